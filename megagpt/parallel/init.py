"""Initialize parameters that may be sharded, to exactly the single-process values.

`GPT.initial_value` gives each parameter's full value from a generator seeded by its
name. A rank keeps its own piece: the tensor-parallel slice of the full tensor, then
FSDP's dim-0 chunk of that slice (FSDP2 shards the tensor-parallel local tensor,
which is why its global placement is "strided"); routed experts likewise: the
expert-parallel share, then FSDP's chunk of it. Only one full parameter exists at a
time, so a model too large for one device can be initialized after sharding.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard

from megagpt.model.gpt import GPT


def local_piece(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The part of `full` that this rank stores for `param` (a tensor or DTensor)."""
    if not isinstance(param, DTensor):
        return full
    mesh, placements = param.device_mesh, param.placements
    names = mesh.mesh_dim_names or ()
    piece = full
    if "tp" in names:
        tp_placement = placements[names.index("tp")]
        piece = distribute_tensor(piece, mesh["tp"], [tp_placement], src_data_rank=None)
        piece = piece.to_local()
    if "ep" in names:  # routed experts: whole experts per expert-parallel rank
        piece = torch.chunk(piece, mesh.size(names.index("ep")), dim=0)[mesh.get_local_rank("ep")]
    for fsdp_dim in ("dp_shard_cp", "efsdp"):  # FSDP2's shard dimension (dense, experts)
        if fsdp_dim not in names:
            continue
        index = names.index(fsdp_dim)
        # FSDP2 marks dim-0 shards of tensor-parallel shards as _StridedShard, which
        # (in torch 2.13) is neither a Shard subclass nor reports is_shard().
        if isinstance(placements[index], (Shard, _StridedShard)):
            chunks = list(torch.chunk(piece, mesh.size(index), dim=0))
            rank = mesh.get_local_rank(fsdp_dim)
            piece = chunks[rank] if rank < len(chunks) else piece[:0]
    return piece


def materialize_shards(part: GPT, device: torch.device, seed: int) -> None:
    """Allocate a (meta, possibly sharded) model part on `device` and initialize it."""
    part.to_empty(device=device)
    part.tie_weights()
    init_parameters(part, seed)


@torch.no_grad()
def init_parameters(part: GPT, seed: int) -> None:
    """Fill every parameter of `part` (sharded or not) and rebuild its buffers."""
    for name, param in part.named_parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        full = part.initial_value(name, param.shape, seed, local.device)
        piece = local_piece(full, param)
        if piece.shape != local.shape:
            raise RuntimeError(
                f"initializing {name}: this rank's piece has shape "
                f"{tuple(piece.shape)} but it stores {tuple(local.shape)}"
            )
        local.copy_(piece)
    part.reset_buffers()
