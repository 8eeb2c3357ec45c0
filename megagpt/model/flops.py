"""Parameter and FLOP counts from a ModelConfig, for MFU and sizing.

FLOPs per token follow the PaLM paper's accounting (appendix B): 6 x (parameters that
take part in a matmul) for the forward and backward pass, plus 12 x layers x hidden x
sequence for attention scores and values. Causal masking skips half of that attention
work in practice; the convention, shared by Megatron and nanoGPT, counts it whole.

In mixture-of-experts layers a token passes through the router, its top_k routed experts
and the shared experts only: FLOPs count those active parameters, not every expert.
"""

from __future__ import annotations

from megagpt.config.schema import ModelConfig


def parameter_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameters by part, computed from the shape alone (no model is built); "total"
    sums the parts, "active" is what one token uses (fewer with MoE layers)."""
    c, layers = cfg.hidden_size, cfg.n_layers
    kv = cfg.kv_heads * cfg.head_dim
    ffn = cfg.mlp_width
    vocab = cfg.padded_vocab_size
    bias = 1 if cfg.bias else 0
    norm = c * (2 if cfg.norm == "layernorm" and cfg.bias else 1)
    attention = c * (c + 2 * kv) + bias * (c + 2 * kv) + c * c + bias * c
    mlp_in = (2 if cfg.activation == "swiglu" else 1) * (c * ffn + bias * ffn)
    mlp = mlp_in + ffn * c + bias * c
    moe, unused = _moe_layer_parameters(cfg)
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(layers))
    counts = {
        "embedding": vocab * c,
        "positions": cfg.max_seq_len * c if cfg.position_embedding == "learned" else 0,
        "blocks": layers * (attention + 2 * norm) + (layers - moe_layers) * mlp + moe_layers * moe,
        "final_norm": norm,
        "lm_head": 0 if cfg.tie_embeddings else vocab * c,
        "score": cfg.num_labels * c,
    }
    counts["total"] = sum(counts.values())
    counts["active"] = counts["total"] - moe_layers * unused
    return counts


def _moe_layer_parameters(cfg: ModelConfig) -> tuple[int, int]:
    """An MoE layer's parameters, and those a token leaves unused (the routed experts
    it is not sent to). Routed experts have no biases; shared experts are one MLP."""
    moe = cfg.moe
    if not moe.num_experts:
        return 0, 0
    c, width = cfg.hidden_size, cfg.expert_width
    matrices = 3 if cfg.activation == "swiglu" else 2
    expert = matrices * c * width
    shared = moe.shared_experts * width
    bias = 1 if cfg.bias else 0
    shared_mlp = (
        (matrices * c * shared + (matrices - 1) * bias * shared + bias * c) if shared else 0
    )
    layer = c * moe.num_experts + moe.num_experts * expert + shared_mlp
    return layer, (moe.num_experts - moe.top_k) * expert


def matmul_parameters(cfg: ModelConfig) -> int:
    """Parameters each token uses in matrix multiplies: the blocks' weights (only the
    active experts of MoE layers) and the output layer."""
    counts = parameter_counts(cfg)
    unused = counts["total"] - counts["active"]
    return counts["blocks"] - unused + cfg.padded_vocab_size * cfg.hidden_size


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token at sequence length `seq_len`."""
    return 6 * matmul_parameters(cfg) + 12 * cfg.n_layers * cfg.hidden_size * seq_len
