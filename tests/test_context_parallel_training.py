"""Context parallelism in training computes what one process computes.

The layouts of tests/test_parallel.py, held to the same single-process references
(5 steps, fp32, dropout off: losses within 1e-5 relative, validation loss, final
weights within 1e-5), with parallel.context_parallel_size = 2 alone and composed with
tensor, data (ZeRO-3) and pipeline parallelism; GPT-2's learned positions and Llama's
rotary ones each appear. The cp2 run also checkpoints at step 3, and one process
resumes from it to the reference's losses. Sequences 8x the per-rank length train
at cp8, and a step's activations per rank halve at cp2. The building block (ring attention, the
split) is tested in tests/test_context_parallel.py.
"""

from __future__ import annotations

import pytest
import torch

from megagpt.config import ConfigError, apply_overrides
from megagpt.parallel.batches import Microbatch
from megagpt.testing import run_distributed
from megagpt.training.trainer import train
from tests import test_parallel
from tests.activation_probe import measure_layout
from tests.test_parallel import GPT2, LLAMA, PP2, TP2, layout_error
from tests.test_parallel import test_layout_trains_like_one_process as check_layout

references = test_parallel.references  # the single-process runs, shared fixture code

CP2 = "parallel.context_parallel_size=2"
# (name, model family, world size, layout overrides)
CP_LAYOUTS = [
    ("cp2", GPT2, 2, [CP2, "checkpoint.interval=3", "checkpoint.keep_last=0"]),
    ("llama-cp2-tp2", LLAMA, 4, [CP2, TP2]),
    ("cp2-dp2-zero3", GPT2, 4, [CP2, "parallel.zero_stage=3"]),
    ("llama-cp2-pp2", LLAMA, 4, [CP2, PP2]),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, family, world, layout", CP_LAYOUTS, ids=[x[0] for x in CP_LAYOUTS])
def test_context_parallel_trains_like_one_process(
    name, family, world, layout, references, tmp_path
):
    check_layout(name, family, world, layout, references, tmp_path)
    if name == "cp2":  # its step-3 checkpoint continues on one process
        reference_config, reference, _ = references[id(family)]
        middle = tmp_path / "checkpoints" / "step_00000003"
        resumed = train(
            apply_overrides(
                reference_config,
                [f"checkpoint.resume={middle}", f"train.output_dir={tmp_path}/resumed"],
                "resume",
            )
        )
        assert resumed.start_step == 3
        torch.testing.assert_close(
            torch.tensor(resumed.losses), torch.tensor(reference.losses[3:]), rtol=1e-5, atol=0
        )


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        (
            [CP2, "data.seq_len=30"],
            2,
            "data.seq_len = 30: must be a multiple of 2 x parallel.context_parallel_size = 4",
        ),
        ([CP2, "parallel.engine=deepspeed", "parallel.zero_stage=1"], 2, "parallel.engine=native"),
        ([CP2, "model.attention_dropout=0.1"], 2, "needs model.attention_dropout = 0"),
        ([CP2, "model.num_labels=2"], 2, "use parallel.context_parallel_size=1 for fine-tuning"),
        ([CP2, "eval.tasks=[hellaswag]"], 2, "does not score eval.tasks during training"),
        ([CP2, "parallel.activation_checkpointing=selective"], 2, "use full or none"),
        (["parallel.context_parallel_size=0"], 1, "must be >= 1"),
        (
            [CP2, TP2],
            6,
            "parallel.tensor_parallel_size x parallel.pipeline_parallel_size x "
            "parallel.context_parallel_size = 2 x 1 x 2 = 4 does not divide the number of "
            "processes (6)",
        ),
        (
            [CP2, "parallel.data_parallel_size=2"],
            2,
            "2 processes / (tensor 1 x pipeline 1 x context 2) leave 1",
        ),
    ],
)
def test_impossible_context_parallel_layouts_say_what_works(overrides, world, message):
    assert message in layout_error(overrides, world)


def test_packed_examples_are_refused_under_context_parallelism():
    ids = torch.arange(16).view(2, 8)
    packed = Microbatch(ids, ids, positions=ids % 4, segments=ids // 4)
    with pytest.raises(ConfigError, match="context_parallel_size=1 for fine-tuning"):
        packed.context_share(0, 2)
    share = Microbatch(ids, ids).context_share(1, 2)  # chunks 1 and 2 of 4
    assert share.inputs[0].tolist() == [2, 3, 4, 5]
    assert share.positions.tolist() == [[2, 3, 4, 5]] * 2


def test_activation_bytes_per_rank_halve_at_cp2(tmp_path):
    """A whole step's peak saved activations per rank (forward and backward of every
    microbatch) at the same sequence length: every activation is per token, so cp2
    holds about half; the excess is the ring's saved key/value blocks. (0.524 when
    written; benchmarks/context_memory.py prints cp4 and cp8 too.)"""
    sizes = {"data.seq_len": 256, "model.max_seq_len": 256}
    one = measure_layout(sizes, 1, str(tmp_path))[0]["activations"]
    two = measure_layout({**sizes, "parallel.context_parallel_size": 2}, 2, str(tmp_path))
    ratio = max(rank["activations"] for rank in two) / one
    assert 0.45 < ratio < 0.55, f"cp2 / cp1 activation bytes per rank: {ratio:.3f}"


@pytest.mark.slow
def test_eight_times_the_per_rank_sequence_trains_at_cp8(tiny_config):
    """Sequences of 256 tokens on 8 context ranks (32 each, the length the other tests
    train at) give one process's losses."""
    long = ["data.seq_len=256", "model.max_seq_len=256", "train.max_steps=3"]
    long += ["train.eval_interval=0", "logging.tensorboard=false"]
    reference = train(apply_overrides(tiny_config, long, "one"))
    out = f"train.output_dir={tiny_config.train.output_dir}-cp8"
    config = apply_overrides(tiny_config, [*long, out, "parallel.context_parallel_size=8"], "cp8")
    result = run_distributed(train, 8, args=(config,))[0]
    torch.testing.assert_close(
        torch.tensor(result.losses), torch.tensor(reference.losses), rtol=1e-5, atol=0
    )
