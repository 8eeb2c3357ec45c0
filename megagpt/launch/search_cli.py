"""The command-line side of `megagpt launch sweep --search optuna` and `megagpt compare`.

A search runs as a SLURM job array whose tasks are workers of one study (each asks for
a trial, trains it, tells the result and goes on until --trials are done), or as one
worker here with --local. Each trial is one node: its processes (--nproc-per-node,
--gpus-per-node, or --nproc with --local) are started by the worker with torchrun.
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
from pathlib import Path

from megagpt.config import ConfigError
from megagpt.launch.search import PRUNERS

SEARCH_ONLY = ("trials", "prune", "metric", "direction")


def add_search_options(sweep) -> None:
    """Add --search and its options to the `launch sweep` parser."""
    sweep.add_argument(
        "--search",
        choices=("grid", "optuna"),
        default="grid",
        help="grid (or random with --random) points, or a guided Optuna search",
    )
    sweep.add_argument("--trials", type=int, metavar="N", help="optuna: trials in the search")
    sweep.add_argument(
        "--prune",
        choices=PRUNERS,
        help="optuna: stop bad trials at evaluations by successive halving (asha, the "
        "default), Hyperband, or the median of earlier trials; none trains every trial",
    )
    sweep.add_argument(
        "--metric",
        help="optuna: the metric logged at evaluations that trials are judged by "
        "(default val_loss; val_accuracy, eval/<task>/acc, ...)",
    )
    sweep.add_argument(
        "--direction",
        choices=("minimize", "maximize"),
        help="optuna: better is lower or higher (default: from the metric's name)",
    )


def check_search_options(args) -> None:
    """Optuna's options without --search optuna, or --random with it, are mistakes."""
    if args.search == "optuna":
        if args.random is not None:
            raise ConfigError("--random is for --search grid; optuna draws --trials N trials")
        if args.trials is None:
            raise ConfigError("--search optuna needs --trials N (how many trials to train)")
        return
    given = [f"--{name}" for name in SEARCH_ONLY if getattr(args, name) is not None]
    if given:
        raise ConfigError(f"{', '.join(given)}: only with --search optuna")


def run_optuna_sweep(args, config_path: str | None, slurm_job, print_or_submit) -> int:
    """Plan the search, then run its worker here (--local) or submit its job array."""
    from megagpt.launch.search import parse_space, plan_search

    if args.nodes != 1:
        raise ConfigError(f"--nodes = {args.nodes}: each trial of a search runs on one node")
    if args.local:
        nproc = args.nproc
    else:
        nproc = args.nproc_per_node or args.gpus_per_node or 1
    search = plan_search(
        args.output_dir,
        config_path,
        args.overrides,
        parse_space(args.grid, args.sample),
        args.trials,
        prune=args.prune or "asha",
        metric=args.metric or "val_loss",
        direction=args.direction,
        seed=args.seed,
        nproc=nproc,
        write=not args.dry_run,
    )
    if args.local:
        return _run_local(search, args.dry_run)
    workers = min(args.max_parallel or search.trials, search.trials)
    command = ["-m", "megagpt.launch.search_run", search.directory]
    job, template = slurm_job(
        args,
        command,
        Path(search.directory),
        job_name=args.job_name or "megagpt-search",
        array=f"0-{workers - 1}",
    )
    # One task per array task: the worker, which starts each trial's processes itself.
    gpus = [f"--gpus-per-node={args.gpus_per_node}"] if args.gpus_per_node else []
    job = dataclasses.replace(
        job,
        rendezvous="srun",
        nproc_per_node=1,
        gpus_per_node=0,
        cpus_per_task=args.cpus_per_task or nproc,
        sbatch_args=[*args.sbatch_arg, *gpus],
    )
    submitted = print_or_submit(job, template, args.dry_run)
    if submitted:
        job_id, log_file = submitted
        print(
            f"submitted job array {job_id} ({workers} workers, {search.trials} trials) "
            f"from {search.directory}"
        )
        print(f"logs: {log_file}")
        print(f"report: megagpt sweep-report {search.directory}")
    return 0


def _run_local(search, dry_run: bool) -> int:
    from megagpt.launch.search_run import run_worker

    if dry_run:
        print(f"checked {len(search.checked_points)} points of the search space:")
        for point in search.checked_points:
            print("  " + shlex.join(f"{k}={v}" for k, v in point.items()))
        return 0
    outcomes, code = run_worker(search.directory, worker="local")
    counts = {state: sum(o.state == state for o in outcomes) for state in ("COMPLETE", "PRUNED")}
    failed = [f"trial-{o.number}" for o in outcomes if o.state == "FAIL"]
    print(
        f"{len(outcomes)} of {search.trials} trials done: {counts['COMPLETE']} complete, "
        f"{counts['PRUNED']} pruned, {len(failed)} failed"
        + (f" ({', '.join(failed)})" if failed else "")
    )
    print(f"report: megagpt sweep-report {search.directory}")
    return code or (1 if failed and not counts["COMPLETE"] else 0)


def add_compare_command(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="runs side by side: validation loss, tokens, task metrics, wall time, a plot",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="train.output_dir of a run")
    p.add_argument(
        "--plot",
        default="compare.png",
        help="where to write the PNG of the loss curves (default compare.png)",
    )


def run_compare(args) -> int:
    from megagpt.launch.compare import format_comparison, summarize_runs, write_comparison_plot

    summaries = summarize_runs(args.run_dirs)
    sys.stdout.write(format_comparison(summaries))
    print(f"\nplot: {write_comparison_plot(summaries, args.plot)}")
    return 0
