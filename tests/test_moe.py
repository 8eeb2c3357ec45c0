"""Mixture-of-experts layers: the grouped-matmul dispatch against a per-expert loop,
the auxiliary losses by hand, balancing by bias, training, gradient accumulation and
data parallelism, parameter and FLOP counts, and the settings refused."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from megagpt.checkpoint import consolidated_state_dict
from megagpt.config import ConfigError, apply_overrides
from megagpt.config.schema import ModelConfig, MoEConfig
from megagpt.model.build import build_model
from megagpt.model.flops import flops_per_token, matmul_parameters, parameter_counts
from megagpt.model.hf import to_hf
from megagpt.model.moe import MoE
from megagpt.parallel.activation_checkpoint import apply_activation_checkpointing
from megagpt.testing import run_distributed
from megagpt.training.trainer import train
from tests.parallel_workers import first_step_gradients


def moe_config(**moe) -> ModelConfig:
    settings = dict(num_experts=4, top_k=2, expert_width=16) | moe
    return ModelConfig(
        vocab_size=64, max_seq_len=16, n_layers=1, hidden_size=32, n_heads=4, bias=False,
        moe=MoEConfig(**settings),
    )  # fmt: skip


def moe_layer(cfg: ModelConfig, seed: int = 0) -> MoE:
    layer = build_model(cfg, seed=seed).layers["0"].mlp
    assert isinstance(layer, MoE)
    return layer


CASES = {
    "softmax-top1": dict(top_k=1, normalize_top_k=False),
    "softmax-top2": dict(top_k=2),
    "sigmoid-top2": dict(router="sigmoid", top_k=2),
    "sigmoid-top1-shared": dict(router="sigmoid", top_k=1, shared_experts=1),
    "softmax-top2-shared-unnormalized": dict(shared_experts=2, normalize_top_k=False),
}


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_grouped_matmul_equals_a_loop_over_experts(case, activation):
    cfg = dataclasses.replace(moe_config(**CASES[case]), activation=activation)
    layer = moe_layer(cfg)
    with torch.no_grad():  # expert 3 never chosen: an empty group in the grouped matmul
        layer.expert_bias[3] = -100.0
    x = torch.randn(3, 5, 32, requires_grad=True)
    upstream = torch.randn(3, 5, 32)  # (a stride-0 gradient from .sum() is refused)

    def run(forward):
        x.grad = None
        layer.zero_grad()
        out = forward(x)
        out.backward(upstream)
        grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
        return out.detach(), x.grad.clone(), grads

    out, x_grad, grads = run(layer)
    assert layer.tokens_per_expert[3] == 0 and layer.tokens_per_expert.sum() == 15 * cfg.moe.top_k
    ref_out, ref_x_grad, ref_grads = run(layer.reference_forward)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x_grad, ref_x_grad, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    assert grads["experts.up_proj"][3].abs().max() == 0  # the idle expert learns nothing
    assert grads["experts.up_proj"][:3].abs().amax((1, 2)).min() > 0


def test_grouped_matmul_runs_in_bf16_under_autocast():
    layer = moe_layer(moe_config(shared_experts=1))
    x = torch.randn(2, 8, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = layer(x), layer.reference_forward(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    "router, balance_by_row",
    # Row 0 sends both tokens to expert 0: f = (1, 0); row 1 one token each: f = (.5, .5).
    # softmax P: row 0 (.75, .25), row 1 (.5, .5); sigmoid P normalizes (.75, .5) per token.
    [("softmax", [2 * 0.75, 2 * (0.5 * 0.5 + 0.5 * 0.5)]), ("sigmoid", [2 * 0.6, 1.0])],
)
def test_auxiliary_losses_by_hand(router, balance_by_row):
    layer = moe_layer(moe_config(num_experts=2, top_k=1, router=router))
    ln3 = math.log(3.0)
    with torch.no_grad():  # token logits: a -> (ln 3, 0), b -> (0, ln 3)
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = ln3
        layer.router.weight[1, 1] = ln3
    a, b = torch.eye(32)[0], torch.eye(32)[1]
    x = torch.stack([torch.stack([a, a]), torch.stack([a, b])])  # (B=2, T=2, C)
    layer(x)
    torch.testing.assert_close(layer.balance_loss, torch.tensor(balance_by_row))
    z = math.log(1 + 3) ** 2  # logsumexp(ln 3, 0) = ln 4, the same for every token
    torch.testing.assert_close(layer.z_loss, torch.tensor([z, z]))
    assert layer.tokens_per_expert.tolist() == [3, 1]


def test_auxiliary_loss_trains_the_router_without_changing_the_reported_loss():
    """Top-1 with normalized weights: the language-model loss gives the router no
    gradient (every weight is 1), so only the auxiliary losses can reach it."""
    tokens = torch.randint(0, 64, (2, 8))

    def loss_and_router_grad(aux, z):
        cfg = moe_config(top_k=1, aux_loss_coeff=aux, z_loss_coeff=z)
        model = build_model(cfg)
        loss = model(tokens, tokens, reduction="sum")
        loss.backward()
        return loss.item(), model.layers["0"].mlp.router.weight.grad.abs().max().item()

    plain_loss, plain_grad = loss_and_router_grad(0.0, 0.0)
    assert plain_grad < 1e-7  # w / w.sum() is 1 up to rounding
    for aux, z in ((0.1, 0.0), (0.0, 0.1)):
        loss, grad = loss_and_router_grad(aux, z)
        assert loss == plain_loss and grad > 1e4 * plain_grad


def test_bias_update_moves_selection_toward_balance():
    torch.manual_seed(0)
    layer = moe_layer(moe_config(num_experts=4, top_k=1, bias_update_rate=0.01))
    x = torch.randn(4, 16, 32)
    with torch.no_grad():  # every token prefers expert 0
        layer.router.weight[0] = x.mean((0, 1)) * 4

    def counts():
        layer(x)
        layer.take_losses()  # as GPT.forward does: adds to the step's counts
        return layer.tokens_per_expert.clone()

    first = counts()
    assert first[0] > 32  # more than half of the 64 tokens
    layer.update_bias()
    assert layer.expert_bias[0] < 0 and (layer.expert_bias[1:] > 0).all()
    assert layer.step_tokens_per_expert.sum() == 0  # reset by the update
    later = []
    for _ in range(80):
        later.append(counts())
        layer.update_bias()
    # A fixed step size makes the counts oscillate around balance (16 each): average.
    settled = torch.stack(later[-20:]).mean(0)
    assert settled.max() - settled.min() < (first.max() - first.min()) / 3


def test_bias_update_takes_counts_given_by_the_caller():
    layer = moe_layer(moe_config(bias_update_rate=0.5))
    layer.update_bias(torch.tensor([5.0, 1.0, 1.0, 1.0]))
    assert layer.expert_bias.tolist() == [-0.5, 0.5, 0.5, 0.5]


def test_moe_checkpoint_round_trip_with_dcp(tmp_path):
    cfg = moe_config(shared_experts=1)
    model = build_model(cfg, seed=1)
    model.layers["0"].mlp.update_bias(torch.tensor([4.0, 0.0, 1.0, 3.0]))
    assert "layers.0.mlp.expert_bias" in model.state_dict()
    dcp.save(model.state_dict(), checkpoint_id=tmp_path)
    other = build_model(cfg, seed=2)
    state = other.state_dict()
    dcp.load(state, checkpoint_id=tmp_path)
    other.load_state_dict(state)
    for key, value in model.state_dict().items():
        assert torch.equal(other.state_dict()[key], value), key


def test_recomputed_blocks_count_their_tokens_once():
    model = build_model(moe_config())
    apply_activation_checkpointing(model, "full")
    tokens = torch.randint(0, 64, (2, 8))
    model(tokens, tokens).backward()  # the backward runs the block's forward again
    layer = model.layers["0"].mlp
    assert layer.tokens_per_expert.sum() == 2 * 8 * 2
    assert torch.equal(layer.step_tokens_per_expert, layer.tokens_per_expert)


MOE_TRAINING = [
    "model.moe.num_experts=4",
    "model.moe.top_k=2",
    "model.moe.shared_experts=1",
    "model.moe.expert_width=32",
    "model.moe.aux_loss_coeff=0.1",
    "model.moe.z_loss_coeff=0.01",
]


def test_tiny_moe_gpt_trains_through_the_trainer(tiny_config):
    config = apply_overrides(
        tiny_config,
        [
            *MOE_TRAINING,
            "train.max_steps=16",
            "train.eval_interval=4",
            "optim.lr=3e-3",
            "model.moe.bias_update_rate=0.001",
        ],
        "test",
    )
    result = train(config)
    assert result.val_losses[16] < result.val_losses[4] - 0.3
    weights, _ = consolidated_state_dict(config.train.output_dir)  # saved and read by DCP
    assert weights["layers.1.mlp.experts.up_proj"].shape == (4, 64, 32)
    # The trainer moved the balancing bias after every step (16 steps of +-0.001 each).
    bias = weights["layers.1.mlp.expert_bias"]
    assert bias.shape == (4,) and 0 < bias.abs().max() <= 16 * 0.001 + 1e-6
    logged = [json.loads(line) for line in open(Path(config.train.output_dir) / "metrics.jsonl")]
    loads = [m["moe/layers.1.mlp/max_load"] for m in logged if "moe/layers.1.mlp/max_load" in m]
    assert len(loads) == 16 and all(load >= 1.0 for load in loads)
    # Every expert's token copies per step: the global batch's 8 x 32 tokens, top 2.
    counts = [[m[f"moe/layers.1.mlp/tokens/{e}"] for e in range(4)] for m in logged if "loss" in m]
    assert len(counts) == 16 and all(sum(step) == 8 * 32 * 2 for step in counts)


@pytest.mark.parametrize("variant", ["accumulate-2", "accumulate-2-checkpointed"])
def test_gradient_accumulation_gives_the_same_first_step_gradients(tiny_config, variant):
    base = apply_overrides(tiny_config, [*MOE_TRAINING, "train.micro_batch_size=8"], "test")
    split = ["train.micro_batch_size=4"]
    if variant.endswith("checkpointed"):  # the auxiliary losses' backward recomputes too
        split.append("parallel.activation_checkpointing=full")
    loss, grads = first_step_gradients(base)
    other_loss, other_grads = first_step_gradients(apply_overrides(base, split, variant))
    assert other_loss == pytest.approx(loss, rel=1e-6)
    assert_same_gradients(other_grads, grads)
    # Not vacuous: the auxiliary losses move the router (compare without them).
    plain = apply_overrides(base, ["model.moe.aux_loss_coeff=0", "model.moe.z_loss_coeff=0"], "x")
    router = "layers.0.mlp.router.weight"
    difference = (first_step_gradients(plain)[1][router] - grads[router]).abs().max()
    assert difference > 100 * 1e-5 * grads[router].abs().max()


def test_data_parallel_gives_the_same_first_step_gradients(tiny_config):
    config = apply_overrides(tiny_config, MOE_TRAINING, "test")
    loss, grads = first_step_gradients(config)
    layout = ["parallel.data_parallel_size=2", "parallel.zero_stage=2"]
    per_rank = run_distributed(
        first_step_gradients, 2, args=(apply_overrides(config, layout, "dp2"),)
    )
    assert per_rank[0][0] == pytest.approx(loss, rel=1e-6)
    assert_same_gradients(per_rank[0][1], grads)


def assert_same_gradients(grads: dict, reference: dict) -> None:
    assert grads.keys() == reference.keys()
    for key, grad in reference.items():
        assert (grads[key] - grad).abs().max() <= 1e-5 * grad.abs().max(), key


def test_active_parameters_and_flops_of_a_small_moe_model():
    # Layer 0 dense (GELU MLP 4C), layer 1 MoE: router, 4 experts of width 16 (2 used),
    # one shared expert; no biases, RMSNorm, learned positions, tied embeddings.
    C, V, E, k, F, T = 32, 64, 4, 2, 16, 24
    moe = MoEConfig(num_experts=E, top_k=k, shared_experts=1, expert_width=F, every_n_layers=2)
    cfg = ModelConfig(
        vocab_size=V, max_seq_len=T, n_layers=2, hidden_size=C, n_heads=4, bias=False,
        norm="rmsnorm", moe=moe,
    )  # fmt: skip
    model = build_model(cfg)
    assert [i for i in range(2) if isinstance(model.layers[str(i)].mlp, MoE)] == [1]
    attention_and_norms = 4 * C * C + 2 * C
    dense_mlp = 2 * C * 4 * C
    expert = 2 * C * F
    moe_layer_total = C * E + E * expert + expert  # router, routed, shared
    blocks = 2 * attention_and_norms + dense_mlp + moe_layer_total
    total = blocks + V * C + T * C + C  # + embedding, positions, final norm
    counts = parameter_counts(cfg)
    assert counts["blocks"] == blocks
    assert counts["total"] == total == sum(p.numel() for p in model.parameters())
    assert counts["active"] == total - (E - k) * expert
    assert matmul_parameters(cfg) == blocks - (E - k) * expert + V * C
    assert flops_per_token(cfg, T) == 6 * (blocks - (E - k) * expert + V * C) + 12 * 2 * C * T
    dense = dataclasses.replace(cfg, moe=MoEConfig())
    assert parameter_counts(dense)["active"] == parameter_counts(dense)["total"]


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["model.moe.num_experts=4", "model.moe.top_k=5"], "model.moe.top_k"),
        (["model.moe.num_experts=4", "model.moe.expert_width=20"], "model.moe.expert_width"),
        (["model.moe.num_experts=4", "model.moe.every_n_layers=3"], "model.moe.every_n_layers"),
        (["model.moe.num_experts=4", "model.moe.aux_loss_coeff=-1"], "model.moe.aux_loss_coeff"),
    ],
)
def test_settings_that_do_not_fit_are_refused(tiny_config, overrides, key):
    with pytest.raises(ConfigError, match=key):
        apply_overrides(tiny_config, overrides, "test")


def test_hugging_face_export_refuses_moe_models_mixtral_cannot_express():
    cfg = moe_config()  # GPT-2-shaped experts: only Llama-shaped ones map to Mixtral
    with pytest.raises(ConfigError, match="mixture-of-experts"):
        to_hf(build_model(cfg).state_dict(), cfg)
