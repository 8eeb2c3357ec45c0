"""Near-duplicate removal: precision, recall and throughput, megagpt against datatrove.

Builds a set with planted near duplicates at known Jaccard similarities: N documents
of real English text (the Debian documentation corpus of benchmarks/preprocess.py),
then, for every third one, a copy with a fraction of its words replaced, appended
after all originals, and its true Jaccard similarity to its original measured by
brute force on word 5-gram shingles. Both tools then remove near duplicates with the
same parameters (14 bands x 8 rows, word 5-grams, threshold ~0.72):

  (a) megagpt-preprocess --near-dedup, phases scan + dedup (--workers W)
  (b) datatrove's MinHash stages 1-3 (signatures, buckets, clusters), W tasks/workers

and it prints, for each: recall per Jaccard bin (planted copies removed), precision
(removed documents whose most similar other document, found exactly among permissive
LSH candidates, has Jaccard >= 0.7 / >= 0.5), wall and CPU seconds, MB/s, and the
ratio a/b of throughput. Neither tool's fourth stage (writing the kept documents) is
timed: megagpt's is its tokenize phase, measured by benchmarks/preprocess.py.

    python benchmarks/near_dedup.py [--documents 30000] [--workers 2]

datatrove 0.10.1 with xxhash 4.x fails to hash str shingles (xxhash 4 takes bytes
only); the script encodes them to UTF-8 first, which is what xxhash 3.x did inside.
datatrove's English word tokenizer needs spacy (pip install datatrove spacy).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from preprocess import build_corpus, run_measured  # noqa: E402

WORD = re.compile(rb"[0-9a-z\x80-\xff]+")
BINS = [(0.0, 0.5), (0.5, 0.6), (0.6, 0.7), (0.7, 0.8), (0.8, 0.9), (0.9, 1.01)]


def shingles(text: str, n: int = 5) -> set:
    words = WORD.findall(text.encode("utf-8").lower())
    return (
        {tuple(words)}
        if len(words) < n
        else {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}
    )


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


def planted_set(corpus: Path, count: int, seed: int = 0):
    """(texts, copies): originals then copies; copies maps copy index -> (original, J)."""
    rng = random.Random(seed)
    originals = []
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["text"]
            if 500 <= len(text) <= 20000:
                originals.append(text)
            if len(originals) == count:
                break
    texts, copies = list(originals), {}
    for i in range(0, len(originals), 3):
        words = originals[i].split(" ")
        fraction = rng.choice([0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12])
        for _ in range(max(1, int(fraction * len(words)))):
            words[rng.randrange(len(words))] = f"zq{rng.randrange(10**9)}"
        copy = " ".join(words)
        copies[len(texts)] = (i, jaccard(shingles(originals[i]), shingles(copy)))
        texts.append(copy)
    return texts, copies


def write_parts(texts: list[str], directory: Path, parts: int) -> list[Path]:
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    bounds = np.linspace(0, len(texts), parts + 1).astype(int)
    paths = []
    for k in range(parts):
        path = directory / f"part{k}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for i in range(bounds[k], bounds[k + 1]):
                f.write(json.dumps({"text": texts[i], "id": str(i)}) + "\n")
        paths.append(path)
    return paths


def nearest_similarity(texts: list[str], removed: set[int], cache: dict) -> dict[int, float]:
    """Each removed document's highest true Jaccard to any other document, among the
    candidates of a permissive LSH (32 bands x 2 rows: pairs at 0.5 found w.p. ~1)."""
    from data_tools.minhash import MinHasher, MinHashSettings

    if "keys" not in cache:
        data = [t.encode() for t in texts]
        hashes = np.array([hashlib.blake2b(d, digest_size=16).digest() for d in data], "S16")
        cache["keys"] = MinHasher(MinHashSettings(bands=32, rows=2, seed=9)).band_keys(data, hashes)
        buckets = defaultdict(list)
        for doc, row in enumerate(cache["keys"]):
            for band, key in enumerate(row):
                buckets[(band, int(key))].append(doc)
        cache["buckets"] = buckets
        cache["shingles"] = {}
    keys, buckets, sets = cache["keys"], cache["buckets"], cache["shingles"]
    best = {}
    for doc in removed:
        candidates = {c for band, key in enumerate(keys[doc]) for c in buckets[(band, int(key))]}
        candidates.discard(doc)
        for c in (doc, *candidates):
            if c not in sets:
                sets[c] = shingles(texts[c])
        best[doc] = max((jaccard(sets[doc], sets[c]) for c in candidates), default=0.0)
    return best


def timed(command: list[str]) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds and peak RSS of the process tree of a command."""
    seconds, peak, _, cpu = run_measured(command, env={**os.environ, "PYTHONPATH": str(HERE)})
    return seconds, cpu, peak


def run_megagpt(
    inputs: list[Path], work: Path, workers: int, tokenizer: Path
) -> tuple[set, float, float]:
    prefix = work / "megagpt/c"
    shutil.rmtree(prefix.parent, ignore_errors=True)
    base = [sys.executable, "-m", "data_tools.preprocess", *map(str, inputs), "--tokenizer",
            str(tokenizer), "--output-prefix", str(prefix), "--workers", str(workers),
            "--near-dedup", "--no-dedup"]  # fmt: skip
    wall = cpu = peak = 0
    for phase in ("scan", "dedup"):
        w, c, p = timed([*base, "--phase", phase])
        wall, cpu, peak = wall + w, cpu + c, max(peak, p)
    marks = np.fromfile(f"{prefix}.job/dedup/near.marks", dtype=np.uint8)
    return set(np.flatnonzero(marks).tolist()), wall, cpu, peak


DATATROVE = r"""
import sys
import datatrove_compat  # noqa: F401 (benchmarks/datatrove_compat.py)
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupSignature,
    MinhashDedupBuckets, MinhashDedupCluster)
inputs, work, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
config = MinhashConfig()  # 5-grams, 14 buckets x 8 hashes, xxhash 64-bit
signatures = MinhashDedupSignature(f"{work}/sigs", config=config)
buckets = MinhashDedupBuckets(f"{work}/sigs", f"{work}/buckets", config=config)
clusters = MinhashDedupCluster(f"{work}/buckets", f"{work}/remove", config=config)
stages = [
    ([JsonlReader(inputs), signatures], workers, workers),
    ([buckets], config.num_buckets, workers),
    ([clusters], 1, 1),
]
for index, (pipeline, tasks, local_workers) in enumerate(stages):
    LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=local_workers,
                          logging_dir=f"{work}/logs{index}", skip_completed=False).run()
"""


def run_datatrove(inputs: list[Path], work: Path, workers: int, counts: list[int]):
    out = work / "datatrove"
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-c", DATATROVE, str(inputs[0].parent), str(out), str(workers)]
    wall, cpu, peak = timed(command)
    offsets = np.r_[0, np.cumsum(counts)]
    removed = set()
    for path in (out / "remove").glob("*.remove"):
        rank = int(path.name.split(".")[0])
        removed |= set((np.fromfile(path, dtype="<u4") + offsets[rank]).tolist())
    return removed, wall, cpu, peak


def report(name, removed, copies, nearest, wall, cpu, peak, megabytes) -> float:
    rows = []
    for low, high in BINS:
        members = [c for c, (_, j) in copies.items() if low <= j < high]
        caught = sum(1 for c in members if c in removed or copies[c][0] in removed)
        rows.append(f"{low:.1f}-{min(high, 1):.1f}: {caught}/{len(members)}")
    precise7 = sum(1 for d in removed if nearest[d] >= 0.7) / max(1, len(removed))
    precise5 = sum(1 for d in removed if nearest[d] >= 0.5) / max(1, len(removed))
    print(
        f"{name}: removed {len(removed)}; recall by Jaccard bin {', '.join(rows)}; precision "
        f"@0.7 {precise7:.3f}, @0.5 {precise5:.3f}; {wall:.1f}s wall, {cpu:.1f}s CPU, "
        f"{megabytes / wall:.2f} MB/s, peak RSS {peak / 2**20:,.0f} MiB"
    )
    return megabytes / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=Path("runs/bench-near-dedup"))
    parser.add_argument("--corpus-dir", type=Path, default=Path("runs/bench-preprocess"))
    parser.add_argument("--documents", type=int, default=30000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    corpus, _ = build_corpus(args.corpus_dir)
    texts, copies = planted_set(corpus, args.documents)
    inputs = write_parts(texts, args.work_dir / "inputs", args.workers)
    counts = [sum(1 for _ in open(p)) for p in inputs]
    megabytes = sum(p.stat().st_size for p in inputs) / 1e6
    tokenizer = args.work_dir / "tok.model"
    if not tokenizer.exists():  # scan needs a tokenizer argument, not its use
        from megagpt.tokenizer import Tokenizer

        Tokenizer.train(texts[:2000], tokenizer, vocab_size=1000)
    print(f"{len(texts):,} documents ({len(copies):,} planted copies), {megabytes:.1f} MB")
    cache: dict = {}
    results = {}
    for name, run in (("megagpt", run_megagpt), ("datatrove", run_datatrove)):
        extra = tokenizer if name == "megagpt" else counts
        removed, wall, cpu, peak = run(inputs, args.work_dir, args.workers, extra)
        nearest = nearest_similarity(texts, removed, cache)
        results[name] = report(name, removed, copies, nearest, wall, cpu, peak, megabytes)
    print(f"throughput megagpt/datatrove: {results['megagpt'] / results['datatrove']:.2f}x")


if __name__ == "__main__":
    main()
