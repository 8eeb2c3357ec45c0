"""Process groups and the application of parallelism to a plain model."""

from megagpt.parallel.env import DistributedEnv, init_distributed, shutdown_distributed

__all__ = ["DistributedEnv", "init_distributed", "shutdown_distributed"]
