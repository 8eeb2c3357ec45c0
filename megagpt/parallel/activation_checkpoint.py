"""Activation checkpointing: recompute block activations in backward to save memory.

full: keep only each block's input; recompute the whole block in backward (about a
third more compute). selective: keep the outputs of matmuls, attention and
collectives, recompute only the cheap element-wise work (norms, activations, dropout,
residual adds), which is most of the memory for a fraction of the compute.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from megagpt.model.gpt import GPT


def _ops_to_save() -> set:
    aten = torch.ops.aten
    ops = {aten.mm.default, aten.addmm.default, aten.bmm.default}
    for name in (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    ):
        if hasattr(aten, name):
            ops.add(getattr(aten, name).default)
    # Recomputing a collective would repeat communication: keep tensor-parallel results.
    c10d = torch.ops._c10d_functional
    for name in ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor"):
        if hasattr(c10d, name):
            ops.add(getattr(c10d, name).default)
    return ops


def _selective_policy(saved_ops, _ctx, op, *_args, **_kwargs):
    return CheckpointPolicy.MUST_SAVE if op in saved_ops else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(part: GPT, mode: str) -> None:
    if mode == "none":
        return
    if mode == "full":
        part.checkpoint_fn = functools.partial(checkpoint, use_reentrant=False)
        return
    policy = functools.partial(_selective_policy, _ops_to_save())
    part.checkpoint_fn = functools.partial(
        checkpoint,
        use_reentrant=False,
        context_fn=functools.partial(create_selective_checkpoint_contexts, policy),
    )
