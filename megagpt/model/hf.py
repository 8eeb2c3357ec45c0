"""How megagpt's GPT maps onto Hugging Face `transformers` models: names, shapes, configs.

A GPT-2-like model (LayerNorm, learned positions, GELU) maps to GPT2LMHeadModel, a
Llama-like one (RMSNorm, rotary, SwiGLU) to LlamaForCausalLM, and a Llama-like mixture
of experts to MixtralForCausalLM (hf_mixtral.py); other combinations have no matching
architecture and are refused with the settings that differ. Conversions in which
gibberish comes out are the field's classic failure, so the tests compare logits
through `transformers` itself, and an import followed by an export reproduces the
original weights bit for bit.

Weight layout notes: GPT-2's `c_attn` is a Conv1D (weights stored transposed) holding
[all queries | all keys | all values]; megagpt's fused QKV groups rows by key/value head
([q x r, k, v] per group) so tensor-parallel shards hold whole groups. Rotary tables
use the half-split layout that Llama checkpoints use, so q/k need no permutation.
"""

from __future__ import annotations

import torch

from megagpt.config.errors import ConfigError
from megagpt.config.schema import ModelConfig, MoEConfig
from megagpt.model import hf_mixtral

GPT2_LIKE = {"norm": "layernorm", "position_embedding": "learned", "activation": "gelu"}
LLAMA_LIKE = {"norm": "rmsnorm", "position_embedding": "rope", "activation": "swiglu"}


def architecture(cfg: ModelConfig) -> str:
    if cfg.moe.num_experts:
        hf_mixtral.check_exportable(cfg)
        return "mixtral"
    for name, wanted in (("gpt2", GPT2_LIKE), ("llama", LLAMA_LIKE)):
        if all(getattr(cfg, k) == v for k, v in wanted.items()):
            if name == "gpt2" and not cfg.bias:
                raise ConfigError(
                    "GPT-2 exports need model.bias=true (GPT2LMHeadModel has biases everywhere)"
                )
            if name == "gpt2" and cfg.kv_heads != cfg.n_heads:
                raise ConfigError(
                    "GPT-2 exports need plain multi-head attention "
                    "(model.n_kv_heads null or equal to model.n_heads)"
                )
            return name
    have = {k: getattr(cfg, k) for k in GPT2_LIKE}
    raise ConfigError(
        f"no Hugging Face architecture matches model {have}: export needs "
        f"GPT-2's {GPT2_LIKE} or Llama's {LLAMA_LIKE}"
    )


# ---------------------------------------------------------------- attention weights
def _split_qkv(state: dict, prefix: str, cfg: ModelConfig, part: str) -> tuple:
    """(q, k, v) weights or biases of one layer, in plain head order."""
    suffix = f".{part}"
    if f"{prefix}attn.q_proj{suffix}" in state:
        return tuple(state[f"{prefix}attn.{n}_proj{suffix}"] for n in "qkv")
    fused = state[f"{prefix}attn.qkv_proj{suffix}"]
    groups = cfg.kv_heads
    per_group = cfg.n_heads // groups + 2
    grouped = fused.reshape(groups, per_group, -1, *fused.shape[1:])  # (G, r + 2, D, ...)
    q = grouped[:, :-2].reshape(-1, *fused.shape[1:])
    return (
        q,
        grouped[:, -2].reshape(-1, *fused.shape[1:]),
        grouped[:, -1].reshape(-1, *fused.shape[1:]),
    )


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig):
    groups = cfg.kv_heads
    rest = q.shape[1:]
    q = q.reshape(groups, cfg.n_heads // groups, -1, *rest)
    k, v = k.reshape(groups, 1, -1, *rest), v.reshape(groups, 1, -1, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


# ---------------------------------------------------------------- name maps
def _name_map(cfg: ModelConfig) -> list[tuple[str, str, bool]]:
    """(megagpt name, transformers name, stored transposed by transformers) for every
    tensor except the attention's query/key/value projections and Mixtral's experts."""
    parts = ("weight", "bias") if cfg.bias else ("weight",)
    if architecture(cfg) == "gpt2":  # Conv1D layers store their weights transposed
        layer = [
            ("attn_norm", "ln_1"),
            ("mlp_norm", "ln_2"),
            ("attn.out_proj", "attn.c_proj"),
            ("mlp.up_proj", "mlp.c_fc"),
            ("mlp.down_proj", "mlp.c_proj"),
        ]
        rows = [
            (f"{ours}.{part}", f"{theirs}.{part}", part == "weight" and "norm" not in ours)
            for ours, theirs in layer
            for part in ("weight", "bias")
        ]
        top = [
            ("embed_tokens.weight", "transformer.wte.weight"),
            ("embed_positions.weight", "transformer.wpe.weight"),
            ("final_norm.weight", "transformer.ln_f.weight"),
            ("final_norm.bias", "transformer.ln_f.bias"),
        ]
        layer_prefix = "transformer.h"
    else:
        rows = [
            ("attn_norm.weight", "input_layernorm.weight", False),
            ("mlp_norm.weight", "post_attention_layernorm.weight", False),
        ]
        linear = [("attn.out_proj", "self_attn.o_proj")]
        if architecture(cfg) == "llama":  # Mixtral's MLPs are experts, mapped apart
            linear += [(f"mlp.{n}_proj", f"mlp.{n}_proj") for n in ("gate", "up", "down")]
        rows += [
            (f"{ours}.{part}", f"{theirs}.{part}", False)
            for ours, theirs in linear
            for part in parts
        ]
        top = [
            ("embed_tokens.weight", "model.embed_tokens.weight"),
            ("final_norm.weight", "model.norm.weight"),
        ]
        layer_prefix = "model.layers"
    names = [(ours, theirs, False) for ours, theirs in top]
    names.append(("lm_head.weight", "lm_head.weight", False))
    for i in range(cfg.n_layers):
        names += [
            (f"layers.{i}.{ours}", f"{layer_prefix}.{i}.{theirs}", transposed)
            for ours, theirs, transposed in rows
        ]
    return names


def _qkv_name(cfg: ModelConfig, layer: int, name: str, part: str) -> str:
    if architecture(cfg) == "gpt2":
        return f"transformer.h.{layer}.attn.c_attn.{part}"
    return f"model.layers.{layer}.self_attn.{name}_proj.{part}"


# ---------------------------------------------------------------- megagpt -> HF
def to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """megagpt state dict (as GPT.state_dict()) -> transformers state dict."""
    out = {
        theirs: state[ours].t() if transposed else state[ours]
        for ours, theirs, transposed in _name_map(cfg)
    }
    for i in range(cfg.n_layers):
        for part in ("weight", "bias") if cfg.bias else ("weight",):
            q, k, v = _split_qkv(state, f"layers.{i}.", cfg, part)
            if architecture(cfg) == "gpt2":  # one Conv1D: [queries | keys | values]
                fused = torch.cat([q, k, v])
                out[_qkv_name(cfg, i, "c_attn", part)] = fused.t() if part == "weight" else fused
            else:
                for name, value in zip("qkv", (q, k, v)):
                    out[_qkv_name(cfg, i, name, part)] = value
        if architecture(cfg) == "mixtral":
            out.update(hf_mixtral.experts_to_hf(state, cfg, i))
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def hf_config(cfg: ModelConfig, special_ids: dict[str, int] | None = None):
    import transformers

    ids = special_ids or {}
    common = dict(
        vocab_size=cfg.padded_vocab_size,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=ids.get("bos"),
        eos_token_id=ids.get("eos"),
        pad_token_id=ids.get("pad"),
    )
    if architecture(cfg) == "gpt2":
        return transformers.GPT2Config(
            n_embd=cfg.hidden_size,
            n_layer=cfg.n_layers,
            n_head=cfg.n_heads,
            n_positions=cfg.max_seq_len,
            n_inner=cfg.mlp_width,
            activation_function="gelu_new",
            layer_norm_epsilon=cfg.norm_eps,
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.attention_dropout,
            **common,
        )
    common |= dict(  # the Llama shape, Mixtral's too
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        hidden_act="silu",
        attention_dropout=cfg.attention_dropout,
    )
    if architecture(cfg) == "mixtral":
        return hf_mixtral.mixtral_config(cfg, common)
    return transformers.LlamaConfig(
        intermediate_size=cfg.mlp_width, attention_bias=cfg.bias, mlp_bias=cfg.bias, **common
    )


# ---------------------------------------------------------------- HF -> megagpt
def model_config_from_hf(config) -> ModelConfig:
    kind = config.model_type
    if kind == "gpt2":
        if config.activation_function != "gelu_new":
            raise ConfigError(
                f"GPT-2 activation {config.activation_function!r}: megagpt "
                "implements gelu_new (tanh GELU)"
            )
        return ModelConfig(
            vocab_size=config.vocab_size,
            max_seq_len=config.n_positions,
            n_layers=config.n_layer,
            hidden_size=config.n_embd,
            n_heads=config.n_head,
            ffn_hidden_size=config.n_inner or 4 * config.n_embd,
            activation="gelu",
            norm="layernorm",
            norm_eps=config.layer_norm_epsilon,
            position_embedding="learned",
            bias=True,
            tie_embeddings=config.tie_word_embeddings,
            fused_qkv=True,
            dropout=config.resid_pdrop,
            attention_dropout=config.attn_pdrop,
        )
    if kind in ("llama", "mixtral"):
        rope = getattr(config, "rope_parameters", None) or {}
        if rope.get("rope_type", "default") != "default":
            raise ConfigError(f"rope scaling {rope.get('rope_type')!r} is not supported")
        # Mixtral has no biases and no settings for them
        bias = getattr(config, "attention_bias", False)
        if bias != getattr(config, "mlp_bias", False) or config.hidden_act != "silu":
            raise ConfigError(
                "megagpt's Llama shape needs attention_bias == mlp_bias and hidden_act silu"
            )
        head_dim = config.head_dim or config.hidden_size // config.num_attention_heads
        if head_dim * config.num_attention_heads != config.hidden_size:
            raise ConfigError("head_dim x num_attention_heads must equal hidden_size")
        moe = hf_mixtral.moe_config_from_hf(config) if kind == "mixtral" else MoEConfig()
        return ModelConfig(
            vocab_size=config.vocab_size,
            max_seq_len=config.max_position_embeddings,
            n_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            n_heads=config.num_attention_heads,
            n_kv_heads=config.num_key_value_heads,
            ffn_hidden_size=config.intermediate_size,
            activation="swiglu",
            norm="rmsnorm",
            norm_eps=config.rms_norm_eps,
            position_embedding="rope",
            rope_theta=rope.get("rope_theta", 10000.0),
            bias=bias,
            tie_embeddings=config.tie_word_embeddings,
            fused_qkv=False,
            attention_dropout=config.attention_dropout,
            moe=moe,
        )
    raise ConfigError(f"model_type {kind!r}: megagpt imports gpt2, llama and mixtral models")


def from_hf(hf_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """transformers state dict -> megagpt state dict (GPT.state_dict() keys); GPT-2
    becomes a fused QKV, Llama separate q/k/v projections (as model_config_from_hf)."""
    if "lm_head.weight" not in hf_state:  # tied: transformers may store it once
        embed = (
            "transformer.wte.weight"
            if architecture(cfg) == "gpt2"
            else ("model.embed_tokens.weight")
        )
        hf_state = {**hf_state, "lm_head.weight": hf_state[embed]}
    state = {
        ours: hf_state[theirs].t() if transposed else hf_state[theirs]
        for ours, theirs, transposed in _name_map(cfg)
    }
    for i in range(cfg.n_layers):
        for part in ("weight", "bias") if cfg.bias else ("weight",):
            if architecture(cfg) == "gpt2":
                fused = hf_state[_qkv_name(cfg, i, "c_attn", part)]
                fused = fused.t() if part == "weight" else fused
                state[f"layers.{i}.attn.qkv_proj.{part}"] = _fuse_qkv(*fused.chunk(3), cfg)
            else:
                for name in "qkv":
                    state[f"layers.{i}.attn.{name}_proj.{part}"] = hf_state[
                        _qkv_name(cfg, i, name, part)
                    ]
        if architecture(cfg) == "mixtral":
            state.update(hf_mixtral.experts_from_hf(hf_state, i))
    return {k: v.detach().contiguous().clone() for k, v in state.items()}
