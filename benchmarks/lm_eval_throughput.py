"""lm-eval requests/s: the `megagpt` adapter against lm-eval's own `hf` backend on the
same model exported to transformers, same tasks, same batch size, on CPU.

(Named lm_eval_throughput.py, not lm_eval.py: a script of that name would shadow the
lm_eval package for `python benchmarks/lm_eval.py`, which puts benchmarks/ first on
the import path.)

- model: megagpt's initialization of a GPT-2-shaped model (--layers, --hidden, --heads),
  with a sentencepiece tokenizer of --vocab pieces trained here on Python's docs; saved
  as a transformers directory (`save_hf`, what `megagpt export hf` writes) for the `hf`
  backend (GPT2LMHeadModel, sdpa) and imported from it as a megagpt checkpoint for the
  adapter (`megagpt import hf`), so both hold the same weights and tokenizer;
- tasks: pydoc_mc (4 choices per question) and pydoc_cloze from
  megagpt.harness.pydoc_tasks (sentences of Python's help topics), --docs each;
- what is timed: `lm.loglikelihood(requests)` over each task's requests as lm-eval builds
  them (tokenizing, batching, forwards, scoring: the model's side of an evaluation),
  alternating megagpt and hf for --rounds rounds; requests/s of each and the ratio of
  each round, then the median. One end-to-end `simple_evaluate` of both tasks each is
  timed too (task building and metrics included), and the answers compared.

    python benchmarks/lm_eval_throughput.py
    python benchmarks/lm_eval_throughput.py --layers 12 --hidden 768 --heads 12 --docs 100
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from megagpt.checkpoint.convert import import_hf, save_hf  # noqa: E402
from megagpt.config import load_config  # noqa: E402
from megagpt.demo_corpus import pydoc_topics  # noqa: E402
from megagpt.harness.pydoc_tasks import write_pydoc_tasks  # noqa: E402
from megagpt.model import build_model  # noqa: E402
from megagpt.tokenizer import Tokenizer  # noqa: E402


def build(directory: Path, args) -> tuple[Path, Path, int]:
    """(megagpt checkpoint, transformers directory, EOD id) of one initialized model."""
    documents = [p.strip() for t in pydoc_topics() for p in t.split("\n\n") if len(p) > 80]
    tokenizer = Tokenizer.train(documents, directory / "tokenizer.model", args.vocab)
    config = load_config(
        None,
        [
            f"model.n_layers={args.layers}",
            f"model.hidden_size={args.hidden}",
            f"model.n_heads={args.heads}",
            f"model.vocab_size={tokenizer.vocab_size}",
            "model.max_seq_len=256",
            "data.seq_len=256",
        ],
    )
    model = build_model(config.model, "cpu", seed=0)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    hf_dir = save_hf(state, config.model, directory / "hf", tokenizer.path)
    checkpoint = import_hf(hf_dir, directory / "megagpt")
    return checkpoint, hf_dir, tokenizer.eod_id


def requests_of(task_path: Path):
    from lm_eval.tasks import TaskManager

    (task,) = TaskManager(include_defaults=False).load([str(task_path)])["tasks"].values()
    task.set_config(key="num_fewshot", value=0)
    task.build_all_requests(limit=None, rank=0, world_size=1)
    return [instance for instance in task.instances for _ in range(instance.repeats)]


def timed(lm, requests) -> tuple[float, list]:
    start = time.perf_counter()
    answers = lm.loglikelihood(requests, disable_tqdm=True)
    return time.perf_counter() - start, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--docs", type=int, default=200, help="documents per task")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from megagpt.harness.adapter import MegagptLM

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, hf_dir, eod = build(Path(tmp), args)
        tasks = write_pydoc_tasks(Path(tmp) / "tasks", count=args.docs)
        ours = MegagptLM(checkpoint=str(checkpoint), batch_size=args.batch_size)
        theirs = HFLM(
            pretrained=str(hf_dir), batch_size=args.batch_size, device="cpu", prefix_token_id=eod
        )
        print(
            f"lm-eval {lm_eval.__version__ if hasattr(lm_eval, '__version__') else ''}, "
            f"torch {torch.__version__}, {args.threads} threads; model {args.layers} layers x "
            f"{args.hidden} wide, vocab {args.vocab}; batch size {args.batch_size}"
        )
        for name in ("pydoc_mc", "pydoc_cloze"):
            requests = requests_of(tasks[name])
            timed(ours, requests[:8]), timed(theirs, requests[:8])  # warm up
            ratios, rates, worst = [], [], 0.0
            for _ in range(args.rounds):
                a, answers_a = timed(ours, requests)
                b, answers_b = timed(theirs, requests)
                ratios.append(b / a)
                rates.append((len(requests) / a, len(requests) / b))
                worst = max(worst, max(abs(x[0] - y[0]) for x, y in zip(answers_a, answers_b)))
            print(
                f"{name}: {len(requests)} requests; megagpt / hf "
                f"{' '.join(f'{r:.2f}' for r in ratios)} -> median {statistics.median(ratios):.2f}x"
                f" ({statistics.median(r[0] for r in rates):.0f} vs "
                f"{statistics.median(r[1] for r in rates):.0f} requests/s; largest difference "
                f"of a log-likelihood {worst:.1e})"
            )
        specs = [str(tasks["pydoc_mc"]), str(tasks["pydoc_cloze"])]
        for label, lm in (("megagpt", ours), ("hf", theirs)):
            start = time.perf_counter()
            lm_eval.simple_evaluate(
                model=lm, tasks=specs, task_manager=TaskManager(include_defaults=False)
            )
            print(
                f"end to end, simple_evaluate of both tasks: {label} "
                f"{time.perf_counter() - start:.1f} s"
            )


if __name__ == "__main__":
    main()
