"""Train one point of a sweep: the SLURM array task's entry point.

    python -m megagpt.launch.sweep_run SWEEP_DIR [--index I]

I defaults to SLURM_ARRAY_TASK_ID. The run is the trainer with that point's config
from SWEEP_DIR/sweep.json, and it exits with `megagpt train`'s codes.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from megagpt.errors import report_user_errors
from megagpt.launch.sweep import Sweep


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megagpt.launch.sweep_run")
    parser.add_argument("sweep_dir", help="directory holding sweep.json")
    parser.add_argument("--index", type=int, help="run index (default: SLURM_ARRAY_TASK_ID)")
    args = parser.parse_args(argv)
    index = args.index if args.index is not None else os.environ.get("SLURM_ARRAY_TASK_ID")
    if index is None:
        parser.error("give --index, or run as a SLURM array task (SLURM_ARRAY_TASK_ID)")
    sweep = Sweep.load(args.sweep_dir)
    if not 0 <= int(index) < len(sweep.runs):
        parser.error(f"index {index} is outside the sweep's runs 0-{len(sweep.runs) - 1}")

    from megagpt.config import load_config
    from megagpt.training.trainer import exit_code, train

    def run() -> int:
        return exit_code(train(load_config(sweep.config, sweep.run_overrides(int(index)))))

    return report_user_errors("megagpt train", run)


if __name__ == "__main__":
    sys.exit(main())
