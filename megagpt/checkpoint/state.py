"""What goes into a checkpoint's `state/`, and how it comes back on any layout.

Model and optimizer state are taken per model part with torch's distributed
state-dict helpers, keyed by parameter name (optimizer state flattened to
`state.<param>.<key>`), so DCP can reshard them between any two layouts. Each rank
also stores its RNG state; it is restored when the layout is unchanged. Frozen
parameters are left out: a LoRA run saves only its adapters (see checkpoint/lora.py).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from megagpt.checkpoint.layout import CheckpointError
from megagpt.checkpoint.safe_dcp import SafeFileSystemReader, SafeLoadPlanner
from megagpt.parallel.optimizer import Optimizers

log = logging.getLogger(__name__)
OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
FROZEN_LEFT_OUT = StateDictOptions(flatten_optimizer_state_dict=True, strict=False)
"""For a part with frozen parameters (a LoRA run's base weights): only what is trained
is saved and loaded; the frozen weights come from their own checkpoint."""


def frozen_names(part: nn.Module) -> set[str]:
    """Names of the frozen parameters, under every name (a tied matrix has two: torch's
    ignore_frozen_params would keep lm_head.weight)."""
    return {n for n, p in part.named_parameters(remove_duplicate=False) if not p.requires_grad}


def options_for(part: nn.Module) -> StateDictOptions:
    return FROZEN_LEFT_OUT if frozen_names(part) else OPTIONS


TIED_COPY, TIED_SOURCE = "lm_head.weight", "embed_tokens.weight"


def rng_key(rank: int) -> str:
    return f"rank{rank}"


def collect(parts: list[nn.Module], optimizers: Optimizers) -> dict:
    """The state dict to save (and, for loading, the template to fill in place) of a
    train module's parts and optimizers; needs the process group of the run. An engine
    that keeps its own partitions (DeepSpeed) writes the same entries itself."""
    if hasattr(optimizers, "collect_state"):
        return optimizers.collect_state(parts)
    model_state, optimizer_state = {}, {}
    for part, optimizer in zip(parts, optimizers.optimizers):
        part_model, part_optimizer = get_state_dict(part, optimizer, options=options_for(part))
        frozen = frozen_names(part)
        model_state.update({k: v for k, v in part_model.items() if k not in frozen})
        optimizer_state.update(part_optimizer)
    rank = dist.get_rank()
    return {
        "model": model_state,
        "optimizer": optimizer_state,
        "rng": {rng_key(rank): torch.get_rng_state()},
    }


def apply(parts: list[nn.Module], optimizers: Optimizers, state: dict) -> None:
    """Put loaded state (filled in place into a `collect` template) into the model."""
    if hasattr(optimizers, "apply_state"):
        optimizers.apply_state(parts, state)
        return
    for part, optimizer in zip(parts, optimizers.optimizers):
        names = set(dict(part.named_parameters(remove_duplicate=False))) | set(part.state_dict())
        part_model = {k: v for k, v in state["model"].items() if k in names}
        part_optimizer = {
            k: v
            for k, v in state["optimizer"].items()
            if k.split(".", 1)[1].rsplit(".", 1)[0] in names
        }
        set_state_dict(
            part,
            optimizer,
            model_state_dict=part_model,
            optim_state_dict=part_optimizer,
            options=options_for(part),
        )
    rng = state.get("rng", {})
    rank = dist.get_rank()
    if rng_key(rank) in rng:
        torch.set_rng_state(rng[rng_key(rank)])


def stored_name(name: str, stored: dict, tie_embeddings: bool) -> str | None:
    """The name under which checkpoint entry `name` was stored, or None if absent.

    The last pipeline stage holds its own copy of a tied embedding as lm_head.weight;
    a checkpoint from a layout without that stage keeps the matrix's optimizer state
    under embed_tokens.weight only.
    """
    if name in stored:
        return name
    if tie_embeddings and TIED_COPY in name:
        source = name.replace(TIED_COPY, TIED_SOURCE)
        if source in stored:
            return source
    return None


def check_fits(
    expected: dict[str, tuple[int, ...]],
    stored: dict[str, tuple[int, ...] | None],
    source,
    tie_embeddings: bool,
    partial: bool = False,
    new_heads: tuple[str, ...] = (),
) -> set[str]:
    """Compare the whole model's tensors (`expected`: name -> global shape) with the
    checkpoint's. Any tensor missing on either side, or of another shape, is a
    CheckpointError listing them all; with `partial`, those differences are logged
    instead and their names returned, to be left as initialized. Tensors under the
    `new_heads` prefixes may be missing (a head a fine-tune adds): they are returned,
    to keep their initial values, without complaint."""
    problems, skipped = [], set()
    for key, shape in expected.items():
        name = stored_name(f"model.{key}", stored, tie_embeddings)
        if name is None and key.startswith(new_heads):
            log.info("%s has no %s: a new head, starting from its initial values", source, key)
            skipped.add(key)
        elif name is None:
            problems.append(f"missing {key}")
            skipped.add(key)
        elif stored[name] is not None and tuple(stored[name]) != tuple(shape):
            problems.append(f"{key}: checkpoint {tuple(stored[name])} vs model {tuple(shape)}")
            skipped.add(key)
    problems += sorted(
        f"unexpected {k[len('model.') :]}"
        for k in stored
        if k.startswith("model.") and k[len("model.") :] not in expected
    )
    if not problems:
        return skipped
    listing = "; ".join(problems[:20]) + (" ..." if len(problems) > 20 else "")
    if partial:
        log.warning(
            "checkpoint.partial_load: %s differs from the model in %d tensors (%s); "
            "the model's own initial values are kept for those, and the optimizer starts "
            "fresh",
            source,
            len(problems),
            listing,
        )
        return skipped
    raise CheckpointError(
        f"{source} does not fit the configured model ({len(problems)} tensors differ): "
        f"{listing}. Resume with the model the checkpoint was trained with (its "
        "config.yaml), or set checkpoint.partial_load=true to load only the tensors "
        "that match"
    )


def load_into(
    parts: list[nn.Module], optimizers: Optimizers | None, state: dict, request: dict, state_dir
) -> None:
    """Read `request` (views into `state`) from a checkpoint's DCP files, then put it in
    place: the whole training state, or the weights alone when there are no optimizers."""
    dcp.load(request, storage_reader=SafeFileSystemReader(state_dir), planner=SafeLoadPlanner())
    if optimizers is not None:
        apply(parts, optimizers, state)
        return
    for part in parts:
        set_model_state_dict(part, state["model"], options=StateDictOptions(strict=False))
