"""Calibration from megagpt itself: activation bytes per token, measured on the real GPT.

One process runs a forward of the model (scaled down, see `calibration_model`) and
attributes every tensor saved for backward (saved-tensor hooks; each storage once,
parameters excluded) to the module saving it, then to a role of ROLE_SCALE. What the
activation-checkpointing modes keep instead is measured on the same forward:

  none       everything the hooks see.
  selective  what the checkpoint's policy keeps: the outputs of matmuls, attention and
             collectives (recorded by a dispatch mode, by role), plus the block's input;
             in backward one block's other activations are rebuilt (transient).
  full       each block's input; in backward one whole block is rebuilt (transient).

The embedding and output layer are never checkpointed, so `first` and `last` are
the same in every mode. And the CPU's matmul rate, for planning on this machine.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megagpt.config import ModelConfig
from megagpt.model.build import build_model
from megagpt.model.moe import MoE
from megagpt.parallel.activation_checkpoint import _ops_to_save
from megagpt.planning.memory import COLUMN, ROW, Calibration

CALIBRATION_TOKENS = 256


def calibration_model(cfg: ModelConfig) -> tuple[ModelConfig, float]:
    """A 2-layer copy of `cfg`, narrowed by a factor f that divides the head counts
    (head size, vocabulary and ratios kept), and f: every per-token activation of a
    block is proportional to the number of heads, so it scales back exactly by f (but
    an MoE router's scores and choices, a few numbers per expert per token, which
    this overstates by f: under 0.1% of a Mixtral block's)."""
    f = 1
    for candidate in range(1, cfg.kv_heads + 1):
        # An MoE model's experts narrow too, to a width the grouped matmul takes.
        experts_fit = not cfg.moe.num_experts or cfg.expert_width % (8 * candidate) == 0
        if cfg.kv_heads % candidate == 0 and cfg.hidden_size // candidate >= 128 and experts_fit:
            f = candidate
    moe = cfg.moe
    if moe.expert_width is not None:
        moe = dataclasses.replace(moe, expert_width=moe.expert_width // f)
    narrow = dataclasses.replace(
        cfg,
        moe=moe,
        n_layers=2,
        hidden_size=cfg.hidden_size // f,
        n_heads=cfg.n_heads // f,
        n_kv_heads=None if cfg.n_kv_heads is None else cfg.n_kv_heads // f,
        ffn_hidden_size=cfg.mlp_width // f,
        max_seq_len=max(cfg.max_seq_len, CALIBRATION_TOKENS),
    )
    return narrow, float(f)


def _role(path: str, after_layers: bool) -> tuple[str, str]:
    """(part, role) of a module path: part is layer, first or last."""
    parts = path.split(".")
    if parts[0] != "layers":
        if parts[0] == "lm_head":
            return "last", "head_input"
        if parts[0] == "final_norm":
            return "last", "norm"
        if parts[0].startswith("embed") or not after_layers:
            return "first", "embedding"
        return "last", "loss"
    leaf = parts[-1]
    if leaf in COLUMN:
        return "layer", "column_input"
    if leaf in ROW:
        return "layer", "row_input"
    if leaf.endswith("norm"):
        return "layer", "norm"
    if leaf.endswith("dropout"):
        return "layer", "dropout"
    if leaf in ("attn", "mlp"):
        return "layer", "core"
    return "layer", "residual"


class _Tracker:
    """The module stack during a forward, so saved tensors can be attributed."""

    def __init__(self, model: torch.nn.Module):
        self.stack: list[str] = []
        self.after_layers = False
        self.handles = []
        self.moe = [name for name, module in model.named_modules() if isinstance(module, MoE)]
        for name, module in model.named_modules():
            if name:
                self.handles.append(module.register_forward_pre_hook(self._enter(name)))
                self.handles.append(module.register_forward_hook(self._leave(name)))

    def _enter(self, name):
        def hook(*_):
            self.stack.append(name)

        return hook

    def _leave(self, name):
        def hook(*_):
            self.stack.pop()
            if name.startswith("layers."):
                self.after_layers = True

        return hook

    def where(self) -> tuple[str, str]:
        path = self.stack[-1] if self.stack else ""
        moe = next((m for m in self.moe if path == m or path.startswith(m + ".")), None)
        if moe is not None and not path.startswith(moe + ".shared"):
            return "layer", "experts"  # router and routed experts: whole on every tp rank
        return _role(path, self.after_layers)

    def close(self):
        for handle in self.handles:
            handle.remove()


class _SavedOutputs(TorchDispatchMode):
    """Records the outputs of the ops selective checkpointing keeps, by role."""

    def __init__(self, tracker: _Tracker, sink):
        super().__init__()
        self.tracker, self.sink, self.ops = tracker, sink, _ops_to_save()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.ops:
            part, role = self.tracker.where()
            if part == "layer":
                if role in ("column_input", "row_input"):  # a projection's output
                    role = "column_output" if role == "column_input" else "residual"
                for tensor in out if isinstance(out, tuple | list) else [out]:
                    if isinstance(tensor, torch.Tensor):
                        self.sink(part, role, tensor)
        return out


def _weight_copy(tensor: torch.Tensor) -> bool:
    """A parameter cast by autocast (a bf16 copy of a weight): proportional to the
    parameters, not the tokens; the plan counts it with the buffers."""
    node = (tensor._base if tensor._base is not None else tensor).grad_fn
    if node is None or type(node).__name__ != "ToCopyBackward0":
        return False
    return any(type(next_).__name__ == "AccumulateGrad" for next_, _ in node.next_functions)


def calibrate(
    cfg: ModelConfig, precision: str = "bf16", autocast: bool = True
) -> dict[str, Calibration]:
    """Bytes per token by role for each activation-checkpointing mode: under bf16
    autocast (the native engine's mixed precision), or with autocast=False on a model
    cast to bf16 itself (the DeepSpeed engine's: norms, residual stream and logits in
    bf16 too, no weight copies)."""
    narrow, scale = calibration_model(cfg)
    model = build_model(narrow, seed=0)
    model.train()
    if not autocast and precision != "fp32":
        model.to(torch.bfloat16)
    n_layers = narrow.n_layers
    tokens = torch.randint(0, narrow.vocab_size, (1, CALIBRATION_TOKENS))
    # Weights and the rotary tables are saved by reference: not activations.
    states = [*model.parameters(), *model.buffers()]
    held = {t.untyped_storage().data_ptr() for t in states}
    saved: dict = defaultdict(float)
    kept: dict = defaultdict(float)
    seen: dict[int, set[int]] = {id(saved): set(), id(kept): set()}
    tracker = _Tracker(model)

    def record(target, part, role, tensor):
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer in held or pointer in seen[id(target)]:
            return
        seen[id(target)].add(pointer)
        target[(part, role)] += storage.nbytes()

    def pack(tensor):
        if not _weight_copy(tensor):
            record(saved, *tracker.where(), tensor)
        return tensor

    mixed = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast and precision != "fp32")
    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    outputs = _SavedOutputs(tracker, lambda part, role, t: record(kept, part, role, t))
    with mixed, hooks, outputs:
        loss = model(tokens, tokens)
    del loss
    tracker.close()
    width = 2 if precision != "fp32" else 4
    block_input = narrow.hidden_size * width * CALIBRATION_TOKENS  # one block's input

    def per_token(table, part, divide=1):
        # The loss's log-softmax is as wide as the vocabulary, which is not narrowed.
        return {
            role: value * (1 if role == "loss" else scale) / CALIBRATION_TOKENS / divide
            for (where, role), value in table.items()
            if where == part
        }

    none_layer = per_token(saved, "layer", n_layers)
    first, last = per_token(saved, "first"), per_token(saved, "last")
    selective_layer = per_token(kept, "layer", n_layers)
    selective_layer["block"] = block_input * scale / CALIBRATION_TOKENS
    block = block_input * scale / CALIBRATION_TOKENS
    # Recomputing a block saves its input again: the same storage the checkpoint keeps.
    recomputed = {**none_layer, "norm": none_layer.get("norm", 0.0) - block}
    # Recomputing under the selective policy saves what a plain forward saves, but the
    # kept outputs (query/key/value, attention, MLP input projections: the "core" of
    # the plain forward) come from the cache, already counted.
    cached = selective_layer.get("column_output", 0.0) + selective_layer.get("core", 0.0)
    rebuilt = {**recomputed, "core": max(0.0, none_layer.get("core", 0.0) - cached)}
    return {
        "none": Calibration("none", none_layer, first, last, {}),
        "selective": Calibration("selective", selective_layer, first, last, rebuilt),
        "full": Calibration("full", {"block": block}, first, last, recomputed),
    }


def measure_matmul_tflops(size: int = 1024, seconds: float = 0.5) -> float:
    """The best rate of size x size matmuls on this machine, in TFLOP/s: bf16 on its
    GPU if it has one (size 8192), else fp32 on the CPU threads torch uses."""
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    size = 8192 if cuda else size
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    best, deadline = math.inf, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.mm(a, b)
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12
