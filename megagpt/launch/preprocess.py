"""`megagpt launch preprocess`: a megagpt-preprocess job as dependent SLURM array jobs.

    megagpt launch preprocess --array 16 --cpus-per-task 8 --time 4:00:00 -- \\
        'corpus/*.jsonl.zst' --tokenizer tok.json --output-prefix data/web --near-dedup

submits the scan phase as a 16-task array, the dedup phase as one task that starts
when every scan task has succeeded, and the tokenize phase as a second array after
it (without deduplication, only the tokenize array). Every task runs
`megagpt-preprocess` with the arguments after `--`, plus --num-tasks and --phase;
the array task id tells it which files are its own. The last tokenize task writes
PREFIX.manifest.json, which `megagpt train data.path=PREFIX.manifest.json` and
`megagpt-merge --manifest` read.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from megagpt.config.errors import ConfigError
from megagpt.launch.slurm import (
    check_header_values,
    fill_template,
    submit_script,
    time_limit_seconds,
)

TEMPLATE = Path(__file__).resolve().parents[2] / "launch" / "preprocess.sbatch.template"
_OWN_OPTIONS = ("--num-tasks", "--task-index", "--phase", "--overwrite")


@dataclass
class PreprocessJob:
    """The arguments of megagpt-preprocess and the SLURM settings of every phase."""

    arguments: list[str]
    array: int
    cpus_per_task: int = 1
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    mem: str | None = None
    max_parallel: int | None = None
    job_name: str = "megagpt-preprocess"
    sbatch_args: list[str] = field(default_factory=list)
    python: str = sys.executable
    workdir: Path = field(default_factory=Path.cwd)

    def phases(self) -> list[str]:
        """scan, dedup and tokenize; only tokenize when nothing is deduplicated."""
        deduplicated = "--near-dedup" in self.arguments or "--no-dedup" not in self.arguments
        return ["scan", "dedup", "tokenize"] if deduplicated else ["tokenize"]

    def output_prefix(self) -> Path:
        for index, argument in enumerate(self.arguments):
            if argument == "--output-prefix" and index + 1 < len(self.arguments):
                return Path(self.arguments[index + 1])
            if argument.startswith("--output-prefix="):
                return Path(argument.split("=", 1)[1])
        raise ConfigError("give megagpt-preprocess an --output-prefix after `--`")

    def log_directory(self) -> Path:
        prefix = (self.workdir / self.output_prefix()).resolve()
        return prefix.with_name(prefix.name + ".job") / "slurm"


def validate(job: PreprocessJob) -> None:
    """Check the SLURM settings and the preprocess arguments before anything is submitted."""
    if job.array < 1:
        raise ConfigError(f"--array {job.array}: give the number of tasks, 1 or more")
    for name, value in (
        ("--cpus-per-task", job.cpus_per_task),
        ("--max-parallel", job.max_parallel),
    ):
        if value is not None and value < 1:
            raise ConfigError(f"{name} = {value}: must be 1 or more")
    for argument in job.arguments:
        if argument.split("=", 1)[0] in _OWN_OPTIONS:
            raise ConfigError(
                f"{argument}: `megagpt launch preprocess` sets --num-tasks, --task-index and "
                "--phase itself, and a job spread over tasks cannot --overwrite; leave it out"
            )
    if job.time is not None:
        time_limit_seconds(job.time)
    check_header_values(
        [("--job-name", job.job_name), *_header_options(job, "scan")], job.sbatch_args
    )
    from data_tools.preprocess import build_parser, options_from_args

    checked = [*job.arguments, "--num-tasks", str(job.array), "--phase", "scan"]
    parsed = build_parser().parse_args([*checked, "--task-index", "0"])
    options_from_args(parsed)  # inputs, tokenizer and every option checked here, once


def _header_options(job: PreprocessJob, phase: str, dependency: str | None = None):
    array = None
    if phase != "dedup" and job.array > 1:
        array = f"0-{job.array - 1}" + (f"%{job.max_parallel}" if job.max_parallel else "")
    options = [
        ("--time", job.time),
        ("--partition", job.partition),
        ("--account", job.account),
        ("--qos", job.qos),
        ("--constraint", job.constraint),
        ("--mem", job.mem),
        ("--array", array),
        ("--dependency", f"afterok:{dependency}" if dependency else None),
    ]
    return [(option, value) for option, value in options if value is not None]


def render_phase(
    job: PreprocessJob, phase: str, dependency: str | None = None, template: Path = TEMPLATE
) -> str:
    """The sbatch script of one phase (dependency: the job id it waits for)."""
    header = [
        f"#SBATCH {option}={value}" for option, value in _header_options(job, phase, dependency)
    ]
    header += [f"#SBATCH {argument}" for argument in job.sbatch_args]
    workers = [] if "--workers" in job.arguments else ["--workers", str(job.cpus_per_task)]
    command = [job.python, "-m", "data_tools.preprocess", *job.arguments, *workers]
    command += ["--num-tasks", str(job.array), "--phase", phase]
    if phase == "dedup" or job.array == 1:
        command += ["--task-index", "0"]
    name = "%A_%a.log" if phase != "dedup" and job.array > 1 else "%j.log"
    values = {
        "job_name": f"{job.job_name}-{phase}",
        "cpus_per_task": str(job.cpus_per_task),
        "log": str(job.log_directory() / f"{phase}_{name}"),
        "sbatch_options": "\n".join(header),
        "workdir": shlex.quote(str(job.workdir.resolve())),
        "phase": phase,
        "command": shlex.join(command),
    }
    return fill_template(template.read_text(encoding="utf-8"), values, template)


def submit(job: PreprocessJob, template: Path = TEMPLATE) -> list[tuple[str, str]]:
    """Submit every phase, each depending on the one before; [(phase, job id)]."""
    validate(job)
    submitted: list[tuple[str, str]] = []
    for phase in job.phases():
        dependency = submitted[-1][1] if submitted else None
        script = render_phase(job, phase, dependency, template)
        job_id = submit_script(script, job.log_directory() / f"{phase}.sbatch")
        submitted.append((phase, job_id))
    return submitted


def dry_run(job: PreprocessJob, template: Path = TEMPLATE) -> str:
    """Every phase's script, as `submit` would write them (dependencies as placeholders)."""
    validate(job)
    scripts, previous = [], None
    for phase in job.phases():
        scripts.append(render_phase(job, phase, previous and f"<{previous} job id>", template))
        previous = phase
    return "\n".join(scripts)
