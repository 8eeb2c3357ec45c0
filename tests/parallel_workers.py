"""Functions run on gloo ranks by the parallel tests (importable, so spawn can find them)."""

from __future__ import annotations

from torch.distributed.tensor import DTensor

from megagpt.config import Config
from megagpt.data import build_datasets
from megagpt.parallel import init_distributed
from megagpt.parallel.batches import step_batches
from megagpt.parallel.parallelize import parallelize


def first_step_gradients(config: Config):
    """Loss and full (gathered) gradients of every parameter after one step's backward."""
    env = init_distributed("cpu")
    model = parallelize(config, env)
    datasets = build_datasets(config.data, config.train.seed)
    loss = model.global_mean(model.train_step(step_batches(datasets.train, 0, model, config)))
    model.sync_tied_gradients()
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad
        grads[name] = (grad.full_tensor() if isinstance(grad, DTensor) else grad).clone()
    return loss, grads
