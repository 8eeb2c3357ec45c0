"""How megagpt's mixture-of-experts model maps onto transformers' MixtralForCausalLM.

Mixtral is Llama's attention and norms with every MLP a sparse block: a router without
bias (`mlp.gate`, E x C), a softmax over all E experts, the top k of those
probabilities renormalized to sum to 1, and E SwiGLU experts without biases. That is
megagpt's MoE with a softmax router, normalize_top_k, an MoE in every layer and no
shared experts; anything else would route or mix differently, so it is refused.

Expert layout: transformers 5 holds a layer's experts as two stacked tensors in
nn.Linear's (out, in) orientation, `gate_up_proj` (E, 2F, C) with the gate's rows first
and `down_proj` (E, C, F); megagpt stacks (E, in, out) for its grouped matmul, so the
mapping is a transpose and a concatenation (bit for bit both ways). save_pretrained
writes Mistral's original per-expert files (`block_sparse_moe.experts.N.w1/w3/w2`) and
from_pretrained reads either form.

Load-balancing coefficient: transformers' Mixtral loss is E x sum_i f_i P_i with f_i
summing to top_k (token-expert assignments per token), over every layer's tokens
and sequences pooled; megagpt's has f_i summing to 1, is taken per sequence and summed
over the layers. The coefficients give each layer's router the same gradient (exactly
for one layer and one sequence, else where the shares agree) when
router_aux_loss_coef = aux_loss_coeff x n_layers / top_k: Mixtral's own 0.02 is
0.00125 here. Neither has a place for the other's z-loss or router jitter.
"""

from __future__ import annotations

import logging

import torch

from megagpt.config.errors import ConfigError
from megagpt.config.schema import ModelConfig, MoEConfig

log = logging.getLogger(__name__)


def check_exportable(cfg: ModelConfig) -> None:
    """Refuse, by name, every setting of an MoE model that Mixtral cannot express."""
    moe = cfg.moe
    # setting: (value, what Mixtral has, why)
    needs = {
        "model.norm": (cfg.norm, "rmsnorm", "Mixtral's norms are RMSNorm"),
        "model.position_embedding": (cfg.position_embedding, "rope", "Mixtral is rotary"),
        "model.activation": (cfg.activation, "swiglu", "Mixtral's experts are SwiGLU"),
        "model.bias": (cfg.bias, False, "Mixtral has no biases"),
        "model.moe.router": (moe.router, "softmax", "Mixtral's router is a softmax"),
        "model.moe.normalize_top_k": (
            moe.normalize_top_k,
            True,
            "Mixtral rescales each token's top-k weights to sum to 1",
        ),
        "model.moe.shared_experts": (moe.shared_experts, 0, "Mixtral has no shared experts"),
        "model.moe.every_n_layers": (
            moe.every_n_layers,
            1,
            "every Mixtral layer is a mixture of experts",
        ),
    }
    wrong = [
        f"{setting}={have!r} ({why}: {want!r} works)"
        for setting, (have, want, why) in needs.items()
        if have != want
    ]
    if wrong:
        raise ConfigError(
            "Hugging Face export of a mixture-of-experts model maps to "
            "MixtralForCausalLM, which cannot express " + "; ".join(wrong)
        )


def experts_to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig, layer: int) -> dict:
    """Layer `layer`'s router and experts as transformers' Mixtral tensors."""
    ours, theirs = f"layers.{layer}.mlp.", f"model.layers.{layer}.mlp."
    bias = state[f"{ours}expert_bias"]
    if bias.any():  # the values, not the setting: a run may have changed the setting
        raise ConfigError(
            f"layer {layer}'s expert_bias is not zero (learned with "
            f"model.moe.bias_update_rate={cfg.moe.bias_update_rate}): it changes which "
            "experts a token goes to, and Mixtral chooses by router probabilities alone; "
            "only models trained with model.moe.bias_update_rate=0 export to Mixtral"
        )
    gate, up, down = (state[f"{ours}experts.{name}_proj"] for name in ("gate", "up", "down"))
    return {
        f"{theirs}gate.weight": state[f"{ours}router.weight"],  # (E, C) both
        f"{theirs}experts.gate_up_proj": torch.cat([gate, up], dim=2).transpose(1, 2),
        f"{theirs}experts.down_proj": down.transpose(1, 2),  # (E, F, C) -> (E, C, F)
    }


def experts_from_hf(hf_state: dict[str, torch.Tensor], layer: int) -> dict:
    """Layer `layer`'s router, experts and (zero) expert bias as megagpt tensors."""
    ours, theirs = f"layers.{layer}.mlp.", f"model.layers.{layer}.mlp."
    router = hf_state[f"{theirs}gate.weight"]
    gate, up = hf_state[f"{theirs}experts.gate_up_proj"].transpose(1, 2).chunk(2, dim=2)
    return {
        f"{ours}router.weight": router,
        f"{ours}experts.gate_proj": gate,  # (E, C, F)
        f"{ours}experts.up_proj": up,
        f"{ours}experts.down_proj": hf_state[f"{theirs}experts.down_proj"].transpose(1, 2),
        f"{ours}expert_bias": torch.zeros(router.shape[0]),  # a float32 buffer
    }


def mixtral_config(cfg: ModelConfig, common: dict):
    """transformers.MixtralConfig for `cfg` (checked by check_exportable); `common` holds
    the vocabulary, tying and special-token settings and the Llama shape (hf.py)."""
    import transformers

    moe = cfg.moe
    if moe.z_loss_coeff:
        log.warning(
            "model.moe.z_loss_coeff=%s is not exported: Mixtral has no router z-loss",
            moe.z_loss_coeff,
        )
    return transformers.MixtralConfig(
        intermediate_size=cfg.expert_width,
        sliding_window=None,
        num_local_experts=moe.num_experts,
        num_experts_per_tok=moe.top_k,
        router_aux_loss_coef=moe.aux_loss_coeff * cfg.n_layers / moe.top_k,
        **common,
    )


def moe_config_from_hf(config) -> MoEConfig:
    """model.moe for a transformers MixtralConfig."""
    window = config.sliding_window
    if window is not None and window < config.max_position_embeddings:
        raise ConfigError(
            f"Mixtral sliding_window={window} (below max_position_embeddings "
            f"{config.max_position_embeddings}): megagpt's attention is full causal "
            "attention; import a model with sliding_window null"
        )
    return MoEConfig(
        num_experts=config.num_local_experts,
        top_k=config.num_experts_per_tok,
        expert_width=config.intermediate_size,
        router="softmax",
        normalize_top_k=True,
        aux_loss_coeff=config.router_aux_loss_coef
        * config.num_experts_per_tok
        / config.num_hidden_layers,
        z_loss_coeff=0.0,
        bias_update_rate=0.0,
        every_n_layers=1,
    )
