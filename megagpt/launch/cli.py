"""`megagpt launch local|slurm|sweep|preprocess`, `megagpt sweep-report` and `megagpt compare`."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from megagpt.contract import DEFAULT_COLLECTIVE_TIMEOUT_S
from megagpt.launch.environment import resume_by_default
from megagpt.launch.search_cli import add_compare_command, add_search_options

OVERRIDES_HELP = "settings as section.key=value, passed to `megagpt train`"


def add_launch_commands(sub) -> None:
    """Add `launch` (with local, slurm, sweep), `sweep-report` and `compare` to `sub`."""
    launch = sub.add_parser("launch", help="start training: torchrun here, or a SLURM job")
    actions = launch.add_subparsers(dest="action", required=True)

    local = actions.add_parser("local", help="torchrun on this machine (or one node of many)")
    local.add_argument("--nproc", type=int, default=1, help="training processes on this node")
    local.add_argument("--nnodes", type=int, default=1, help="nodes in the job (default 1)")
    local.add_argument(
        "--rdzv-endpoint",
        help="HOST:PORT of the rendezvous, the same on every node; needed with --nnodes > 1",
    )
    local.add_argument("--rdzv-id", default="megagpt", help="job name shared by all nodes")
    _add_common(local)

    slurm = actions.add_parser("slurm", help="render an sbatch script and submit it")
    _add_slurm_options(slurm)
    _add_common(slurm)

    sweep = actions.add_parser(
        "sweep", help="a grid, random or Optuna search as a SLURM job array (or --local)"
    )
    sweep.add_argument("--output-dir", required=True, help="the sweep's directory, one run each")
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2")
    sweep.add_argument(
        "--sample",
        action="append",
        default=[],
        metavar="KEY=DIST:LOW:HIGH",
        help="with --random: DIST is uniform, loguniform or int",
    )
    sweep.add_argument("--random", type=int, metavar="N", help="N random points, not a grid")
    sweep.add_argument("--seed", type=int, default=0, help="seed of the random points")
    sweep.add_argument("--local", action="store_true", help="run the points here, in turn")
    sweep.add_argument("--nproc", type=int, default=1, help="processes per run with --local")
    sweep.add_argument(
        "--max-parallel",
        type=int,
        help="array tasks running at once (optuna: the number of workers, default --trials)",
    )
    add_search_options(sweep)
    _add_slurm_options(sweep)
    _add_common(sweep)

    _add_preprocess_parser(actions)

    report = sub.add_parser(
        "sweep-report", help="every sweep run or trial ranked, and PNG plots of the sweep"
    )
    report.add_argument("directory", help="the --output-dir of `megagpt launch sweep`")
    report.add_argument(
        "--no-plots", action="store_true", help="print the table only; write no PNG files"
    )
    add_compare_command(sub)


def _add_preprocess_parser(actions) -> None:
    preprocess = actions.add_parser(
        "preprocess",
        help="megagpt-preprocess as dependent SLURM array jobs (scan, dedup, tokenize)",
        description="Submit a megagpt-preprocess job spread over an array of tasks; the "
        "arguments after -- are megagpt-preprocess's own.",
    )
    preprocess.add_argument("--array", type=int, required=True, help="tasks per phase")
    preprocess.add_argument("--cpus-per-task", type=int, default=1, help="workers per task")
    for option in ("partition", "account", "qos", "constraint", "mem"):
        preprocess.add_argument(f"--{option}")
    preprocess.add_argument("--time", help="time limit of each task")
    preprocess.add_argument("--max-parallel", type=int, help="array tasks running at once")
    preprocess.add_argument("--job-name", default="megagpt-preprocess")
    preprocess.add_argument("--sbatch-arg", action="append", default=[], metavar="--NAME=VALUE")
    preprocess.add_argument("--template", type=Path, help="an edited preprocess.sbatch.template")
    preprocess.add_argument("--dry-run", action="store_true", help="print the scripts only")
    preprocess.add_argument(
        "arguments", nargs=argparse.REMAINDER, help="-- then megagpt-preprocess's arguments"
    )


def _add_common(p) -> None:
    p.add_argument(
        "--collective-timeout",
        type=int,
        default=DEFAULT_COLLECTIVE_TIMEOUT_S,
        metavar="S",
        help="seconds a collective may wait before the process group fails",
    )
    p.add_argument("--config", help="YAML file, or a preset name from configs/")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)


def _add_slurm_options(p) -> None:
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0, help="0 for CPU nodes (gloo)")
    p.add_argument("--nproc-per-node", type=int, help="processes per node (default: GPUs, or 1)")
    p.add_argument(
        "--rendezvous",
        choices=("torchrun", "srun"),
        default="torchrun",
        help="torchrun: one task per node running torchrun; srun: one task per rank",
    )
    for option in ("partition", "account", "qos", "constraint", "mem"):
        p.add_argument(f"--{option}")
    p.add_argument("--time", help="time limit: minutes, H:MM:SS or D-HH:MM:SS")
    p.add_argument("--exclusive", action="store_true")
    p.add_argument("--cpus-per-task", type=int)
    p.add_argument("--job-name")
    p.add_argument(
        "--signal-lead",
        type=int,
        default=300,
        metavar="S",
        help="SIGUSR1 this many seconds before the time limit: checkpoint, then requeue",
    )
    p.add_argument("--max-restarts", type=int, default=3, help="requeues allowed (default 3)")
    p.add_argument("--port", type=int, help="rendezvous port (default: derived from the job id)")
    p.add_argument(
        "--sbatch-arg",
        action="append",
        default=[],
        metavar="--NAME=VALUE",
        help="another #SBATCH line, e.g. --sbatch-arg=--mail-type=END",
    )
    p.add_argument("--template", type=Path, help="an edited copy of launch/slurm.sbatch.template")
    p.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")


def _config_path(args) -> str | None:
    """--config as the job will see it: a file made absolute, a preset name as given."""
    if not args.config:
        return None
    config = Path(args.config)
    return str(config.resolve()) if config.is_file() else args.config


def _train_command(args) -> list[str]:
    """The `megagpt train` command a launched job runs (resuming by default)."""
    config = _config_path(args)
    overrides = resume_by_default(args.overrides)
    return ["-m", "megagpt", "train", *(["--config", config] if config else []), *overrides]


def _slurm_job(args, command: list[str], output_dir: Path, **extra):
    from megagpt.launch.slurm import TEMPLATE, SlurmJob

    job = SlurmJob(
        command=command,
        output_dir=output_dir,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        nproc_per_node=args.nproc_per_node,
        rendezvous=args.rendezvous,
        time=args.time,
        signal_lead_s=args.signal_lead,
        max_restarts=args.max_restarts,
        partition=args.partition,
        account=args.account,
        qos=args.qos,
        constraint=args.constraint,
        exclusive=args.exclusive,
        mem=args.mem,
        cpus_per_task=args.cpus_per_task,
        sbatch_args=args.sbatch_arg,
        collective_timeout_s=args.collective_timeout,
        port=args.port,
        **extra,
    )
    return job, args.template or TEMPLATE


def run_launch(args) -> int:
    """Handle `megagpt launch ...`; returns the exit code."""
    from megagpt.config import load_config
    from megagpt.data import check_data_config

    if args.action == "preprocess":
        return _preprocess(args)
    config = load_config(args.config, args.overrides)  # bad settings fail here, once
    check_data_config(config.data)
    if args.action == "local":
        return _local(args)
    if args.action == "slurm":
        return _slurm(args, Path(config.train.output_dir))
    return _sweep(args)


def _at_least_one(**options: int) -> None:
    from megagpt.config import ConfigError

    for name, value in options.items():
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} = {value}: must be 1 or more")


def _local(args) -> int:
    from megagpt.launch.agent import run_agent, torchrun_arguments
    from megagpt.launch.environment import launch_environment

    _at_least_one(nproc=args.nproc, nnodes=args.nnodes, collective_timeout=args.collective_timeout)

    arguments = torchrun_arguments(
        args.nproc, _train_command(args), args.nnodes, args.rdzv_endpoint, args.rdzv_id
    )
    env = launch_environment(args.nproc, collective_timeout_s=args.collective_timeout)
    return run_agent(arguments, env)


def _print_or_submit(job, template: Path, dry_run: bool):
    """Print the script (dry run; returns None) or submit it (returns job id and log)."""
    from megagpt.launch.slurm import render_script, submit_job

    if dry_run:
        print(render_script(job, template), end="")
        return None
    return submit_job(job, template)


def _slurm(args, output_dir: Path) -> int:
    job_name = args.job_name or "megagpt"
    job, template = _slurm_job(args, _train_command(args), output_dir, job_name=job_name)
    submitted = _print_or_submit(job, template, args.dry_run)
    if submitted:
        job_id, log_file = submitted
        print(f"submitted job {job_id}")
        print(f"log: {log_file}")
    return 0


def _sweep(args) -> int:
    from megagpt.launch.search_cli import check_search_options, run_optuna_sweep
    from megagpt.launch.sweep import plan_sweep, run_locally, sweep_points

    _at_least_one(max_parallel=args.max_parallel, nproc=args.nproc)
    check_search_options(args)
    if args.search == "optuna":
        return run_optuna_sweep(args, _config_path(args), _slurm_job, _print_or_submit)
    points = sweep_points(args.grid, args.sample, args.random, args.seed)
    write = not args.dry_run
    sweep = plan_sweep(args.output_dir, _config_path(args), args.overrides, points, write)
    if args.local and args.dry_run:
        for index in range(len(sweep.runs)):
            print(shlex.join(["megagpt", "train", *sweep.train_arguments(index)]))
        return 0
    if args.local:
        codes = run_locally(sweep, args.nproc)
        failed = [run.name for run, code in zip(sweep.runs, codes) if code != 0]
        failures = f"; failed: {', '.join(failed)}" if failed else ""
        print(f"{len(codes) - len(failed)} of {len(codes)} runs finished{failures}")
        print(f"report: megagpt sweep-report {sweep.directory}")
        return 1 if failed else 0
    array = f"0-{len(points) - 1}" + (f"%{args.max_parallel}" if args.max_parallel else "")
    command = ["-m", "megagpt.launch.sweep_run", sweep.directory]
    job_name = args.job_name or "megagpt-sweep"
    job, template = _slurm_job(args, command, Path(sweep.directory), job_name=job_name, array=array)
    submitted = _print_or_submit(job, template, args.dry_run)
    if submitted:
        job_id, log_file = submitted
        print(f"submitted job array {job_id} ({len(points)} runs) from {sweep.directory}")
        print(f"logs: {log_file}")
        print(f"report: megagpt sweep-report {sweep.directory}")
    return 0


def _preprocess(args) -> int:
    from megagpt.launch import preprocess

    arguments = args.arguments[1:] if args.arguments[:1] == ["--"] else args.arguments
    job = preprocess.PreprocessJob(
        arguments=arguments,
        array=args.array,
        cpus_per_task=args.cpus_per_task,
        time=args.time,
        partition=args.partition,
        account=args.account,
        qos=args.qos,
        constraint=args.constraint,
        mem=args.mem,
        max_parallel=args.max_parallel,
        job_name=args.job_name,
        sbatch_args=args.sbatch_arg,
    )
    template = args.template or preprocess.TEMPLATE
    if args.dry_run:
        print(preprocess.dry_run(job, template), end="")
        return 0
    for phase, job_id in preprocess.submit(job, template):
        print(f"submitted {phase} as job {job_id}")
    print(f"logs: {job.log_directory()}")
    print(f"manifest when done: {job.output_prefix()}.manifest.json")
    return 0


def run_sweep_report(args) -> int:
    from megagpt.launch.report import write_report

    sys.stdout.write(write_report(args.directory, plots=not args.no_plots))
    return 0
