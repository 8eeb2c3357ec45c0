"""The baseline for benchmarks/preprocess.py: Megatron-LM's tools/preprocess_data.py
algorithm, reduced to what it does for a jsonl corpus with a sentencepiece model.

As Megatron does: a multiprocessing Pool whose workers each load the tokenizer,
`pool.imap(encoder.encode, file, 32)` encoding one JSON line at a time, the token
lists pickled back to the main process, which feeds megatron-core's
`IndexedDatasetBuilder.add_document` (lengths kept in Python lists until finalize).

    python benchmarks/megatron_preprocess_baseline.py CORPUS.jsonl TOKENIZER.model OUT WORKERS
"""

from __future__ import annotations

import json
import multiprocessing
import sys
import time

import numpy as np


class Encoder:
    """Megatron's Encoder: the tokenizer lives in a class attribute of each worker."""

    def __init__(self, model_path: str):
        self.model_path = model_path

    def initializer(self) -> None:
        import sentencepiece as spm

        Encoder.tokenizer = spm.SentencePieceProcessor(model_file=self.model_path)

    def encode(self, json_line: str):
        data = json.loads(json_line)
        text = data["text"]
        doc_ids = Encoder.tokenizer.encode_as_ids(text)
        if len(doc_ids) > 0:
            doc_ids.append(Encoder.tokenizer.eos_id())  # --append-eod
        return {"text": doc_ids}, {"text": [len(doc_ids)]}, len(json_line)


def main(corpus: str, model_path: str, prefix: str, workers: int) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    start = time.perf_counter()
    encoder = Encoder(model_path)
    vocab = (
        __import__("sentencepiece").SentencePieceProcessor(model_file=model_path).get_piece_size()
    )
    dtype = np.uint16 if vocab < 65500 else np.int32  # Megatron's DType.optimal_dtype
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    with (
        open(corpus, encoding="utf-8") as fin,
        multiprocessing.Pool(workers, initializer=encoder.initializer) as pool,
    ):
        for doc, sentence_lens, _ in pool.imap(encoder.encode, fin, 32):
            if sum(sentence_lens["text"]) == 0:
                continue
            builder.add_document(doc["text"], sentence_lens["text"])
    builder.finalize(f"{prefix}.idx")
    print(json.dumps({"seconds": time.perf_counter() - start}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
