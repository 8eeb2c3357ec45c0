"""Render launch/slurm.sbatch.template for a training job and submit it with sbatch."""

from __future__ import annotations

import logging
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from megagpt.config.errors import ConfigError
from megagpt.contract import DEFAULT_COLLECTIVE_TIMEOUT_S, REQUEUE_EXIT_CODE, WATCHDOG_EXIT_CODE
from megagpt.launch.errors import LaunchError

log = logging.getLogger(__name__)

# launch/ at the top of the repository, like configs/: users find and copy it there.
TEMPLATE = Path(__file__).resolve().parents[2] / "launch" / "slurm.sbatch.template"

# Values that go into "#SBATCH --key=value" lines, which sbatch reads without a shell:
# no spaces, quotes or anything that could end the line.
_HEADER_VALUE = re.compile(r"^[A-Za-z0-9_.,:=%@/+\-\[\]]+$")
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


@dataclass
class SlurmJob:
    """Everything `megagpt launch slurm` puts into an sbatch script.

    `command` is what each training process runs after `python`, e.g.
    ["-m", "megagpt", "train", "--config", "gpt2-124m.yaml", "optim.lr=3e-4"].
    """

    command: list[str]
    output_dir: Path
    nodes: int = 1
    gpus_per_node: int = 0
    nproc_per_node: int | None = None
    rendezvous: Literal["torchrun", "srun"] = "torchrun"
    time: str | None = None
    signal_lead_s: int = 300
    max_restarts: int = 3
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclusive: bool = False
    mem: str | None = None
    cpus_per_task: int | None = None
    job_name: str = "megagpt"
    array: str | None = None
    sbatch_args: list[str] = field(default_factory=list)
    collective_timeout_s: int = DEFAULT_COLLECTIVE_TIMEOUT_S
    port: int | None = None
    python: str = sys.executable
    workdir: Path = field(default_factory=Path.cwd)

    @property
    def processes_per_node(self) -> int:
        return self.nproc_per_node or self.gpus_per_node or 1

    @property
    def log_path(self) -> Path:
        """The job's log; %j (%A_%a for an array task) is the job id."""
        name = "%A_%a.log" if self.array else "%j.log"
        return Path(self.output_dir).resolve() / "slurm" / name


def validate_job(job: SlurmJob) -> None:
    """Raise a ConfigError naming the option for anything sbatch would refuse or misread."""
    for option, value, least in (
        ("--nodes", job.nodes, 1),
        ("--gpus-per-node", job.gpus_per_node, 0),
        ("--nproc-per-node", job.processes_per_node, 1),
        ("--max-restarts", job.max_restarts, 0),
        ("--signal-lead", job.signal_lead_s, 1),
        ("--collective-timeout", job.collective_timeout_s, 1),
        ("--cpus-per-task", job.cpus_per_task or 1, 1),
    ):
        if value < least:
            raise ConfigError(f"{option} = {value}: must be {least} or more")
    if job.gpus_per_node and job.nproc_per_node and job.nproc_per_node != job.gpus_per_node:
        raise ConfigError(
            f"--nproc-per-node = {job.nproc_per_node} with --gpus-per-node = "
            f"{job.gpus_per_node}: one process per GPU; leave --nproc-per-node out"
        )
    if job.signal_lead_s > 65535:
        raise ConfigError(f"--signal-lead = {job.signal_lead_s}: SLURM allows at most 65535 s")
    if job.time is not None:
        limit = time_limit_seconds(job.time)
        if job.signal_lead_s >= limit:
            raise ConfigError(
                f"--signal-lead = {job.signal_lead_s} s is not shorter than --time = "
                f"{job.time} ({limit} s): the warning would come before the job starts"
            )
    named = [("--job-name", job.job_name), ("--output (under train.output_dir)", job.log_path)]
    check_header_values([*named, *_optional_header_options(job)], job.sbatch_args)


def check_header_values(options: list[tuple[str, object]], sbatch_args: list[str]) -> None:
    """Raise a ConfigError for a value sbatch would misread in a "#SBATCH" line."""
    for option, value in options:
        if value is not True and not _HEADER_VALUE.match(str(value)):
            raise ConfigError(
                f"{option} = {str(value)!r}: sbatch header values may hold letters, digits "
                "and _.,:=%@/+-[] only (no spaces or quotes)"
            )
    for arg in sbatch_args:
        if not arg.startswith("--") or not _HEADER_VALUE.match(arg[2:]):
            raise ConfigError(
                f"--sbatch-arg {arg!r}: write one sbatch option as --name=value, "
                "e.g. --sbatch-arg=--mail-type=END"
            )


def time_limit_seconds(value: str) -> int:
    """Seconds in a SLURM time limit: MIN, MIN:SEC, H:MIN:SEC, D-H, D-H:MIN, D-H:MIN:SEC."""
    match = _TIME.match(value)
    if not match:
        raise ConfigError(
            f"--time = {value!r}: use a SLURM time limit such as 90 (minutes), "
            "4:00:00 or 2-00:00:00"
        )
    days, first, second, third = (int(g) if g else None for g in match.groups())
    if days is None:
        parts = [p for p in (first, second, third) if p is not None]
        if len(parts) == 1:
            return parts[0] * 60
        if len(parts) == 2:
            return parts[0] * 60 + parts[1]
        return parts[0] * 3600 + parts[1] * 60 + parts[2]
    return days * 86400 + first * 3600 + (second or 0) * 60 + (third or 0)


def _optional_header_options(job: SlurmJob) -> list[tuple[str, object]]:
    """The "#SBATCH" options that only some jobs have, in the order they are written."""
    options: list[tuple[str, object]] = []
    for option, value in (
        ("--time", job.time),
        ("--gpus-per-node", job.gpus_per_node or None),
        ("--partition", job.partition),
        ("--account", job.account),
        ("--qos", job.qos),
        ("--constraint", job.constraint),
        ("--mem", job.mem),
        ("--array", job.array),
        ("--exclusive", job.exclusive or None),
    ):
        if value is not None:
            options.append((option, value))
    return options


def render_script(job: SlurmJob, template: Path = TEMPLATE) -> str:
    """The sbatch script for `job`, from `template` (launch/slurm.sbatch.template)."""
    validate_job(job)
    header = [
        f"#SBATCH {option}" if value is True else f"#SBATCH {option}={value}"
        for option, value in _optional_header_options(job)
    ]
    header += [f"#SBATCH {arg}" for arg in job.sbatch_args]
    per_task = job.rendezvous == "srun"
    tasks_per_node = job.processes_per_node if per_task else 1
    mode = ["--per-task"] if per_task else ["--nproc-per-node", str(job.processes_per_node)]
    if job.port is not None:
        mode += ["--port", str(job.port)]
    task = [job.python, "-m", "megagpt.launch.slurm_task", *mode, "--"]
    values = {
        "job_name": job.job_name,
        "nodes": str(job.nodes),
        "tasks_per_node": str(tasks_per_node),
        "cpus_per_task": str(job.cpus_per_task or (1 if per_task else job.processes_per_node)),
        "log": str(job.log_path),
        "signal_lead_s": str(job.signal_lead_s),
        "sbatch_options": "\n".join(header),
        "max_restarts": str(job.max_restarts),
        "requeue_exit_code": str(REQUEUE_EXIT_CODE),
        "watchdog_exit_code": str(WATCHDOG_EXIT_CODE),
        "workdir": shlex.quote(str(Path(job.workdir).resolve())),
        "collective_timeout_s": str(job.collective_timeout_s),
        "task_command": f"{shlex.join(task)} \\\n        {shlex.join(job.command)}",
    }
    return fill_template(template.read_text(encoding="utf-8"), values, template)


def fill_template(text: str, values: dict[str, str], source: Path | str) -> str:
    """Replace every {{name}} in `text`; a name without a value is an error."""
    unknown = sorted(set(_PLACEHOLDER.findall(text)) - values.keys())
    if unknown:
        raise ConfigError(
            f"{source}: unknown placeholders {', '.join(unknown)}; "
            f"known: {', '.join(sorted(values))}"
        )
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


def submit_script(script: str, script_path: Path) -> str:
    """Write `script` to `script_path` and submit it; returns the job id."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise LaunchError(
            "sbatch not found: submit from a SLURM login node, or print the script "
            "with --dry-run and submit it there"
        )
    script_path.parent.mkdir(parents=True, exist_ok=True)
    script_path.write_text(script, encoding="utf-8")
    done = subprocess.run([sbatch, "--parsable", str(script_path)], capture_output=True, text=True)
    if done.returncode != 0:
        raise LaunchError(f"sbatch {script_path} failed: {done.stderr.strip()}")
    job_id = done.stdout.strip().split(";")[0]
    log.info("submitted %s as job %s", script_path, job_id)
    return job_id


def submit_job(job: SlurmJob, template: Path = TEMPLATE) -> tuple[str, Path]:
    """Render, write next to the logs, and submit `job`; returns (job id, log path)."""
    script = render_script(job, template)
    log_dir = job.log_path.parent
    log_dir.mkdir(parents=True, exist_ok=True)  # sbatch does not create it
    job_id = submit_script(script, log_dir / f"{job.job_name}.sbatch")
    log_file = str(job.log_path).replace("%j", job_id)
    if job.array:
        log_file = log_file.replace("%A", job_id).replace("%a", "*")
    return job_id, Path(log_file)
