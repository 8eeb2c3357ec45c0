"""A Megatron-style GPT in one file, with no torch.distributed inside.

Token embedding (+ learned positions, or rotary on queries/keys), N pre-norm blocks,
a final norm and the LM head. Parallelism is applied from outside by plans keyed on
the stable module names used here (`layers.3.attn.qkv_proj`, ...), and a pipeline
stage is this model with the other layers set to None. Build it on the `meta`
device, move it with `to_empty`, then call `init_weights()`.

Shapes in comments: B batch, T sequence, C hidden size, H heads, G key/value heads,
D head size, V (padded) vocabulary.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megagpt.config.schema import ModelConfig
from megagpt.model.kv_cache import KVCache
from megagpt.model.lora import ADAPTER_PARAMETERS, adapter_initial_value
from megagpt.model.moe import MoE
from megagpt.utils.seeds import derive_key

IGNORE_INDEX = -100
"""A target that is not trained on: prompt tokens, padding, a packed example's end."""


def cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Next-token loss over the targets that are not IGNORE_INDEX, their mean or sum;
    logits (B, T, V) are upcast so bf16 runs reduce in fp32."""
    return F.cross_entropy(
        logits.flatten(0, 1).float(),
        targets.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )


def example_mask(segments: torch.Tensor) -> torch.Tensor:
    """The attention mask of packed examples: token i sees token j when j <= i and
    both belong to the same example. segments (B, T) -> (B, 1, T, T) bool; every row
    keeps its diagonal, so no query is left without a key."""
    T = segments.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
    return (same & causal)[:, None]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def build_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.hidden_size, cfg.norm_eps)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, bias=cfg.bias)


def rotary_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, ...]:
    """cos and sin tables (max_seq_len, D) in the half-split layout Llama checkpoints use."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


@dataclass(frozen=True)
class Rotary:
    """The rotary tables for a forward: per-token rows (positions given), or the whole
    tables and where the sequence starts, sliced by each attention layer to the length
    it sees (with sequence parallelism a pipeline stage receives only a slice of the
    sequence, while attention works on all of it)."""

    cos: torch.Tensor
    sin: torch.Tensor
    start: int | None = None

    def rows(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.start is None:
            return self.cos, self.sin
        end = self.start + length
        return self.cos[self.start : end], self.sin[self.start : end]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, H, D) by position; cos/sin are the tables' rows for its tokens'
    positions, (T, D) when every sequence starts at the same place, else (B, T, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)  # over heads
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.head_dim = cfg.head_dim
        n_kv_heads = cfg.kv_heads
        self.q_per_kv = cfg.n_heads // n_kv_heads
        self.dropout = cfg.attention_dropout
        d, c = self.head_dim, cfg.hidden_size
        if cfg.fused_qkv:
            # Rows grouped per key/value head: [q x q_per_kv, k, v] for group 0, then
            # group 1, ... so splitting the rows into equal column-parallel shards gives
            # every rank whole groups (Megatron's layout).
            self.qkv_proj = nn.Linear(c, (cfg.n_heads + 2 * n_kv_heads) * d, bias=cfg.bias)
        else:
            self.q_proj = nn.Linear(c, cfg.n_heads * d, bias=cfg.bias)
            self.k_proj = nn.Linear(c, n_kv_heads * d, bias=cfg.bias)
            self.v_proj = nn.Linear(c, n_kv_heads * d, bias=cfg.bias)
        self.out_proj = nn.Linear(cfg.n_heads * d, c, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        # Set by megagpt.parallel for context parallelism: causal attention f(q, k, v)
        # over a sequence split across ranks (ring attention), in place of SDPA.
        self.attention_fn: Callable[..., torch.Tensor] | None = None

    def forward(
        self,
        x: torch.Tensor,
        rope: Rotary | None,
        kv_cache: KVCache | None = None,
        examples: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`rope`: the rotary tables; `examples`: an explicit attention mask (B, 1, T, K),
        True where a query may see a key (packed examples, see example_mask; or the
        caller's own, over the cached keys and these), or None for causal attention."""
        B, T, _ = x.shape  # with sequence parallelism T is the whole sequence here
        d = self.head_dim
        # Head counts are inferred (-1) so the same code runs on tensor-parallel shards.
        if hasattr(self, "qkv_proj"):
            qkv = self.qkv_proj(x).view(B, T, -1, self.q_per_kv + 2, d)  # (B, T, G, q+2, D)
            q = qkv[:, :, :, : self.q_per_kv].reshape(B, T, -1, d)  # (B, T, H, D)
            k, v = qkv[:, :, :, -2], qkv[:, :, :, -1]  # (B, T, G, D)
        else:
            q = self.q_proj(x).view(B, T, -1, d)
            k = self.k_proj(x).view(B, T, -1, d)
            v = self.v_proj(x).view(B, T, -1, d)
        if rope is not None:
            cos, sin = rope.rows(T)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|G, T, D)

        mask, causal, start = None, True, 0
        if kv_cache is not None:
            start = kv_cache.length(self.layer_index)
            k, v = kv_cache.append(self.layer_index, k, v)
        if examples is not None:
            mask, causal = examples, False
        elif start > 0:  # new queries see the whole cache and their own causal prefix
            causal = False
            mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(start)
        if self.attention_fn is not None and mask is None and kv_cache is None:
            y = self.attention_fn(q, k, v)  # (B, H, T, D)
        else:
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=self.dropout if self.training else 0.0,
                is_causal=causal,
                enable_gqa=self.q_per_kv > 1,
            )  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, H * D)
        return self.resid_dropout(self.out_proj(y))


class ClassificationHead(nn.Module):
    """GPT-1's classifier: a linear layer on the final hidden state of one token of each
    sequence (the text's last, EOD, which has attended to all of it)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.proj = nn.Linear(cfg.hidden_size, cfg.num_labels, bias=False)

    def forward(self, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(h.shape[0], device=h.device)
        return self.proj(h[rows, positions])  # (B, num_labels)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, width: int | None = None):
        super().__init__()
        hidden = width or cfg.mlp_width
        self.swiglu = cfg.activation == "swiglu"
        if self.swiglu:
            self.gate_proj = nn.Linear(cfg.hidden_size, hidden, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.hidden_size, hidden, bias=cfg.bias)
        self.down_proj = nn.Linear(hidden, cfg.hidden_size, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        else:  # GPT-2's GELU is the tanh approximation; exports depend on matching it
            h = F.gelu(self.up_proj(x), approximate="tanh")
        return self.dropout(self.down_proj(h))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_index: int):
        super().__init__()
        self.attn_norm = build_norm(cfg)
        self.attn = Attention(cfg, layer_index)
        self.mlp_norm = build_norm(cfg)
        if cfg.is_moe_layer(layer_index):
            shared = cfg.moe.shared_experts * cfg.expert_width
            self.mlp = MoE(cfg, MLP(cfg, shared) if shared else None)
        else:
            self.mlp = MLP(cfg)

    def forward(self, x, rope=None, kv_cache=None, examples=None):
        x = x + self.attn(self.attn_norm(x), rope, kv_cache, examples)
        return x + self.mlp(self.mlp_norm(x))


class _AddGradient(torch.autograd.Function):
    """Returns x unchanged; in backward, `loss` receives gradient 1, as if it had been
    added to the final loss (Megatron's MoEAuxLossAutoScaler): how a pipeline stage's
    auxiliary losses reach backward without travelling to the last stage."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(loss)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (loss,) = ctx.saved_tensors
        return grad, torch.ones_like(loss)


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        vocab = cfg.padded_vocab_size
        self.embed_tokens = nn.Embedding(vocab, cfg.hidden_size)
        self.embed_positions = (
            nn.Embedding(cfg.max_seq_len, cfg.hidden_size)
            if cfg.position_embedding == "learned"
            else None
        )
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.n_layers)})
        self.final_norm = build_norm(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, vocab, bias=False)
        self.score = ClassificationHead(cfg) if cfg.num_labels else None
        self.tie_weights()
        # Rotary tables are derived state: not saved, rebuilt by init_weights().
        shape = (cfg.max_seq_len, cfg.head_dim) if cfg.position_embedding == "rope" else (0,)
        self.register_buffer("rope_cos", torch.empty(shape), persistent=False)
        self.register_buffer("rope_sin", torch.empty(shape), persistent=False)
        # Set by megagpt.parallel to recompute blocks in backward: f(block, *args).
        self.checkpoint_fn: Callable[..., torch.Tensor] | None = None

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        start_pos: int = 0,
        kv_cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
        reduction: str = "mean",
        label_positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        select: torch.Tensor | None = None,
        moe_row_weights: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, T) ids -> logits (B, T, V), or the loss over the targets (B, T)
        that are not IGNORE_INDEX if they are given (their mean, or sum with
        reduction="sum"). The loss is computed here, inside forward, so that
        torch.compile fuses it with the output layer and DDP/FSDP see one call. A
        pipeline stage without the embedding takes hidden states (B, T, C) instead, and
        one without the head returns them.

        Packed examples (fine-tuning): `positions` (B, T) restart at 0 in every example
        and `segments` (B, T) number the examples of each row, so that attention never
        crosses from one example into another. Without them token t is at start_pos + t.

        Classification: with `label_positions` (B,), the token of each row whose final
        hidden state the classification head reads, the result is a pair: what the
        language-model head gives (logits or loss, as above) and the class logits (B, L).

        Scoring and generation (megagpt.harness): `attention_mask` (B, 1, T, K) bool,
        True where a query may see a key (K: the keys cached before plus these T),
        replaces the causal mask, e.g. for left-padded prompts or for several
        continuations sharing one context; `select` (B, T) bool keeps only those
        positions for the output layer, which then returns logits (N, V) for the N
        selected positions in row-major order (the output layer is the largest matmul
        at a large vocabulary; the other positions' logits are never computed).

        Mixture-of-experts layers (model.moe): in training, with targets, their
        auxiliary losses add to the loss's gradient, not to its value (see
        moe_auxiliary_loss). A pipeline stage has no targets: with `moe_row_weights`
        (B,), what the step's loss weighs each row's per-sequence losses by, its layers'
        auxiliary losses join backward through the hidden states it returns.
        """
        if self.embed_tokens is not None:
            h = self.embed_tokens(tokens)  # (B, T, C)
            if self.embed_positions is not None:
                if positions is None:
                    T = tokens.shape[1]
                    positions = torch.arange(start_pos, start_pos + T, device=tokens.device)
                h = h + self.embed_positions(positions)
            h = self.embed_dropout(h)
        else:
            h = tokens
        rope = None
        if self.config.position_embedding == "rope":
            if positions is None:
                rope = Rotary(self.rope_cos, self.rope_sin, start_pos)
            else:  # packed examples: every row has its own positions
                rope = Rotary(self.rope_cos[positions], self.rope_sin[positions])
        examples = attention_mask
        if examples is None and segments is not None:
            examples = example_mask(segments)
        for block in self.layers.values():
            if self.checkpoint_fn is not None and self.training and kv_cache is None:
                h = self.checkpoint_fn(block, h, rope, None, examples)
            else:
                h = block(h, rope, kv_cache, examples)
        if moe_row_weights is not None and self.training and self.config.moe.num_experts:
            h = _AddGradient.apply(h, self.weighted_auxiliary_loss(moe_row_weights))
        if select is not None and self.lm_head is not None:
            h = h[select]  # (N, C)
        if self.final_norm is not None:
            h = self.final_norm(h)
        classes = None
        if label_positions is not None:
            classes = self.score(h, label_positions)  # (B, num_labels)
        if self.lm_head is not None:
            h = self.lm_head(h)  # (B, T, V)
            if targets is not None:
                h = cross_entropy(h, targets, reduction)
                if self.training and self.config.moe.num_experts:
                    aux = self.moe_auxiliary_loss(targets, reduction)
                    if hasattr(h, "to_local"):  # tensor parallel's loss, whole on every rank
                        h = h.to_local()  # (a DTensor; the model stays free of its import)
                    h = h + aux
        return h if classes is None else (h, classes)

    @property
    def moe_layers(self) -> list[MoE]:
        """The mixture-of-experts layers this model (or pipeline stage) holds."""
        return [m for m in self.modules() if isinstance(m, MoE)]

    def moe_auxiliary_loss(self, targets: torch.Tensor, reduction: str) -> torch.Tensor:
        """The MoE layers' load-balancing and z-losses of this forward, weighted by
        model.moe's coefficients, as a term that adds to the loss's gradient only.

        Each sequence's losses count once per trained token of its row (targets that
        are not IGNORE_INDEX), as its cross-entropy does: summed ("sum", which the train
        module scales by dp / N) or over this batch's trained tokens ("mean"). The
        gradient is then that of the mean over every sequence of the global batch,
        weighted by its share of the trained tokens, whatever the gradient accumulation
        and data-parallel size (the per-sequence losses do not depend on which rows
        share a microbatch). Its value is zero: the loss reported stays the language
        model's cross-entropy, comparable with validation and dense runs; the layers
        keep the auxiliary losses themselves.
        """
        row_tokens = (targets != IGNORE_INDEX).sum(-1).float()  # (B,)
        if reduction == "mean":
            row_tokens = row_tokens / row_tokens.sum().clamp(min=1)
        total = self.weighted_auxiliary_loss(row_tokens)
        return total - total.detach()

    def weighted_auxiliary_loss(self, row_weights: torch.Tensor) -> torch.Tensor:
        """The sum over this forward's MoE layers and rows of each row's coefficient-
        weighted load-balancing and z-losses times `row_weights` (B,)."""
        moe = self.config.moe
        total = torch.zeros((), device=row_weights.device)
        for layer in self.moe_layers:
            balance, z = layer.take_losses()  # (B,) each
            per_row = moe.aux_loss_coeff * balance + moe.z_loss_coeff * z
            total = total + (per_row * row_weights).sum()
        return total

    def tie_weights(self) -> None:
        """Share the embedding with the output layer. Call again after `to_empty`,
        which allocates every module's parameters separately and so unties them."""
        has_both = self.embed_tokens is not None and self.lm_head is not None
        if self.config.tie_embeddings and has_both:
            self.lm_head.weight = self.embed_tokens.weight

    def initial_value(
        self, name: str, shape: torch.Size, seed: int, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """The full initial value of parameter `name`: GPT-2/Megatron initialization,
        N(0, init_std) for matmuls and embeddings, init_std / sqrt(2 x n_layers) for the
        projections that write into the residual stream, zero biases, unit norms.

        Each parameter draws from its own generator, seeded by (seed, name), so the
        values do not depend on how the model is split across ranks: a parallel run
        starts from exactly the weights of a single-process run.
        """
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ADAPTER_PARAMETERS:  # LoRA: B zero, so training starts at the base model
            return adapter_initial_value(name, shape, seed, device)
        if "norm" in name:
            return (torch.ones if leaf == "weight" else torch.zeros)(shape, device=device)
        if leaf == "bias":
            return torch.zeros(shape, device=device)
        std = self.config.init_std
        if name.endswith(("out_proj.weight", "down_proj.weight", "experts.down_proj")):
            std /= math.sqrt(2 * self.config.n_layers)
        if name == "lm_head.weight" and self.config.tie_embeddings:
            name = "embed_tokens.weight"  # a pipeline's last-stage copy of the tied matrix
        generator = torch.Generator(device=device)
        generator.manual_seed(derive_key(seed, zlib.crc32(name.encode())))
        return torch.empty(shape, device=device).normal_(0.0, std, generator=generator)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Initialize every (unsharded) parameter with `initial_value`, and the buffers."""
        for name, param in self.named_parameters():
            param.copy_(self.initial_value(name, param.shape, seed, param.device))
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        for layer in self.moe_layers:
            layer.reset_state()
        if self.config.position_embedding == "rope":
            cos, sin = rotary_tables(
                self.rope_cos.shape[-1], self.config.max_seq_len, self.config.rope_theta
            )
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)
