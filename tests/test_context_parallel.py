"""Ring attention over context-parallel ranks computes what one process computes.

The reference is F.scaled_dot_product_attention(is_causal=True) over the whole
sequence in one process; the ring runs on 2 and 4 gloo ranks, each holding its
load-balanced share, and its gathered output and q/k/v gradients (backward with a
random upstream gradient) must match within 1e-5. Autograd's saved tensors per rank
must shrink with the local length.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megagpt.config import ConfigError
from megagpt.parallel.activation_meter import ActivationMeter
from megagpt.parallel.context_parallel import (
    gather_from_context_parallel,
    positions_for_rank,
    ring_attention,
    split_for_context_parallel,
)
from megagpt.testing import run_distributed

B, H, T, D = 2, 4, 32, 16  # T a multiple of 2 * cp for cp in 1, 2, 4
CASES = [(4, "fused"), (2, "fused"), (4, "math"), (2, "math")]  # (key/value heads, kernel)
TOLERANCE = 1e-5


def _inputs(kv_heads: int):
    """Full-sequence q, k, v and an upstream gradient, the same on every rank."""
    g = torch.Generator().manual_seed(kv_heads)
    q = torch.randn(B, H, T, D, generator=g)
    k = torch.randn(B, kv_heads, T, D, generator=g)
    v = torch.randn(B, kv_heads, T, D, generator=g)
    return q, k, v, torch.randn(B, H, T, D, generator=g)


def _reference(q, k, v, dout):
    """Output and q, k, v gradients of plain causal attention in one process."""
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] < H)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def _saved_bytes(q, k, v, group, **kwargs) -> int:
    """Bytes autograd keeps for backward after one attention call (q, k, v included:
    they are activations in a model)."""
    with ActivationMeter([]) as meter:
        out = ring_attention(q, k, v, group, **kwargs)
        saved = meter.live_bytes
    del out
    return saved


def _ring_results(cases):
    """On each rank: max abs errors of the gathered ring output and gradients against
    the reference, per case; the gather round trip; the bytes saved for backward."""
    group, rank, size = dist.group.WORLD, dist.get_rank(), dist.get_world_size()
    errors = []
    for kv_heads, kernel in cases:
        q, k, v, dout = _inputs(kv_heads)
        reference = _reference(q, k, v, dout)
        local = [split_for_context_parallel(x, 2, rank, size).requires_grad_() for x in (q, k, v)]
        out = ring_attention(*local, group, kernel=kernel)
        out.backward(split_for_context_parallel(dout, 2, rank, size))
        ours = [
            gather_from_context_parallel(t, 2, group)
            for t in (out.detach(), *[x.grad for x in local])
        ]
        errors.append(
            {
                name: (a - b).abs().max().item()
                for name, a, b in zip(("out", "dq", "dk", "dv"), ours, reference, strict=True)
            }
        )
    x = torch.arange(2 * 3 * T * 5, dtype=torch.float32).view(2, 3, T, 5)
    round_trip = torch.equal(
        gather_from_context_parallel(split_for_context_parallel(x, -2, rank, size), -2, group), x
    )
    q, k, v, _ = _inputs(2)
    local = [split_for_context_parallel(t, 2, rank, size).requires_grad_() for t in (q, k, v)]
    return errors, round_trip, _saved_bytes(*local, group)


@pytest.mark.parametrize("world_size", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_ring_attention_matches_one_process(world_size):
    q, k, v, _ = _inputs(2)
    full_bytes = _saved_bytes(*(t.clone().requires_grad_() for t in (q, k, v)), None)
    for rank, (errors, round_trip, saved) in enumerate(
        run_distributed(_ring_results, world_size, args=(CASES,))
    ):
        for (kv_heads, kernel), case_errors in zip(CASES, errors, strict=True):
            worst = max(case_errors.values())
            assert worst < TOLERANCE, (rank, kv_heads, kernel, case_errors)
        assert round_trip, f"rank {rank}: gather(split(x)) != x"
        # Saved tensors (q, k, v, output, log-sum-exp) scale with the local length.
        assert saved * world_size == full_bytes, (rank, saved, full_bytes)


@pytest.mark.parametrize("kv_heads, kernel", CASES)
def test_one_process_is_plain_causal_attention(kv_heads, kernel):
    q, k, v, dout = _inputs(kv_heads)
    reference = _reference(q, k, v, dout)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = ring_attention(*leaves, None, kernel=kernel)
    out.backward(dout)
    for ours, theirs in zip((out.detach(), *[x.grad for x in leaves]), reference, strict=True):
        torch.testing.assert_close(ours, theirs, atol=TOLERANCE, rtol=0)


def test_bf16_accumulates_the_merge_in_fp32():
    q, k, v, dout = _inputs(2)
    reference = _reference(q, k, v, dout)
    leaves = [x.bfloat16().requires_grad_() for x in (q, k, v)]
    out = ring_attention(*leaves, None)
    out.backward(dout.bfloat16())
    assert out.dtype == leaves[0].grad.dtype == torch.bfloat16
    for ours, theirs in zip((out, *[x.grad for x in leaves]), reference, strict=True):
        torch.testing.assert_close(ours.float(), theirs, atol=0.05, rtol=0.05)


def test_layout_gives_each_rank_a_head_and_a_tail_chunk():
    assert positions_for_rank(8, 0, 2).tolist() == [0, 1, 6, 7]
    assert positions_for_rank(8, 1, 2).tolist() == [2, 3, 4, 5]
    assert positions_for_rank(8, 0, 1).tolist() == list(range(8))
    # Causal work (keys visible to each query) is the same on every rank.
    for cp in (2, 4):
        work = {int((positions_for_rank(32, r, cp) + 1).sum()) for r in range(cp)}
        assert len(work) == 1, (cp, work)


def test_split_takes_the_rank_chunks_along_any_dim():
    x = torch.arange(2 * 16).view(2, 16)
    for cp in (1, 2, 4):
        shares = [split_for_context_parallel(x, 1, r, cp) for r in range(cp)]
        for r, share in enumerate(shares):
            assert torch.equal(share, x[:, positions_for_rank(16, r, cp)])
        # Every token lands on exactly one rank.
        taken = torch.cat([positions_for_rank(16, r, cp) for r in range(cp)])
        assert sorted(taken.tolist()) == list(range(16))


def test_bad_input_is_refused_with_what_would_work():
    with pytest.raises(ConfigError, match=r"multiple of 2 \* context_parallel_size = 4"):
        split_for_context_parallel(torch.zeros(2, 6), 1, 0, 2)
    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ConfigError, match="model.attention_dropout=0"):
        ring_attention(q, q, q, None, dropout_p=0.1)
    with pytest.raises(ValueError, match="kernel"):
        ring_attention(q, q, q, None, kernel="flash")
    with pytest.raises(ValueError, match="groups"):
        ring_attention(q, q[:, :1].expand(1, 3, 4, 8), q[:, :1].expand(1, 3, 4, 8), None)
