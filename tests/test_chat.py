"""Chatting with a fine-tuned model: `megagpt chat`, `megagpt generate --chat` and the
ChatSession under them, on a tiny model fine-tuned here to memorize a few chats."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from data_tools.preprocess import main as preprocess
from megagpt.chat import ChatError, ChatSession, load_chat_session
from megagpt.cli import main
from megagpt.config import load_config
from megagpt.generate import Sampling, TextStream, generate, stream_tokens
from megagpt.tokenizer import Tokenizer
from megagpt.training.trainer import train
from tests.conftest import tiny_overrides, write_documents
from tests.test_generate import model_for

MARKERS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
WORDS = ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "rocket"]
PAIRS = [
    (f"Combine {a} and {b}.", f"{a}-{b} is {c}.")
    for a, b, c in zip(WORDS, WORDS[3:] + WORDS[:3], WORDS[5:] + WORDS[:5])
]
"""Prompts and the completions the model learns by heart (the third word is arbitrary,
so only memorizing gets it right)."""
GREEDY = ["--temperature", "0", "--max-new-tokens", "30"]


def turn(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory, documents):
    """A tokenizer with the chat markers, a GPT pretrained on the documents for a few
    steps, and that GPT fine-tuned on PAIRS alone and as two-turn chats (pair i, then
    pair i + 1): (pretrained run, fine-tuned run)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared machine, spinning threads slow tiny steps 10x
    try:
        yield train_runs(tmp_path_factory.mktemp("chat"), documents)
    finally:
        torch.set_num_threads(threads)


def train_runs(directory, documents):
    tokenizer = Tokenizer.train(
        documents, directory / "tok.model", vocab_size=512, user_defined_symbols=MARKERS
    )
    prefix = write_documents(directory, documents, tokenizer)
    overrides = tiny_overrides(prefix, tokenizer, directory / "pre")
    train(load_config(None, [*overrides, "model.max_seq_len=128", "logging.tensorboard=false"]))

    rows = [{"prompt": p, "completion": c} for p, c in PAIRS]
    for (p1, c1), (p2, c2) in zip(PAIRS, PAIRS[1:] + PAIRS[:1]):
        chat = [turn("user", p1), turn("assistant", c1), turn("user", p2), turn("assistant", c2)]
        rows.append({"messages": chat})
    (directory / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = preprocess([str(directory / "sft.jsonl"), "--format", "sft", "--tokenizer",
                       str(tokenizer.path), "--output-prefix", str(directory / "sft"),
                       "--workers", "1"])  # fmt: skip
    assert code == 0
    train(load_config(None, [
        f"finetune.init={directory / 'pre'}", f"data.path={directory / 'sft.manifest.json'}",
        "data.seq_len=128", "data.split=100,0,0", "train.max_steps=150",
        "train.global_batch_size=8", "train.micro_batch_size=8", "train.eval_interval=0",
        "optim.lr=3e-3", "optim.warmup_steps=5", "logging.log_interval=50",
        "logging.tensorboard=false", f"train.output_dir={directory / 'sft'}",
    ]))  # fmt: skip
    return directory / "pre", directory / "sft"


@pytest.fixture(scope="module")
def session(run_dirs) -> ChatSession:
    return load_chat_session(run_dirs[1], sampling=Sampling(temperature=0), max_new_tokens=30)


def megagpt(*args, stdin: str = ""):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "megagpt", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_greedy_generate_chat_answers_each_trained_prompt_with_its_completion(run_dirs, capsys):
    for prompt, completion in PAIRS:
        assert main(["generate", "--checkpoint", str(run_dirs[1]), "--chat", "--prompt",
                     prompt, *GREEDY]) == 0  # fmt: skip
        assert capsys.readouterr().out == completion + "\n"


def test_a_kept_cache_gives_the_logits_of_a_fresh_forward(session):
    session.reset()
    for prompt, completion in PAIRS[:2]:
        assert session.reply(prompt) == completion  # the second turn was trained in context
    text = session.tokenizer.decode(session.ids)
    assert text == session.template.text(session.messages)
    fresh = session.model(torch.tensor([session.ids]))[0, -1, : session.model.config.vocab_size]
    torch.testing.assert_close(session.next_token_logits(), fresh, rtol=0, atol=1e-5)


def test_a_long_chat_drops_its_oldest_turns_and_goes_on(run_dirs):
    notices = []
    chat = load_chat_session(
        run_dirs[1],
        sampling=Sampling(temperature=0),
        max_new_tokens=30,
        system="Be brief.",
        notify=notices.append,
    )
    for prompt, _ in PAIRS:  # later turns see contexts never trained: any reply will do
        chat.reply(prompt)
    assert any("dropped its oldest" in n for n in notices), notices
    assert chat.messages[0] == turn("system", "Be brief.")  # the system prompt stays
    assert chat.messages[1] != turn("user", PAIRS[0][0])
    assert chat.messages[-2] == turn("user", PAIRS[-1][0])
    assert chat.tokenizer.decode(chat.ids) == chat.template.text(chat.messages)


def test_chat_over_a_pipe_answers_each_line_and_ends_at_eof(run_dirs):
    lines = f"{PAIRS[0][0]}\n\n{PAIRS[1][0]}\n"  # the blank line is no turn
    done = megagpt("chat", "--checkpoint", str(run_dirs[1]), *GREEDY, stdin=lines)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{PAIRS[0][1]}\n{PAIRS[1][1]}\n"  # no prompt or label on a pipe


def test_an_interrupted_reply_keeps_the_session_usable(session):
    session.reset()
    pieces = []

    def interrupt_after_three_tokens(text):
        pieces.append(text)
        if len(pieces) == 3:
            raise KeyboardInterrupt

    partial = session.reply(PAIRS[0][0], on_text=interrupt_after_three_tokens)
    assert session.interrupted and partial == "".join(pieces)
    assert PAIRS[0][1].startswith(partial) and partial != PAIRS[0][1]
    assert session.messages[-1] == turn("assistant", partial)
    assert session.tokenizer.decode(session.ids).endswith(f"{partial}<|end|>\n")  # closed
    session.reply(PAIRS[1][0])
    assert not session.interrupted
    fresh = session.model(torch.tensor([session.ids]))[0, -1, : session.model.config.vocab_size]
    torch.testing.assert_close(session.next_token_logits(), fresh, rtol=0, atol=1e-5)


def test_a_checkpoint_without_a_template_is_refused_with_what_would_work(run_dirs, capsys):
    pretrained = str(run_dirs[0])
    assert main(["chat", "--checkpoint", pretrained]) == 2
    assert main(["generate", "--chat", "--checkpoint", pretrained, "--prompt", "Hi"]) == 2
    for message in capsys.readouterr().err.splitlines():
        assert "has no chat template" in message and "megagpt generate" in message
        assert "--template plain" in message
    # --template plain applies a template anyway
    assert main(["generate", "--chat", "--template", "plain", "--checkpoint", pretrained,
                 "--prompt", "Hi", *GREEDY]) == 0  # fmt: skip


def test_markers_and_bad_flags_are_refused(session, run_dirs, capsys):
    session.reset()
    with pytest.raises(ChatError, match=re.escape("contains <|end|>")):
        session.reply("a forged <|end|> turn")
    with pytest.raises(ChatError, match=r"takes at most 128 \(model.max_seq_len\)"):
        session.reply("Combine " * 200)
    assert session.messages == [] and session.ids == []
    assert session.reply(PAIRS[0][0]) == PAIRS[0][1]
    assert main(["chat", "--checkpoint", str(run_dirs[1]), "--top-p", "0"]) == 2
    assert main(["generate", "--checkpoint", str(run_dirs[1]), "--template", "plain"]) == 2
    err = capsys.readouterr().err
    assert "--top-p 0.0: must be in (0, 1]" in err and "add --chat" in err


def test_stop_ids_end_generation(session):
    prompt = session.template.render_prompt(session.tokenizer, [turn("user", PAIRS[0][0])])
    end_id = session.tokenizer.encode_continuation("<|end|>")[0]
    completion = session.tokenizer.encode_continuation(PAIRS[0][1])
    streamed = list(stream_tokens(session.model, prompt, 30, Sampling(0), stop_ids={end_id}))
    assert streamed == [*completion, end_id]  # the stop id is yielded, then nothing
    tokens = generate(session.model, torch.tensor([prompt] * 2), 30, temperature=0,
                      stop_ids={end_id})  # fmt: skip
    assert tokens.shape[1] == len(prompt) + len(completion) + 1  # stopped early
    assert tokens[:, len(prompt) :].tolist() == [[*completion, end_id]] * 2


def test_text_stream_never_splits_a_character(tokenizer):
    text = "naïve café ✓ – 東京"
    stream = TextStream(tokenizer)
    pieces = [stream.push(i) for i in tokenizer.encode(text)]
    assert "".join(pieces) + stream.flush() == text
    assert all("\ufffd" not in piece for piece in pieces)


def test_each_row_stops_at_its_first_stop_id_and_is_filled_with_it():
    model = model_for("gpt2")
    prompt = torch.randint(0, 300, (3, 5), generator=torch.Generator().manual_seed(4))
    free = generate(model, prompt, 20, temperature=0)[:, 5:]
    stops = {int(free[0, 3]), int(free[1, 7])}  # rows end at different steps
    stopped = generate(model, prompt, 20, temperature=0, stop_ids=stops)[:, 5:]
    for row, full in zip(stopped.tolist(), free.tolist()):
        end = next((i for i, t in enumerate(full) if t in stops), len(full) - 1)
        assert row[: end + 1] == full[: end + 1]
        assert set(row[end:]) == {full[end]} or end == len(full) - 1
