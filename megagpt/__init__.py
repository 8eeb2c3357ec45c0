"""megagpt: pretrain GPT language models, from one CPU to a SLURM GPU cluster."""

__version__ = "0.1.0"
