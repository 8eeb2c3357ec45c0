"""In-loop downstream evaluation (eval.tasks): multiple-choice, cloze and bits-per-byte
tasks built from sentences of Python's own documentation, scored during training on any
layout, with lm-evaluation-harness's metric definitions."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from megagpt.checkpoint import load_model_for_inference
from megagpt.config import ConfigError, apply_overrides, load_config
from megagpt.data.tasks import encode_pair, load_task
from megagpt.testing import run_distributed
from megagpt.tokenizer import Tokenizer
from megagpt.training.trainer import train
from tests.conftest import tiny_overrides


def sentences(documents) -> list[str]:
    found = []
    for document in documents:
        for sentence in " ".join(document.split()).split(". "):
            if 40 < len(sentence) < 160:
                found.append(sentence)
    return list(dict.fromkeys(found))


@pytest.fixture(scope="module")
def task_files(tmp_path_factory, documents) -> list[str]:
    """A multiple-choice task (the true second half of a sentence among three taken from
    other sentences), a cloze task (a sentence's last word) and a text for bpb."""
    rng = random.Random(0)
    found = sentences(documents)
    rng.shuffle(found)
    directory = tmp_path_factory.mktemp("tasks")
    rows = []
    for sentence in found[:30]:
        words = sentence.split()
        cut = len(words) // 2
        right = " " + " ".join(words[cut:])
        choices = [" " + " ".join(rng.choice(found).split()[cut:] or ["so"]) for _ in range(3)]
        choices.insert(rng.randrange(4), right)
        rows.append({"context": " ".join(words[:cut]), "choices": choices,
                     "answer": choices.index(right)})  # fmt: skip
    (directory / "halves.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cloze = [
        {"context": " ".join(s.split()[:-1]), "continuation": " " + s.split()[-1]}
        for s in found[30:60]
    ]
    (directory / "last_word.jsonl").write_text("".join(json.dumps(r) + "\n" for r in cloze))
    (directory / "prose.txt").write_text(". ".join(found[60:120]))
    return [str(directory / n) for n in ("halves.jsonl", "last_word.jsonl", "prose.txt")]


def config_for(dataset_prefix, tokenizer, output_dir, task_files, *extra):
    return load_config(None, [
        *tiny_overrides(dataset_prefix, tokenizer, output_dir), "train.max_steps=4",
        "train.eval_interval=2", "logging.tensorboard=false", f"eval.tasks={task_files}",
        *extra,
    ])  # fmt: skip


@pytest.fixture(scope="module")
def reference(dataset_prefix, tokenizer, tmp_path_factory, task_files):
    out = tmp_path_factory.mktemp("reference")
    config = config_for(dataset_prefix, tokenizer, out, task_files)
    return config, train(config), out


def test_tasks_are_logged_at_every_evaluation(reference):
    _, result, out = reference
    metrics = result.val_metrics[4]
    for key in ("eval/halves/acc", "eval/halves/acc_norm", "eval/last_word/acc",
                "eval/last_word/ppl", "eval/prose/bpb"):  # fmt: skip
        assert key in metrics
    assert 0 <= metrics["eval/halves/acc"] <= 1 and metrics["eval/prose/bpb"] > 0
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in logged if "eval/prose/bpb" in x] == [2, 4]


def test_scores_equal_a_direct_computation_with_the_final_model(reference, tokenizer, task_files):
    """Recompute every metric request by request, without batching or padding."""
    config, result, out = reference
    model, _, _ = load_model_for_inference(out)
    tok = Tokenizer(tokenizer.path)

    def loglik(context_ids, continuation_ids):
        """Of the continuation after the context, within the last 33 tokens (seq_len + 1:
        a context that does not fit loses its beginning, as in lm-eval)."""
        tokens = torch.tensor([(context_ids + continuation_ids)[-33:]])
        target = torch.tensor(continuation_ids[-32:])
        with torch.no_grad():
            logprobs = model(tokens[:, :-1]).float().log_softmax(-1)[0][-len(target) :]
        picked = logprobs.gather(-1, target[:, None])[:, 0]
        return float(picked.sum()), bool((logprobs.argmax(-1) == target).all())

    halves = load_task(task_files[0])
    right = right_norm = 0
    for row in halves.rows:
        values = np.array([loglik(*encode_pair(tok, row["context"], c))[0] for c in row["choices"]])
        right += int(values.argmax() == row["answer"])
        lengths = np.array([len(c) for c in row["choices"]], dtype=float)
        right_norm += int((values / lengths).argmax() == row["answer"])
    expected = {"eval/halves/acc": right / 30, "eval/halves/acc_norm": right_norm / 30}
    cloze = [
        loglik(*encode_pair(tok, r["context"], r["continuation"]))
        for r in load_task(task_files[1]).rows
    ]
    expected["eval/last_word/acc"] = sum(g for _, g in cloze) / 30
    expected["eval/last_word/ppl"] = math.exp(-np.mean([v for v, _ in cloze]))
    text = open(task_files[2]).read()
    ids = tok.encode(text)  # 32-token windows: the first from EOD, then one token of context
    total, start = 0.0, 0
    while start < len(ids):
        end = min(len(ids), start + 32)
        context = [tok.eod_id] if start == 0 else ids[max(0, end - 33) : start]
        total += loglik(context, ids[start:end])[0]
        start = end
    expected["eval/prose/bpb"] = -total / (len(text.encode()) * math.log(2))
    got = result.val_metrics[4]
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5), key


LAYOUTS = [
    ("dp2", 2, []),
    ("tp2", 2, ["parallel.tensor_parallel_size=2"]),
    ("pp2", 2, ["parallel.pipeline_parallel_size=2"]),
]


@pytest.mark.parametrize("name, world, layout", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_every_layout_scores_the_tasks_alike(reference, tmp_path, name, world, layout):
    config, result, _ = reference
    parallel = apply_overrides(config, [*layout, f"train.output_dir={tmp_path}"], name)
    got = run_distributed(train, world, args=(parallel,))[0].val_metrics
    for step in (2, 4):
        for key, value in result.val_metrics[step].items():
            if key.startswith("eval/"):
                assert got[step][key] == pytest.approx(value, rel=1e-5), (step, key)


@pytest.mark.parametrize(
    "row, message",
    [
        ('{"context": "a", "choices": ["b"], "answer": 0}', "two or more strings"),
        ('{"context": "a", "choices": ["b", "c"], "answer": 2}', "answer must be the index"),
        ('{"context": "a"}', "no continuation"),
        ("not json", ":1: not JSON"),
    ],
)
def test_bad_task_rows_name_the_file_and_line(tmp_path, row, message, dataset_prefix, tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text(row + "\n")
    with pytest.raises(ConfigError, match=message):
        train(config_for(dataset_prefix, tokenizer, tmp_path / "run", [str(path)]))
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before training
    with pytest.raises(ConfigError, match="no such file"):
        load_task(str(tmp_path / "missing.jsonl"))


def test_in_loop_scores_equal_the_lm_eval_route(dataset_prefix, tokenizer, tmp_path):
    """The same tasks (rows in the in-loop format, and lm-eval YAMLs over the same files)
    scored in the training loop and by lm-evaluation-harness through the megagpt
    adapter on the checkpoint of that step: the same metrics. Windows of 64 tokens on
    both sides (data.seq_len = model.max_seq_len)."""
    from megagpt.harness.pydoc_tasks import write_pydoc_tasks
    from megagpt.harness.run import evaluate_tasks

    yamls = write_pydoc_tasks(tmp_path / "tasks", count=24)
    names = ("pydoc_mc", "pydoc_cloze", "pydoc_text")
    files = [str(yamls[name].with_suffix(".jsonl")) for name in names]
    config = config_for(dataset_prefix, tokenizer, tmp_path / "run", files, "data.seq_len=64")
    in_loop = train(config).val_metrics[4]
    results = evaluate_tasks(
        str(tmp_path / "run"), [str(yamls[name]) for name in names], bootstrap_iters=0
    )["results"]
    pairs = [
        ("pydoc_mc/acc", "pydoc_mc", "acc,none"),
        ("pydoc_mc/acc_norm", "pydoc_mc", "acc_norm,none"),
        ("pydoc_cloze/acc", "pydoc_cloze", "acc,none"),
        ("pydoc_cloze/ppl", "pydoc_cloze", "perplexity,none"),
        ("pydoc_text/bpb", "pydoc_text", "bits_per_byte,none"),
    ]
    for ours, task, theirs in pairs:
        assert in_loop[f"eval/{ours}"] == pytest.approx(results[task][theirs], rel=1e-4), ours
