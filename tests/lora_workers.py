"""Functions run on gloo ranks by the LoRA tests (importable, so spawn can find them)."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from megagpt.config import Config
from megagpt.data import build_datasets
from megagpt.parallel import init_distributed
from megagpt.parallel.batches import step_batches
from megagpt.parallel.init import local_piece
from megagpt.parallel.parallelize import parallelize


def adapter_layouts(config: Config) -> dict[str, tuple]:
    """How every parameter of the first layer's attention and MLP is placed on the tensor
    mesh dimension, with its requires_grad flag."""
    env = init_distributed("cpu")
    module = parallelize(config, env)
    layouts = {}
    for name, param in module.named_parameters():
        if name.startswith("layers.0.") and "norm" not in name:
            tp = param.placements[-1] if isinstance(param, DTensor) else None
            layouts[name] = (tp, param.requires_grad)
    return layouts


@torch.no_grad()
def _randomize_b(module) -> None:
    """B drawn from a seeded generator (the same full values on every layout), so that
    both A and B get gradients in the first step."""
    for name, param in module.named_parameters():
        if name.endswith("lora_B"):
            generator = torch.Generator().manual_seed(len(name))
            full = torch.randn(param.shape, generator=generator) * 0.1
            local = param.to_local() if isinstance(param, DTensor) else param
            local.copy_(local_piece(full, param))


def adapter_gradients(config: Config) -> tuple[float, dict[str, torch.Tensor]]:
    """The first step's loss and the full gradients of every parameter that gets one,
    with random B."""
    env = init_distributed("cpu")
    module = parallelize(config, env)
    _randomize_b(module)
    datasets = build_datasets(config.data, config.train.seed)
    loss = module.global_mean(module.train_step(step_batches(datasets.train, 0, module, config)))
    grads = {}
    for name, param in module.named_parameters():
        if param.grad is not None:
            grad = param.grad
            grads[name] = (grad.full_tensor() if isinstance(grad, DTensor) else grad).clone()
    return loss, grads


def forward_collectives(config: Config) -> dict[str, int]:
    """The collectives of one forward (an evaluation microbatch), by operation name."""
    from torch.distributed.tensor.debug import CommDebugMode

    env = init_distributed("cpu")
    module = parallelize(config, env)
    batches = step_batches(build_datasets(config.data, config.train.seed).train, 0, module, config)
    with CommDebugMode() as comm:
        module.eval_step(batches[:1], supervised=1)
    return {str(op): n for op, n in comm.get_comm_counts().items()}
