"""Launchers: torchrun on one machine, SLURM jobs that requeue themselves, sweeps.

`megagpt launch local|slurm|sweep` and `megagpt sweep-report` (megagpt/launch/cli.py);
the sbatch template is launch/slurm.sbatch.template.
"""
