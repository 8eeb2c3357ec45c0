"""What goes into a checkpoint's `state/`, and how it comes back on any layout.

Model and optimizer state are taken per model part with torch's distributed
state-dict helpers, keyed by parameter name (optimizer state flattened to
`state.<param>.<key>`), so DCP can reshard them between any two layouts. Each rank
also stores its RNG state; it is restored when the layout is unchanged.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from megagpt.checkpoint.layout import CheckpointError
from megagpt.parallel.optimizer import Optimizers

OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
TIED_COPY, TIED_SOURCE = "lm_head.weight", "embed_tokens.weight"


def rng_key(rank: int) -> str:
    return f"rank{rank}"


def collect(parts: list[nn.Module], optimizers: Optimizers) -> dict:
    """The state dict to save (and, for loading, the template to fill in place) of a
    train module's parts and optimizers; needs the process group of the run."""
    model_state, optimizer_state = {}, {}
    for part, optimizer in zip(parts, optimizers.optimizers):
        part_model, part_optimizer = get_state_dict(part, optimizer, options=OPTIONS)
        model_state.update(part_model)
        optimizer_state.update(part_optimizer)
    rank = dist.get_rank()
    return {
        "model": model_state,
        "optimizer": optimizer_state,
        "rng": {rng_key(rank): torch.get_rng_state()},
    }


def apply(parts: list[nn.Module], optimizers: Optimizers, state: dict) -> None:
    """Put loaded state (filled in place into a `collect` template) into the model."""
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
            options=OPTIONS,
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


def check_fits(template: dict, stored: dict[str, tuple[int, ...] | None], source) -> None:
    """Raise a CheckpointError listing every model tensor that is missing or differs in
    shape (the global, unsharded shape) between the checkpoint and this model."""
    problems = []
    for key, value in template["model"].items():
        full = f"model.{key}"
        if full not in stored:
            problems.append(f"missing {key}")
        elif stored[full] is not None and tuple(stored[full]) != tuple(value.shape):
            problems.append(
                f"{key}: checkpoint {tuple(stored[full])} vs model {tuple(value.shape)}"
            )
    extra = sorted(
        k[len("model.") :]
        for k in stored
        if k.startswith("model.") and k[len("model.") :] not in template["model"]
    )
    if problems:
        problems += [f"unexpected {k}" for k in extra]
        raise CheckpointError(
            f"{source} does not fit the configured model ({len(problems)} tensors): "
            + "; ".join(problems[:20])
            + (" ..." if len(problems) > 20 else "")
        )
