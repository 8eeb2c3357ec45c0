"""Hugging Face `transformers` export and import.

A GPT-2-like model (LayerNorm, learned positions, GELU) maps to GPT2LMHeadModel, a
Llama-like one (RMSNorm, rotary, SwiGLU) to LlamaForCausalLM; other combinations have
no matching architecture and are refused with the settings that differ. Conversions
in which gibberish comes out are the field's classic failure, so the tests compare
logits through `transformers` itself, and an import followed by an export reproduces
the original weights bit for bit.

Weight layout notes: GPT-2's `c_attn` is a Conv1D (weights stored transposed) holding
[all queries | all keys | all values]; megagpt's fused QKV groups rows by key/value head
([q x r, k, v] per group) so tensor-parallel shards hold whole groups. Rotary tables
use the half-split layout that Llama checkpoints use, so q/k need no permutation.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from megagpt.checkpoint.layout import CheckpointError
from megagpt.config.schema import ModelConfig
from megagpt.model.gpt import ffn_hidden_size, padded_vocab_size

GPT2_LIKE = {"norm": "layernorm", "position_embedding": "learned", "activation": "gelu"}
LLAMA_LIKE = {"norm": "rmsnorm", "position_embedding": "rope", "activation": "swiglu"}


def architecture(cfg: ModelConfig) -> str:
    for name, wanted in (("gpt2", GPT2_LIKE), ("llama", LLAMA_LIKE)):
        if all(getattr(cfg, k) == v for k, v in wanted.items()):
            if name == "gpt2" and not cfg.bias:
                raise CheckpointError(
                    "GPT-2 exports need model.bias=true (GPT2LMHeadModel has biases everywhere)"
                )
            if name == "gpt2" and (cfg.n_kv_heads or cfg.n_heads) != cfg.n_heads:
                raise CheckpointError(
                    "GPT-2 exports need plain multi-head attention "
                    "(model.n_kv_heads null or equal to model.n_heads)"
                )
            return name
    have = {k: getattr(cfg, k) for k in GPT2_LIKE}
    raise CheckpointError(
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
    groups = cfg.n_kv_heads or cfg.n_heads
    per_group = cfg.n_heads // groups + 2
    grouped = fused.reshape(groups, per_group, -1, *fused.shape[1:])  # (G, r + 2, D, ...)
    q = grouped[:, :-2].reshape(-1, *fused.shape[1:])
    return (
        q,
        grouped[:, -2].reshape(-1, *fused.shape[1:]),
        grouped[:, -1].reshape(-1, *fused.shape[1:]),
    )


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig):
    groups = cfg.n_kv_heads or cfg.n_heads
    rest = q.shape[1:]
    q = q.reshape(groups, cfg.n_heads // groups, -1, *rest)
    k, v = k.reshape(groups, 1, -1, *rest), v.reshape(groups, 1, -1, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


# ---------------------------------------------------------------- megagpt -> HF
def to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """megagpt state dict (as GPT.state_dict()) -> transformers state dict."""
    arch = architecture(cfg)
    out: dict[str, torch.Tensor] = {}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        parts = ("weight", "bias") if cfg.bias else ("weight",)
        qkv = {part: _split_qkv(state, p, cfg, part) for part in parts}
        if arch == "gpt2":
            h = f"transformer.h.{i}."
            out[h + "ln_1.weight"], out[h + "ln_1.bias"] = (
                state[p + "attn_norm.weight"],
                state[p + "attn_norm.bias"],
            )
            out[h + "ln_2.weight"], out[h + "ln_2.bias"] = (
                state[p + "mlp_norm.weight"],
                state[p + "mlp_norm.bias"],
            )
            out[h + "attn.c_attn.weight"] = torch.cat(qkv["weight"]).t()
            out[h + "attn.c_attn.bias"] = torch.cat(qkv["bias"])
            for ours, theirs in (
                ("attn.out_proj", "attn.c_proj"),
                ("mlp.up_proj", "mlp.c_fc"),
                ("mlp.down_proj", "mlp.c_proj"),
            ):
                out[f"{h}{theirs}.weight"] = state[f"{p}{ours}.weight"].t()
                out[f"{h}{theirs}.bias"] = state[f"{p}{ours}.bias"]
        else:
            h = f"model.layers.{i}."
            out[h + "input_layernorm.weight"] = state[p + "attn_norm.weight"]
            out[h + "post_attention_layernorm.weight"] = state[p + "mlp_norm.weight"]
            for part in parts:
                for name, value in zip("qkv", qkv[part]):
                    out[f"{h}self_attn.{name}_proj.{part}"] = value
                for ours, theirs in (
                    ("attn.out_proj", "self_attn.o_proj"),
                    ("mlp.gate_proj", "mlp.gate_proj"),
                    ("mlp.up_proj", "mlp.up_proj"),
                    ("mlp.down_proj", "mlp.down_proj"),
                ):
                    out[f"{h}{theirs}.{part}"] = state[f"{p}{ours}.{part}"]
    if arch == "gpt2":
        out["transformer.wte.weight"] = state["embed_tokens.weight"]
        out["transformer.wpe.weight"] = state["embed_positions.weight"]
        out["transformer.ln_f.weight"] = state["final_norm.weight"]
        out["transformer.ln_f.bias"] = state["final_norm.bias"]
    else:
        out["model.embed_tokens.weight"] = state["embed_tokens.weight"]
        out["model.norm.weight"] = state["final_norm.weight"]
    out["lm_head.weight"] = state["lm_head.weight"]
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def hf_config(cfg: ModelConfig, special_ids: dict[str, int] | None = None):
    import transformers

    ids = special_ids or {}
    common = dict(
        vocab_size=padded_vocab_size(cfg),
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
            n_inner=ffn_hidden_size(cfg),
            activation_function="gelu_new",
            layer_norm_epsilon=cfg.norm_eps,
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.attention_dropout,
            **common,
        )
    return transformers.LlamaConfig(
        hidden_size=cfg.hidden_size,
        intermediate_size=ffn_hidden_size(cfg),
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads or cfg.n_heads,
        head_dim=cfg.hidden_size // cfg.n_heads,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        attention_bias=cfg.bias,
        mlp_bias=cfg.bias,
        hidden_act="silu",
        attention_dropout=cfg.attention_dropout,
        **common,
    )


def save_hf(
    state: dict[str, torch.Tensor], cfg: ModelConfig, out: Path, tokenizer_model: Path | None = None
) -> Path:
    """Write a transformers model directory (config.json, model.safetensors, tokenizer)."""
    import transformers

    special = None
    if tokenizer_model is not None:
        from megagpt.tokenizer import Tokenizer

        tok = Tokenizer(tokenizer_model)
        special = {"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id}
    config = hf_config(cfg, special)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    hf_state = to_hf(state, cfg)
    missing, unexpected = model.load_state_dict(hf_state, strict=False, assign=True)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(
            f"export mapping is incomplete: missing {missing}, unexpected {unexpected}"
        )
    if cfg.tie_embeddings:
        model.tie_weights()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if tokenizer_model is not None:
        _save_tokenizer(tokenizer_model, out)
    return out


def _save_tokenizer(tokenizer_model: Path, out: Path) -> None:
    """The sentencepiece model with a config transformers' LlamaTokenizer reads (it
    converts it to a fast tokenizer: the same ids, except for text that starts with
    spaces, where sentencepiece's dummy prefix is handled differently)."""
    shutil.copyfile(tokenizer_model, out / "tokenizer.model")
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "add_bos_token": False,
                "add_eos_token": False,
                "legacy": False,
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "pad_token": "<pad>",
                "model_max_length": 1_000_000,
            },
            indent=2,
        )
        + "\n"
    )


# ---------------------------------------------------------------- HF -> megagpt
def model_config_from_hf(config) -> ModelConfig:
    kind = config.model_type
    if kind == "gpt2":
        if config.activation_function != "gelu_new":
            raise CheckpointError(
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
    if kind == "llama":
        rope = getattr(config, "rope_parameters", None) or {}
        if rope.get("rope_type", "default") != "default":
            raise CheckpointError(f"rope scaling {rope.get('rope_type')!r} is not supported")
        if config.attention_bias != config.mlp_bias or config.hidden_act != "silu":
            raise CheckpointError(
                "megagpt's Llama shape needs attention_bias == mlp_bias and hidden_act silu"
            )
        if config.head_dim * config.num_attention_heads != config.hidden_size:
            raise CheckpointError("head_dim x num_attention_heads must equal hidden_size")
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
            bias=config.attention_bias,
            tie_embeddings=config.tie_word_embeddings,
            fused_qkv=False,
            attention_dropout=config.attention_dropout,
        )
    raise CheckpointError(f"model_type {kind!r}: megagpt imports gpt2 and llama models")


def from_hf(hf_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """transformers state dict -> megagpt state dict (GPT.state_dict() keys)."""
    arch = architecture(cfg)
    state: dict[str, torch.Tensor] = {}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        if arch == "gpt2":
            h = f"transformer.h.{i}."
            for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
                state[f"{p}{ours}.weight"] = hf_state[f"{h}{theirs}.weight"]
                state[f"{p}{ours}.bias"] = hf_state[f"{h}{theirs}.bias"]
            weight = hf_state[h + "attn.c_attn.weight"].t()
            bias = hf_state[h + "attn.c_attn.bias"]
            state[p + "attn.qkv_proj.weight"] = _fuse_qkv(*weight.chunk(3), cfg)
            state[p + "attn.qkv_proj.bias"] = _fuse_qkv(*bias.chunk(3), cfg)
            for ours, theirs in (
                ("attn.out_proj", "attn.c_proj"),
                ("mlp.up_proj", "mlp.c_fc"),
                ("mlp.down_proj", "mlp.c_proj"),
            ):
                state[f"{p}{ours}.weight"] = hf_state[f"{h}{theirs}.weight"].t()
                state[f"{p}{ours}.bias"] = hf_state[f"{h}{theirs}.bias"]
        else:
            h = f"model.layers.{i}."
            state[p + "attn_norm.weight"] = hf_state[h + "input_layernorm.weight"]
            state[p + "mlp_norm.weight"] = hf_state[h + "post_attention_layernorm.weight"]
            for part in ("weight", "bias") if cfg.bias else ("weight",):
                for name in "qkv":
                    state[f"{p}attn.{name}_proj.{part}"] = hf_state[
                        f"{h}self_attn.{name}_proj.{part}"
                    ]
                for ours, theirs in (
                    ("attn.out_proj", "self_attn.o_proj"),
                    ("mlp.gate_proj", "mlp.gate_proj"),
                    ("mlp.up_proj", "mlp.up_proj"),
                    ("mlp.down_proj", "mlp.down_proj"),
                ):
                    state[f"{p}{ours}.{part}"] = hf_state[f"{h}{theirs}.{part}"]
    prefix = "transformer." if arch == "gpt2" else "model."
    embed = "wte" if arch == "gpt2" else "embed_tokens"
    state["embed_tokens.weight"] = hf_state[f"{prefix}{embed}.weight"]
    if arch == "gpt2":
        state["embed_positions.weight"] = hf_state["transformer.wpe.weight"]
        state["final_norm.weight"] = hf_state["transformer.ln_f.weight"]
        state["final_norm.bias"] = hf_state["transformer.ln_f.bias"]
    else:
        state["final_norm.weight"] = hf_state["model.norm.weight"]
    state["lm_head.weight"] = hf_state.get("lm_head.weight", state["embed_tokens.weight"])
    return {k: v.detach().contiguous().clone() for k, v in state.items()}
