import os
import signal
import subprocess
import sys

import pytest
import torch.distributed as dist

from megagpt.contract import REQUEUE_EXIT_CODE
from megagpt.testing import run_distributed
from megagpt.training.preemption import PreemptionHandler


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_a_signal_to_this_process_is_recorded_and_stops_it(sig):
    before = signal.getsignal(sig)
    with PreemptionHandler() as preemption:
        assert not preemption.requested() and not preemption.should_stop(1)
        os.kill(os.getpid(), sig)
        assert preemption.requested() and preemption.received == sig
        assert preemption.should_stop(2)
    assert signal.getsignal(sig) == before


def test_ctrl_c_stops_after_the_step_and_a_second_one_at_once():
    with PreemptionHandler((signal.SIGINT,)) as preemption:
        os.kill(os.getpid(), signal.SIGINT)  # the first: recorded, no KeyboardInterrupt
        assert preemption.should_stop(1) and preemption.decided == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):  # pressed again while the checkpoint saves
            os.kill(os.getpid(), signal.SIGINT)
            signal.sigtimedwait([], 0.1)  # let the handler run
    with PreemptionHandler((signal.SIGINT,)) as preemption:
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):  # twice before the step ends
            os.kill(os.getpid(), signal.SIGINT)
            signal.sigtimedwait([], 0.1)


def test_check_interval_skips_steps_between_checks():
    with PreemptionHandler(check_interval=5) as preemption:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert [preemption.should_stop(step) for step in (3, 4, 5)] == [False, False, True]


SCRIPT = """
import os, signal, sys
from megagpt.contract import REQUEUE_EXIT_CODE
from megagpt.training.preemption import PreemptionHandler
preemption = PreemptionHandler().install()
os.kill(os.getpid(), signal.SIGUSR1)
assert preemption.should_stop(1)
os.kill(os.getpid(), signal.SIGUSR1)  # a late copy, as from the batch shell
print("checkpoint written", flush=True)
sys.exit(REQUEUE_EXIT_CODE)
"""


def test_late_copies_of_the_signal_do_not_kill_a_stopping_process():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True)
    assert done.returncode == REQUEUE_EXIT_CODE, done.stderr
    assert done.stdout == "checkpoint written\n"


def _stop_when_rank1_is_signalled(signalled_after: int, sig: int) -> tuple[int, str | None]:
    """Rank 0 sends `sig` to rank 1's process after step `signalled_after`; every rank
    steps until should_stop, and returns that step and the signal it received itself."""
    preemption = PreemptionHandler().install()
    pids = [None] * dist.get_world_size()
    dist.all_gather_object(pids, os.getpid())
    step = 0
    while step < 100:
        step += 1
        if preemption.should_stop(step):
            break
        if step == signalled_after and dist.get_rank() == 0:
            os.kill(pids[1], sig)
        dist.barrier()  # rank 1 is signalled before anyone starts the next step
    return step, preemption.received.name if preemption.received else None


def test_ranks_agree_to_stop_when_only_one_rank_got_the_signal():
    results = run_distributed(_stop_when_rank1_is_signalled, 3, args=(4, signal.SIGTERM))
    assert results == [(5, None), (5, "SIGTERM"), (5, None)]
