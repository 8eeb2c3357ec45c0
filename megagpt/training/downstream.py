"""In-loop downstream evaluation: the tasks of eval.tasks, scored every eval.interval steps.

Each task's requests (megagpt.data.tasks) become rows of data.seq_len tokens, read in
global batches as training reads its samples, so every layout scores them (tensor,
pipeline and data parallel; see megagpt.parallel.scoring), each data-parallel replica
its share. The metrics are lm-evaluation-harness's, computed the way it computes them,
and logged as eval/<task>/<metric>: acc and acc_norm (multiple choice), acc and ppl
(cloze), bpb (text).
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np

from megagpt.config import Config, ConfigError
from megagpt.data.tasks import Request, Task, load_task, pair_request, rolling_requests
from megagpt.model.gpt import IGNORE_INDEX
from megagpt.parallel.batches import microbatch_indices, step_batches
from megagpt.parallel.scoring import gather_rows, score_rows
from megagpt.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class RequestRows:
    """Requests as rows of seq_len input tokens, for step_batches (rows past the end
    are padding that scores nothing)."""

    def __init__(self, requests: list[Request], seq_len: int, name: str):
        self.requests, self.seq_len, self.name = requests, seq_len, name

    def __len__(self) -> int:
        return len(self.requests)

    def microbatch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        rows = len(indices)
        inputs = np.zeros((rows, self.seq_len), dtype=np.int64)
        targets = np.full((rows, self.seq_len), IGNORE_INDEX, dtype=np.int64)
        for row, index in enumerate(np.asarray(indices).tolist()):
            if index >= len(self.requests):
                continue
            request = self.requests[index]
            n = len(request.tokens) - 1
            inputs[row, :n] = request.tokens[:-1]
            targets[row, n - request.scored : n] = request.tokens[-request.scored :]
        return {"inputs": inputs, "targets": targets}


class DownstreamEvaluator:
    """The tasks of eval.tasks, encoded once, scored by `evaluate(module)`."""

    def __init__(self, config: Config):
        self.config = config
        if not config.data.tokenizer:
            raise ConfigError("eval.tasks needs data.tokenizer, to encode the tasks' text")
        self.tokenizer = Tokenizer(config.data.tokenizer)
        self.tasks = [load_task(spec) for spec in config.eval.tasks]
        self.requests = {task.name: self._requests(task) for task in self.tasks}

    def _requests(self, task: Task) -> list[Request]:
        window, tok = self.config.data.seq_len, self.tokenizer
        if task.kind == "multiple_choice":
            return [
                pair_request(tok, r["context"], c, window) for r in task.rows for c in r["choices"]
            ]
        if task.kind == "cloze":
            return [pair_request(tok, r["context"], r["continuation"], window) for r in task.rows]
        return [q for r in task.rows for q in rolling_requests(tok, r["text"], window)]

    def evaluate(self, module) -> dict[str, float]:
        started = time.perf_counter()
        metrics = {}
        for task in self.tasks:
            scores = self._score(module, self.requests[task.name], task.name)
            for key, value in task_metrics(task, scores).items():
                metrics[f"eval/{task.name}/{key}"] = value
        log.info(
            "downstream tasks (%.1fs): %s",
            time.perf_counter() - started,
            ", ".join(f"{k.removeprefix('eval/')} {v:.4f}" for k, v in metrics.items()),
        )
        return metrics

    def _score(self, module, requests: list[Request], name: str) -> np.ndarray:
        dataset = RequestRows(requests, self.config.data.seq_len, name)
        rows = self.config.train.global_batch_size
        total = np.zeros((len(requests), 2))
        for step in range(-(-len(requests) // rows)):
            batches = step_batches(dataset, step, module, self.config)
            indices = np.concatenate(microbatch_indices(step, module, self.config))
            local = score_rows(module, batches)
            total += gather_rows(module, local, indices, len(requests)).cpu().numpy()
        return total


def task_metrics(task: Task, scores: np.ndarray) -> dict[str, float]:
    """lm-evaluation-harness's metrics of a task from its requests' (log-likelihood,
    greedy) scores."""
    loglik, greedy = scores[:, 0], scores[:, 1]
    if task.kind == "multiple_choice":
        right = right_norm = 0
        start = 0
        for row in task.rows:
            choices = row["choices"]
            values = loglik[start : start + len(choices)]
            lengths = np.array([float(len(c)) for c in choices])
            right += int(np.argmax(values) == row["answer"])
            right_norm += int(np.argmax(values / lengths) == row["answer"])
            start += len(choices)
        return {"acc": right / len(task.rows), "acc_norm": right_norm / len(task.rows)}
    if task.kind == "cloze":
        return {"acc": float(greedy.mean()), "ppl": math.exp(-float(loglik.mean()))}
    text_bytes = sum(len(row["text"].encode("utf-8")) for row in task.rows)
    return {"bpb": -float(loglik.sum()) / (text_bytes * math.log(2))}
