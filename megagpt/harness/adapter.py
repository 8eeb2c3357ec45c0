"""lm-evaluation-harness's `megagpt` model: a megagpt checkpoint on any layout.

    import megagpt.harness.adapter  # registers "megagpt" with lm-eval
    lm_eval.simple_evaluate(model="megagpt", model_args="checkpoint=runs/x", tasks=[...])

(or `megagpt eval --checkpoint DIR --tasks ...`, which also checks the tasks first and
writes the results beside the checkpoint). lm-eval shares requests out by `rank` and
`world_size`; here those are the data-parallel replica and the number of replicas, so
the tensor- and pipeline-parallel ranks of a replica receive the same requests and run
each forward together (megagpt.parallel.inference).

Text is encoded as in training: no BOS, and EOD (the id that separates training
documents) is the token before a text that has no context (`prefix_token_id`). To compare
with lm-eval's `hf` backend on an exported model, give it the same prefix:
`prefix_token_id=<EOD id>`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

import torch.distributed as dist
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)

from megagpt.config import ConfigError
from megagpt.generate import Sampling
from megagpt.harness.generation import Stops, generate_batch
from megagpt.harness.model import EvaluationModel, evaluation_config, load_evaluation_model
from megagpt.harness.scoring import loglikelihoods

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 8


@register_model("megagpt")
class MegagptLM(TemplateLM):
    """A megagpt checkpoint as an lm-eval model.

    Args:
        checkpoint: A checkpoint directory, checkpoints/ root or run directory (not
            needed with `model`).
        batch_size: Sequences per forward: contexts (each with its continuations) for
            log-likelihoods, as many rows of the longest length (shorter rows fill
            that many tokens), prompts for generation. Results do not depend on it.
        device: cpu, cuda or auto (a GPU index is ignored: each process uses the GPU of
            its LOCAL_RANK).
        overrides: Settings on top of the checkpoint's config, space-separated or a
            list (a layout: parallel.tensor_parallel_size=2 ...).
        max_gen_toks: New tokens per generation when a task does not say.
        model: An already loaded model (see megagpt.harness.model).
    """

    def __init__(
        self,
        checkpoint: str | None = None,
        batch_size: int | str | None = DEFAULT_BATCH_SIZE,
        device: str | None = None,
        overrides: str | Sequence[str] = (),
        max_gen_toks: int = 256,
        model: EvaluationModel | None = None,
        **unused,
    ):
        super().__init__()
        if model is None:
            if not checkpoint:
                raise ConfigError("the megagpt model needs checkpoint=DIR in its model_args")
            if isinstance(overrides, str):
                overrides = overrides.split()
            # lm-eval passes "cuda:0" and the like; each rank takes its LOCAL_RANK's GPU.
            device = (device or "cpu").split(":")[0]
            directory, config = evaluation_config(checkpoint, overrides, device)
            model = load_evaluation_model(directory, config)
        if batch_size in (None, "auto"):
            batch_size = DEFAULT_BATCH_SIZE
        if int(batch_size) < 1:
            raise ConfigError(f"batch_size = {batch_size}: must be at least 1")
        self.model = model
        self.runner = model.runner
        self.text_tokenizer = model.tokenizer
        self._batch_size = int(batch_size)
        self._max_gen_toks = int(max_gen_toks)

    # ------------------------------------------------------------------ identity
    @property
    def eot_token_id(self) -> int:
        return self.text_tokenizer.eod_id

    @property
    def prefix_token_id(self) -> int:
        return self.text_tokenizer.eod_id

    @property
    def max_length(self) -> int:
        return self.runner.config.max_seq_len

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self):
        return self.runner.device

    @property
    def rank(self) -> int:
        return self.runner.replica_rank

    @property
    def world_size(self) -> int:
        return self.runner.replicas

    @property
    def tokenizer_name(self) -> str:
        return str(self.text_tokenizer.path).replace("/", "__")

    def all_gather(self, tensor):
        return self.runner.all_gather(tensor)

    def gather_object(self, obj, dst=0):
        return self.runner.gather_object(obj, dst)

    def barrier(self) -> None:
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()

    def get_model_info(self) -> dict:
        return {"checkpoint": str(self.model.directory), "step": self.model.step}

    # ------------------------------------------------------------------ text
    def tok_encode(self, string: str, add_special_tokens=None, left_truncate_len=None, **kwargs):
        ids = self.text_tokenizer.encode(string)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.text_tokenizer.decode(list(tokens))

    # ------------------------------------------------------------------ requests
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        pairs = [(context, continuation) for _, context, continuation in requests]
        answers = loglikelihoods(self.runner, pairs, self.batch_size, pad_id=self.eot_token_id)
        for (request_str, _, _), answer in zip(requests, answers):
            if request_str is not None:  # rolling windows are cached per document instead
                self.cache_hook.add_partial("loglikelihood", request_str, answer)
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood, in windows of max_length that predict every token
        once, the first after prefix_token_id (lm-eval's definition)."""
        windows, owners = [], []
        for index, (text,) in enumerate(request.args for request in requests):
            pieces = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for context, continuation in map(lm_utils.make_disjoint_window, pieces):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (loglikelihood, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += loglikelihood
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, if the task asks) continuations, stopped at the task's stop
        strings, EOD or max_gen_toks; requests with the same settings are batched,
        longest prompt first."""
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            key = json.dumps(request.args[1], sort_keys=True, default=str)
            groups.setdefault(key, []).append(index)
        texts: list[str] = [""] * len(requests)
        for indices in groups.values():
            settings = normalize_gen_kwargs(requests[indices[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(settings.pop("until", None), eos=None)
            max_new = int(settings.pop("max_gen_toks"))
            if max_new >= self.max_length:
                raise ConfigError(
                    f"max_gen_toks = {max_new} leaves no room for a prompt: the model takes "
                    f"{self.max_length} positions (model.max_seq_len)"
                )
            sampling = Sampling(
                temperature=float(settings.get("temperature", 0.0)) if settings["do_sample"] else 0,
                top_k=settings.get("top_k"),
                top_p=settings.get("top_p"),
                seed=settings.get("seed", 1234),
            )
            prompts = {
                i: self.tok_encode(requests[i].args[0], left_truncate_len=self.max_length - max_new)
                or [self.prefix_token_id]
                for i in indices
            }
            order = sorted(indices, key=lambda i: (-len(prompts[i]), i))
            stops = Stops(ids={self.eot_token_id}, texts=until, decode=self.tok_decode)
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                outputs = generate_batch(
                    self.runner,
                    [prompts[i] for i in chunk],
                    max_new,
                    stops,
                    sampling,
                    pad_id=self.eot_token_id,
                )
                for i, ids in zip(chunk, outputs):
                    text = postprocess_generated_text(self.tok_decode(ids), until, None)
                    texts[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return texts
