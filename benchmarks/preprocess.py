"""megagpt-preprocess against Megatron's algorithm and against the tokenizer alone.

Builds ~110 MB of real English text from four Debian packages (python3.11-doc,
linux-doc-6.1, dict-gcide, dict-wn: reStructuredText sources and two dictionaries),
trains one sentencepiece BPE model, then measures on the same cores with that model:

  (a) megagpt-preprocess (default cleaning and dedup on) with --workers N
  (b) Megatron-LM's preprocess_data.py algorithm (megatron_preprocess_baseline.py)
  (c) the tokenizer alone: sentencepiece encoding the same texts on all cores

With datatrove installed (pip install datatrove), it also trains a byte-level BPE
tokenizer.json of the same vocabulary size and compares, with that one file:

  (d) datatrove's DocumentTokenizer stage (W tasks, W workers, no shuffling)
  (e) megagpt-preprocess's tokenize stage alone (no cleaning, no dedup), --workers W

printing e/d. (MinHash deduplication against datatrove: benchmarks/near_dedup.py.)

It prints MB/s and tokens/s of each (best of --repeats interleaved runs), the ratios
a/b and a/c, the CPU seconds each spends (a measure of work that a busy shared machine
does not distort the way it does wall time), and the peak memory (RSS summed over the
whole process tree, sampled every 20 ms) of (a) and (b) on the corpus and on 4x it.

    python benchmarks/preprocess.py [--workers 2] [--work-dir runs/bench-preprocess]
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

PACKAGES = ("python3.11-doc", "linux-doc-6.1", "dict-gcide", "dict-wn")
HERE = Path(__file__).resolve().parent


def fetch_packages(work: Path) -> Path:
    """Download and unpack the Debian packages once (apt-get download + dpkg-deb -x)."""
    root = work / "debian"
    if (root / ".done").exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run(["apt-get", "download", *PACKAGES], cwd=root, check=True)
    for deb in sorted(root.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root / "x")], check=True)
    (root / ".done").touch()
    return root


def documents(root: Path):
    """One document per reStructuredText/text file, and the dictionaries cut before a
    headword into documents of about 4 KB."""
    for path in sorted((root / "x").rglob("*")):
        name = path.name
        if name.endswith((".rst.txt", ".rst.gz", ".txt.gz")) or (
            name.endswith(".txt") and "_sources" in str(path)
        ):
            opener = gzip.open if name.endswith(".gz") else open
            with opener(path, "rt", encoding="utf-8", errors="replace") as f:
                text = f.read().strip()
            if text:
                yield text
    for dictionary in sorted((root / "x/usr/share/dictd").glob("*.dict.dz")):
        with gzip.open(dictionary, "rt", encoding="utf-8", errors="replace") as f:
            chunk: list[str] = []
            size = 0
            for line in f:
                # a headword starts at column 0 in both dictionaries (wn has no blank
                # lines between entries, so cutting at blank lines made it one 31 MB
                # document that the length filter drops and the baselines do not)
                if size > 4000 and line[:1].strip():
                    yield "".join(chunk).strip()
                    chunk, size = [], 0
                chunk.append(line)
                size += len(line)
            if chunk:
                yield "".join(chunk).strip()


def distinct(texts):
    """Each text once: the packages ship some files twice (.rst.txt and .rst.gz), and
    all three tools must tokenize the same work."""
    seen = set()
    for text in texts:
        if text not in seen:
            seen.add(text)
            yield text


def build_corpus(work: Path) -> tuple[Path, list[Path]]:
    """corpus.jsonl (1x) and four files that together are 4x (each copy's documents
    tagged with its number, so deduplication keeps them all)."""
    one = work / "corpus.jsonl"
    copies = [work / f"corpus4x_{k}.jsonl" for k in range(4)]
    if not one.exists():
        root = fetch_packages(work)
        partial = one.with_suffix(".partial")
        with open(partial, "w", encoding="utf-8") as f:
            for text in distinct(documents(root)):
                f.write(json.dumps({"text": text}) + "\n")
        os.replace(partial, one)
    for k, path in enumerate(copies):
        if not path.exists():
            with open(one, encoding="utf-8") as src, open(path, "w", encoding="utf-8") as dst:
                for line in src:
                    dst.write(
                        json.dumps({"text": json.loads(line)["text"] + f"\n[copy {k}]"}) + "\n"
                    )
    return one, copies


def train_tokenizer(work: Path, corpus: Path, vocab: int) -> Path:
    model = work / f"bpe{vocab}.model"
    if not model.exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "data_tools.train_tokenizer",
                str(corpus),
                "--model",
                str(model),
                "--vocab-size",
                str(vocab),
                "--sample-lines",
                "300000",
            ],
            check=True,
        )
    return model


def train_byte_bpe(work: Path, corpus: Path, vocab: int) -> Path:
    path = work / f"bbpe{vocab}.json"
    if not path.exists():
        subprocess.run(
            [sys.executable, "-m", "data_tools.train_tokenizer", str(corpus), "--type",
             "byte-bpe", "--model", str(path), "--vocab-size", str(vocab),
             "--sample-chars", "30000000"],
            check=True,
        )  # fmt: skip
    return path


DATATROVE_TOKENIZE = """
import sys
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.tokens import DocumentTokenizer
corpus, tokenizer, out, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
tokenize = DocumentTokenizer(out, tokenizer_name_or_path=tokenizer, eos_token="<|endoftext|>",
                             shuffle_documents=False)
LocalPipelineExecutor(pipeline=[JsonlReader(corpus), tokenize], tasks=workers, workers=workers,
                      logging_dir=out + "_logs", skip_completed=False).run()
"""


def measure_datatrove(inputs: list[Path], tokenizer: Path, out: Path, workers: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(f"{out}_logs", ignore_errors=True)
    folder = out.parent / "datatrove_inputs"
    if not folder.exists():  # datatrove reads a folder: the same files, linked
        folder.mkdir(parents=True)
        for path in inputs:
            (folder / path.name).symlink_to(path.resolve())
    command = [sys.executable, "-c", DATATROVE_TOKENIZE, str(folder), str(tokenizer), str(out),
               str(workers)]  # fmt: skip
    seconds, peak, _, cpu = run_measured(command)
    from tokenizers import Tokenizer

    width = 2 if Tokenizer.from_file(str(tokenizer)).get_vocab_size() <= 2**16 else 4
    tokens = sum(p.stat().st_size for p in out.rglob("*.ds")) // width  # as datatrove stores
    return {"seconds": seconds, "peak_rss": peak, "tokens": tokens, "cpu": cpu}


def run_measured(command: list[str], env: dict | None = None) -> tuple[float, int, str, float]:
    """Wall seconds, peak RSS of the process tree (bytes), stdout, and CPU seconds of
    the whole tree (every process in it is waited for by its parent, so the kernel's
    RUSAGE_CHILDREN counts them all)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    root = psutil.Process(process.pid)
    peak = 0
    while process.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            total = 0
            for p in tree:
                with contextlib.suppress(psutil.Error):
                    total += p.memory_info().rss
            peak = max(peak, total)
        except psutil.Error:
            pass
        time.sleep(0.02)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    out = process.stdout.read().decode()
    if process.returncode:
        raise RuntimeError(f"{command[:4]} failed with {process.returncode}: {out[-2000:]}")
    return seconds, peak, out, cpu


CEILING = """
import json, sys, time, os
import sentencepiece as spm
texts = [json.loads(line)["text"] for line in open(sys.argv[1], encoding="utf-8")]
sp = spm.SentencePieceProcessor(model_file=sys.argv[2])
start, cpu = time.perf_counter(), time.process_time()
ids = sp.encode(texts, num_threads=int(sys.argv[3]))
seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
print(json.dumps({"seconds": seconds, "cpu": cpu, "tokens": sum(map(len, ids)) + len(ids)}))
"""


def text_megabytes(corpus: Path) -> float:
    with open(corpus, encoding="utf-8") as f:
        return sum(len(json.loads(line)["text"].encode()) for line in f) / 1e6


TOKENIZE_ONLY = ("--no-dedup", "--no-normalize", "--no-strip-control", "--no-strip-markup")


def measure_ours(
    inputs: list[Path], model: Path, out: Path, workers: int, extra: tuple[str, ...] = ()
) -> dict:
    command = [
        sys.executable,
        "-m",
        "data_tools.preprocess",
        *map(str, inputs),
        "--tokenizer",
        str(model),
        "--output-prefix",
        str(out),
        "--workers",
        str(workers),
        "--overwrite",
        *extra,
    ]
    seconds, peak, _, cpu = run_measured(command)
    summary = json.loads(Path(f"{out}.summary.json").read_text())
    return {"seconds": seconds, "peak_rss": peak, "tokens": summary["tokens"], "cpu": cpu}


def measure_ceiling(corpus: Path, model: Path, threads: int) -> dict:
    _, _, out, _ = run_measured(
        [sys.executable, "-c", CEILING, str(corpus), str(model), str(threads)]
    )
    return json.loads(out)  # the encode call alone, not loading the texts


def measure_megatron(corpus: Path, model: Path, out: Path, workers: int) -> dict:
    command = [
        sys.executable,
        str(HERE / "megatron_preprocess_baseline.py"),
        str(corpus),
        str(model),
        str(out),
        str(workers),
    ]
    seconds, peak, _, cpu = run_measured(command)
    tokens = os.path.getsize(f"{out}.bin") // 2
    return {"seconds": seconds, "peak_rss": peak, "tokens": tokens, "cpu": cpu}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--work-dir", default="runs/bench-preprocess")
    p.add_argument("--repeats", type=int, default=3, help="runs of each on the 1x corpus")
    p.add_argument("--skip-4x", action="store_true", help="only the 1x corpus")
    p.add_argument("--skip-datatrove", action="store_true", help="no (d)/(e) comparison")
    args = p.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    corpus, copies = build_corpus(work)
    model = train_tokenizer(work, corpus, args.vocab_size)
    megabytes = text_megabytes(corpus)
    cores = os.cpu_count()
    print(
        f"corpus: {corpus} ({megabytes:.1f} MB of text); tokenizer {model.name}; "
        f"{args.workers} workers on {cores} cores"
    )

    print(f"load average before: {os.getloadavg()[0]:.1f} (the machine is shared)")
    runs: dict[str, list[dict]] = {"a": [], "b": [], "c": []}
    measure = {
        "a": lambda: measure_ours([corpus], model, work / "out/ours", args.workers),
        "b": lambda: measure_megatron(corpus, model, work / "out/megatron", args.workers),
        "c": lambda: measure_ceiling(corpus, model, cores),
    }
    for repeat in range(args.repeats):  # interleaved, so noise hits all three alike
        for key in "cab"[repeat % 3 :] + "cab"[: repeat % 3]:
            runs[key].append(measure[key]())
    best = {key: min(results, key=lambda r: r["seconds"]) for key, results in runs.items()}
    names = {"a": "megagpt-preprocess", "b": "Megatron algorithm", "c": "tokenizer alone"}
    rate = {key: megabytes / best[key]["seconds"] for key in "abc"}
    for key in "abc":
        spread = sorted(megabytes / r["seconds"] for r in runs[key])
        print(
            f"({key}) {names[key]:<20} {rate[key]:6.2f} MB/s  "
            f"{best[key]['tokens'] / best[key]['seconds'] / 1e6:5.2f} M tokens/s  "
            f"(best of {len(spread)}; all: {', '.join(f'{x:.2f}' for x in spread)})"
        )
    print(f"a/b = {rate['a'] / rate['b']:.2f}   a/c = {rate['a'] / rate['c']:.2f}")
    # CPU time barely depends on what else runs on a shared machine; wall time does.
    cpu = {key: min(r["cpu"] for r in results) for key, results in runs.items()}
    print(
        "CPU seconds (whole process tree): "
        + "  ".join(f"({k}) {cpu[k]:.1f}" for k in "abc")
        + f"   work ratios b/a = {cpu['b'] / cpu['a']:.2f}  c/a = {cpu['c'] / cpu['a']:.2f}"
    )
    a, b = (max(runs[k], key=lambda r: r["peak_rss"]) for k in "ab")
    print(
        f"peak RSS 1x: (a) {a['peak_rss'] / 2**20:,.0f} MiB  (b) {b['peak_rss'] / 2**20:,.0f} MiB"
    )
    if not args.skip_datatrove:
        compare_datatrove(args, work, corpus, megabytes)
    if not args.skip_4x:
        a4 = measure_ours(copies, model, work / "out/ours4x", args.workers)
        joined = work / "corpus4x.jsonl"
        if not joined.exists():
            with open(joined, "wb") as dst:
                for path in copies:
                    dst.write(path.read_bytes())
        b4 = measure_megatron(joined, model, work / "out/megatron4x", args.workers)
        mib = 2**20
        print(
            f"peak RSS 4x: (a) {a4['peak_rss'] / mib:,.0f} MiB  (b) {b4['peak_rss'] / mib:,.0f} MiB"
        )
        print(
            f"peak RSS 4x/1x: (a) {a4['peak_rss'] / a['peak_rss']:.2f}  "
            f"(b) {b4['peak_rss'] / b['peak_rss']:.2f}"
        )
        rate_a4, rate_b4 = 4 * megabytes / a4["seconds"], 4 * megabytes / b4["seconds"]
        print(f"4x corpus: (a) {rate_a4:.2f} MB/s  (b) {rate_b4:.2f} MB/s")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


def compare_datatrove(args, work: Path, corpus: Path, megabytes: float) -> None:
    tokenizer = train_byte_bpe(work, corpus, args.vocab_size)
    runs: dict[str, list[dict]] = {"d": [], "e": []}
    measure = {
        "d": lambda: measure_datatrove([corpus], tokenizer, work / "out/datatrove", args.workers),
        "e": lambda: measure_ours(
            [corpus], tokenizer, work / "out/ours_tokenize", args.workers, TOKENIZE_ONLY
        ),
    }
    for repeat in range(args.repeats):
        for key in "de" if repeat % 2 == 0 else "ed":
            runs[key].append(measure[key]())
    best = {key: min(results, key=lambda r: r["seconds"]) for key, results in runs.items()}
    names = {"d": "datatrove tokenize", "e": "megagpt tokenize"}
    for key in "de":
        spread = sorted(megabytes / r["seconds"] for r in runs[key])
        print(
            f"({key}) {names[key]:<20} {megabytes / best[key]['seconds']:6.2f} MB/s  "
            f"{best[key]['tokens'] / best[key]['seconds'] / 1e6:5.2f} M tokens/s  "
            f"peak RSS {best[key]['peak_rss'] / 2**20:,.0f} MiB  "
            f"(all: {', '.join(f'{x:.2f}' for x in spread)})"
        )
    print(f"e/d = {best['d']['seconds'] / best['e']['seconds']:.2f} ({tokenizer.name})")


if __name__ == "__main__":
    main()
