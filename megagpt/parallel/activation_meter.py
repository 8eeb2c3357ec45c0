"""Measure the activation memory of a training step: the peak bytes saved for backward.

    with ActivationMeter(module.parts) as meter:
        module.train_step(batches)
    meter.peak_bytes  # this rank's peak, over every microbatch's forward and backward

Activations are the tensors autograd keeps for backward that are not model state:
parameters, buffers (the rotary tables), views of either and FSDP2's unsharded
parameter copies (also as local tensors of DTensors) are left out. Each storage counts
once, however many ops save it or views of it, at its whole size; a DTensor counts its
local shard. A tensor counts from the op that saves it until autograd releases it
(after the backward node that uses it ran, or when its graph is dropped), so pipeline
schedules, gradient accumulation and ZeRO-3 are measured as they run.

Activation checkpointing (torch.utils.checkpoint, non-reentrant) hides the tensors
saved inside a checkpointed block from outer hooks. It is measured as it holds memory:
  * the block's inputs, which checkpoint saves through the outer hooks;
  * selective: the outputs of the ops the policy saves (the cache of
    create_selective_checkpoint_contexts), from the forward until the recomputation
    consumes them;
  * the tensors recomputed in backward, from the recomputation until the backward node
    that needs each takes it; the meter wraps each part's `checkpoint_fn` to see them,
    calling the checkpoint's own hooks underneath (torch private API: the top of the
    hooks stack and the selective-checkpoint cache mode).

Not counted: temporaries that are not saved (gradients of activations, an op's
workspace), tensors kept alive only outside autograd (a pipeline stage's outputs and
received inputs in its caches, unless an op saves them), blocks under torch.compile
(compiled graphs save inside themselves).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.utils._python_dispatch import (
    _get_current_dispatch_mode_stack,
    is_traceable_wrapper_subclass,
)
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import _CachingTorchDispatchMode


def _storages(t: torch.Tensor) -> list[tuple[tuple, int]]:
    """(key, bytes) of each storage under `t`: a DTensor's local shard, the inner
    tensors of any other wrapper subclass (functional collectives' async result)."""
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        inner = (getattr(t, name) for name in names)
        return [s for x in inner if isinstance(x, torch.Tensor) for s in _storages(x)]
    if t.device.type == "meta":
        return []
    s = t.untyped_storage()
    return [((t.device, s.data_ptr()), s.nbytes())]


class ActivationMeter:
    """Tracks the bytes of activations live at once while it is entered.

    Args:
        parts: the model parts of this rank (TrainModule.parts); their parameters and
            buffers are not activations, and their `checkpoint_fn` is wrapped meanwhile.

    Enter the same meter for every step: tensors saved in one step that outlive it
    (none should) are counted until freed, also in the next step's peak.

    Attributes:
        peak_bytes: the most bytes live at once since the last entry.
        live_bytes: the bytes live now (0 after a plain step).
    """

    def __init__(self, parts: Iterable[nn.Module]):
        self.parts = list(parts)
        self.peak_bytes = 0
        self.live_bytes = 0
        self._holders: dict[tuple, int] = {}  # storage key -> holders
        self._sizes: dict[tuple, int] = {}
        self._lock = threading.Lock()  # releases may run on autograd's device threads
        self._state: set[tuple] = set()
        self._hooks = saved_tensors_hooks(self._pack, _unpack)
        self._wrapped: list[tuple[nn.Module, object]] = []

    def __enter__(self) -> ActivationMeter:
        self.peak_bytes = self.live_bytes  # what earlier entries left saved still counts
        self._state = {
            key
            for part in self.parts
            for t in (*part.parameters(), *part.buffers())
            for key, _ in _storages(t)
        }
        for part in self.parts:
            original = getattr(part, "checkpoint_fn", None)
            if original is not None:
                self._wrapped.append((part, original))
                part.checkpoint_fn = self._metered_checkpoint(original)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        for part, original in self._wrapped:
            part.checkpoint_fn = original
        self._wrapped.clear()

    # ------------------------------------------------------------------ accounting
    def is_state(self, t: torch.Tensor) -> bool:
        """Whether `t` is a parameter or buffer (or a view of one): not an activation."""
        base = t._base if t._base is not None else t
        if isinstance(base, nn.Parameter) or any(k in self._state for k, _ in _storages(t)):
            return True
        # The local tensor of a parameter gathered since __enter__ (to_local() of FSDP2's
        # unsharded DTensor, as expert parallelism computes with): its storage is the
        # parameter's as it is now.
        current = {key for part in self.parts for p in part.parameters() for key, _ in _storages(p)}
        return any(k in current for k, _ in _storages(t))

    def _add(self, t: torch.Tensor) -> list[tuple]:
        """Count `t`'s storages (each once, however many hold it); returns their keys."""
        keys = []
        with self._lock:
            for key, size in _storages(t):
                if size == 0:
                    continue
                keys.append(key)
                self._holders[key] = self._holders.get(key, 0) + 1
                if self._holders[key] == 1:
                    self._sizes[key] = size
                    self.live_bytes += size
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return keys

    def _release(self, keys: list[tuple]) -> None:
        with self._lock:
            for key in keys:
                self._holders[key] -= 1
                if self._holders[key] == 0:
                    del self._holders[key]
                    self.live_bytes -= self._sizes.pop(key)

    def _pack(self, t: torch.Tensor):
        # Detached: a saved output holding its own grad_fn would make a cycle through
        # autograd's C++ that keeps a retained graph (zero-bubble's) alive for good.
        return t if self.is_state(t) else _Held(self, t.detach())

    def _watch(self, t: torch.Tensor) -> None:
        """Count `t` until the tensor object dies (it is held by torch, not by us)."""
        if not self.is_state(t):
            weakref.finalize(t, self._release, self._add(t))

    def _metered_checkpoint(self, checkpoint_fn):
        def metered(fn, *args, **kwargs):
            return checkpoint_fn(_Region(self, fn), *args, **kwargs)

        return metered


def _unpack(packed):
    return packed.tensor if isinstance(packed, _Held) else packed


class _Held:
    """What autograd keeps in place of a saved tensor: the tensor, counted until freed."""

    def __init__(self, meter: ActivationMeter, tensor: torch.Tensor | None, inner=None):
        self.meter, self.tensor, self.inner = meter, tensor, inner
        self.keys = meter._add(tensor) if tensor is not None else []

    def hold(self, tensor: torch.Tensor) -> None:
        self.tensor, self.keys = tensor, self.meter._add(tensor)

    def drop(self) -> None:
        self.meter._release(self.keys)
        self.tensor, self.keys = None, []

    def __del__(self):
        self.meter._release(self.keys)


class _Region:
    """A checkpointed function, run twice by torch.utils.checkpoint: in the forward
    (its saved tensors are replaced by the checkpoint's placeholders) and in backward
    (recomputed). Its hooks sit above the checkpoint's own and call them, so the n-th
    tensor recomputed is counted as long as the n-th placeholder lives."""

    def __init__(self, meter: ActivationMeter, fn):
        self.meter, self.fn = meter, fn
        self.slots: list[weakref.ref] = []
        self.recomputed = 0
        self.forward_done = False

    def __call__(self, *args, **kwargs):
        hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
        if hooks is None:  # not entered: nothing to meter
            return self.fn(*args, **kwargs)
        pack, unpack = hooks
        if not self.forward_done:
            self.forward_done = True
            cache = next(
                (
                    m.storage
                    for m in _get_current_dispatch_mode_stack()
                    if isinstance(m, _CachingTorchDispatchMode)
                ),
                None,
            )

            def forward_pack(t):
                slot = _Held(self.meter, None, inner=pack(t))
                self.slots.append(weakref.ref(slot))
                return slot

            def forward_unpack(slot):
                # The checkpoint hands its recomputed tensor over and forgets it: it
                # lives on only while this backward node runs (also in a graph kept
                # with retain_graph, which recomputes again if needed).
                tensor = unpack(slot.inner)
                slot.drop()
                return tensor

            with saved_tensors_hooks(forward_pack, forward_unpack):
                out = self.fn(*args, **kwargs)
            for entries in (cache or {}).values():  # selective: the outputs kept
                for leaf in tree_leaves(list(entries.values())):
                    if isinstance(getattr(leaf, "val", None), torch.Tensor):
                        self.meter._watch(leaf.val)
            return out

        self.recomputed = 0

        def recompute_pack(t):
            slot = self.slots[self.recomputed]() if self.recomputed < len(self.slots) else None
            self.recomputed += 1
            if slot is not None and slot.tensor is None and not self.meter.is_state(t):
                slot.hold(t.detach())  # detached: keeps the storage, not the graph
            return pack(t)  # may stop the recomputation early (after the last one)

        with saved_tensors_hooks(recompute_pack, unpack):
            return self.fn(*args, **kwargs)
