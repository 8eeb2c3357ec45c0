import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from megagpt.contract import REQUEUE_EXIT_CODE
from megagpt.testing import run_distributed
from megagpt.training.preemption import PreemptionHandler
from tests.conftest import tiny_overrides


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


HELD = """
import os, signal
from megagpt.training.preemption import PreemptionHandler, hold_stop_signals
hold_stop_signals()
os.kill(os.getpid(), signal.SIGUSR1)  # during start-up: SIGUSR1's default would kill
os.kill(os.getpid(), signal.SIGTERM)  # a second signal: the first one counts
with PreemptionHandler() as preemption:
    assert preemption.received == signal.SIGUSR1 and preemption.should_stop(1)
assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the hold ended
print("held", flush=True)
"""


def test_a_signal_held_since_start_up_counts_once_the_handler_installs():
    done = subprocess.run([sys.executable, "-c", HELD], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "held\n"


def catches(pid: int, sig: signal.Signals) -> bool:
    """Whether process `pid` has a handler for `sig` (SigCgt in /proc/PID/status)."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = int(re.search(r"^SigCgt:\s*([0-9a-f]+)", status, re.M)[1], 16)
    return bool(mask >> (sig - 1) & 1)


def test_megagpt_train_signalled_while_starting_stops_after_its_first_step(
    dataset_prefix, tokenizer, tmp_path
):
    overrides = tiny_overrides(dataset_prefix, tokenizer, tmp_path)
    command = [sys.executable, "-m", "megagpt", "train", *overrides, "train.max_steps=1000"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not catches(process.pid, signal.SIGUSR1):  # Python startup: microseconds to go
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.001)
    process.send_signal(signal.SIGUSR1)  # seconds before the model exists
    log = process.communicate(timeout=300)[0]
    assert process.returncode == REQUEUE_EXIT_CODE, log[-3000:]
    assert "SIGUSR1 came while the run was starting" in log
    assert "step 1: SIGUSR1 received (this rank: SIGUSR1); stopping after this step" in log
    assert (tmp_path / "checkpoints" / "step_00000001").is_dir(), log[-3000:]
