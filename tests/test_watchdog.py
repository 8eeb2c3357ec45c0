import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megagpt.contract import WATCHDOG_EXIT_CODE
from megagpt.training.watchdog import Watchdog

STUCK = Path(__file__).with_name("stuck_collective.py")
RUN_AGENT = (
    "import sys\n"
    "from megagpt.launch.agent import run_agent, torchrun_arguments\n"
    "from megagpt.launch.environment import launch_environment\n"
    "sys.exit(run_agent(torchrun_arguments(2, sys.argv[1:]), launch_environment(2)))\n"
)


def test_a_rank_stuck_in_a_collective_dumps_its_stack_and_exits_in_time():
    limit_s = 3
    done = subprocess.run(
        [sys.executable, "-c", RUN_AGENT, str(STUCK), str(limit_s)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    ended = time.time()
    log = done.stdout + done.stderr
    # the agent reports the workers' exit code, so SLURM's script can requeue
    assert done.returncode == WATCHDOG_EXIT_CODE, log
    stuck_at = min(float(t) for t in re.findall(r"stuck at (\d+\.\d+)", log))
    # the limit, plus the agent noticing the exit and tearing the other rank down
    assert ended - stuck_at < limit_s + 15, log
    # both ranks fire at once into one log: each line says whose it is
    reports = {}
    for rank, line in re.findall(r"^\[rank (\d)\] (.*)$", log, re.M):
        reports[int(rank)] = reports.get(int(rank), "") + line + "\n"
    assert sorted(reports) == [0, 1], log
    assert all(f"megagpt watchdog: rank {rank}" in reports[rank] for rank in (0, 1)), log
    # rank 0 waits in the all_reduce that rank 1 never joins; rank 1 is stuck reading
    assert re.search(r"distributed_c10d.py\", line \d+ in all_reduce", reports[0])
    assert "stuck_collective.py" in reports[0]
    assert "in read_next_batch" in reports[1] and "all_reduce" not in reports[1]


def test_limit_is_the_first_step_limit_until_steps_are_timed_then_at_least_the_minimum():
    watchdog = Watchdog(multiple=5, min_timeout_s=60, first_step_timeout_s=600, warmup_steps=1)
    try:
        assert watchdog.timeout_s() == 600
        with watchdog.step():  # warmup: not timed
            pass
        assert watchdog.timeout_s() == 600
        with watchdog.step():
            pass
        assert watchdog.timeout_s() == 60  # 5 x (a step of microseconds) < the minimum
        with pytest.raises(RuntimeError), watchdog.step():
            raise RuntimeError("a failed step is not timed, and not left armed")
        assert not watchdog.armed
    finally:
        watchdog.close()


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="min_timeout_s = 0"):
        Watchdog(min_timeout_s=0)
