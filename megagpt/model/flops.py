"""Parameter and FLOP counts from a ModelConfig, for MFU and sizing.

FLOPs per token follow the PaLM paper's accounting (appendix B): 6 x (parameters that
take part in a matmul) for the forward and backward pass, plus 12 x layers x hidden x
sequence for attention scores and values. Causal masking skips half of that attention
work in practice; the convention, shared by Megatron and nanoGPT, counts it whole.
"""

from __future__ import annotations

from megagpt.config.schema import ModelConfig


def parameter_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameters by part, computed from the shape alone (no model is built)."""
    c, layers = cfg.hidden_size, cfg.n_layers
    kv = cfg.kv_heads * cfg.head_dim
    ffn = cfg.mlp_width
    vocab = cfg.padded_vocab_size
    bias = 1 if cfg.bias else 0
    norm = c * (2 if cfg.norm == "layernorm" and cfg.bias else 1)
    attention = c * (c + 2 * kv) + bias * (c + 2 * kv) + c * c + bias * c
    mlp_in = (2 if cfg.activation == "swiglu" else 1) * (c * ffn + bias * ffn)
    mlp = mlp_in + ffn * c + bias * c
    counts = {
        "embedding": vocab * c,
        "positions": cfg.max_seq_len * c if cfg.position_embedding == "learned" else 0,
        "blocks": layers * (attention + mlp + 2 * norm),
        "final_norm": norm,
        "lm_head": 0 if cfg.tie_embeddings else vocab * c,
        "score": cfg.num_labels * c,
    }
    counts["total"] = sum(counts.values())
    return counts


def matmul_parameters(cfg: ModelConfig) -> int:
    """Parameters used in matrix multiplies: the blocks' weights and the output layer."""
    counts = parameter_counts(cfg)
    return counts["blocks"] + cfg.padded_vocab_size * cfg.hidden_size


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token at sequence length `seq_len`."""
    return 6 * matmul_parameters(cfg) + 12 * cfg.n_layers * cfg.hidden_size * seq_len
