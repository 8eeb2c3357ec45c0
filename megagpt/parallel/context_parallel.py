"""Context parallelism: the sequence split over ranks, attention as a ring of K/V blocks.

Layout. With a causal mask, token t attends to t + 1 keys, so cutting the sequence
into cp contiguous pieces gives the last rank cp times the work of the first (and the
first sits idle for most of the ring). Instead the sequence is cut into 2 * cp chunks
and rank r holds chunk r (its head) and chunk 2 * cp - 1 - r (its tail), concatenated:

    cp = 2, chunks 0 1 2 3:   rank 0 holds [0, 3], rank 1 holds [1, 2]

Every rank then holds the same number of (query, visible key) pairs. Position
embeddings need the global positions of the local tokens (`positions_for_rank`).

Ring. Each rank keeps its queries; the K/V chunks travel around the ring (rank r sends
to r + 1 and receives from r - 1), so at step i rank r holds the K/V of rank
s = r - i (mod cp). Against its local queries [head r, tail 2cp-1-r] that block is:
  * s == r: causal along the local order (both halves are in increasing position);
  * s < r:  its head chunk s is before both local chunks (fully visible), its tail
            chunk 2cp-1-s is after both (invisible): all queries against the K/V head;
  * s > r:  both its chunks are after the local head (invisible) and before the local
            tail (fully visible): the query tail against all of the K/V.
So every step after the first is half a square and unmasked: balanced, and no block is
computed only to be masked away.

Merge. Each block gives its output o_b and the log-sum-exp l_b of its scores per query
row. The softmax over all keys is the blocks' softmaxes reweighted by their share of
the total mass: l = log(sum_b exp(l_b)), o = sum_b exp(l_b - l) * o_b. Outputs and
log-sum-exps are accumulated in fp32 whatever the input dtype.

Backward runs the ring again: each block's gradients follow from the final output and
log-sum-exp (P_b = exp(S_b - l), as flash attention's backward), so dQ stays local
while dK/dV accumulate (in fp32) as they travel with their K/V, and one last hop
brings each rank the gradients of its own chunks. Autograd keeps only q, k, v, the
output and the log-sum-exp of the local tokens: memory scales with the local length.

Block kernel: on CPU, torch's fused flash kernel
(`_scaled_dot_product_flash_attention_for_cpu`, the one F.scaled_dot_product_attention
runs there), which returns the log-sum-exp, handles grouped-query heads and never
materializes the (T, T) scores; elsewhere (and on request) plain matmul-and-softmax
math in fp32, portable but O(T_local^2) memory per block: a CUDA flash kernel is not
wired yet. Attention dropout is refused: its mask would have to be replayed per block.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist
from torch import nn

from megagpt.config import ConfigError

KERNELS = ("auto", "fused", "math")
"""Block kernels of `ring_attention`: "fused" is torch's CPU flash kernel (CPU only),
"math" plain matmul and softmax in fp32, "auto" the fused one on CPU, math elsewhere."""

_KV_TAG, _GRAD_TAG = 0, 1  # distinct tags: gloo matches messages by peer and tag


# --------------------------------------------------------------------------- layout
def _check_divisible(length: int, cp_size: int, what: str) -> None:
    if length % (2 * cp_size):
        raise ConfigError(
            f"{what} = {length} cannot be split over parallel.context_parallel_size = "
            f"{cp_size}: it must be a multiple of 2 * context_parallel_size = {2 * cp_size} "
            "(each rank holds a head and a tail chunk)"
        )


def split_for_context_parallel(
    x: torch.Tensor, dim: int, cp_rank: int, cp_size: int
) -> torch.Tensor:
    """This rank's load-balanced share of the full tensor `x` along `dim`: chunk
    `cp_rank` then chunk `2 * cp_size - 1 - cp_rank` of `2 * cp_size` equal chunks."""
    _check_divisible(x.shape[dim], cp_size, "sequence length")
    chunks = x.chunk(2 * cp_size, dim)
    return torch.cat([chunks[cp_rank], chunks[2 * cp_size - 1 - cp_rank]], dim)


def positions_for_rank(
    seq_len: int, cp_rank: int, cp_size: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Global positions (int64) of the tokens this rank holds, in local order."""
    positions = torch.arange(seq_len, device=device)
    return split_for_context_parallel(positions, 0, cp_rank, cp_size)


def gather_from_context_parallel(
    local: torch.Tensor, dim: int, group: dist.ProcessGroup | None
) -> torch.Tensor:
    """The full tensor from every rank's share along `dim` (inverse of the split).

    Not differentiable: for tests and evaluation."""
    cp_size = _group_size(group)
    if cp_size == 1:
        return local
    local = local.contiguous()
    shares = [torch.empty_like(local) for _ in range(cp_size)]
    dist.all_gather(shares, local, group=group)
    halves = [share.chunk(2, dim) for share in shares]
    heads = [head for head, _ in halves]
    tails = [tail for _, tail in reversed(halves)]
    return torch.cat(heads + tails, dim)


def _group_size(group: dist.ProcessGroup | None) -> int:
    """A group's size; no group and no process group initialized is one process."""
    if group is None and not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


# --------------------------------------------------------------------------- blocks
def _fused_forward(q, k, v, causal, scale):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, scale=scale
    )
    return out.float(), lse.float()


def _fused_backward(dout, q, k, v, out, lse, causal, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, causal, scale=scale
    )


def _math_scores(q, k, causal, scale):
    """fp32 scores (B, G, H/G, Tq, Tk): query heads grouped by their key/value head."""
    B, H, Tq, D = q.shape
    G = k.shape[1]
    qg = q.float().view(B, G, H // G, Tq, D)
    s = qg @ k.float().unsqueeze(2).transpose(-1, -2) * scale
    if causal:  # square diagonal blocks only
        s = s.masked_fill(torch.ones_like(s[0, 0, 0], dtype=torch.bool).triu(1), -math.inf)
    return qg, s


def _math_forward(q, k, v, causal, scale):
    B, H, Tq, D = q.shape
    _, s = _math_scores(q, k, causal, scale)
    lse = s.logsumexp(-1)  # (B, G, H/G, Tq)
    out = torch.exp(s - lse.unsqueeze(-1)) @ v.float().unsqueeze(2)
    return out.view(B, H, Tq, D), lse.view(B, H, Tq)


def _math_backward(dout, q, k, v, out, lse, causal, scale):
    B, H, Tq, D = q.shape
    G = k.shape[1]
    qg, s = _math_scores(q, k, causal, scale)
    p = torch.exp(s - lse.float().view(B, G, H // G, Tq, 1))  # the final softmax's share
    do = dout.float().view(B, G, H // G, Tq, D)
    dv = (p.transpose(-1, -2) @ do).sum(2)
    dp = do @ v.float().unsqueeze(2).transpose(-1, -2)
    row_dot = (do * out.float().view(B, G, H // G, Tq, D)).sum(-1, keepdim=True)
    ds = p * (dp - row_dot)
    dq = (ds @ k.float().unsqueeze(2)) * scale
    dk = (ds.transpose(-1, -2) @ qg).sum(2) * scale
    return dq.view(B, H, Tq, D), dk, dv


def _block_ops(kernel: str, device: torch.device):
    if kernel not in KERNELS:
        raise ValueError(f"ring_attention kernel = {kernel!r}; use one of {KERNELS}")
    if kernel == "fused" and device.type != "cpu":
        raise ValueError(f"the fused ring attention kernel runs on CPU only, not {device}")
    if kernel == "fused" or (kernel == "auto" and device.type == "cpu"):
        return _fused_forward, _fused_backward
    return _math_forward, _math_backward


def _visible(source: int, rank: int, t_half: int):
    """(query rows, key/value columns, causal) of the block from `source`'s K/V."""
    everything = slice(None)
    if source == rank:
        return everything, everything, True
    if source < rank:
        return everything, slice(None, t_half), False
    return slice(t_half, None), everything, False


# --------------------------------------------------------------------------- ring
class _Ring:
    """Point-to-point exchange with the ring neighbours: send to rank + 1, receive
    from rank - 1 (in the group), started asynchronously so compute can overlap."""

    def __init__(self, group: dist.ProcessGroup | None, rank: int, size: int):
        self.group = group if group is not None else dist.group.WORLD
        self.next = dist.get_global_rank(self.group, (rank + 1) % size)
        self.prev = dist.get_global_rank(self.group, (rank - 1) % size)

    def start(self, send: torch.Tensor, tag: int):
        received = torch.empty_like(send)
        ops = [
            dist.P2POp(dist.isend, send, self.next, self.group, tag),
            dist.P2POp(dist.irecv, received, self.prev, self.group, tag),
        ]
        return received, dist.batch_isend_irecv(ops)

    @staticmethod
    def wait(pending) -> torch.Tensor:
        received, requests = pending
        for request in requests:
            request.wait()
        return received


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, scale, kernel):
        rank, size = (dist.get_rank(group), _group_size(group)) if dist.is_initialized() else (0, 1)
        forward_block, backward_block = _block_ops(kernel, q.device)
        half = q.shape[2] // 2
        ring = _Ring(group, rank, size) if size > 1 else None
        kv = torch.stack([k, v])
        out = lse = None
        for step in range(size):
            pending = ring.start(kv, _KV_TAG) if step < size - 1 else None
            rows, cols, causal = _visible((rank - step) % size, rank, half)
            block_out, block_lse = forward_block(
                q[:, :, rows].contiguous(),
                kv[0][:, :, cols].contiguous(),
                kv[1][:, :, cols].contiguous(),
                causal,
                scale,
            )
            if out is None:  # the diagonal block covers every row
                out, lse = block_out, block_lse
            else:
                _merge(out[:, :, rows], lse[:, :, rows], block_out, block_lse)
            if pending is not None:
                kv = _Ring.wait(pending)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.rank, ctx.size, ctx.scale = group, rank, size, scale
        ctx.backward_block = backward_block
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        rank, size = ctx.rank, ctx.size
        half = q.shape[2] // 2
        ring = _Ring(ctx.group, rank, size) if size > 1 else None
        dout = dout.contiguous()
        dq = torch.zeros_like(q, dtype=torch.float32)
        kv, pending_grad = torch.stack([k, v]), None
        for step in range(size):
            pending_kv = ring.start(kv, _KV_TAG) if step < size - 1 else None
            rows, cols, causal = _visible((rank - step) % size, rank, half)
            block_dq, block_dk, block_dv = ctx.backward_block(
                dout[:, :, rows].contiguous(),
                q[:, :, rows].contiguous(),
                kv[0][:, :, cols].contiguous(),
                kv[1][:, :, cols].contiguous(),
                out[:, :, rows].contiguous(),
                lse[:, :, rows].contiguous(),
                causal,
                ctx.scale,
            )
            dq[:, :, rows] += block_dq
            # The K/V gradients accumulated so far by the ranks before this one.
            dkv = _Ring.wait(pending_grad) if pending_grad else torch.zeros_like(kv, dtype=dq.dtype)
            dkv[0][:, :, cols] += block_dk
            dkv[1][:, :, cols] += block_dv
            if ring is not None:
                pending_grad = ring.start(dkv, _GRAD_TAG)
            if pending_kv is not None:
                kv = _Ring.wait(pending_kv)
        if pending_grad is not None:  # the last hop: gradients of this rank's own chunks
            dkv = _Ring.wait(pending_grad)
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None


def _merge(out, lse, block_out, block_lse) -> None:
    """Fold one block's (fp32) output and log-sum-exp into the running ones, in place."""
    merged = torch.logaddexp(lse, block_lse)
    out.mul_(torch.exp(lse - merged).unsqueeze(-1))
    out.add_(block_out * torch.exp(block_lse - merged).unsqueeze(-1))
    lse.copy_(merged)


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup | None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    kernel: str = "auto",
) -> torch.Tensor:
    """Causal attention over the whole sequence, held split over the context-parallel
    group in the load-balanced layout of `split_for_context_parallel`.

    Args:
        q: this rank's queries (B, H, T_local, D).
        k, v: this rank's keys and values (B, G, T_local, D), G dividing H (grouped
            query attention: query head h uses key/value head h // (H / G)).
        group: the context-parallel group; None with no process group initialized (or
            a group of one) is plain causal attention.
        dropout_p: must be 0 (attention dropout is not supported across the ring).
        scale: the softmax scale, 1 / sqrt(D) by default.
        kernel: the block kernel, one of KERNELS.

    Returns:
        This rank's rows (B, H, T_local, D) of the full causal attention output.
    """
    if dropout_p:
        raise ConfigError(
            f"attention dropout = {dropout_p} is not supported with context parallelism "
            "(the ring computes attention block by block); set model.attention_dropout=0 "
            "or parallel.context_parallel_size=1"
        )
    if (
        q.dim() != 4
        or k.shape != v.shape
        or (k.shape[0], *k.shape[2:]) != (q.shape[0], *q.shape[2:])
    ):
        raise ValueError(
            f"ring_attention wants q (B, H, T, D) and k, v (B, G, T, D); got q "
            f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads do not split into {k.shape[1]} groups")
    if q.shape[2] % 2:
        raise ValueError(f"local length {q.shape[2]} is not a head and a tail chunk")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _RingAttention.apply(q, k, v, group, scale, kernel)


# --------------------------------------------------------------------------- model
def apply_context_parallel(part: nn.Module, group: dist.ProcessGroup) -> None:
    """Make every attention layer of `part` (a GPT or pipeline stage) a ring over the
    context-parallel `group`. The model stays free of torch.distributed: Attention calls
    its `attention_fn` in place of SDPA when one is set (causal attention only; the
    batches bring each rank's share of the sequence and its positions), and an MoE
    layer its `sum_over_sequence` for the balance loss's per-sequence counts."""
    attention = functools.partial(ring_attention, group=group)
    for block in part.layers.values():
        block.attn.attention_fn = attention
    for moe in part.moe_layers:  # their balance loss counts whole sequences
        moe.sum_over_sequence = functools.partial(dist.all_reduce, group=group)
