"""A worker of an Optuna search: ask the shared study for a trial, train it, tell the
result, and continue until the search has its number of trials.

    python -m megagpt.launch.search_run SWEEP_DIR            a worker (a SLURM array task)
    python -m megagpt.launch.search_run SWEEP_DIR --trial N  one rank of trial N's training
                                                             (what torchrun starts when a
                                                             trial has several processes)

Each trial trains with a `PruningHook`: at every evaluation it reports the metric to the
study and, when the pruner says so, stops the run after that step (with a checkpoint);
the trial is then told PRUNED. A trial stopped by SIGUSR1/SIGTERM (time limit,
preemption) stays RUNNING and the worker exits with REQUEUE_EXIT_CODE; the requeued
array task (the same worker id) resumes that trial from its checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import socket
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from megagpt.config import ConfigError, load_config
from megagpt.contract import REQUEUE_EXIT_CODE
from megagpt.errors import INTERRUPTED_EXIT_CODE, MegagptError, report_user_errors
from megagpt.launch.search import STUDY_NAME, Search, import_optuna

log = logging.getLogger("megagpt.launch.search_run")  # not __name__: run as __main__

TRIAL_FILE = "trial.json"
CLAIM_LOCK = "claim"
# What torchrun or srun set for a training rank. A worker is not one: it trains a trial
# as a lone process (or starts torchrun for it), so these must not reach the trainer.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK")
RANK_VARIABLES += ("ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class TrialOutcome:
    number: int
    state: str
    """COMPLETE, PRUNED or FAIL (as Optuna names them)."""
    value: float | None
    params: dict
    last_step: int | None = None
    note: str = ""


class PruningHook:
    """An EvaluationHook: reports the search's metric to the trial at each evaluation and
    returns a stop reason when the pruner prunes it. The study opens at the first call,
    on the main rank only (the trainer calls hooks there)."""

    def __init__(self, search: Search, number: int, max_steps: int):
        self.search, self.number, self.max_steps = search, number, max_steps
        self.trial = None

    def __call__(self, step: int, metrics: dict[str, float]) -> str | None:
        if self.trial is None:
            study = self.search.study()
            _, trial_id, _ = _frozen_trial(self.search, self.number)
            self.trial = import_optuna().trial.Trial(study, trial_id)
            self.trial.set_user_attr("logged_metrics", sorted(metrics))
        value = metrics.get(self.search.metric)
        if value is None:  # this evaluation did not measure it (e.g. eval.interval)
            return None
        self.trial.report(float(value), step)
        # At the last step the trial has finished: it completes, whatever the pruner
        # would say (with parallel workers, later rungs may fill up while it trains).
        if step >= self.max_steps or not self.trial.should_prune():
            return None
        self.trial.set_user_attr("pruned_at", step)
        return (
            f"trial {self.number} pruned by the {self.search.prune} pruner at step {step} "
            f"({self.search.metric} {value:.4f})"
        )


def _frozen_trial(search: Search, number: int):
    """(storage, trial id, FrozenTrial) of trial `number`."""
    storage = search.storage()
    study_id = storage.get_study_id_from_name(STUDY_NAME)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
    return storage, trial_id, storage.get_trial(trial_id)


def claim_trial(search: Search, worker: str) -> int | None:
    """The trial this worker trains next: its own unfinished one (after a requeue), else
    a new one from the sampler; None once the search has all its trials. Counting and
    asking happen under a lock, so parallel workers never start more than `trials`."""
    optuna = import_optuna()
    lock = optuna.storages.journal.JournalFileOpenLock(str(Path(search.directory) / CLAIM_LOCK))
    lock.acquire()
    try:
        study = search.study()
        trials = study.get_trials(deepcopy=False)
        running = optuna.trial.TrialState.RUNNING
        for trial in trials:
            if trial.state == running and trial.user_attrs.get("worker") == worker:
                log.info("resuming trial %d (this worker's, unfinished)", trial.number)
                return trial.number
        if len(trials) >= search.trials:
            return None
        study = search.study(sampler_seed=search.seed + len(trials))
        trial = study.ask(search.distributions())
        trial.set_user_attr("worker", worker)
        return trial.number
    finally:
        lock.release()


def _write_trial_file(search: Search, trial_number: int, **fields) -> None:
    directory = search.trial_directory(trial_number)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / TRIAL_FILE
    record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    record.update(fields)
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


@contextlib.contextmanager
def _trial_log(directory: Path) -> Iterator[None]:
    """Also write the log of an in-process trial to its train.log."""
    handler = logging.FileHandler(directory / "train.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def run_trial(search: Search, number: int) -> TrialOutcome | int:
    """Train trial `number` and tell the study how it ended. Returns the outcome, or an
    exit code when a stop signal cut it short (the trial then stays to be resumed; after
    Ctrl-C it is told FAIL)."""
    _, _, frozen = _frozen_trial(search, number)
    if "pruned_at" in frozen.user_attrs:  # pruned, then stopped before it was told
        return finish_trial(search, number)
    overrides = search.trial_overrides(frozen.params, number)
    directory = search.trial_directory(number)
    _write_trial_file(
        search,
        number,
        number=number,
        state="RUNNING",
        params=frozen.params,
        overrides=overrides,
        rerun=f"megagpt train --config {directory / 'config.yaml'} train.output_dir=NEW_DIR",
    )
    log.info("trial %d: %s", number, ", ".join(f"{k}={v}" for k, v in frozen.params.items()))
    try:
        code = _train(search, number, overrides, directory)
    except MegagptError as error:  # a bad trial (diverged, invalid point): the search goes on
        return finish_trial(search, number, failure=str(error))
    except BaseException as error:
        finish_trial(search, number, failure=f"{type(error).__name__}: {error}")
        raise
    if code == INTERRUPTED_EXIT_CODE:
        finish_trial(search, number, failure="interrupted (Ctrl-C)")
        return code
    if code == REQUEUE_EXIT_CODE:
        log.warning("trial %d stopped on request; it resumes when the worker restarts", number)
        return code
    if code != 0:
        return finish_trial(search, number, failure=f"training exited with status {code}")
    return finish_trial(search, number)


def _train(search: Search, number: int, overrides: list[str], directory: Path) -> int:
    """Train in this process (one process per trial), or under torchrun."""
    from megagpt.launch.agent import run_agent, torchrun_arguments
    from megagpt.launch.environment import launch_environment
    from megagpt.training.trainer import exit_code, train

    if search.nproc == 1:
        config = load_config(search.config, overrides)
        with _trial_log(directory):
            hook = PruningHook(search, number, config.train.max_steps)
            return exit_code(train(config, hooks=[hook]))
    command = ["-m", "megagpt.launch.search_run", search.directory, "--trial", str(number)]
    return run_agent(torchrun_arguments(search.nproc, command), launch_environment(search.nproc))


def finish_trial(search: Search, number: int, failure: str | None = None) -> TrialOutcome:
    """Tell the study how trial `number` ended (from what its hook reported) and write it
    to the trial's trial.json."""
    optuna = import_optuna()
    states = optuna.trial.TrialState
    storage, trial_id, frozen = _frozen_trial(search, number)
    reported = frozen.intermediate_values
    last_step = max(reported) if reported else None
    value = reported[last_step] if reported else None
    pruned_at = frozen.user_attrs.get("pruned_at")
    note = failure or ""
    if failure is None and pruned_at is not None:
        state, note = states.PRUNED, f"pruned at step {pruned_at}"
    elif failure is None and value is not None and math.isfinite(value):
        state = states.COMPLETE
    else:
        state = states.FAIL
        if not note and value is None:
            logged = ", ".join(frozen.user_attrs.get("logged_metrics", [])) or "nothing"
            note = f"{search.metric} was not logged at any evaluation (logged: {logged})"
        elif not note:
            note = f"{search.metric} is {value}"
    if note:
        storage.set_trial_user_attr(trial_id, "note", note)
    study = search.study()
    study.tell(number, value if state == states.COMPLETE else None, state=state)
    outcome = TrialOutcome(number, state.name, value, frozen.params, last_step, note)
    _write_trial_file(search, number, **asdict(outcome))
    log.info("trial %d: %s %s %s", number, state.name, search.metric, value)
    if note.startswith(f"{search.metric} was not logged"):
        raise ConfigError(f"--metric {search.metric}: trial {number}: {note}")
    return outcome


def leave_launcher_environment() -> None:
    """Forget the rank variables a launcher set for this process (see RANK_VARIABLES)."""
    for name in RANK_VARIABLES:
        os.environ.pop(name, None)
    for name in [n for n in os.environ if n.startswith("TORCHELASTIC_")]:
        os.environ.pop(name)


def default_worker_id() -> str:
    """SLURM_ARRAY_JOB_ID_SLURM_ARRAY_TASK_ID (the same after a requeue), else host-pid."""
    job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if job and task:
        return f"slurm-{job}_{task}"
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm-{os.environ['SLURM_JOB_ID']}"
    return f"{socket.gethostname()}-{os.getpid()}"


def run_worker(directory: str | Path, worker: str | None = None) -> tuple[list[TrialOutcome], int]:
    """Train trials of the search in `directory` until it has all of them. Returns the
    outcomes of the trials this worker finished and its exit code (0, or the code of a
    stop on request)."""
    search = Search.load(directory)
    worker = worker or default_worker_id()
    leave_launcher_environment()
    outcomes: list[TrialOutcome] = []
    while (number := claim_trial(search, worker)) is not None:
        outcome = run_trial(search, number)
        if isinstance(outcome, int):
            return outcomes, outcome
        outcomes.append(outcome)
    return outcomes, 0


def _train_one_rank(directory: str, number: int) -> int:
    """One rank of trial `number` under torchrun."""
    from megagpt.training.trainer import exit_code, train

    search = Search.load(directory)
    _, _, frozen = _frozen_trial(search, number)
    config = load_config(search.config, search.trial_overrides(frozen.params, number))
    return exit_code(train(config, hooks=[PruningHook(search, number, config.train.max_steps)]))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megagpt.launch.search_run")
    parser.add_argument("sweep_dir", help="directory holding search.json")
    parser.add_argument("--trial", type=int, help="train this trial as one rank (torchrun)")
    parser.add_argument("--worker", help="this worker's id (default: the SLURM array task)")
    args = parser.parse_args(argv)
    if args.trial is not None:
        return report_user_errors(
            "megagpt search trial", lambda: _train_one_rank(args.sweep_dir, args.trial)
        )
    from megagpt.utils.logging import setup_logging

    setup_logging()
    return report_user_errors("megagpt search", lambda: run_worker(args.sweep_dir, args.worker)[1])


if __name__ == "__main__":
    sys.exit(main())
