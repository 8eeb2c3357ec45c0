"""Labeled data for fine-tuning: chat templates, and megagpt-preprocess --format
sft|classify end to end (real tokenizers with the chat markers, real files)."""

import json
import random
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_tools import train_tokenizer
from data_tools.preprocess import main
from megagpt.data import IndexedDataset
from megagpt.data.labeled_format import read_labeled_manifest
from megagpt.tokenizer import Tokenizer
from megagpt.tokenizer.chat_template import (
    ExampleError,
    TemplateError,
    load_chat_template,
)

MARKERS = "<|system|>,<|user|>,<|assistant|>,<|end|>"
CHAT = load_chat_template("megagpt-chat")
PLAIN = load_chat_template("plain")


@pytest.fixture(scope="module")
def chat_tokenizers(tmp_path_factory, documents):
    """A sentencepiece model and a byte-level BPE with the chat markers, trained by the
    command a user would run."""
    directory = tmp_path_factory.mktemp("chat_tokenizers")
    corpus = directory / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    tokenizers = {}
    for kind, name in (("sentencepiece", "sp.model"), ("byte-bpe", "bpe.json")):
        args = [str(corpus), "--model", str(directory / name), "--type", kind]
        assert (
            train_tokenizer.main([*args, "--vocab-size", "600", "--special-tokens", MARKERS]) == 0
        )
        tokenizers[kind] = Tokenizer(directory / name)
    return tokenizers


@pytest.fixture(params=["sentencepiece", "byte-bpe"])
def chat_tokenizer(request, chat_tokenizers):
    return chat_tokenizers[request.param]


def snippet(rng, documents, most_words=12):
    words = rng.choice(documents).split()
    start = rng.randrange(len(words))
    return " ".join(words[start : start + rng.randint(1, most_words)])


def conversation(rng, documents):
    messages = (
        [{"role": "system", "content": snippet(rng, documents)}] if rng.random() < 0.5 else []
    )
    for _ in range(rng.randint(1, 3)):
        messages.append({"role": "user", "content": snippet(rng, documents)})
        messages.append({"role": "assistant", "content": snippet(rng, documents)})
    return messages


def turns(*pairs):
    return [{"role": role, "content": content} for role, content in pairs]


def runs(ids, mask):
    """Maximal runs of equal mask: [(mask value, ids), ...]."""
    out = []
    for token, m in zip(ids, mask):
        if out and out[-1][0] == m:
            out[-1][1].append(token)
        else:
            out.append((m, [token]))
    return out


def test_render_trains_exactly_the_assistant_turns(chat_tokenizer, documents):
    tok = chat_tokenizer
    CHAT.check(tok)
    rng = random.Random(0)
    for _ in range(60):
        messages = conversation(rng, documents)
        ids, mask = CHAT.render(tok, messages)
        text = CHAT.text(messages)
        # The ids of the text as a whole: generation sees what training saw.
        assert ids == [*tok.encode(text), tok.eod_id]
        assert set(mask) == {0, 1} and len(mask) == len(ids) and mask[-1] == 1
        expected, context = [], ""
        for message in messages:
            if message["role"] == "assistant":
                context += "<|assistant|>\n"
                expected += [(0, context), (1, message["content"] + "<|end|>\n")]
                context = ""
            else:
                context += f"<|{message['role']}|>\n{message['content']}<|end|>\n"
        # Every run of trained tokens is one assistant reply with its end; every
        # untrained run is the prompt between (role prefixes, system and user turns).
        assert [(m, tok.decode(run)) for m, run in runs(ids, mask)] == expected


def test_render_prompt_is_what_training_saw_up_to_the_reply(chat_tokenizer, documents):
    tok = chat_tokenizer
    rng = random.Random(1)
    for _ in range(20):
        messages = conversation(rng, documents)
        ids, mask = CHAT.render(tok, messages)
        prompt = CHAT.render_prompt(tok, messages[:-1])
        assert prompt == ids[: len(prompt)]  # an example starts the window: no EOD before
        assert mask[len(prompt) - 1] == 0 and mask[len(prompt)] == 1


def test_markers_must_be_tokens_of_the_tokenizer(tokenizer):
    with pytest.raises(TemplateError) as error:
        CHAT.check(tokenizer)  # the conftest tokenizer has no chat markers
    message = str(error.value)
    assert "does not have <|system|> (" in message and "<|end|> (" in message
    assert f"--special-tokens '{MARKERS}'" in message and "--chat-template plain" in message


def test_a_turn_end_that_is_also_eod_is_refused(tmp_path, chat_tokenizers):
    """Examples are separated by EOD; a tokenizer whose EOS also ends turns would blur
    turn and example boundaries."""
    directory = tmp_path / "model"
    directory.mkdir()
    shutil.copy(chat_tokenizers["byte-bpe"].path, directory / "tokenizer.json")
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end|>"}))
    tok = Tokenizer(directory / "tokenizer.json")
    assert tok.eod_id == tok.piece_to_id("<|end|>")
    with pytest.raises(TemplateError, match="<\\|end\\|> is the tokenizer's EOD"):
        CHAT.check(tok)


def test_template_files_are_validated_and_round_trip(tmp_path):
    path = tmp_path / "mine.json"
    CHAT.save(path)
    assert load_chat_template(path) == CHAT == load_chat_template("megagpt-chat-v1")
    data = json.loads(path.read_text())
    del data["roles"]["assistant"]
    path.write_text(json.dumps(data))
    with pytest.raises(TemplateError, match=f'{path}: "roles" has no "assistant" turn: without'):
        load_chat_template(path)
    data["roles"]["assistant"] = "<|assistant|>\n<|end|>\n"  # no place for the reply
    path.write_text(json.dumps(data))
    with pytest.raises(TemplateError, match="assistant turn .* must contain \\{content\\}"):
        load_chat_template(path)
    data["roles"]["assistant"] = "{content}"
    data["version"] = "1"
    path.write_text(json.dumps(data))
    with pytest.raises(TemplateError, match='"version" must be a JSON int, not "1"'):
        load_chat_template(path)
    data["version"], data["generation_promt"] = 1, "A:"
    path.write_text(json.dumps(data))
    with pytest.raises(TemplateError, match="unknown key\\(s\\) \\['generation_promt'\\]"):
        load_chat_template(path)
    with pytest.raises(TemplateError, match="no such template; the built-in ones are megagpt-chat"):
        load_chat_template("megagpt-chat-v9")


def test_plain_template_needs_no_markers(tokenizer, documents):
    PLAIN.check(tokenizer)
    prompt, completion = documents[0][:200].rstrip(), " " + documents[1][:100].strip()
    ids, mask = PLAIN.render_completion(tokenizer, prompt, completion)
    assert ids == [*tokenizer.encode(prompt + completion), tokenizer.eod_id]  # EOD last
    assert [m for m, _ in runs(ids, mask)] == [0, 1]
    assert mask.count(0) == len(tokenizer.encode(prompt))
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    ids, mask = PLAIN.render(tokenizer, chat)
    assert tokenizer.decode(ids) == "User: Hi\nAssistant: Hello\n" == PLAIN.text(chat)
    assert ids[-1] == tokenizer.eod_id and tokenizer.decode(runs(ids, mask)[1][1]) == "Hello\n"


@pytest.mark.parametrize(
    "messages, reason",
    [
        (turns(("user", "hi")), "no_supervised_token"),
        (turns(("user", "hi"), ("assistant", " ")), "empty_completion"),
        (turns(("robot", "hi"), ("assistant", "x")), "unknown_role"),
        ("hello", "bad_messages"),
        ([], "bad_messages"),
        ([{"role": "user"}], "bad_messages"),
        (turns(("assistant", "a<|end|>b")), "marker_in_content"),
    ],
)
def test_bad_conversations_say_why(chat_tokenizers, messages, reason):
    with pytest.raises(ExampleError) as error:
        CHAT.render(chat_tokenizers["byte-bpe"], messages)
    assert error.value.reason == reason


def run(tmp_path, inputs, tokenizer, *extra, prefix="out/chat"):
    args = [*map(str, inputs), "--tokenizer", str(tokenizer.path), *extra]
    code = main([*args, "--output-prefix", str(tmp_path / prefix)])
    summary = tmp_path / f"{prefix}.summary.json"
    return code, json.loads(summary.read_text()) if summary.exists() else None


def documents_of(prefix):
    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


@pytest.fixture
def sft_rows(documents):
    rng = random.Random(2)
    good = [{"prompt": snippet(rng, documents), "completion": snippet(rng, documents)}]
    good += [{"messages": conversation(rng, documents)} for _ in range(8)]
    good += [{"prompt": turns(("user", "Why?")), "completion": turns(("assistant", "Because."))}]
    long_reply = {"messages": turns(("user", "Tell all."), ("assistant", " ".join(documents[:8])))}
    long_prompt = {"prompt": " ".join(documents[:8]), "completion": "Short."}
    bad = {
        "no_supervised_token": {"messages": turns(("user", "anyone?"))},
        "empty_completion": {"prompt": "Say nothing.", "completion": ""},
        "unknown_role": {"messages": turns(("robot", "beep"), ("assistant", "Hi."))},
        "bad_messages": {"messages": "not a list"},
    }
    return good, long_reply, long_prompt, bad


@pytest.mark.parametrize("overlong", ["drop", "truncate"])
def test_preprocess_sft_writes_tokens_and_mask(tmp_path, chat_tokenizers, sft_rows, overlong):
    tok = chat_tokenizers["sentencepiece"]
    good, long_reply, long_prompt, bad = sft_rows
    rows = [good[0], bad["no_supervised_token"], *good[1:5], long_reply, bad["empty_completion"]]
    rows += [bad["unknown_role"], *good[5:], bad["bad_messages"], long_prompt]
    lines = [json.dumps(row) for row in rows]
    lines.insert(3, "not json")
    (tmp_path / "chat.jsonl").write_text("\n".join(lines) + "\n")

    def rendered(row):
        if "messages" in row:
            return CHAT.render(tok, row["messages"])
        if isinstance(row["prompt"], list):
            return CHAT.render(tok, row["prompt"] + row["completion"], len(row["prompt"]))
        return CHAT.render_completion(tok, row["prompt"], row["completion"])

    expected = [rendered(row) for row in good]
    limit = max(len(ids) for ids, _ in expected) + 5
    args = ["--format", "sft", "--max-tokens", str(limit), "--overlong", overlong]
    code, summary = run(tmp_path, [tmp_path / "chat.jsonl"], tok, *args)
    assert code == 0
    drops = {reason: 1 for reason in bad} | {"invalid_json": 1}
    if overlong == "drop":
        drops["too_long"] = 2
    else:  # the reply is cut at the limit; the long prompt leaves nothing to train
        ids, mask = CHAT.render(tok, long_reply["messages"])
        expected.insert(5, (ids[:limit], mask[:limit]))
        drops["no_supervised_token"] += 1
    assert summary["drops"] == drops
    assert summary["truncated"] == (overlong == "truncate")
    assert summary["documents_in"] == len(lines) and summary["documents_out"] == len(expected)
    tokens = documents_of(tmp_path / "out/chat_00000")
    masks = documents_of(tmp_path / "out/chat_00000_mask")
    assert tokens == [ids for ids, _ in expected] and masks == [m for _, m in expected]
    assert IndexedDataset(tmp_path / "out/chat_00000_mask").dtype == np.uint8
    assert summary["supervised_tokens"] == sum(map(sum, masks))
    assert summary["tokens"] == sum(map(len, tokens))
    assert summary["chat_template"] == {"name": "megagpt-chat", "version": 1}
    manifest = json.loads((tmp_path / "out/chat.manifest.json").read_text())
    assert manifest["format"] == "sft" and manifest["mask_suffix"] == "_mask"
    assert manifest["chat_template"] == {
        "name": "megagpt-chat",
        "version": 1,
        "file": "chat.chat_template.json",
    }
    assert manifest["data_path"] == ["chat_00000"] and manifest["vocab_size"] == 600
    assert load_chat_template(tmp_path / "out/chat.chat_template.json") == CHAT
    labeled = read_labeled_manifest(tmp_path / "out/chat.manifest.json")
    assert labeled.format == "sft" and labeled.shard_prefixes == [str(tmp_path / "out/chat_00000")]
    assert labeled.template_path == tmp_path / "out/chat.chat_template.json"


def test_sft_strict_names_file_and_line_and_output_is_not_overwritten(
    tmp_path, chat_tokenizers, sft_rows, capsys
):
    tok = chat_tokenizers["byte-bpe"]
    good, _, _, bad = sft_rows
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [*good[:3], bad["unknown_role"]]))
    assert run(tmp_path, [path], tok, "--format", "sft", "--strict")[0] == 2
    assert f"{path}:4: unknown_role: turn 1 has role 'robot'" in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("chat*.bin"))  # a failed run leaves nothing
    code, summary = run(tmp_path, [path], tok, "--format", "sft", "--chat-template", "plain")
    assert code == 0 and summary["documents_out"] == 3
    assert summary["chat_template"] == {"name": "plain", "version": 1}
    assert run(tmp_path, [path], tok, "--format", "sft")[0] == 2
    assert "output from another run exists" in capsys.readouterr().err
    assert run(tmp_path, [path], tok, "--format", "sft", "--overwrite")[0] == 0


def test_sft_refuses_a_tokenizer_without_the_markers_before_writing(tmp_path, tokenizer, capsys):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    assert run(tmp_path, [path], tokenizer, "--format", "sft")[0] == 2
    assert "--chat-template plain" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert run(tmp_path, [path], tokenizer, "--chat-template", "plain")[0] == 2
    assert "--chat-template is for --format sft, not text" in capsys.readouterr().err


def test_sft_reads_parquet_rows_into_shards_of_n_tokens(tmp_path, chat_tokenizers, sft_rows):
    tok = chat_tokenizers["byte-bpe"]
    good = [row for row in sft_rows[0] if "messages" in row]
    pq.write_table(pa.Table.from_pylist(good), tmp_path / "chat.parquet")
    args = ["--format", "sft", "--shard-tokens", "300"]
    code, summary = run(tmp_path, [tmp_path / "chat.parquet"], tok, *args)
    assert code == 0 and summary["drops"] == {} and summary["shards"] > 1
    expected = [CHAT.render(tok, row["messages"]) for row in good]
    shards = read_labeled_manifest(tmp_path / "out/chat.manifest.json").shard_prefixes
    assert len(shards) == summary["shards"]
    assert [d for s in shards for d in documents_of(s)] == [ids for ids, _ in expected]
    assert [d for s in shards for d in documents_of(s + "_mask")] == [m for _, m in expected]


def test_preprocess_classify(tmp_path, tokenizer, documents):
    rows = [{"text": documents[i], "label": ["10", "2", "7"][i % 3]} for i in range(12)]
    rows += [{"text": documents[20], "label": 2}, {"text": documents[21]}, {"label": "7"}]
    path = tmp_path / "reviews.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, summary = run(tmp_path, [path], tokenizer, "--format", "classify", prefix="out/cls")
    assert code == 0
    assert summary["labels"] == ["2", "7", "10"]  # found, in numeric order
    assert summary["label_counts"] == {"2": 5, "7": 4, "10": 4}
    assert summary["drops"] == {"missing_label": 1, "missing_field": 1}
    tokens = documents_of(tmp_path / "out/cls_00000")
    labels = documents_of(tmp_path / "out/cls_00000_labels")
    kept = rows[:13]
    assert tokens == [[*tokenizer.encode(r["text"]), tokenizer.eod_id] for r in kept]
    assert labels == [[{"2": 0, "7": 1, "10": 2}[str(r["label"])]] for r in kept]
    assert IndexedDataset(tmp_path / "out/cls_00000_labels").dtype == np.int32
    assert json.loads((tmp_path / "out/cls.labels.json").read_text()) == ["2", "7", "10"]
    manifest = read_labeled_manifest(tmp_path / "out/cls.manifest.json")
    assert manifest.format == "classify" and manifest.labels == ["2", "7", "10"]
    assert manifest.side_suffix == "_labels"

    args = ["--format", "classify", "--labels", "7,2", "--max-tokens", "20", "--overwrite"]
    code, summary = run(tmp_path, [path], tokenizer, *args, prefix="out/cls")
    assert code == 0 and summary["labels"] == ["7", "2"]
    assert summary["drops"] == {"missing_label": 1, "missing_field": 1, "unknown_label": 4}
    tokens = documents_of(tmp_path / "out/cls_00000")
    assert all(len(t) <= 20 and t[-1] == tokenizer.eod_id for t in tokens)
    long = sum(len(tokenizer.encode(t["text"])) >= 20 for t in rows[:13] if t["label"] != "10")
    assert summary["truncated"] == long > 0
    assert documents_of(tmp_path / "out/cls_00000_labels")[:3] == [[1], [0], [1]]
