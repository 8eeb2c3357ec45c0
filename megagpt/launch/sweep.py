"""Hyperparameter sweeps: a grid or random search over config keys, one run directory each.

    --grid optim.lr=1e-3,3e-4 --grid model.n_layers=2,4       4 runs (every combination)
    --random 8 --grid model.n_layers=2,4 --sample optim.lr=loguniform:1e-4:1e-2
                                                             8 runs, keys drawn per run

Every point is resolved with `load_config` before anything runs or is submitted, so a
misspelt key or a bad value fails the whole sweep up front. The plan is written to
<sweep dir>/sweep.json; a SLURM array task (or a local run) reads its point from there.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from megagpt.config import ConfigError, load_config
from megagpt.data import check_data_config
from megagpt.launch.environment import resume_by_default

MANIFEST = "sweep.json"
DISTRIBUTIONS = ("uniform", "loguniform", "int")


@dataclass(frozen=True)
class Sample:
    """A key drawn from a distribution in random search."""

    key: str
    distribution: str
    low: float
    high: float

    def draw(self, rng: random.Random) -> str:
        if self.distribution == "int":
            return str(rng.randint(int(self.low), int(self.high)))
        if self.distribution == "loguniform":
            return format(math.exp(rng.uniform(math.log(self.low), math.log(self.high))), ".4g")
        return format(rng.uniform(self.low, self.high), ".4g")


@dataclass(frozen=True)
class SweepRun:
    name: str
    point: dict[str, str]
    output_dir: str


@dataclass(frozen=True)
class Sweep:
    """A planned sweep: the base config and one entry per run."""

    directory: str
    config: str | None
    overrides: list[str]
    runs: list[SweepRun]

    def run_overrides(self, index: int) -> list[str]:
        """The command-line overrides of run `index`: base, point, then its output dir."""
        run = self.runs[index]
        point = [f"{key}={value}" for key, value in run.point.items()]
        return resume_by_default([*self.overrides, *point, f"train.output_dir={run.output_dir}"])

    def train_arguments(self, index: int) -> list[str]:
        """`megagpt train` arguments for run `index`."""
        config = ["--config", self.config] if self.config else []
        return [*config, *self.run_overrides(index)]

    def save(self) -> Path:
        path = Path(self.directory) / MANIFEST
        path.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> Sweep:
        data = json.loads((Path(directory) / MANIFEST).read_text(encoding="utf-8"))
        data["runs"] = [SweepRun(**run) for run in data["runs"]]
        return cls(**data)


def _split_key(spec: str, option: str, example: str) -> tuple[str, str]:
    key, sep, value = spec.partition("=")
    key = key.strip()
    if not sep or "." not in key or not value.strip():
        raise ConfigError(f"{option} {spec!r}: write {example}")
    return key, value.strip()


def parse_grid(spec: str) -> tuple[str, list[str]]:
    """ "optim.lr=1e-3,3e-4" -> ("optim.lr", ["1e-3", "3e-4"])."""
    key, values = _split_key(spec, "--grid", "section.key=value1,value2 (e.g. optim.lr=1e-3,3e-4)")
    choices = [v.strip() for v in values.split(",")]
    if any(not v for v in choices):
        raise ConfigError(f"--grid {spec!r}: an empty value between commas")
    return key, choices


def parse_sample(spec: str) -> Sample:
    """ "optim.lr=loguniform:1e-4:1e-2" -> Sample("optim.lr", "loguniform", 1e-4, 1e-2)."""
    example = "section.key=DIST:LOW:HIGH with DIST one of uniform, loguniform, int"
    key, value = _split_key(spec, "--sample", example)
    parts = value.split(":")
    if len(parts) != 3 or parts[0] not in DISTRIBUTIONS:
        raise ConfigError(f"--sample {spec!r}: write {example}")
    try:
        low, high = float(parts[1]), float(parts[2])
    except ValueError:
        raise ConfigError(f"--sample {spec!r}: LOW and HIGH must be numbers") from None
    if not low < high or (parts[0] == "loguniform" and low <= 0):
        raise ConfigError(f"--sample {spec!r}: needs LOW < HIGH (and LOW > 0 for loguniform)")
    if parts[0] == "int" and not (low.is_integer() and high.is_integer()):
        raise ConfigError(f"--sample {spec!r}: int ranges need whole numbers")
    return Sample(key, parts[0], low, high)


def sweep_points(
    grid: Sequence[str] = (),
    samples: Sequence[str] = (),
    random_runs: int | None = None,
    seed: int = 0,
) -> list[dict[str, str]]:
    """The points of a sweep: every grid combination, or `random_runs` random draws in
    which grid keys are choices and `samples` are distributions."""
    choices = dict(parse_grid(spec) for spec in grid)
    distributions = [parse_sample(spec) for spec in samples]
    keys = [*choices, *(s.key for s in distributions)]
    repeated = {k for k in keys if keys.count(k) > 1}
    if repeated:
        raise ConfigError(f"swept more than once: {', '.join(sorted(repeated))}")
    if random_runs is None:
        if distributions:
            raise ConfigError("--sample draws values for random search: add --random N")
        if not choices:
            raise ConfigError("nothing to sweep: add --grid section.key=v1,v2 (or --random N)")
        return [dict(zip(choices, combo)) for combo in itertools.product(*choices.values())]
    if random_runs < 1:
        raise ConfigError(f"--random = {random_runs}: must be 1 or more")
    if not keys:
        raise ConfigError("--random needs --grid or --sample keys to draw")
    rng = random.Random(seed)
    points = []
    for _ in range(random_runs):
        point = {key: rng.choice(values) for key, values in choices.items()}
        point.update({s.key: s.draw(rng) for s in distributions})
        points.append(point)
    return points


def plan_sweep(
    directory: str | Path,
    config: str | None,
    overrides: Sequence[str],
    points: Sequence[dict[str, str]],
    write: bool = True,
) -> Sweep:
    """Check every point with `load_config`, then (if `write`) create one directory per
    run and write the manifest. Nothing is written if any point is invalid.

    Raises:
        ConfigError: naming the run and its point.
    """
    root = Path(directory).resolve()
    config_path = str(Path(config).resolve()) if config and Path(config).is_file() else config
    runs = [
        SweepRun(f"run-{i}", dict(point), str(root / f"run-{i}")) for i, point in enumerate(points)
    ]
    sweep = Sweep(str(root), config_path, list(overrides), runs)
    for index, run in enumerate(runs):
        try:
            check_data_config(load_config(config_path, sweep.run_overrides(index)).data)
        except ConfigError as error:
            raise ConfigError(f"sweep point {run.name} {run.point}: {error}") from None
    if not write:
        return sweep
    if (root / MANIFEST).exists():
        raise ConfigError(f"{root} already holds a sweep ({MANIFEST}); choose a new --output-dir")
    for run in runs:
        Path(run.output_dir).mkdir(parents=True, exist_ok=True)
    sweep.save()
    return sweep


def run_locally(sweep: Sweep, nproc: int = 1) -> list[int]:
    """Run every point in turn (a failed run does not stop the others); each run's
    output goes to <run>/train.log. Returns the exit codes."""
    codes = []
    for index, run in enumerate(sweep.runs):
        if nproc == 1:
            command = ["train", *sweep.train_arguments(index)]
        else:
            command = ["launch", "local", "--nproc", str(nproc), *sweep.train_arguments(index)]
        with open(Path(run.output_dir) / "train.log", "ab") as log_file:
            done = subprocess.run(
                [sys.executable, "-m", "megagpt", *command], stdout=log_file, stderr=log_file
            )
        codes.append(done.returncode)
    return codes
