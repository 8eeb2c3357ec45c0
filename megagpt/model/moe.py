"""A mixture-of-experts layer in place of a block's MLP.

A router (a linear layer without bias) scores every expert for every token; each token
goes to its top_k experts, whose outputs are summed weighted by the scores, plus the
output of the shared experts, which every token goes through. Routing is dropless:
there is no capacity, every token copy is computed. The copies are sorted by expert so
that one grouped matmul (`torch._grouped_mm`) runs every expert over its contiguous
rows, whatever number of tokens each received (none included). `reference_forward` is
the same layer as a plain loop over the experts, for tests.

Routed experts have no biases (as Mixtral's and DeepSeek's); the shared experts are
the model's own MLP, with model.bias. Their weights are stored stacked, (E, in, out),
one parameter per matrix, so that expert parallelism shards them on dim 0 (and
replaces GroupedExperts' forward with one that sends each row to its expert's rank,
see parallel/expert_parallel.py).

Balancing. The load-balancing loss is Switch's/Mixtral's E x sum_i f_i P_i (f_i: share
of the token copies sent to expert i, P_i: mean router probability of expert i; 1 when
balanced), and the router z-loss ST-MoE's squared log-sum-exp of the logits. Both are
computed per sequence (as DeepSeek-V3's sequence-wise balance loss) and recorded for
the current forward; GPT.forward weighs them into the training loss. A batch-wide f_i
would be a product of means over whatever rows share a microbatch, so the gradient
would change with gradient accumulation and the data-parallel size; per sequence it
does not. DeepSeek-V3's auxiliary-loss-free balancing adds a per-expert bias to the
scores for choosing experts only, moved after each optimizer step (`update_bias`).

Routing runs in fp32 (outside autocast): top-k choices flip on tiny differences.
Shapes: S tokens (B x T), C hidden size, E experts, k top_k, F expert width.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from megagpt.config.schema import ModelConfig


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on x's device run in: autocast's, else x's own. The grouped
    matmul has no autocast rule and wants both operands in one dtype."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class GroupedExperts(nn.Module):
    """E MLPs of one width, stacked as (E, in, out) matrices: SwiGLU (gate, up, down)
    or GPT-2's tanh GELU (up, down)."""

    def __init__(self, num_experts: int, dim: int, width: int, swiglu: bool):
        super().__init__()
        self.swiglu = swiglu
        if swiglu:
            self.gate_proj = nn.Parameter(torch.empty(num_experts, dim, width))
        self.up_proj = nn.Parameter(torch.empty(num_experts, dim, width))
        self.down_proj = nn.Parameter(torch.empty(num_experts, width, dim))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (N, C): token copies sorted by expert, counts[e] of them for expert e."""
        gate = self.gate_proj if self.swiglu else None
        return expert_mlp(x, counts, self.up_proj, self.down_proj, gate)


def expert_mlp(
    x: torch.Tensor,
    counts: torch.Tensor,
    up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    gate_proj: torch.Tensor | None,
) -> torch.Tensor:
    """Rows x (N, C) sorted by expert, counts[e] of them for expert e, through the
    stacked expert weights ((E, C, F), (E, F, C)): SwiGLU with a gate, else tanh GELU."""
    dtype = compute_dtype(x)
    offsets = counts.cumsum(0).to(torch.int32)  # where each expert's rows end

    def matmul(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return torch._grouped_mm(rows, weight.to(dtype), offs=offsets)

    x = x.to(dtype)
    up = matmul(x, up_proj)  # (N, F)
    if gate_proj is not None:
        hidden = F.silu(matmul(x, gate_proj)) * up
    else:
        hidden = F.gelu(up, approximate="tanh")
    return matmul(hidden, down_proj)  # (N, C)


class MoE(nn.Module):
    """Router, routed experts and (optionally) shared experts: the MLP of an MoE block.

    After a training forward the layer holds, for that forward: `balance_loss` and
    `z_loss` per sequence (B,), and `tokens_per_expert` (E,) (the token copies each
    expert received). `step_tokens_per_expert` adds up the counts of the forwards since
    the last `update_bias`, as GPT.forward collects them (see `take_losses`).
    """

    def __init__(self, cfg: ModelConfig, shared: nn.Module | None = None):
        super().__init__()
        moe = cfg.moe
        self.num_experts, self.top_k = moe.num_experts, moe.top_k
        self.sigmoid = moe.router == "sigmoid"
        self.normalize_top_k = moe.normalize_top_k
        self.bias_update_rate = moe.bias_update_rate
        self.router = nn.Linear(cfg.hidden_size, moe.num_experts, bias=False)
        self.experts = GroupedExperts(
            moe.num_experts, cfg.hidden_size, cfg.expert_width, cfg.activation == "swiglu"
        )
        self.shared = shared  # an MLP of shared_experts x expert_width, with its own dropout
        self.dropout = nn.Dropout(cfg.dropout)
        # Checkpointed with the weights: selection depends on it.
        self.register_buffer("expert_bias", torch.zeros(moe.num_experts))
        self.register_buffer("tokens_per_expert", torch.zeros(moe.num_experts), persistent=False)
        self.register_buffer(
            "step_tokens_per_expert", torch.zeros(moe.num_experts), persistent=False
        )
        self.balance_loss: torch.Tensor | None = None
        self.z_loss: torch.Tensor | None = None
        # Under context parallelism a sequence's tokens are spread over ranks: this sums
        # a per-sequence tensor over them in place (set by parallel/context_parallel.py).
        self.sum_over_sequence: Callable[[torch.Tensor], None] | None = None
        # A forward that is not data (torch's pipeline learning its shapes): not counted.
        self.ignore_next_forward = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        flat = x.reshape(-1, C)  # (S, C)
        chosen, weights, counts = self._route(flat, B)
        expert_of_copy = chosen.flatten()  # (S k,): copy j belongs to token j // k
        order = expert_of_copy.argsort(stable=True)  # the copies grouped by expert
        token = order // self.top_k  # (S k,) the token of each sorted copy
        routed = self.experts(flat[token], counts)  # (S k, C)
        routed = routed * weights.flatten()[order, None].to(routed.dtype)
        out = routed.new_zeros(flat.shape[0], C).index_add_(0, token, routed)  # (S, C)
        return self._finish(out.view(B, T, C), x)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """forward as a plain loop over the experts, each with its own matmuls on the
        tokens that chose it (for tests)."""
        B, T, C = x.shape
        flat = x.reshape(-1, C)
        chosen, weights, _ = self._route(flat, B)
        ex = self.experts
        out = torch.zeros(flat.shape[0], C, dtype=compute_dtype(x), device=x.device)
        for e in range(self.num_experts):
            token, slot = (chosen == e).nonzero(as_tuple=True)
            rows = flat[token].to(out.dtype)
            up = rows @ ex.up_proj[e].to(out.dtype)
            if ex.swiglu:
                hidden = F.silu(rows @ ex.gate_proj[e].to(out.dtype)) * up
            else:
                hidden = F.gelu(up, approximate="tanh")
            y = hidden @ ex.down_proj[e].to(out.dtype)
            out = out.index_add(0, token, y * weights[token, slot, None].to(out.dtype))
        return self._finish(out.view(B, T, C), x)

    def _route(self, flat: torch.Tensor, rows: int) -> tuple[torch.Tensor, ...]:
        """Each token's chosen experts (S, k) and their weights (S, k), and the copies
        each expert receives (E,); records the auxiliary losses when training."""
        with torch.autocast(flat.device.type, enabled=False):
            logits = F.linear(flat.float(), self.router.weight.float())  # (S, E)
        scores = logits.sigmoid() if self.sigmoid else logits.softmax(-1)
        # The bias steers which experts are chosen, never how much they weigh.
        chosen = (scores.detach() + self.expert_bias).topk(self.top_k, dim=-1).indices
        weights = scores.gather(-1, chosen)
        if self.normalize_top_k:
            weights = weights / weights.sum(-1, keepdim=True)
        counts = torch.zeros(self.num_experts, dtype=torch.long, device=flat.device)
        counts.scatter_add_(0, chosen.flatten(), torch.ones_like(chosen.flatten()))
        if self.training:
            self._record(logits, scores, chosen, counts, rows)
        return chosen, weights, counts

    def _finish(self, routed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        routed = self.dropout(routed)
        return routed if self.shared is None else routed + self.shared(x)

    def _record(self, logits, scores, chosen, counts, rows: int) -> None:
        """The per-sequence auxiliary losses and the token counts of this forward."""
        E = self.num_experts
        # Sigmoid scores do not sum to 1: P_i uses them normalized, as DeepSeek-V3 does.
        probs = scores / scores.sum(-1, keepdim=True) if self.sigmoid else scores
        mean_probs = probs.view(rows, -1, E).mean(1)  # (B, E): P_i per sequence
        copies = chosen.view(rows, -1)  # (B, T k)
        shares = torch.zeros(rows, E, device=chosen.device)  # (B, E): f_i per sequence
        shares.scatter_add_(1, copies, torch.ones_like(copies, dtype=shares.dtype))
        if self.sum_over_sequence is not None:
            # f_i counts the whole sequence's copies. P_i and the z-loss stay means over
            # this rank's tokens: the loss is linear in them, and the ranks' losses are
            # averaged (as their LM losses are), which makes them the sequence's means.
            self.sum_over_sequence(shares)
        shares /= shares.sum(-1, keepdim=True)
        self.balance_loss = E * (shares * mean_probs).sum(-1)  # (B,)
        self.z_loss = logits.logsumexp(-1).square().view(rows, -1).mean(1)  # (B,)
        self.tokens_per_expert.copy_(counts)

    def take_losses(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This forward's (balance_loss, z_loss) per sequence, for the model's loss;
        adds its token counts to step_tokens_per_expert. GPT.forward calls it once per
        forward, outside activation checkpointing, whose recomputation in backward
        records the same values again and must not count them twice."""
        if self.ignore_next_forward:
            self.ignore_next_forward = False
        else:
            self.step_tokens_per_expert += self.tokens_per_expert
        return self.balance_loss, self.z_loss

    @torch.no_grad()
    def update_bias(self, counts: torch.Tensor | None = None) -> None:
        """DeepSeek-V3's auxiliary-loss-free balancing, after an optimizer step: each
        expert's bias moves by bias_update_rate toward balance (up when it received
        fewer token copies than the mean, down when more) by `counts` (default: this
        layer's step_tokens_per_expert; with data parallelism the caller passes them
        summed over the ranks, so every replica moves alike). Resets the step counts."""
        counts = self.step_tokens_per_expert if counts is None else counts
        if self.bias_update_rate > 0 and counts.sum() > 0:
            counts = counts.float()
            self.expert_bias += self.bias_update_rate * torch.sign(counts.mean() - counts)
        self.step_tokens_per_expert.zero_()

    @torch.no_grad()
    def reset_state(self) -> None:
        """Zero the bias and the counts (a new model; a checkpoint then loads the bias)."""
        for buffer in (self.expert_bias, self.tokens_per_expert, self.step_tokens_per_expert):
            buffer.zero_()
