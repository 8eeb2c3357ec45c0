import pytest

from megagpt.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer


def test_special_ids(tokenizer):
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (BOS_ID, EOS_ID, PAD_ID)
    assert tokenizer.eod_id == tokenizer.eos_id
    assert tokenizer.unk_id == UNK_ID and tokenizer.kind == "sentencepiece"
    assert tokenizer.vocab_size == 512


def test_round_trip_and_batch_encoding(tokenizer):
    texts = ["The for statement iterates over a sequence.", "x = [1, 2, 3]", "naïve café ☃"]
    batch = tokenizer.encode_batch(texts, num_threads=2)
    assert batch == [tokenizer.encode(t) for t in texts]
    for text, ids in zip(texts, batch):
        assert tokenizer.decode(ids) == text  # byte fallback keeps unseen characters
    assert tokenizer.encode_prompt("for")[0] == tokenizer.eod_id


def test_training_from_a_generator_with_bounded_sample(tmp_path, documents):
    def texts():  # a generator: read once, never held whole
        for i in range(5000):
            yield f"line {i} of a generated corpus\n{documents[i % len(documents)]}"

    tok = Tokenizer.train(
        texts(),
        tmp_path / "gen.model",
        vocab_size=600,
        max_sentences=2000,
        model_type="unigram",
        user_defined_symbols=["<sep>"],
    )
    assert tok.vocab_size == 600
    assert tok.piece_to_id("<sep>") == 4  # right after unk, bos, eos, pad
    assert tok.id_to_piece(4) == "<sep>" and tok.piece_to_id("<not a piece>") is None
    assert tok.decode(tok.encode("line 12 <sep> corpus")) == "line 12 <sep> corpus"
    assert not (tmp_path / "gen.model.tmp").exists()


def test_missing_model_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.model does not exist"):
        Tokenizer(tmp_path / "missing.model")


def test_text_survives_encoding_exactly(tokenizer):
    """No normalization: spaces, tabs, newlines and digits come back as they were."""
    texts = ["a  b   c", "line one\nline two\n\n\tindented", "x = 12345.678", "  leading"]
    for text in texts:
        assert tokenizer.decode(tokenizer.encode(text)) == text
