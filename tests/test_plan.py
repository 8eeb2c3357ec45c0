"""megagpt plan: layouts, the accelerator table, the search, the CLI, the start-up check."""

from __future__ import annotations

import json
import math

import pytest

from megagpt.cli import main
from megagpt.config import ConfigError, load_config
from megagpt.model.build import build_model
from megagpt.planning.calibrate import calibrate
from megagpt.planning.hardware import cpu_accelerator, find_accelerator, load_accelerators
from megagpt.planning.layouts import Layout, apply_layout, candidate_layouts, parse_layout
from megagpt.planning.memory import _remember, in_flight, model_state_bytes, parameter_shapes
from megagpt.planning.plan import plan_layout, search
from megagpt.planning.startup import startup_plan


def test_parameter_shapes_are_the_models():
    cfg = load_config("tiny").model
    model = build_model(cfg)
    assert dict(parameter_shapes(_remember(cfg))) == {
        name: tuple(p.shape) for name, p in model.named_parameters()
    }
    total = sum(p.numel() for p in model.parameters())
    states = model_state_bytes(load_config("tiny"), Layout(), 0)
    assert states == {
        "parameters": 4 * total,
        "gradients": 4 * total,
        "optimizer_state": 8 * total,
    }


def test_layout_strings():
    layout = parse_layout("tp=2,pp=4,vp=2,zero=1,ac=selective,mbs=2", 64)
    assert (layout.tp, layout.pp, layout.vp, layout.dp, layout.zero) == (2, 4, 2, 8, 1)
    assert layout.schedule == "interleaved_1f1b" and layout.ac == "selective"
    assert parse_layout(str(layout), 64) == layout
    for text, words in (
        ("tp=3", "does not divide --gpus 64"),
        ("tp=2,dp=2", "uses 4 GPUs, but --gpus is 64"),
        ("tp=two", "must be an integer"),
        ("ac=some", "use one of none, selective, full"),
        ("cp=3", "tp x pp x cp = 3 does not divide --gpus 64"),
        ("offload=nvme", "use cpu or none"),
        ("colour=blue", "expected key=value"),
    ):
        with pytest.raises(ConfigError, match=words):
            parse_layout(text, 64)


def test_context_and_expert_parallel_layouts():
    """cp and ep parse, print only when above 1, round-trip through a config, and an
    ep that does not divide the shard ranks (dp at ZeRO >= 1, times cp) is refused."""
    moe = load_config("tiny-moe")  # 8 experts
    layout = parse_layout("cp=2,zero=1,ep=4", 8)
    assert (layout.cp, layout.ep, layout.dp, layout.world_size) == (2, 4, 4, 8)
    assert str(layout) == "tp=1,pp=1,dp=4,zero=1,ac=none,mbs=1,cp=2,ep=4"
    assert "cp=" not in str(parse_layout("zero=1", 8)) and "ep=" not in str(Layout())
    assert parse_layout(str(layout), 8) == layout
    assert Layout.from_config(apply_layout(moe, layout), 8) == layout
    with pytest.raises(ConfigError, match="expert_parallel_size = 4 must divide the ranks"):
        apply_layout(moe, parse_layout("zero=1,ep=4", 2))
    with pytest.raises(ConfigError, match="needs mixture-of-experts layers"):
        apply_layout(load_config("tiny"), parse_layout("zero=1,ep=2", 2))
    # each ep rank holds a share of the experts; cp shards parameters even at ZeRO 0
    whole = model_state_bytes(moe, Layout(), 0)["parameters"]
    cp2 = model_state_bytes(moe, parse_layout("cp=2", 2), 0)["parameters"]
    assert whole / 2 <= cp2 < whole / 2 + 4 * moe.model.hidden_size
    gpu = find_accelerator("h100-80gb", load_accelerators())
    ep = plan_layout(moe, parse_layout("zero=1,ep=2", 2), gpu, 8)
    dense = plan_layout(moe, parse_layout("zero=1", 2), gpu, 8)
    assert ep.memory[0]["parameters"] == dense.memory[0]["parameters"]  # same shard count
    assert ep.time["expert_parallel_s"] > 0 == dense.time["expert_parallel_s"]
    ring = plan_layout(moe, parse_layout("cp=2", 2), gpu, 8)
    assert ring.time["context_parallel_s"] > 0
    assert (
        ring.memory[0]["activations"] < plan_layout(moe, Layout(), gpu, 8).memory[0]["activations"]
    )
    searched = {str(plan.layout) for plan in search(moe, 4, gpu, 4)}
    assert any(",cp=" in text for text in searched) and any(",ep=" in text for text in searched)


def test_offloaded_states_are_in_host_memory_and_cost_copies():
    """offload=cpu (the native engine's FSDP2 offload): parameters, gradients and
    optimizer state move from the GPU's total to host memory; FSDP2 computes on gathered
    copies (buffers); the step pays the host copies and AdamW on the host."""
    config = load_config("gpt3-13b")
    gpu = find_accelerator("h100-80gb", load_accelerators())
    layout = parse_layout("tp=4,zero=1,ac=full", 8)
    offloaded = parse_layout(str(layout) + ",offload=cpu", 8)
    assert offloaded.offload and parse_layout(str(offloaded), 8) == offloaded
    assert Layout.from_config(apply_layout(config, offloaded), 8) == offloaded
    on_gpu, on_host = plan_layout(config, layout, gpu, 8), plan_layout(config, offloaded, gpu, 8)
    a, b = on_gpu.memory[0], on_host.memory[0]
    states = sum(a[k] for k in ("parameters", "gradients", "optimizer_state"))
    assert a["host"] == 0 and b["host"] == states
    assert b["total"] - b["margin"] == a["total"] - a["margin"] - states
    assert on_gpu.time["offload_s"] == 0 < on_host.time["offload_s"]
    assert on_host.time["step_s"] > on_gpu.time["step_s"]


def test_deepspeed_layouts_parse_print_and_refuse_what_the_engine_refuses():
    """engine=deepspeed and its two offload settings parse, print when set, round-trip
    through a config; what megagpt (or the layout syntax) refuses is refused."""
    config = load_config("gpt3-13b")
    layout = parse_layout("engine=deepspeed,zero=3,offload_optimizer=nvme,offload_params=cpu", 8)
    assert str(layout) == (
        "tp=1,pp=1,dp=8,zero=3,ac=none,mbs=1,engine=deepspeed,offload_optimizer=nvme,"
        "offload_params=cpu"
    )
    assert parse_layout(str(layout), 8) == layout and "engine" not in str(Layout())
    nvme = load_config("gpt3-13b", ["parallel.nvme_path=/local/nvme"])
    assert Layout.from_config(apply_layout(nvme, layout), 8) == layout
    for text, words in (
        ("engine=deepspeed,zero=0", "zero_stage = 0: must be 1, 2 or 3 with parallel.engine"),
        ("engine=deepspeed,zero=1,tp=2", "tensor_parallel_size = 2: must be 1 with"),
        ("engine=deepspeed,zero=2,offload_params=cpu", "offload_params = 'cpu': needs parallel"),
        ("engine=deepspeed,zero=3,offload_optimizer=nvme", "nvme_path = None: must name"),
        ("engine=deepspeed,zero=1,offload=cpu", "offload=cpu is the native engine's"),
        ("zero=1,offload_optimizer=cpu", "are the deepspeed engine's: add engine=deepspeed"),
    ):
        with pytest.raises(ConfigError, match=words):
            apply_layout(config, parse_layout(text, 8))
    for text, words in (
        ("engine=fast", "use one of native, deepspeed"),
        ("offload_params=disk", "use one of none, cpu, nvme"),
    ):
        with pytest.raises(ConfigError, match=words):
            parse_layout(text, 8)


def test_deepspeed_offload_moves_states_off_the_gpu_and_costs_copies():
    """ZeRO-2 keeps bf16 weights whole; its offloaded optimizer side (masters, moments,
    gradient partitions) leaves the GPU's total for host memory, ZeRO-3 NVMe moves the
    optimizer state to the drive; the step pays the copies and AdamW on the host.
    The search of a deepspeed config lists DeepSpeed layouts alone."""
    config = load_config("gpt3-13b", ["parallel.nvme_path=/local/nvme"])
    gpu = find_accelerator("h100-80gb", load_accelerators())
    on_gpu = plan_layout(config, parse_layout("engine=deepspeed,zero=2", 8), gpu, 8)
    text = "engine=deepspeed,zero=2,offload_optimizer=cpu"
    on_host = plan_layout(config, parse_layout(text, 8), gpu, 8)
    a, b = on_gpu.memory[0], on_host.memory[0]
    params = sum(math.prod(shape) for _, shape in parameter_shapes(_remember(config.model)))
    assert a["parameters"] == b["parameters"] == 2 * params  # bf16, whole
    assert a["host"] == 0 and b["host"] == b["gradients"] + b["optimizer_state"]
    assert b["total"] - b["margin"] < a["total"] - a["margin"] - b["host"] + b["buffers"]
    assert on_gpu.time["offload_s"] == 0 < on_host.time["offload_s"]
    assert on_host.time["optimizer_s"] > on_gpu.time["optimizer_s"]
    text = "engine=deepspeed,zero=3,offload_optimizer=nvme,offload_params=cpu"
    infinity = plan_layout(config, parse_layout(text, 8), gpu, 8)
    c = infinity.memory[0]
    assert c["nvme"] == c["optimizer_state"] and c["host"] == c["parameters"] + c["gradients"]
    assert infinity.placement == {
        "parameters": "host",
        "gradients": "host",
        "optimizer_state": "nvme",
    }
    assert c["parameters"] == pytest.approx(a["parameters"] / 8, rel=1e-3)  # partitioned
    # the engine checkpoints activations as the native one does
    full = plan_layout(config, parse_layout("engine=deepspeed,zero=2,ac=full", 8), gpu, 8)
    assert full.memory[0]["activations"] < a["activations"] / 2
    small = load_config("gpt3-1.3b", ["parallel.engine=deepspeed", "parallel.zero_stage=1"])
    searched = [str(plan.layout) for plan in search(small, 8, gpu, 8)]
    assert searched and all(",engine=deepspeed" in text for text in searched)
    assert next(candidate_layouts(load_config("gpt3-1.3b"), 8, 8)).engine == "native"
    # megagpt train plans DeepSpeed runs too (logged beside the measured memory)
    import torch

    overrides = ["parallel.engine=deepspeed", "parallel.zero_stage=3"]
    tiny = load_config("tiny", [*overrides, "parallel.offload_optimizer=cpu"])
    started = startup_plan(tiny, 2, torch.device("cpu"))
    assert started.layout.engine == "deepspeed" and started.memory[0]["host"] > 0


def test_layouts_megagpt_refuses_are_refused_with_its_message():
    config = load_config("gpt3-13b")
    with pytest.raises(ConfigError, match="must divide model.n_heads"):
        apply_layout(config, Layout(tp=16, dp=4))


def test_pipeline_ranks_hold_the_microbatches_of_their_schedule():
    assert [in_flight(Layout(pp=4, dp=1), r, 8) for r in range(4)] == [4, 3, 2, 1]
    assert in_flight(Layout(pp=4, schedule="gpipe"), 2, 8) == 8
    interleaved = Layout(pp=2, vp=2, schedule="interleaved_1f1b")
    assert [in_flight(interleaved, r, 4) for r in range(2)] == [5, 3]


def test_accelerator_table_and_user_file(tmp_path):
    table = load_accelerators()
    assert find_accelerator("h100-80gb", table).bf16_tflops == 989
    extra = tmp_path / "gpus.yaml"
    extra.write_text(
        "my-gpu:\n  memory_gib: 24\n  bf16_tflops: 100\n  fp8_tflops: 0\n"
        "  memory_bandwidth_gbps: 900\n  intra_node_gbps: 32\n  inter_node_gbps: 12.5\n"
        "h100-80gb:\n  achievable: 0.5\n"
    )
    table = load_accelerators(extra)
    assert table["my-gpu"].memory_gib == 24 and table["h100-80gb"].achievable == 0.5
    assert table["h100-80gb"].bf16_tflops == 989
    extra.write_text("bad-gpu:\n  memory_gib: 24\n  speed: 3\n")
    with pytest.raises(ConfigError, match=r"gpus.yaml: entry 'bad-gpu' has unknown keys"):
        load_accelerators(extra)
    for line, message in (
        ("memory_gib: 24GB", r"memory_gib = '24GB' must be a number"),
        ("overlap: 'false'", r"overlap = 'false' must be true or false"),
        ("achievable: true", r"achievable = True must be a number"),
    ):
        extra.write_text(f"h100-80gb:\n  {line}\n")
        with pytest.raises(ConfigError, match=rf"gpus.yaml: entry 'h100-80gb': {message}"):
            load_accelerators(extra)
    extra.write_text("h100-80gb:\n  overlap: false\n  block_overhead_us: 12\n")
    assert not load_accelerators(extra)["h100-80gb"].overlap
    with pytest.raises(ConfigError, match="not in the accelerator table; known: a100-40gb"):
        find_accelerator("tpu", table)


def test_a_cpus_framework_overheads_and_unhidden_traffic_add_to_the_step():
    """Host time per block per microbatch (more under tensor and sequence parallelism),
    FSDP2's per collective with sharded parameters, and data-parallel traffic that a
    CPU cannot hide under compute: each adds what it says, and nothing on a GPU."""
    config = load_config("tiny", ["train.global_batch_size=16", "train.micro_batch_size=2"])
    overheads = {"block": 1000, "tensor_parallel": 3000, "sequence_parallel": 500, "sharded": 200}
    bare = cpu_accelerator(8, 0.05, 1.0, 100)
    cpu = cpu_accelerator(8, 0.05, 1.0, 100, overheads)
    layers = config.model.n_layers

    def extra(layout: str) -> float:
        chosen = parse_layout(layout + ",mbs=2", 2)
        return (
            plan_layout(config, chosen, cpu, 2).time["compute_s"]
            - plan_layout(config, chosen, bare, 2).time["compute_s"]
        )

    # dp2: 4 microbatches per rank; tp2: 8; ZeRO-3: 3 collectives per microbatch.
    assert extra("dp=2,zero=0") == pytest.approx(4 * layers * 1000e-6)
    assert extra("tp=2") == pytest.approx(8 * layers * 4000e-6)
    assert extra("tp=2,sp=1") == pytest.approx(8 * layers * 4500e-6)
    assert extra("dp=2,zero=3") == pytest.approx(4 * layers * (1000 + 3 * 200) * 1e-6)
    assert extra("dp=2,zero=0,ac=full") == pytest.approx(4 * layers * 1000e-6 * 4 / 3)
    zero3 = plan_layout(config, parse_layout("dp=2,zero=3,mbs=2", 2), bare, 2).time
    assert zero3["data_parallel_exposed_s"] == zero3["data_parallel_s"] > 0  # not hidden
    gpu = find_accelerator("h100-80gb", load_accelerators())
    assert gpu.block_overhead_us == 0 and gpu.overlap
    big = load_config("gpt3-1.3b")
    on_gpu = plan_layout(big, parse_layout("dp=8,zero=3", 8), gpu, 8).time
    assert 0 < on_gpu["data_parallel_exposed_s"] < on_gpu["data_parallel_s"]
    tiny_on_gpu = plan_layout(config, parse_layout("dp=2,zero=3,mbs=2", 2), gpu, 2).time
    assert tiny_on_gpu["data_parallel_exposed_s"] <= tiny_on_gpu["data_parallel_s"]


def test_checkpointing_saves_activations_in_the_documented_order():
    calibrations = calibrate(load_config("tiny").model, "bf16")
    per_layer = {mode: sum(c.layer.values()) for mode, c in calibrations.items()}
    assert per_layer["full"] < per_layer["selective"] < per_layer["none"]
    # full keeps one block input: hidden size x 2 bytes per token in bf16
    assert per_layer["full"] == 2 * 192


def test_search_ranks_fitting_layouts_fastest_first():
    config = load_config("gpt3-1.3b")
    gpu = find_accelerator("a100-40gb", load_accelerators())
    plans = search(config, 8, gpu, 8)
    assert plans and all(plan.fits for plan in plans)
    steps = [plan.time["step_s"] for plan in plans]
    assert steps == sorted(steps)
    # a layout it does not list because it does not fit
    lone = plan_layout(config, Layout(dp=8, mbs=16), gpu, 8)
    assert not lone.fits and lone.peak > gpu.memory_bytes
    assert str(lone.layout) not in {str(plan.layout) for plan in plans}


def test_plan_command_json(capsys):
    code = main(
        [
            "plan",
            "--config",
            "gpt3-13b",
            "--gpus",
            "64",
            "--layout",
            "tp=8,pp=2,zero=1,sp=1",
            "--json",
        ]
    )
    (plan,) = json.loads(capsys.readouterr().out)
    assert code == 0 and plan["fits"]
    assert len(plan["memory_per_pipeline_rank"]) == 2
    parts = plan["time"]
    assert parts["step_s"] == pytest.approx(
        parts["compute_s"]
        + parts["tensor_parallel_s"]
        + parts["pipeline_p2p_s"]
        + parts["data_parallel_exposed_s"]
        + parts["bubble_s"]
        + parts["optimizer_s"]
    )
    assert 0 < parts["mfu"] < 1


def test_plan_command_names_what_would_work(capsys):
    assert main(["plan", "--config", "gpt3-13b", "--gpus", "64", "--layout", "tp=3"]) == 2
    assert "does not divide --gpus 64" in capsys.readouterr().err


def test_train_refuses_a_layout_that_cannot_fit_before_allocating():
    import torch

    huge = load_config("tiny", ["model.n_layers=64", "model.hidden_size=8192", "model.n_heads=64"])
    with pytest.raises(ConfigError, match="needs about .* GiB per rank .* no layout"):
        startup_plan(huge, 1, torch.device("cpu"))
    unchecked = load_config(
        "tiny",
        [
            "model.n_layers=64",
            "model.hidden_size=8192",
            "model.n_heads=64",
            "train.memory_check=false",
        ],
    )
    assert not startup_plan(unchecked, 1, torch.device("cpu")).fits


PIPELINE = {"model.n_layers": 4, "train.micro_batch_size": 2}  # 4 microbatches
MOE = {"model.moe.num_experts": 4, "model.moe.expert_width": 64}
MEASURED_LAYOUTS = [
    ({}, 1),
    ({"parallel.activation_checkpointing": "selective"}, 1),
    ({"parallel.activation_checkpointing": "full"}, 1),
    ({"parallel.tensor_parallel_size": 2}, 2),
    ({"parallel.tensor_parallel_size": 2, "parallel.sequence_parallel": True}, 2),
    ({**PIPELINE, "parallel.pipeline_parallel_size": 2}, 2),
    ({**PIPELINE, "parallel.pipeline_parallel_size": 2, "parallel.pipeline_schedule": "gpipe"}, 2),
    (
        {
            **PIPELINE,
            "parallel.pipeline_parallel_size": 2,
            "parallel.pipeline_schedule": "interleaved_1f1b",
            "parallel.virtual_stages": 2,
        },
        2,
    ),
    (
        {
            **PIPELINE,
            "parallel.pipeline_parallel_size": 2,
            "parallel.pipeline_schedule": "zero_bubble",
            "parallel.virtual_stages": 2,
            "parallel.activation_checkpointing": "full",
        },
        2,
    ),
    ({"parallel.zero_stage": 3}, 2),
    ({"parallel.zero_stage": 1, "parallel.activation_checkpointing": "selective"}, 2),
    ({"parallel.zero_stage": 2}, 2),
    # the native engine's CPU offload: the same states, in host memory
    ({"parallel.zero_stage": 1, "parallel.offload_optimizer": "cpu"}, 2),
    # context parallelism: seq_len / cp tokens per rank and the ring's output copy;
    # parameters sharded over the context ranks at ZeRO 0
    ({"parallel.context_parallel_size": 2}, 2),
    # expert parallelism: two of four routed experts per rank, the rest FSDP2-sharded
    ({**MOE, "parallel.zero_stage": 1, "parallel.expert_parallel_size": 2}, 2),
    ({**MOE, "parallel.context_parallel_size": 2, "parallel.expert_parallel_size": 2}, 2),
    # bf16 autocast: the weight copies it keeps for backward count as activations
    ({"train.precision": "bf16"}, 1),
    ({"parallel.tensor_parallel_size": 2, "parallel.zero_stage": 3}, 4),
    (
        {
            **PIPELINE,
            "parallel.tensor_parallel_size": 2,
            "parallel.pipeline_parallel_size": 2,
            "parallel.zero_stage": 1,
            "parallel.activation_checkpointing": "selective",
        },
        8,
    ),
]


@pytest.mark.slow
def test_plan_matches_every_ranks_measured_memory(tmp_path_factory):
    """Each rank's parameter, gradient and optimizer-state bytes (memory_bytes after a
    step) and peak saved activations (ActivationMeter over a step) against the plan, on
    layouts chosen to differ: tp with and without sequence parallelism, pp with each
    schedule, dp with ZeRO 0-3, every checkpointing mode."""
    from tests.activation_probe import measure_layout, probe_config

    tmp = str(tmp_path_factory.mktemp("probe"))
    cpu = find_accelerator("h100-80gb", load_accelerators())  # memory is what is checked
    worst = {}
    for overrides, world in MEASURED_LAYOUTS:
        overrides = {"train.precision": "fp32", **overrides}  # all in bf16: plan_accuracy.py
        config = probe_config(overrides, tmp)
        layout = Layout.from_config(config, world)
        precision = config.train.precision
        plan = plan_layout(config, layout, cpu, 8, calibrate(config.model, precision))
        for rank in measure_layout(overrides, world, tmp):
            planned = plan.memory[rank["pp_rank"]]
            # FSDP2's last chunk can be smaller: plan that rank's own (its index in the
            # data x context shard group)
            shard = (rank["dp_rank"] if layout.zero > 0 else 0) * layout.cp + rank["cp_rank"]
            planned = {**planned, **model_state_bytes(config, layout, rank["pp_rank"], shard)}
            for part in ("parameters", "gradients", "optimizer_state", "activations"):
                error = abs(planned[part] / rank[part] - 1)
                where = f"{layout} rank {rank['rank']} {part}"
                assert error <= 0.10, f"{where}: plan {planned[part]:,} vs {rank[part]:,}"
                worst[part] = max(worst.get(part, 0.0), error)
    assert len(MEASURED_LAYOUTS) >= 10
    print("largest relative error by part:", worst)


DEEPSPEED = {"parallel.engine": "deepspeed", "train.precision": "fp32"}
DEEPSPEED_LAYOUTS = [
    {**DEEPSPEED, "parallel.zero_stage": 1, "parallel.activation_checkpointing": "selective"},
    {**DEEPSPEED, "parallel.zero_stage": 2, "parallel.offload_optimizer": "cpu"},
    {
        **DEEPSPEED,
        "parallel.zero_stage": 3,
        "parallel.offload_optimizer": "cpu",
        "parallel.offload_params": "cpu",
    },
    # bf16: DeepSpeed computes with bf16 weights themselves (no autocast copies)
    {**DEEPSPEED, "parallel.zero_stage": 2, "train.precision": "bf16"},
]


@pytest.mark.slow
def test_plan_matches_deepspeeds_measured_memory(tmp_path_factory):
    """The DeepSpeed engine on two gloo ranks: each rank's parameter, gradient and
    optimizer-state bytes as megagpt counts DeepSpeed's partitions (memory_bytes) equal
    the plan's exactly, padding included (whether DeepSpeed's CPU Adam is built or not:
    both keep two fp32 moments), and the peak saved activations are within 10%."""
    pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")
    from tests.activation_probe import measure_layouts, probe_config

    tmp = str(tmp_path_factory.mktemp("probe"))
    gpu = find_accelerator("h100-80gb", load_accelerators())
    measured = measure_layouts(DEEPSPEED_LAYOUTS, 2, tmp)
    for overrides, ranks in zip(DEEPSPEED_LAYOUTS, measured):
        config = probe_config(overrides, tmp)
        layout = Layout.from_config(config, 2)
        assert layout.engine == "deepspeed"
        calibrations = calibrate(config.model, config.train.precision, autocast=False)
        planned = plan_layout(config, layout, gpu, 8, calibrations).memory[0]
        for rank in ranks:
            where = f"{layout} rank {rank['rank']}"
            for part in ("parameters", "gradients", "optimizer_state"):
                assert planned[part] == rank[part], f"{where} {part}"
            error = abs(planned["activations"] / rank["activations"] - 1)
            assert error <= 0.10, f"{where}: plan {planned['activations']:,} vs measured"
