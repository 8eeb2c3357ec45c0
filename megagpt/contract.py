"""The contract between launchers and the trainer: exit codes, stop signals, timeout.

Both sides import it, and it imports nothing, so neither side depends on the other:
`megagpt.launch` (torchrun agent, sbatch template, SLURM task) and `megagpt.training`
(preemption handler, watchdog, process-group setup).
"""

from __future__ import annotations

import signal

REQUEUE_EXIT_CODE = 75
"""Exit code of a run that stopped on request and saved a checkpoint: "resume me".
75 is EX_TEMPFAIL in sysexits.h. The sbatch template requeues the job on it."""

WATCHDOG_EXIT_CODE = 76
"""Exit code of a rank that the hang watchdog stopped: hung, not finished; the job may
be requeued to resume from the last checkpoint."""

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
"""Signals that ask training to checkpoint and exit with REQUEUE_EXIT_CODE: SLURM's
time-limit warning (`--signal=B:USR1@T`, forwarded by the sbatch script), and SIGTERM
(scancel, preemption)."""

COLLECTIVE_TIMEOUT_ENV = "MEGAGPT_COLLECTIVE_TIMEOUT_S"
"""Seconds a collective may wait before the process group gives up (gloo raises; NCCL
with TORCH_NCCL_ASYNC_ERROR_HANDLING=3 aborts the process). Set by the launchers, read
by the trainer unless train.collective_timeout_s is set."""

DEFAULT_COLLECTIVE_TIMEOUT_S = 600
