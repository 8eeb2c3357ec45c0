"""Two small downstream tasks made offline from Python's own documentation, with their
lm-eval task YAMLs: for tests, benchmarks, and trying `megagpt eval --tasks` without a
download.

- pydoc_mc (multiple choice): the first half of a sentence from the reference manual's
  help topics (`megagpt.demo_corpus.pydoc_topics()`), its own second half and the
  second halves of three other sentences as the choices (lm-eval's acc and acc_norm);
- pydoc_cloze (cloze, LAMBADA's form): a sentence without its last word, and that word
  (acc: greedy decoding gives it exactly; perplexity);
- pydoc_text (loglikelihood_rolling): whole paragraphs, bits per byte and word perplexity;
- pydoc_generate (generate_until): pydoc_cloze's rows, generated greedily until "." or a
  newline, at most 8 tokens (exact_match of the last word).

Rows use the JSONL format of the in-loop tasks (`eval.tasks`): {"context", "choices",
"answer"}, {"context", "continuation"} and {"text"}, continuations with their leading
space.

    python -m megagpt.harness.pydoc_tasks OUT_DIR      # writes the .jsonl and .yaml files
    megagpt eval --checkpoint runs/demo --tasks OUT_DIR/pydoc_mc.yaml,OUT_DIR/pydoc_cloze.yaml
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Iterable
from pathlib import Path

from megagpt.demo_corpus import pydoc_topics

MARKUP = set("*`|>=()[]{}\\")


def pydoc_sentences(min_words: int = 8, max_words: int = 14) -> list[str]:
    """Plain ASCII sentences of the pydoc help topics, in the order they appear."""
    sentences = []
    for topic in pydoc_topics():
        for paragraph in topic.split("\n\n"):
            for sentence in re.split(r"(?<=[.])\s+", " ".join(paragraph.split())):
                words = sentence.split()
                if (
                    min_words <= len(words) <= max_words
                    and sentence.isascii()
                    and sentence.endswith(".")
                    and sentence[0].isupper()
                    and not MARKUP & set(sentence)
                ):
                    sentences.append(sentence)
    return list(dict.fromkeys(sentences))  # each once


def multiple_choice_rows(sentences: list[str], count: int, seed: int = 0) -> list[dict]:
    """Sentence halves with their true ending among three others; the answer's place
    is drawn at random."""
    rng = random.Random(seed)
    chosen = rng.sample(sentences, min(count, len(sentences)))
    endings = []
    for sentence in sentences:
        words = sentence.split()
        endings.append(" " + " ".join(words[len(words) // 2 :]))
    rows = []
    for sentence in chosen:
        words = sentence.split()
        half = len(words) // 2
        right = " " + " ".join(words[half:])
        others = rng.sample([e for e in endings if e != right], 3)
        answer = rng.randrange(4)
        choices = others[:answer] + [right] + others[answer:]
        rows.append({"context": " ".join(words[:half]), "choices": choices, "answer": answer})
    return rows


def cloze_rows(sentences: list[str], count: int, seed: int = 1) -> list[dict]:
    """A sentence without its last word (and the full stop), and that word."""
    rng = random.Random(seed)
    rows = []
    for sentence in rng.sample(sentences, min(count, len(sentences))):
        words = sentence.rstrip(".").split()
        rows.append({"context": " ".join(words[:-1]), "continuation": " " + words[-1]})
    return rows


MC_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
  - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
"""

CLOZE_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
target_delimiter: ""
metric_list:
  - {{metric: perplexity, aggregation: perplexity, higher_is_better: false}}
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
"""


TEXT_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: "{{{{text}}}}"
doc_to_target: "{{{{text}}}}"
metric_list:
  - {{metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}}
  - {{metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}}
"""

GENERATE_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
target_delimiter: ""
generation_kwargs: {{until: [".", "\\n"], max_gen_toks: 8, do_sample: false}}
metric_list:
  - {{metric: exact_match, aggregation: mean, higher_is_better: true}}
"""


def text_rows(count: int, min_chars: int = 200, max_chars: int = 600) -> list[dict]:
    """The first `count` paragraphs of the help topics of a middling length, whole."""
    rows = []
    for topic in pydoc_topics():
        for paragraph in topic.split("\n\n"):
            paragraph = paragraph.strip()
            if min_chars <= len(paragraph) <= max_chars and len(rows) < count:
                rows.append({"text": paragraph})
    return rows


def write_jsonl(path: Path, rows: Iterable[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_pydoc_tasks(directory: str | Path, count: int = 40, seed: int = 0) -> dict[str, Path]:
    """Write the four tasks (`count` rows each, count / 4 paragraphs for pydoc_text) as
    JSONL data and lm-eval task YAMLs (data paths absolute) into `directory`; {task
    name: YAML path}."""
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    sentences = pydoc_sentences()
    cloze = cloze_rows(sentences, count, seed + 1)
    tasks = {}
    for name, rows, template in (
        ("pydoc_mc", multiple_choice_rows(sentences, count, seed), MC_YAML),
        ("pydoc_cloze", cloze, CLOZE_YAML),
        ("pydoc_text", text_rows(max(1, count // 4)), TEXT_YAML),
        ("pydoc_generate", cloze, GENERATE_YAML),
    ):
        data = write_jsonl(directory / f"{name}.jsonl", rows)
        tasks[name] = directory / f"{name}.yaml"
        tasks[name].write_text(template.format(name=name, data=data))
    return tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory")
    parser.add_argument("--count", type=int, default=40, help="rows per task")
    args = parser.parse_args()
    for name, path in write_pydoc_tasks(args.directory, args.count).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
