"""`megagpt import deepspeed`: a DeepSpeed checkpoint written by other tools, as a
megagpt checkpoint with its AdamW state, resumable on any layout and either engine.

DeepSpeed's own universal-checkpoint conversion (`deepspeed.checkpoint.ds_to_universal`)
does the unsharding: it merges every rank's ZeRO partitions into one folder per
parameter (fp32 weights, exp_avg, exp_avg_sq, step), whatever data-parallel size
wrote them. Those folders hold plain tensors and are read with weights_only=True.
The checkpoint itself is DeepSpeed's pickles, which the conversion unpickles: loading
a pickle can run code, so the user says the checkpoint is trusted (--trust-pickles).

Parameter names are megagpt's (a DeepSpeed run of megagpt's GPT) or Hugging Face's
GPT-2/Llama names (e.g. a transformers Trainer run with DeepSpeed), which are mapped
as `megagpt import hf` maps them; the moments are rearranged like the weights.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from megagpt.checkpoint.convert import write_weights_checkpoint
from megagpt.checkpoint.layout import CheckpointError
from megagpt.checkpoint.state import TIED_COPY, TIED_SOURCE
from megagpt.config import Config
from megagpt.model import hf
from megagpt.model.build import build_meta_model

log = logging.getLogger(__name__)
KINDS = ("fp32", "exp_avg", "exp_avg_sq")


def step_folder(directory: Path) -> Path:
    """The `global_stepN` folder a DeepSpeed checkpoint directory points at (its
    `latest` file), or the directory itself when it is one."""
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory")
    if re.fullmatch(r"global_step\d+", directory.name):
        return directory
    latest = directory / "latest"
    if latest.is_file():
        folder = directory / latest.read_text().strip()
        if folder.is_dir():
            return folder
        raise CheckpointError(f"{latest} names {folder.name}, which {directory} lacks")
    raise CheckpointError(
        f"{directory} is not a DeepSpeed checkpoint: it has no `latest` file and is not a "
        "global_stepN folder (pass the directory given to engine.save_checkpoint)"
    )


def universal_tensors(folder: Path, workdir: Path) -> tuple[dict[str, dict], int]:
    """DeepSpeed's universal conversion of `folder`: {kind: {name: tensor}} and AdamW's
    step count."""
    universal = workdir / "universal"
    command = [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(folder),
        "--output_folder",
        str(universal),
        "--num_extract_workers",
        "1",
        "--num_merge_workers",
        "1",
        "--inject_missing_state",  # checkpoints not written by Megatron-DeepSpeed
    ]
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    log.info("converting %s with DeepSpeed's ds_to_universal", folder)
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise CheckpointError(f"DeepSpeed's universal conversion of {folder} failed:\n{tail}")
    tensors: dict[str, dict] = {kind: {} for kind in KINDS}
    steps = []
    for param_dir in sorted((universal / "zero").iterdir()):
        if not param_dir.is_dir():
            continue
        for kind in KINDS:
            path = param_dir / f"{kind}.pt"
            if path.is_file():
                tensors[kind][param_dir.name] = torch.load(path, weights_only=True)["param"]
        if (param_dir / "step.pt").is_file():
            steps.append(int(torch.load(param_dir / "step.pt", weights_only=True)))
    return tensors, max(steps, default=0)


def to_megagpt_names(state: dict[str, torch.Tensor], config: Config) -> dict[str, torch.Tensor]:
    """`state` under megagpt's parameter names (Hugging Face names are mapped)."""
    if any(k.startswith(("transformer.", "model.")) for k in state):
        return hf.from_hf(state, config.model)
    if TIED_COPY not in state and TIED_SOURCE in state and config.model.tie_embeddings:
        state = {**state, TIED_COPY: state[TIED_SOURCE]}
    return state


def check_shapes(weights: dict[str, torch.Tensor], config: Config, source: Path) -> None:
    expected = {k: tuple(v.shape) for k, v in build_meta_model(config.model).state_dict().items()}
    problems = [f"missing {k}" for k in expected if k not in weights]
    problems += [
        f"{k}: checkpoint {tuple(weights[k].shape)} vs model {shape}"
        for k, shape in expected.items()
        if k in weights and tuple(weights[k].shape) != shape
    ]
    problems += [f"unexpected {k}" for k in weights if k not in expected]
    if problems:
        raise CheckpointError(
            f"{source} does not fit the configured model ({len(problems)} tensors differ): "
            + "; ".join(problems[:12])
            + ". Give the model's shape with --config and overrides (model.*)"
        )


def import_deepspeed(
    directory: str | Path, out: str | Path, config: Config, trust_pickles: bool = False
) -> Path:
    """Write the DeepSpeed checkpoint in `directory` as a megagpt checkpoint (weights,
    AdamW moments and step) under <out>/checkpoints; return its directory."""
    folder = step_folder(Path(directory))
    if not trust_pickles:
        raise CheckpointError(
            f"{folder} holds DeepSpeed's pickled files, and unpickling can run code: pass "
            "--trust-pickles if this checkpoint was written by you or someone you trust"
        )
    with tempfile.TemporaryDirectory() as tmp:
        tensors, adam_steps = universal_tensors(folder, Path(tmp))
    weights = to_megagpt_names(tensors["fp32"], config)
    check_shapes(weights, config, folder)
    optimizer = {}
    if all(tensors[kind] for kind in ("exp_avg", "exp_avg_sq")):
        moments = {kind: to_megagpt_names(tensors[kind], config) for kind in KINDS[1:]}
        for name, _ in build_meta_model(config.model).named_parameters():
            for kind in KINDS[1:]:
                optimizer[f"state.{name}.{kind}"] = moments[kind][name]
            optimizer[f"state.{name}.step"] = torch.tensor(float(adam_steps))
    schedule_step = int(re.findall(r"\d+", folder.name)[-1]) if folder.name[-1].isdigit() else 0
    log.info(
        "%s: %d tensors, AdamW state %s, step %d",
        folder,
        len(weights),
        "included" if optimizer else "absent (the optimizer will start fresh)",
        schedule_step,
    )
    return write_weights_checkpoint(
        weights,
        config,
        Path(out) / "checkpoints",
        {"imported_from": str(folder.resolve()), "imported_with": "deepspeed ds_to_universal"},
        optimizer=optimizer or None,
        step=schedule_step,
    )
