"""`megagpt eval --tasks`: lm-evaluation-harness tasks on a checkpoint, results beside it.

Everything that can be wrong with the request is checked before the model loads: lm-eval
is installed, every task YAML parses and reads local data that holds the fields its
templates use, no metric would need the network, and the checkpoint's tokenizer encodes
every text the tasks will show the model. Then the model is built on this process's
layout, lm-eval runs its tasks through the `megagpt` adapter, and the first rank writes

    <checkpoint>/eval/<YYYYmmdd-HHMMSS>/results.json       lm-eval's results (no samples)
    <checkpoint>/eval/<YYYYmmdd-HHMMSS>/samples_<task>.jsonl  one line per document

(or under `output`, when given).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from megagpt.harness.model import checkpoint_tokenizer, evaluation_config, load_evaluation_model
from megagpt.harness.tasks import (
    TaskError,
    check_task_files,
    check_tokenizer_covers,
    is_task_file,
    require_lm_eval,
    split_task_specs,
)
from megagpt.parallel import shutdown_distributed

log = logging.getLogger(__name__)


def load_tasks(specs: Sequence[str]):
    """lm-eval's TaskManager and the tasks of `specs` ({"tasks": {name: Task}, ...}).
    lm-eval's own task index (~15k YAML files) is read only if some spec is a name."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_defaults=not all(is_task_file(s) for s in specs))
    try:
        return manager, manager.load(list(specs))
    except KeyError as error:
        raise TaskError(
            f"--tasks: {error.args[0] if error.args else error}; give lm-eval task names "
            "(lm-eval ls tasks) or paths of task YAML files"
        ) from None


def task_sources(loaded: dict, specs: Sequence[str]) -> dict[str, str]:
    """{task name: the spec it came from}: a YAML path where one was given."""
    named = {_yaml_task(s): s for s in specs if is_task_file(s)}
    return {name: named.get(name, name) for name in loaded["tasks"]}


def _yaml_task(spec: str) -> str | None:
    from megagpt.harness.tasks import read_task_yaml

    task = read_task_yaml(Path(spec)).get("task")
    return task if isinstance(task, str) else None


def evaluate_tasks(
    checkpoint: str,
    tasks: str | Sequence[str],
    num_fewshot: int | None = None,
    limit: float | None = None,
    batch_size: int = 8,
    overrides: Sequence[str] = (),
    device: str = "cpu",
    output: str | Path | None = None,
    bootstrap_iters: int = 100_000,
) -> dict | None:
    """Run lm-eval `tasks` on `checkpoint` on this process's layout (see the module
    docstring); lm-eval's results dict on the first rank (samples left out), None on
    the others.

    Args:
        tasks: Task names or task YAML paths, comma-separated or a list.
        num_fewshot: Examples before each question (default: each task's own).
        limit: Documents per task (a fraction if below 1; for quick checks).
        batch_size: Sequences per forward; the results do not depend on it.
        overrides: Settings on top of the checkpoint's config (a layout).
        output: Directory for the results (default <checkpoint>/eval/<time>/).
        bootstrap_iters: lm-eval's resamples for the standard error of metrics that
            are not plain means (0: none).
    """
    version = require_lm_eval()
    specs = split_task_specs(tasks)
    check_task_files(specs)
    directory, config = evaluation_config(checkpoint, overrides, device)
    tokenizer = checkpoint_tokenizer(directory, config)
    manager, loaded = load_tasks(specs)
    check_tokenizer_covers(
        loaded["tasks"], tokenizer, task_sources(loaded, specs), limit, num_fewshot
    )
    import lm_eval

    from megagpt.harness.adapter import MegagptLM

    model = load_evaluation_model(directory, config)
    try:
        results = lm_eval.simple_evaluate(
            model=MegagptLM(model=model, batch_size=batch_size),
            tasks=specs,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=True,
            bootstrap_iters=bootstrap_iters,
        )
        if model.env.rank != 0 or results is None:
            return None
        results["config"]["lm_eval_version"] = version
        out = Path(output) if output else directory / "eval" / time.strftime("%Y%m%d-%H%M%S")
        write_results(results, out)
        results["output_dir"] = str(out)
        return results
    finally:
        shutdown_distributed(model.env)


def write_results(results: dict, out: Path) -> None:
    """results.json and one samples_<task>.jsonl per task (lm-eval's per-document logs)."""
    from lm_eval.utils import handle_non_serializable

    out.mkdir(parents=True, exist_ok=True)
    samples = results.pop("samples", None) or {}
    text = json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)
    (out / "results.json").write_text(text + "\n")
    for task, rows in samples.items():
        with open(out / f"samples_{task}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, default=handle_non_serializable, ensure_ascii=False))
                f.write("\n")
    results["samples"] = samples
    log.info("wrote %s", out)


def format_results(results: dict) -> str:
    """lm-eval's results table (markdown), and where they were written."""
    from lm_eval.utils import make_table

    table = make_table(results)
    return f"{table}\nresults and per-document samples: {results['output_dir']}"
