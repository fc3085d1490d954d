"""Blocks sharded over processes (FSDP2, see ``families/sharded.py``) as the walk meets them: gathered once
per visit, released after it, and the adapted weight norms taken from the row shards each process holds."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..deltas import LoraModule
from ..solve import weight_norm_sq


def is_unit(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def fsdp_units(module: nn.Module) -> list[nn.Module]:
    """The sharded blocks in a module (itself, if it is one; every one of a model, those past its last target
    layer too)."""
    return [m for m in module.modules() if is_unit(m)]


def gather(block: nn.Module) -> None:
    """The block's whole weights on every process (a collective: all processes, same order), kept until
    ``release``: processes run different numbers of calls of it meanwhile, so no call may gather or free."""
    for unit in fsdp_units(block):
        unit.set_reshard_after_forward(False)
        unit.unshard()


def release(block: nn.Module) -> None:
    for unit in fsdp_units(block):
        unit.reshard()
        unit.set_reshard_after_forward(True)  # a call outside the walk (the probes) frees the block after itself


def adapted_weight_norms(layers: dict[str, nn.Module], loras: dict[str, list], ranks) -> dict[str, list[float]]:
    """||W0 + s B A||_F^2 for every layer and adapter (None: ||W0||^2), from the row shards each process holds,
    summed over the processes in one all_reduce. Every process calls it, with the same layers.

    Over rows, ||W0 + s B A||^2 is a sum of the same norm of each row shard (W0 and B cut alike), so each
    process takes ``weight_norm_sq`` of its shard: ||W0_r||^2 and, per adapter, what the adapter adds to it."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor


    names = sorted(layers)
    partial = []
    for name in names:
        weight = layers[name].weight
        if isinstance(weight, DTensor):
            share, local = slice(*rows_of(weight.shape[0], ranks)), weight.to_local()
        else:  # whole on every process: counted once
            share = slice(0, weight.shape[0] if ranks.rank == 0 else 0)
            local = weight[share]
        W0 = local.detach()
        partial.append(weight_norm_sq(W0, None))
        partial += [weight_norm_sq(W0, LoraModule(A=lora.A, B=lora.B[share], scale=lora.scale), base_sq=0.0)
                    for lora in loras[name] if lora is not None]
    total = torch.tensor(partial, dtype=torch.float64, device=ranks.device)
    if ranks.world > 1:
        dist.all_reduce(total)
    values = iter(total.tolist())
    out = {}
    for name in names:
        base_sq = next(values)
        out[name] = [base_sq if lora is None else base_sq + next(values) for lora in loras[name]]
    return out


def rows_of(rows: int, ranks) -> tuple[int, int]:
    """The rows [start, stop) of a dim-0-sharded weight this process holds, as FSDP2 splits them (torch.chunk)."""
    size = math.ceil(rows / ranks.world)
    return min(ranks.rank * size, rows), min((ranks.rank + 1) * size, rows)
