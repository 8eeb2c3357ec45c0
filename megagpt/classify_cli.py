"""`megagpt classify`: labels and probabilities of texts, from a classifier checkpoint."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from megagpt.classify import ClassifyError


def add_classify_command(sub) -> None:
    p = sub.add_parser(
        "classify",
        help="label texts with a fine-tuned classifier (--format classify data)",
        description="Print each text's most likely label and the probability of every "
        "label. --input reads JSONL rows with a text field and prints one JSON object per "
        "row (its line number, label and probabilities).",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint, checkpoints/ root or run")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", action="append", help="a text to classify (repeatable)")
    source.add_argument("--input", type=Path, help="a JSONL file, one text per row")
    p.add_argument("--text-field", default="text", help="the JSONL rows' text field")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")


def run_classify(args) -> int:
    from megagpt.checkpoint import load_model_for_inference
    from megagpt.classify import classify_texts
    from megagpt.tokenizer import Tokenizer

    if args.batch_size < 1:
        raise ClassifyError(f"--batch-size {args.batch_size}: must be at least 1")
    texts = args.text if args.text else _read_texts(args.input, args.text_field)
    model, config, _ = load_model_for_inference(args.checkpoint, args.device)
    if not config.model.num_labels:
        raise ClassifyError(
            f"{args.checkpoint} is not a classifier (model.num_labels = 0); fine-tune one on "
            "megagpt-preprocess --format classify data"
        )
    if not config.data.tokenizer:
        raise ClassifyError(f"{args.checkpoint} holds no tokenizer to encode the texts with")
    predictions = classify_texts(
        model, Tokenizer(config.data.tokenizer), config, texts, args.batch_size
    )
    for number, (text, prediction) in enumerate(zip(texts, predictions), start=1):
        if args.input:
            row = {"line": number, "label": prediction.label}
            print(json.dumps({**row, "probabilities": prediction.probabilities}))
            continue
        ranked = sorted(prediction.probabilities.items(), key=lambda kv: -kv[1])
        shown = "  ".join(f"{name} {p:.3f}" for name, p in ranked[:5])
        print(f"{prediction.label}\t{shown}\t{text[:60]!r}")
    sys.stdout.flush()
    return 0


def _read_texts(path: Path, field: str) -> list[str]:
    texts = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ClassifyError(f"--input {path}: {error}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as error:
            raise ClassifyError(f"{path}:{number}: not JSON ({error})") from None
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            raise ClassifyError(f"{path}:{number}: no string {field!r} field (--text-field)")
        texts.append(row[field])
    if not texts:
        raise ClassifyError(f"--input {path}: no rows to classify")
    return texts
