"""Byte-level BPE through Hugging Face `tokenizers`: trained here or brought as a
tokenizer.json, and used by preprocessing, training, generation and export."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from data_tools import train_tokenizer
from data_tools.cleaning import CleaningOptions, clean
from data_tools.preprocess import main as preprocess
from megagpt import cli
from megagpt.checkpoint import layout, verify_checkpoints
from megagpt.checkpoint.convert import export_hf, import_hf
from megagpt.checkpoint.inference import checkpoint_config
from megagpt.config import apply_overrides, load_config
from megagpt.data import IndexedDataset
from megagpt.tokenizer import Tokenizer, TokenizerError
from megagpt.tokenizer.byte_bpe import PIECE_CHARS, SampleCounts, sample_pieces, text_pieces
from megagpt.training.trainer import train
from tests.conftest import TEST_VOCAB, tiny_overrides, write_documents

TRICKY = [
    "The for statement iterates over a sequence.",
    "  two leading spaces, and two trailing  ",
    " one leading space",
    "line one\nline two\r\n\n\tindented\n    four spaces\n",
    "emoji 😀👍🏽 and CJK 中文字符 and 한국어, naïve café ☃, e\u0301 (combining)",
    "special text stays text: <|endoftext|> <|pad|> </s>",
    "\x00 nul and \x7f del",
    "",
    " ",
    "\n",
]


@pytest.fixture(scope="module")
def byte_bpe(tmp_path_factory, documents) -> Tokenizer:
    path = tmp_path_factory.mktemp("byte_bpe") / "tok.json"
    return Tokenizer.train_byte_bpe(documents, path, vocab_size=TEST_VOCAB)


@pytest.fixture(scope="module")
def byte_bpe_prefix(tmp_path_factory, documents, byte_bpe) -> str:
    return write_documents(tmp_path_factory.mktemp("byte_bpe_data"), documents, byte_bpe)


def user_tokenizer(path, documents, specials=("<|endoftext|>",), post_processor=None):
    """A tokenizer.json as a model brings one: GPT-2's pieces, its special tokens added
    after the vocabulary (GPT-2's <|endoftext|> is its last id)."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(documents[:200], trainer)
    tok.add_special_tokens(list(specials))
    if post_processor:
        tok.post_processor = post_processor(tok)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def test_trained_byte_bpe_gives_back_any_text_exactly(byte_bpe):
    assert byte_bpe.kind == "hf" and byte_bpe.vocab_size == TEST_VOCAB
    assert (byte_bpe.eod_id, byte_bpe.pad_id, byte_bpe.bos_id, byte_bpe.unk_id) == (0, 1, 0, None)
    assert byte_bpe.id_to_piece(0) == "<|endoftext|>" and byte_bpe.piece_to_id("<|pad|>") == 1
    batch = byte_bpe.encode_batch(TRICKY)
    assert batch == [byte_bpe.encode(text) for text in TRICKY]
    for text, ids in zip(TRICKY, batch):
        assert byte_bpe.decode(ids) == text
        assert byte_bpe.eod_id not in ids and byte_bpe.pad_id not in ids  # text never forges them
    assert len(byte_bpe.encode(TRICKY[0])) < len(TRICKY[0]) / 2  # it learned words
    assert byte_bpe.encode_prompt("x") == [0, *byte_bpe.encode("x")]


def test_user_symbols_stay_one_token_and_come_last(tmp_path, documents):
    tok = Tokenizer.train_byte_bpe(
        documents, tmp_path / "tok.json", vocab_size=300, user_defined_symbols=["<sep>"]
    )
    assert tok.vocab_size == 300 and tok.piece_to_id("<sep>") == 299
    ids = tok.encode("a<sep>b")
    assert 299 in ids and tok.decode(ids) == "a<sep>b"


def test_too_little_text_or_too_small_a_vocabulary_is_a_clear_error(tmp_path):
    path = tmp_path / "tok.json"
    with pytest.raises(TokenizerError, match=r"found only \d+ of the 5,000 ids asked for: it was "):
        Tokenizer.train_byte_bpe(["A short document. " * 30], path, vocab_size=5000)
    with pytest.raises(TokenizerError, match="540 characters from 1 texts; use more text"):
        Tokenizer.train_byte_bpe(["A short document. " * 30], path, vocab_size=5000)
    with pytest.raises(TokenizerError, match="258 ids has no room to learn"):
        Tokenizer.train_byte_bpe(["text"], path, vocab_size=258)
    assert not path.exists()


def test_the_sample_is_bounded_and_uniform_over_pieces():
    def texts():  # a generator: read once, never held whole
        for i in range(2000):
            yield f"document {i:04d}\n" + "word " * 300  # 1,514 characters each

    counts = SampleCounts()
    sample = sample_pieces(texts(), 100_000, counts)
    assert sum(map(len, sample)) <= 100_000 and len(sample) > 60
    assert counts.texts == 2000 and counts.characters == 2000 * 1514
    firsts = sorted(int(piece.split()[1]) for piece in sample)
    assert firsts[0] < 200 and firsts[-1] > 1800  # from the whole stream, not its start
    long = "line\n" * 1000 + "x" * 10_000 + " spaced" * 2000
    pieces = list(text_pieces(long))
    assert "".join(pieces) == long and max(map(len, pieces)) <= PIECE_CHARS
    assert pieces[0].endswith("\n") and pieces[-1].startswith(" spaced")


def test_a_models_tokenizer_json_is_accepted(tmp_path, documents):
    gpt2 = Tokenizer(user_tokenizer(tmp_path / "gpt2.json", documents))
    assert gpt2.eod_id == gpt2.bos_id == gpt2.pad_id == 400 and gpt2.vocab_size == 401
    assert gpt2.decode(gpt2.encode(TRICKY[4])) == TRICKY[4]

    def add_bos(tok):  # Llama 3's post-processor puts BOS in front of every text
        return processors.TemplateProcessing(
            single="<|begin_of_text|> $A",
            special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))],
        )

    specials = ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>")
    path = user_tokenizer(tmp_path / "llama3" / "tokenizer.json", documents, specials, add_bos)
    alone = Tokenizer(shutil.copy(path, tmp_path / "llama3.json"))
    assert (alone.bos_id, alone.eod_id) == (400, 401)  # found by their names
    assert alone.encode("Hello") == alone.encode_batch(["Hello"])[0]
    assert 400 not in alone.encode("Hello")  # no BOS added
    (path.parent / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|eot_id|>"}))
    configured = Tokenizer(path)
    assert (configured.bos_id, configured.eod_id, configured.pad_id) == (400, 402, 402)


def test_a_tokenizer_json_without_an_end_of_text_token_is_refused(tmp_path, documents):
    path = user_tokenizer(tmp_path / "plain.json", documents, specials=("<mask>",))
    with pytest.raises(TokenizerError, match=f"{path} has no end-of-text token.*Add one"):
        Tokenizer(path)


@pytest.mark.parametrize(
    "name, content",
    [
        ("tok.json", os.urandom(2048)),
        ("tokenizer.json", b'{"text": "a jsonl record"}\n'),
        ("tokenizer.json", b'{"text": "two records"}\n{"text": "b"}\n'),
        ("tok.model", b"[1, 2, 3]"),
    ],
)
def test_a_file_that_is_not_a_tokenizer_is_one_clear_line(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(TokenizerError) as raised:
        Tokenizer(tmp_path / name)
    message = str(raised.value)
    assert (
        f"{tmp_path / name} is not a sentencepiece model or a Hugging Face tokenizer.json ("
        in message
    )
    assert "\n" not in message


def test_train_tokenizer_command_writes_a_byte_bpe(tmp_path, documents, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents[:400]))
    model = tmp_path / "tok.json"
    args = [str(corpus), "--model", str(model), "--vocab-size", "400", "--type", "byte-bpe"]
    assert train_tokenizer.main([*args, "--special-tokens", "<sep>"]) == 0
    assert "byte-level BPE with 400 ids" in capsys.readouterr().out
    tok = Tokenizer(model)
    assert tok.kind == "hf" and tok.vocab_size == 400 and tok.piece_to_id("<sep>") == 399
    wrong = [str(corpus), "--type", "byte-bpe", "--model", str(tmp_path / "tok.model")]
    assert train_tokenizer.main(wrong) == 2
    assert (
        f"name it {tmp_path / 'tok.json'}, or give --type sentencepiece" in capsys.readouterr().err
    )
    assert train_tokenizer.main([str(corpus), "--model", str(tmp_path / "sp.json")]) == 2
    assert "is what --type byte-bpe writes, but --type is sentencepiece" in capsys.readouterr().err


def test_preprocessing_with_a_tokenizer_json(tmp_path, documents, byte_bpe):
    texts = [*list(dict.fromkeys(documents))[:40], TRICKY[4], TRICKY[5], "\tindented\n  code"]
    with open(tmp_path / "a.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": text}) + "\n" for text in texts)
    prefix = tmp_path / "out" / "corpus"
    args = [str(tmp_path / "a.jsonl"), "--tokenizer", str(byte_bpe.path), "--workers", "2"]
    assert preprocess([*args, "--output-prefix", str(prefix)]) == 0
    dataset = IndexedDataset(f"{prefix}_00000")
    got = [dataset[i].tolist() for i in range(len(dataset))]
    cleaned = [clean(text, CleaningOptions())[0] for text in texts]
    assert got == [[*byte_bpe.encode(text), byte_bpe.eod_id] for text in cleaned]


def test_train_generate_and_export_with_a_tokenizer_json(
    tmp_path, byte_bpe, byte_bpe_prefix, capsys
):
    transformers = pytest.importorskip("transformers")
    overrides = tiny_overrides(byte_bpe_prefix, byte_bpe, tmp_path / "run")
    config = apply_overrides(
        load_config(None, overrides), ["train.max_steps=2", "logging.tensorboard=false"], "test"
    )
    checkpoint = train(config).checkpoint
    assert layout.tokenizer_file(checkpoint) == checkpoint / "tokenizer.json"
    assert not (checkpoint / "tokenizer.model").exists()
    assert verify_checkpoints(checkpoint) == [(checkpoint, [])]  # the copy is checksummed

    prompt = " The for statement"
    argv = ["generate", "--checkpoint", str(checkpoint), "--prompt", prompt, "--seed", "1"]
    capsys.readouterr()  # training's log lines
    assert cli.main([*argv, "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.startswith(prompt)

    out = export_hf(checkpoint, tmp_path / "hf")
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    for text in TRICKY:
        ids = theirs.encode(text, add_special_tokens=False)
        assert ids == byte_bpe.encode(text) and theirs.decode(ids) == text
    hf_config = json.loads((out / "config.json").read_text())
    ids = [hf_config[f"{role}_token_id"] for role in ("bos", "eos", "pad")]
    assert (
        ids == [0, 0, 1] and [theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id] == ids
    )


def test_checkpoints_and_imports_keep_the_tokenizer_config(tmp_path, documents, byte_bpe):
    """A tokenizer_config.json can name another EOS: its copy goes along."""
    transformers = pytest.importorskip("transformers")
    model_dir = tmp_path / "gpt2"
    gpt2 = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=64, vocab_size=512)
    transformers.AutoModelForCausalLM.from_config(gpt2).save_pretrained(model_dir)
    shutil.copy(byte_bpe.path, model_dir / "tokenizer.json")
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|pad|>"}))
    checkpoint = import_hf(model_dir, tmp_path / "run")
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(layout.tokenizer_copy(checkpoint))
    tokenizer = Tokenizer(checkpoint_config(checkpoint).data.tokenizer)
    assert tokenizer.eod_id == 1  # as the config beside it says
