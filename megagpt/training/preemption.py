"""Stop cleanly when SLURM asks: SIGUSR1 (time-limit warning) or SIGTERM (scancel, preemption).

A signal handler only records that a signal came; the training loop asks, once per
step, whether any rank got one, so every rank leaves after the same step:

    preemption = PreemptionHandler().install()
    for step in ...:
        ...train one step...
        if preemption.should_stop(step):   # collective: every rank calls it
            save_checkpoint(...)
            sys.exit(REQUEUE_EXIT_CODE)     # the sbatch script requeues the job

Signals reach ranks at different moments (or only some ranks: `scancel --signal` to
one node, a forwarded warning that races a step), so a rank deciding alone would
leave the others blocked in the next collective; the all-reduce makes it one decision.

A training process is seconds to minutes from its first step (imports, building the
model, loading a checkpoint), and SIGUSR1's default action is death: `megagpt train`
calls `hold_stop_signals()` first thing, and the handler adopts what came meanwhile.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from megagpt.contract import STOP_SIGNALS

log = logging.getLogger(__name__)

_held: signal.Signals | None = None
"""The first stop signal that came while hold_stop_signals was in charge."""


def hold_stop_signals() -> None:
    """Record stop signals instead of dying of them until a PreemptionHandler installs:
    it adopts the first one, so the run stops, with a checkpoint, after its first step."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _hold)


def _hold(signum: int, frame: FrameType | None) -> None:
    global _held
    if _held is None:
        _held = signal.Signals(signum)


class PreemptionHandler:
    """Records SIGUSR1/SIGTERM and turns them into one stop decision shared by all ranks.

    Args:
        signals: The signals that request a stop.
        check_interval: `should_stop(step)` communicates only on steps that are a
            multiple of this; other steps return False without a collective.
        device: Where the all-reduce tensor lives: "cuda" under NCCL, "cpu" under gloo.
    """

    def __init__(
        self,
        signals: tuple[signal.Signals, ...] = STOP_SIGNALS,
        check_interval: int = 1,
        device: str = "cpu",
    ):
        if check_interval < 1:
            raise ValueError(f"check_interval = {check_interval}: must be 1 or more")
        self.signals = signals
        self.check_interval = check_interval
        self.device = device
        self.received: signal.Signals | None = None
        self.decided: signal.Signals | None = None
        """The stop signal all ranks agreed on, once should_stop said True."""
        self._previous: dict[signal.Signals, object] = {}

    def install(self) -> PreemptionHandler:
        """Replace the handlers of `signals` in this process; returns self. A stop signal
        held since `hold_stop_signals` counts as received here."""
        global _held
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("signal handlers can only be installed from the main thread")
        for sig in self.signals:
            previous = signal.signal(sig, self._record)
            # The hold was for start-up only: after this handler, the default action.
            self._previous[sig] = signal.SIG_DFL if previous is _hold else previous
        if self.received is None and _held in self.signals:
            self.received = _held
            log.warning("%s came while the run was starting: it stops after a step", _held.name)
        _held = None
        return self

    def uninstall(self) -> None:
        """Restore the handlers that were there before `install`."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def __enter__(self) -> PreemptionHandler:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        # Only a flag: the handler can run in the middle of any bytecode, so it must not
        # take locks (logging) or touch the model.
        if signum == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: the user wants out now
        if self.received is None:
            self.received = signal.Signals(signum)

    def requested(self) -> bool:
        """Whether this process has received a stop signal (no communication)."""
        return self.received is not None

    def should_stop(self, step: int) -> bool:
        """Whether any rank received a stop signal; the same answer on every rank.

        A collective when a process group is initialized: every rank must call it at the
        same step. Without a process group it is `requested()`. Once it says True, the
        stop signals are ignored from then on: the process is on its way out.
        """
        if step % self.check_interval:
            return False
        signum = self.received.value if self.received is not None else 0
        signum = _max_over_ranks(signum, self.device)
        if not signum:
            return False
        self.decided = signal.Signals(signum)
        log.warning(
            "step %d: %s received (this rank: %s); stopping after this step",
            step,
            signal.Signals(signum).name,
            self.received.name if self.received else "no signal",
        )
        # Stop signals come in copies (SLURM, the batch shell, the torchrun agent). At
        # interpreter exit Python resets its handlers to the default action, which for
        # SIGUSR1 is death: a late copy would turn a clean exit into "killed by signal".
        # Ctrl-C is a person: pressed again while the checkpoint is saved, it aborts.
        for sig in self.signals:
            quit_now = sig == signal.SIGINT
            signal.signal(sig, signal.default_int_handler if quit_now else signal.SIG_IGN)
        return True


def _max_over_ranks(value: int, device: str) -> int:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int32, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())
