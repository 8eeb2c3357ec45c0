"""Checking lm-eval tasks before a model loads: the library, the YAML files, their data,
their metrics, and whether the checkpoint's tokenizer can encode their text.

A task is a name lm-eval knows (hellaswag, lambada_openai: their data comes from the
Hugging Face Hub, or its cache when HF_DATASETS_OFFLINE=1) or the path of a task YAML.
A local task needs no network:

    task: pydoc_mc
    dataset_path: json
    dataset_kwargs:
      data_files: {test: /abs/path/pydoc_mc.jsonl}
    test_split: test
    output_type: multiple_choice
    doc_to_text: "{{context}}"
    doc_to_choice: "{{choices}}"
    doc_to_target: "{{answer}}"
    target_delimiter: ""
    metric_list: [{metric: acc}, {metric: acc_norm}]

lm-eval renders a field the rows lack as empty text and fetches a metric it does not
ship from the Hub (HF Evaluate); both are refused here, naming the file and the key.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path

from megagpt.errors import MegagptError
from megagpt.tokenizer import Tokenizer

SUPPORTED_LM_EVAL = ">=0.4.13,<0.5"
"""The lm-eval versions the adapter is written against (the `eval` extra pins 0.4.13)."""

OUTPUT_TYPES = ("loglikelihood", "loglikelihood_rolling", "multiple_choice", "generate_until")
TEMPLATE_KEYS = ("doc_to_text", "doc_to_target", "doc_to_choice")
LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")
"""dataset_path values that read local data_files with a `datasets` packaged builder."""


class TaskError(MegagptError):
    """A task cannot be evaluated as written: the message names the file and the key."""


class LmEvalMissingError(MegagptError):
    """lm-evaluation-harness is not installed, or not a version the adapter supports."""


def require_lm_eval() -> str:
    """The installed lm-eval version, if the adapter supports it; else a one-line error."""
    try:
        version = metadata.version("lm-eval")
    except metadata.PackageNotFoundError:
        raise LmEvalMissingError(
            "lm-evaluation-harness is not installed: pip install megagpt[eval]"
        ) from None
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    if Version(version) not in SpecifierSet(SUPPORTED_LM_EVAL):
        raise LmEvalMissingError(
            f"lm-eval {version} is installed; megagpt's adapter needs lm-eval"
            f"{SUPPORTED_LM_EVAL}: pip install megagpt[eval]"
        )
    return version


def split_task_specs(tasks: str | Sequence[str]) -> list[str]:
    """`hellaswag,lambada_openai,path/to/task.yaml` (or a list of such) as a list."""
    items = [tasks] if isinstance(tasks, str) else list(tasks)
    specs = [s.strip() for item in items for s in item.split(",") if s.strip()]
    if not specs:
        raise TaskError("--tasks names no task: give lm-eval task names or task YAML paths")
    return specs


def is_task_file(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml")) or Path(spec).is_file()


def check_task_files(specs: Iterable[str]) -> None:
    """Check every task YAML among `specs` without building it (see the module
    docstring); names are left to lm-eval."""
    for spec in specs:
        if is_task_file(spec):
            check_task_file(Path(spec))


def read_task_yaml(path: Path) -> dict:
    """The YAML's settings, `include`s merged, `!function` tags kept as text."""
    import yaml
    from lm_eval.tasks._yaml_loader import load_yaml

    if not path.is_file():
        raise TaskError(f"{path}: no such task file")
    try:
        return load_yaml(path, resolve_func=False)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise TaskError(f"{path}: not valid YAML{where}: {problem}") from None
    except (ValueError, OSError) as error:
        raise TaskError(f"{path}: {error}") from None


def check_task_file(path: Path) -> None:
    """One task YAML: it parses, says its output_type, names data files that exist and
    hold the fields its templates use, and asks only for metrics lm-eval ships."""
    config = read_task_yaml(path)
    if "task" not in config:
        raise TaskError(f"{path}: no `task:` key (the task's name)")
    if isinstance(config["task"], list) or "group" in config:
        return  # a group: its tasks are checked by lm-eval when it builds them
    output_type = config.get("output_type")
    if output_type not in OUTPUT_TYPES:
        raise TaskError(
            f"{path}: output_type = {output_type!r}: set one of {', '.join(OUTPUT_TYPES)}"
        )
    _check_metrics(path, config)
    files = _data_files(path, config)
    if config.get("process_docs") is None:  # a function may add or rename fields
        _check_fields(path, config, files)


def _check_metrics(path: Path, config: dict) -> None:
    if config.get("process_results") is not None:
        return  # the task's own function computes its metrics
    import lm_eval.api.metrics  # noqa: F401 (registers the metrics lm-eval ships)
    from lm_eval.api.registry import metric_registry

    builtin = sorted(metric_registry)
    for index, entry in enumerate(config.get("metric_list") or []):
        name = entry.get("metric") if isinstance(entry, dict) else None
        if not isinstance(name, str):
            continue
        if entry.get("hf_evaluate") or name not in metric_registry:
            raise TaskError(
                f"{path}: metric_list[{index}].metric = {name!r} is not built into lm-eval, "
                "which would download it from the Hugging Face Hub (HF Evaluate); evaluation "
                f"here never downloads. Use one of: {', '.join(builtin)}"
            )


def _data_files(path: Path, config: dict) -> dict[str, list[Path]]:
    """{split: files} of a task reading local files; every file must exist."""
    if config.get("dataset_path") not in LOCAL_BUILDERS:
        return {}
    data_files = (config.get("dataset_kwargs") or {}).get("data_files")
    if data_files is None:
        raise TaskError(
            f"{path}: dataset_path = {config['dataset_path']!r} needs "
            "dataset_kwargs.data_files, e.g. {test: /abs/path/rows.jsonl}"
        )
    if not isinstance(data_files, dict):
        data_files = {"train": data_files}  # how `datasets` names an unnamed split
    files: dict[str, list[Path]] = {}
    for split, names in data_files.items():
        for name in [names] if isinstance(names, str) else list(names):
            file = Path(os.path.expanduser(name))
            if not file.is_file():
                raise TaskError(
                    f"{path}: dataset_kwargs.data_files.{split} = {name!r}: no such file "
                    f"(a relative path is read from the current directory, {Path.cwd()}; "
                    "give an absolute path)"
                )
            files.setdefault(split, []).append(file)
    return files


def template_fields(template) -> set[str]:
    """The document fields a doc_to_* setting reads: the free variables of a Jinja
    template (or of each template in a list); none for an index or a function."""
    if isinstance(template, list):
        return set().union(*(template_fields(t) for t in template)) if template else set()
    if not isinstance(template, str) or not re.search(r"{{|{%", template):
        return set()
    import jinja2
    import jinja2.meta

    try:
        return set(jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(template)))
    except jinja2.TemplateSyntaxError:
        return set()  # lm-eval reports it with the task's name


def _rows(file: Path) -> Iterable[tuple[int, dict]]:
    """(row number, row) of a JSON Lines file, or of a JSON file holding a list."""
    if file.suffix not in (".json", ".jsonl"):
        return
    text = file.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
        rows = data if isinstance(data, list) else None
    except ValueError:
        rows = None
    if rows is None:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append((number, json.loads(line)))
                except ValueError as error:
                    raise TaskError(f"{file}:{number}: not a JSON row ({error})") from None
        yield from rows
        return
    yield from enumerate(rows, start=1)


def _check_fields(path: Path, config: dict, files: dict[str, list[Path]]) -> None:
    needed = {key: template_fields(config.get(key)) for key in TEMPLATE_KEYS}
    used_splits = {
        config.get(key)
        for key in ("test_split", "validation_split", "training_split", "fewshot_split")
    }
    for split, split_files in files.items():
        if split not in used_splits:
            continue
        for file in split_files:
            for number, row in _rows(file):
                if not isinstance(row, dict):
                    raise TaskError(f"{file}: row {number} is not a JSON object")
                for key, fields in needed.items():
                    missing = sorted(fields - row.keys())
                    if missing:
                        raise TaskError(
                            f"{path}: {key} uses the field {missing[0]!r}, which row {number} "
                            f"of {file} lacks (its fields: {', '.join(sorted(row)) or 'none'})"
                        )


# ---------------------------------------------------------------------- tokenizer
def can_emit_unknown(tokenizer: Tokenizer) -> bool:
    """Whether some text encodes to the unknown id: a vocabulary without byte pieces
    (sentencepiece's byte_fallback, byte-level BPE) and with an unknown token."""
    return tokenizer.unk_id is not None and tokenizer.piece_to_id("<0x00>") is None


def task_texts(task, limit: int | float | None, num_fewshot: int) -> Iterable[tuple[str, str]]:
    """(where, text) of every text an lm-eval Task will put before the model: each
    evaluated document's doc_to_text, doc_to_target and doc_to_choice, and those of
    the few-shot documents."""
    docs = list(task.eval_docs)
    if limit is not None:
        docs = docs[: int(limit if limit >= 1 else len(docs) * limit)]
    sources = [("document", docs)]
    if num_fewshot:  # the examples put before each question
        sources.append(("few-shot document", list(task.fewshot_docs() or [])))
    has_choices = task.config.doc_to_choice is not None
    for kind, rows in sources:
        for number, doc in enumerate(rows):
            for key in TEMPLATE_KEYS:
                if key == "doc_to_choice" and not has_choices:
                    continue
                value = getattr(task, key)(doc)
                for text in value if isinstance(value, list) else [value]:
                    if isinstance(text, str):
                        yield f"{key} of {kind} {number}", text


def check_tokenizer_covers(
    tasks: dict, tokenizer: Tokenizer, sources: dict[str, str], limit, num_fewshot: int | None
) -> None:
    """Every text of `tasks` ({name: lm-eval Task}) encodes without the unknown id.

    Args:
        sources: {task name: the YAML or name it came from}, for the message.
    """
    if not can_emit_unknown(tokenizer):
        return
    for name, task in tasks.items():
        shots = num_fewshot if num_fewshot is not None else task.config.num_fewshot or 0
        for where, text in task_texts(task, limit, shots):
            if tokenizer.unk_id not in tokenizer.encode(text):
                continue
            unknown = sorted({c for c in text if tokenizer.unk_id in tokenizer.encode(c)})
            shown = ", ".join(f"{c!r} (U+{ord(c):04X})" for c in unknown[:5]) or repr(text[:60])
            raise TaskError(
                f"{sources.get(name, name)}: task {name}, {where}: the checkpoint's tokenizer "
                f"({tokenizer.path}) has no token for {shown} and no byte fallback, so the "
                "model could only score it as <unk>; evaluate with a tokenizer that covers "
                "the task's text, or remove those characters from the data"
            )
