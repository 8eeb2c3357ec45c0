"""The error type of the launchers."""

from megagpt.errors import MegagptError


class LaunchError(MegagptError):
    """A launch cannot be done as asked: an option that does not fit, not inside a SLURM
    job, or sbatch (or another SLURM command) failed or is not installed here."""
