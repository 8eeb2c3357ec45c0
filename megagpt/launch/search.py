"""Guided hyperparameter search with Optuna: a seeded TPE sampler proposes each trial's
settings, a pruner stops trials whose validation metric falls behind at an evaluation.

    megagpt launch sweep --search optuna --trials 16 --prune asha --output-dir sweeps/lr \\
        --sample optim.lr=loguniform:1e-4:1e-2 --grid model.n_layers=2,4

The sweep directory holds:
    search.json      the plan: base config and overrides, the space, pruner, metric
    study.journal    Optuna's JournalStorage (a journal file with a file lock), shared by
                     every worker: SLURM array tasks, or the one local loop
    trial-<N>/       one run per trial: config.yaml (rerun it alone with `megagpt train
                     --config trial-<N>/config.yaml`), metrics.jsonl, checkpoints, and
                     trial.json (state, value, settings)

Keys of --sample become float (uniform, loguniform) or int parameters; keys of --grid
become categorical ones. Values reach the config as exact decimal strings, so a trial's
config.yaml holds the very numbers the study recorded.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megagpt.config import ConfigError, load_config
from megagpt.config.metric_mode import metric_mode
from megagpt.errors import MegagptError
from megagpt.launch.environment import resume_by_default
from megagpt.launch.sweep import parse_grid, parse_sample

MANIFEST = "search.json"
JOURNAL = "study.journal"
STUDY_NAME = "megagpt-search"
PRUNERS = ("asha", "hyperband", "median", "none")
REDUCTION_FACTOR = 3
"""Successive halving and Hyperband keep the best third of the trials at each rung."""
MAX_CHECKED_POINTS = 64
"""Up to this many combinations of the space's edge values are checked before a search
starts; larger spaces are checked one key at a time."""


def import_optuna():
    """The optuna module, or a MegagptError saying how to install it."""
    try:
        import optuna
    except ImportError:
        raise MegagptError("--search optuna needs Optuna: pip install 'megagpt[search]'") from None
    from packaging.version import Version

    if Version(optuna.__version__) < Version("4.0"):
        raise MegagptError(
            f"--search optuna needs Optuna 4.0 or later (its JournalFileBackend); "
            f"{optuna.__version__} is installed: pip install -U 'megagpt[search]'"
        )
    return optuna


@dataclass(frozen=True)
class SearchParam:
    """One searched key: a float or int range, or categorical choices."""

    key: str
    kind: str
    """float, int, or categorical."""
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[str] | None = None

    def distribution(self):
        distributions = import_optuna().distributions
        if self.kind == "categorical":
            return distributions.CategoricalDistribution(self.choices)
        if self.kind == "int":
            return distributions.IntDistribution(int(self.low), int(self.high))
        return distributions.FloatDistribution(self.low, self.high, log=self.log)

    def edge_values(self) -> list[str]:
        """The values checked before the search starts: every choice, every integer of
        a short range, else the ends (and the middle of an int range)."""
        if self.kind == "categorical":
            return list(self.choices)
        if self.kind == "int":
            low, high = int(self.low), int(self.high)
            if high - low < 8:
                return [str(v) for v in range(low, high + 1)]
            return [str(low), str((low + high) // 2), str(high)]
        return [repr(float(self.low)), repr(float(self.high))]


def parse_space(grid: Sequence[str], samples: Sequence[str]) -> list[SearchParam]:
    """The search space from --grid (categorical) and --sample (ranges)."""
    space = [SearchParam(key, "categorical", choices=v) for key, v in map(parse_grid, grid)]
    for sample in map(parse_sample, samples):
        kind = "int" if sample.distribution == "int" else "float"
        log = sample.distribution == "loguniform"
        space.append(SearchParam(sample.key, kind, sample.low, sample.high, log))
    keys = [p.key for p in space]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ConfigError(f"searched more than once: {', '.join(repeated)}")
    if not space:
        raise ConfigError(
            "--search optuna needs keys to search: --sample section.key=DIST:LOW:HIGH "
            "(e.g. optim.lr=loguniform:1e-4:1e-2) or --grid section.key=v1,v2"
        )
    return space


def override_value(value: object) -> str:
    """A parameter value as the override string that reproduces it exactly."""
    return repr(value) if isinstance(value, float) else str(value)


@dataclass
class Search:
    """A planned search: what every worker reads from search.json."""

    directory: str
    config: str | None
    overrides: list[str]
    space: list[SearchParam]
    trials: int
    prune: str
    metric: str
    direction: str
    """minimize or maximize."""
    seed: int = 0
    nproc: int = 1
    """Training processes of each trial."""
    min_resource: int = 1
    """Steps before the first rung of the pruner: the first evaluation."""
    max_resource: int | None = None
    """The steps of a whole trial, for Hyperband; None lets Optuna find out."""
    checked_points: list[dict[str, str]] = field(default_factory=list)

    # ------------------------------------------------------------------ files
    def save(self) -> Path:
        path = Path(self.directory) / MANIFEST
        path.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> Search:
        data = json.loads((Path(directory) / MANIFEST).read_text(encoding="utf-8"))
        data["space"] = [SearchParam(**param) for param in data["space"]]
        return cls(**data)

    def trial_directory(self, number: int) -> Path:
        return Path(self.directory) / f"trial-{number}"

    def trial_overrides(self, params: dict[str, object], number: int) -> list[str]:
        """Base overrides, the trial's values, then its own output directory."""
        values = [f"{key}={override_value(value)}" for key, value in params.items()]
        output = f"train.output_dir={self.trial_directory(number)}"
        return resume_by_default([*self.overrides, *values, output])

    # ------------------------------------------------------------------ optuna
    def distributions(self) -> dict:
        return {param.key: param.distribution() for param in self.space}

    def storage(self):
        journal = import_optuna().storages.journal
        path = str(Path(self.directory) / JOURNAL)
        # An O_EXCL lock file works on NFS, where the workers of a cluster share it.
        lock = journal.JournalFileOpenLock(path)
        return journal.JournalStorage(journal.JournalFileBackend(path, lock_obj=lock))

    def pruner(self):
        pruners = import_optuna().pruners
        if self.prune == "asha":
            return pruners.SuccessiveHalvingPruner(
                min_resource=self.min_resource, reduction_factor=REDUCTION_FACTOR
            )
        if self.prune == "hyperband":
            return pruners.HyperbandPruner(
                min_resource=self.min_resource,
                max_resource=self.max_resource or "auto",
                reduction_factor=REDUCTION_FACTOR,
            )
        if self.prune == "median":
            return pruners.MedianPruner(n_warmup_steps=self.min_resource - 1)
        return pruners.NopPruner()

    def study(self, sampler_seed: int | None = None):
        """The shared study. The sampler is seeded with the search's seed plus the number
        of the trial about to be asked for, so a local search repeats itself exactly and
        parallel workers never draw the same random proposals."""
        optuna = import_optuna()
        seed = self.seed if sampler_seed is None else sampler_seed
        return optuna.load_study(
            study_name=STUDY_NAME,
            storage=self.storage(),
            sampler=optuna.samplers.TPESampler(seed=seed),
            pruner=self.pruner(),
        )


def _check_metric(metric: str, config) -> None:
    """The search reads the metric at evaluations: it must be one a run logs there."""
    classifier = ("val_accuracy", "val_macro_f1")
    if metric in classifier and not config.model.num_labels:
        raise ConfigError(
            f"--metric {metric}: logged by classifiers only (model.num_labels); "
            "use val_loss or val_ppl"
        )
    if not (metric.startswith("val_") or metric.startswith("eval/") or metric == "train_val_gap"):
        raise ConfigError(
            f"--metric {metric}: the search reads a metric logged at each evaluation: "
            "val_loss, val_ppl, val_accuracy and val_macro_f1 (classifiers), or "
            "eval/<task>/<metric> of eval.tasks"
        )


def _checked_points(space: list[SearchParam]) -> list[dict[str, str]]:
    """Every combination of the edge values, or each key's edges alone when there
    are too many combinations."""
    edges = {param.key: param.edge_values() for param in space}
    count = 1
    for values in edges.values():
        count *= len(values)
    if count <= MAX_CHECKED_POINTS:
        return [dict(zip(edges, combo)) for combo in itertools.product(*edges.values())]
    first = {key: values[0] for key, values in edges.items()}
    return [{**first, key: v} for key, values in edges.items() for v in values]


def plan_search(
    directory: str | Path,
    config: str | None,
    overrides: Sequence[str],
    space: list[SearchParam],
    trials: int,
    prune: str = "asha",
    metric: str = "val_loss",
    direction: str | None = None,
    seed: int = 0,
    nproc: int = 1,
    write: bool = True,
) -> Search:
    """Check the search and every edge of its space with `load_config`; then (if
    `write`) create the directory, search.json and the study. Nothing is written if
    anything is wrong.

    Raises:
        ConfigError: naming the option, or the point of the space and its setting.
    """
    from megagpt.data import check_data_config

    if trials < 1:
        raise ConfigError(f"--trials = {trials}: must be 1 or more")
    if prune not in PRUNERS:
        raise ConfigError(f"--prune {prune}: choose one of {', '.join(PRUNERS)}")
    if direction not in (None, "minimize", "maximize"):
        raise ConfigError(f"--direction {direction}: choose minimize or maximize")
    root = Path(directory).resolve()
    config_path = str(Path(config).resolve()) if config and Path(config).is_file() else config
    points = _checked_points(space)
    search = Search(str(root), config_path, list(overrides), space, trials, prune, metric, "")
    base = None
    for point in points:
        try:
            checked = load_config(config_path, search.trial_overrides(point, 0))
            check_data_config(checked.data)
        except ConfigError as error:
            raise ConfigError(f"search point {point}: {error}") from None
        base = base or checked
    t = base.train
    if not t.eval_interval:
        raise ConfigError(
            "train.eval_interval = 0: the search feeds the pruner the validation metric at "
            "each evaluation; set train.eval_interval (e.g. a tenth of train.max_steps)"
        )
    _check_metric(metric, base)
    searched = {param.key for param in space}
    search.direction = direction or ("maximize" if metric_mode(metric) == "max" else "minimize")
    search.seed, search.nproc = seed, nproc
    search.min_resource = t.eval_interval
    fixed_length = t.epochs is None and "train.max_steps" not in searched
    search.max_resource = t.max_steps if fixed_length else None
    search.checked_points = points
    if not write:
        return search
    if (root / MANIFEST).exists() or (root / "sweep.json").exists():
        raise ConfigError(f"{root} already holds a sweep; choose a new --output-dir")
    optuna = import_optuna()
    root.mkdir(parents=True, exist_ok=True)
    optuna.create_study(storage=search.storage(), study_name=STUDY_NAME, direction=search.direction)
    search.save()
    return search
