"""lm-evaluation-harness through megagpt's own model (megagpt.harness).

The tasks are made offline from Python's documentation (megagpt.harness.pydoc_tasks):
multiple choice, cloze, rolling log-likelihood of paragraphs, and greedy generation,
read by lm-eval from local JSONL files. The model is a tiny GPT trained here for a few
steps. lm-eval's own `hf` backend on the same model exported to transformers is the
reference.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before `datasets` is imported

import pytest
import torch

from megagpt.checkpoint import resolve_checkpoint_dir
from megagpt.config import apply_overrides, load_config
from megagpt.generate import generate
from megagpt.harness.generation import generate_batch
from megagpt.harness.pydoc_tasks import write_pydoc_tasks
from megagpt.harness.scoring import (
    Row,
    loglikelihoods,
    multiple_choice_metrics,
    token_budget_batches,
)
from megagpt.model import build_model
from megagpt.parallel.inference import InferenceRunner
from megagpt.testing import run_distributed
from megagpt.tokenizer import Tokenizer
from megagpt.training.trainer import train
from tests.conftest import LLAMA_BLOCKS, tiny_overrides, write_documents

lm_eval = pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")

TASKS = ("pydoc_mc", "pydoc_cloze", "pydoc_text", "pydoc_generate")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, dataset_prefix, tokenizer) -> str:
    out = tmp_path_factory.mktemp("lm_eval_run")
    overrides = [*tiny_overrides(dataset_prefix, tokenizer, out), "train.max_steps=8"]
    return str(train(load_config(None, [*overrides, "logging.tensorboard=false"])).checkpoint)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> dict:
    return write_pydoc_tasks(tmp_path_factory.mktemp("tasks"), count=16)


def evaluate(lm, tasks: dict, **options) -> dict:
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model=lm,
        tasks=[str(tasks[name]) for name in TASKS],
        task_manager=TaskManager(include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
        **options,
    )


def responses(results: dict, task: str) -> list:
    """Each request's answer, by document: (log-likelihood, greedy), a float or a text.
    (Samples come gathered replica by replica: put them back in document order.)"""
    samples = sorted(results["samples"][task], key=lambda sample: sample["doc_id"])
    return [[r[0] for r in sample["resps"]] for sample in samples]


def assert_same_answers(ours: list, theirs: list, abs_tol: float = 1e-4) -> None:
    for doc_ours, doc_theirs in zip(ours, theirs, strict=True):
        for a, b in zip(doc_ours, doc_theirs, strict=True):
            if isinstance(a, str):
                assert a == b
                continue
            if isinstance(a, float):  # loglikelihood_rolling: no greedy flag
                a, b = (a, None), (b, None)
            # lm-eval's hf backend sums a request's token log-probabilities in fp32, whose
            # rounding at a paragraph's ~-700 is ~6e-5: allow that on top of 1e-4.
            assert a[0] == pytest.approx(b[0], abs=abs_tol, rel=1e-6)
            assert a[1] == b[1]


def metrics(results: dict, task: str) -> dict:
    return {k: v for k, v in results["results"][task].items() if "," in k and "stderr" not in k}


def test_adapter_matches_lm_evals_hf_backend_on_the_exported_model(checkpoint, tasks, tmp_path):
    from lm_eval.models.huggingface import HFLM

    from megagpt.checkpoint.convert import export_hf
    from megagpt.harness.adapter import MegagptLM
    from megagpt.harness.model import evaluation_config, load_evaluation_model

    model = load_evaluation_model(*evaluation_config(checkpoint))
    ours = evaluate(MegagptLM(model=model, batch_size=8), tasks)
    hf_dir = export_hf(checkpoint, tmp_path / "hf")
    # megagpt puts EOD (not BOS) before a text without context, as training did.
    eod = model.tokenizer.eod_id
    theirs = evaluate(
        HFLM(pretrained=str(hf_dir), batch_size=8, device="cpu", prefix_token_id=eod), tasks
    )
    for task in TASKS:
        assert_same_answers(responses(ours, task), responses(theirs, task))
        assert metrics(ours, task) == pytest.approx(metrics(theirs, task), rel=1e-5), task
    # The reusable multiple-choice scoring gives lm-eval's own acc and acc_norm.
    for sample in ours["samples"]["pydoc_mc"]:
        lls = [r[0][0] for r in sample["resps"]]
        expected = multiple_choice_metrics(lls, sample["doc"]["choices"], sample["doc"]["answer"])
        assert expected == {"acc": sample["acc"], "acc_norm": sample["acc_norm"]}


def evaluate_on_layout(checkpoint: str, tasks: dict, overrides: list[str], batch_size: int):
    """One rank's part of an evaluation under `overrides` (a layout); rank 0's answers."""
    from megagpt.harness.run import evaluate_tasks

    results = evaluate_tasks(
        checkpoint,
        [str(tasks[name]) for name in TASKS],
        batch_size=batch_size,
        overrides=overrides,
        output=tasks["pydoc_mc"].parent / f"out-{'-'.join(overrides) or 'one'}",
        bootstrap_iters=0,
    )
    if results is None:
        return None
    return {task: (responses(results, task), metrics(results, task)) for task in TASKS}


def test_megagpt_eval_writes_results_and_samples_beside_the_checkpoint(checkpoint, tasks):
    from megagpt.cli import main

    paths = ",".join(str(tasks[name]) for name in ("pydoc_mc", "pydoc_cloze"))
    assert main(["eval", "--checkpoint", checkpoint, "--tasks", paths, "--limit", "4"]) == 0
    (written,) = (resolve_checkpoint_dir(checkpoint) / "eval").iterdir()
    results = json.loads((written / "results.json").read_text())
    assert set(results["results"]) == {"pydoc_mc", "pydoc_cloze"}
    assert 0 <= results["results"]["pydoc_mc"]["acc,none"] <= 1
    lines = (written / "samples_pydoc_mc.jsonl").read_text().splitlines()
    assert len(lines) == 4 and len(json.loads(lines[0])["resps"]) == 4  # four choices


@pytest.fixture(scope="module")
def reference(checkpoint, tasks) -> dict:
    """Answers and metrics of one process at batch size 8."""
    return evaluate_on_layout(checkpoint, tasks, [], 8)


def test_results_do_not_depend_on_the_batch_size(checkpoint, tasks, reference):
    one_at_a_time = evaluate_on_layout(checkpoint, tasks, [], 1)
    for task in TASKS:
        assert_same_answers(one_at_a_time[task][0], reference[task][0], abs_tol=1e-5)
        assert one_at_a_time[task][1] == pytest.approx(reference[task][1], rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout",
    [
        ["parallel.tensor_parallel_size=2"],
        ["parallel.pipeline_parallel_size=2"],
        [],  # two data-parallel replicas: requests shared out, results gathered
    ],
    ids=["tp2", "pp2", "dp2"],
)
def test_results_do_not_depend_on_the_layout(checkpoint, tasks, reference, layout):
    answers = run_distributed(evaluate_on_layout, 2, (checkpoint, tasks, layout, 8))
    assert answers[1] is None  # the first rank reports
    for task in TASKS:
        assert_same_answers(answers[0][task][0], reference[task][0], abs_tol=1e-5)
        assert answers[0][task][1] == pytest.approx(reference[task][1], rel=1e-6)


# ---------------------------------------------------------------------- bad input
# Each case runs with a layout this one process cannot build (two pipeline stages): had
# the model started to load, the error would be about the number of processes instead.
CANNOT_BUILD = ["parallel.pipeline_parallel_size=2"]


def check_fails(checkpoint, task_path, *fragments) -> None:
    from megagpt.harness.run import evaluate_tasks
    from megagpt.harness.tasks import TaskError

    with pytest.raises(TaskError) as error:
        evaluate_tasks(checkpoint, str(task_path), overrides=CANNOT_BUILD)
    for fragment in fragments:
        assert fragment in str(error.value)


def edited(tasks: dict, name: str, directory, old: str, new: str):
    path = directory / f"{name}.yaml"
    text = tasks[name].read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    return path


def test_a_task_yaml_that_does_not_parse_is_refused(checkpoint, tasks, tmp_path):
    path = edited(tasks, "pydoc_mc", tmp_path, "test_split: test", "test_split: [test")
    check_fails(checkpoint, path, str(path), "not valid YAML", "line")


def test_a_missing_data_file_is_refused(checkpoint, tasks, tmp_path):
    path = edited(tasks, "pydoc_cloze", tmp_path, "pydoc_cloze.jsonl", "nowhere.jsonl")
    check_fails(checkpoint, path, str(path), "dataset_kwargs.data_files.test", "nowhere.jsonl")


def test_a_field_the_rows_lack_is_refused(checkpoint, tasks, tmp_path):
    path = edited(tasks, "pydoc_mc", tmp_path, "{{context}}", "{{question}}")
    check_fails(checkpoint, path, str(path), "doc_to_text", "'question'", "row 1", "context")


def test_a_metric_that_needs_the_network_is_refused(checkpoint, tasks, tmp_path):
    path = edited(tasks, "pydoc_cloze", tmp_path, "metric: perplexity,", "metric: bertscore,")
    check_fails(checkpoint, path, str(path), "metric_list[0].metric = 'bertscore'", "acc_norm")


def test_a_tokenizer_that_cannot_encode_the_task_is_refused(
    tmp_path, documents, tasks, dataset_prefix
):
    # A sentencepiece model without byte fallback, trained on ASCII text: it has no
    # token for characters it never saw and would encode them as <unk>.
    ascii_docs = [d for d in documents if d.isascii()]
    tokenizer = Tokenizer.train(ascii_docs, tmp_path / "ascii.model", 300, byte_fallback=False)
    prefix = write_documents(tmp_path, ascii_docs[:200], tokenizer)
    overrides = [*tiny_overrides(prefix, tokenizer, tmp_path / "run"), "train.max_steps=1"]
    overrides += ["model.vocab_size=300", "logging.tensorboard=false"]
    checkpoint = str(train(load_config(None, overrides)).checkpoint)
    rows = [json.loads(line) for line in tasks["pydoc_mc"].with_suffix(".jsonl").open()]
    rows[0]["context"] = "The word 語 is"
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    original = str(tasks["pydoc_mc"].with_suffix(".jsonl"))
    path = edited(tasks, "pydoc_mc", tmp_path, original, str(data))
    directory = str(resolve_checkpoint_dir(checkpoint))  # its copy of the tokenizer
    check_fails(checkpoint, path, str(path), "doc_to_text of document 0", "U+8A9E", directory)


# ---------------------------------------------------------------------- no lm-eval needed
@pytest.mark.parametrize("shape", ["gpt2", "llama"])
def test_shared_context_rows_score_each_request_as_alone(shape):
    """Continuations sharing a context row give the log-likelihoods of their own forward,
    whatever the batch size; a request longer than the window is cut from the left."""
    blocks = LLAMA_BLOCKS if shape == "llama" else []
    config = load_config(None, ["data.seq_len=32", *blocks])
    config = apply_overrides(
        config,
        ["model.vocab_size=97", "model.max_seq_len=48", "model.n_layers=2"]
        + ["model.hidden_size=32", "model.n_heads=4"],
        "test",
    )
    model = build_model(config.model, "cpu", seed=1).eval()
    g = torch.Generator().manual_seed(0)

    def draw(low, high):
        n = int(torch.randint(low, high, (1,), generator=g))
        return torch.randint(0, 97, (n,), generator=g).tolist()

    requests = [(context, draw(1, 6)) for context in (draw(1, 20) for _ in range(10))]
    requests += [(requests[i][0], draw(1, 6)) for i in range(10) for _ in range(i % 3)]
    requests.append((list(range(40)), list(range(20))))  # 59 tokens: cut to the last 49

    def alone(context, continuation):
        inputs = (context + continuation)[-49:][:-1]
        with torch.no_grad():
            logprobs = model(torch.tensor([inputs])).log_softmax(-1)[0, -len(continuation) :]
        targets = torch.tensor(continuation)
        picked = logprobs.gather(-1, targets[:, None]).sum()
        return float(picked), bool((logprobs.argmax(-1) == targets).all())

    expected = [alone(*r) for r in requests]
    runner = InferenceRunner.from_model(model)
    for batch_size in (1, 3, 64):
        got = loglikelihoods(runner, requests, batch_size)
        assert [g[1] for g in got] == [e[1] for e in expected]
        assert [g[0] for g in got] == pytest.approx([e[0] for e in expected], abs=1e-5)

    # Prompts of different lengths generated together, left-padded: each as alone.
    prompts = [draw(1, 14) for _ in range(5)]
    together = generate_batch(runner, prompts, 10)
    for prompt, new in zip(prompts, together):
        alone_ids = generate(model, torch.tensor([prompt]), 10, temperature=0)[0, len(prompt) :]
        assert new == alone_ids.tolist()


def test_shorter_rows_share_a_forward_within_the_first_batchs_tokens():
    """batch_size rows of the longest length set the budget; shorter rows fill it."""
    rows = [Row(tokens=[0] * n) for n in (10, 9, 5, 5, 5, 4, 2, 2, 1)]
    batches = token_budget_batches(rows, batch_size=2)
    assert [[len(r.tokens) for r in b] for b in batches] == [
        [10, 9],
        [5, 5, 5, 4],  # 4 x 5 = 20 tokens padded, the budget
        [2, 2, 1],
    ]
    assert [len(b) for b in token_budget_batches(rows, batch_size=1)] == [1, 1, 2, 2, 3]
    assert token_budget_batches([], batch_size=4) == []


def test_multiple_choice_metrics_normalize_by_characters():
    # "a" is likelier in total, "bbbbbbbb" per character: acc and acc_norm disagree.
    scores = multiple_choice_metrics([-2.0, -4.0], ["a", "bbbbbbbb"], answer=1)
    assert scores == {"acc": 0.0, "acc_norm": 1.0}
    assert multiple_choice_metrics([-1.0, -1.0], ["x", "y"], answer=0)["acc"] == 1.0  # ties
