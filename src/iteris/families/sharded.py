"""A base model larger than one GPU, under torchrun: each block of the stack holding the target layers is
sharded over the processes with FSDP2 (``fully_shard``), so each process keeps 1/N of every block's weights.

The block walk gathers a block once per visit (``gather``), runs every sample of the process through it,
and frees it again (``release``); any other call of a block (the probes) gathers and frees it around
itself. The embeddings, final norm and head stay whole on every process. Each
process reads only its own rows of each block weight from the safetensors files, so no process ever holds
the whole model, on the GPU or in CPU memory.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from ..engine.blocks import block_list
from ..engine.sharding import is_unit, rows_of
from ..errors import IterisError
from ..files import load_json
from ..finite import check_parameters
from .loading import auto_class

SETTINGS = ("auto", "blocks", "off")
AUTO_FRACTION = 0.4  # auto: shard where the checkpoint takes more than this share of one GPU's memory


class NotShardable(IterisError):
    """This model (or this merge) cannot run with its blocks sharded; ``auto`` then holds it whole."""


def wanted(setting: str, path: str, ranks) -> bool:
    """Whether this merge shards the model's blocks over its processes."""
    if setting == "off" or ranks is None:
        return False
    if setting == "blocks":
        return True
    if not ranks.device.startswith("cuda"):
        return False
    return checkpoint_bytes(path) > AUTO_FRACTION * torch.cuda.get_device_properties(ranks.device).total_memory


def checkpoint_bytes(path: str) -> int:
    index = Path(path) / "model.safetensors.index.json"
    if index.is_file():
        return int(_index(index).get("metadata", {}).get("total_size", 0))
    return sum(f.stat().st_size for f in _checkpoint_files(path))


def _index(path: Path) -> dict:
    """A sharded checkpoint's index: {"weight_map": {tensor: file}, "metadata": {...}}."""
    index = load_json(path, "checkpoint index")
    files = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(files, dict) or not all(isinstance(f, str) for f in files.values()):
        raise IterisError(f"checkpoint index '{path}' has no weight_map of tensor names to file names in its folder")
    if not isinstance(index.get("metadata", {}), dict):
        raise IterisError(f"checkpoint index '{path}': metadata must be a mapping")
    return index


def _checkpoint_files(path: str) -> list[Path]:
    """The model's safetensors files: those its index names, or the single model.safetensors."""
    root = Path(path)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        return sorted({root / name for name in _index(index)["weight_map"].values()})
    return [root / "model.safetensors"] if (root / "model.safetensors").is_file() else []


def load_sharded(path: str, task_type: str | None, extra_tensors: dict, dtype: torch.dtype, layer_names: list[str],
                 ranks, trust_remote_code: bool = False) -> nn.Module:
    """The base model with its blocks sharded over ``ranks``, built empty and filled from the checkpoint."""
    from accelerate import init_empty_weights
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    files = _checkpoint_files(path)
    if not files:
        raise NotShardable(f"sharding a model over processes reads its rows from a local safetensors checkpoint "
                           f"(model.safetensors or an index of shards); '{path}' has none: save it with "
                           "save_pretrained into a directory, or set calibration.shard: off")
    auto_cls, config, kwargs = auto_class(path, task_type, extra_tensors, trust_remote_code)
    for key, value in kwargs.items():
        setattr(config, key, value)
    with init_empty_weights(include_buffers=False):  # parameters on the meta device, buffers (rotary tables) real
        model = auto_cls.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    found = block_list(model, layer_names)
    if found is None or getattr(model.config, "is_encoder_decoder", False):
        raise NotShardable(f"{type(model).__name__} does not keep its target layers in one list of blocks walked "
                           "in turn, so its blocks cannot be sharded over processes; set calibration.shard: off")
    odd = sorted({type(model.get_submodule(n)).__name__ for n in layer_names} - {"Linear"})
    if odd:
        raise NotShardable(f"sharding over processes splits nn.Linear weights by rows; target layers of type {odd} "
                           "are not: set calibration.shard: off")
    device_type = "cuda" if ranks.device.startswith("cuda") else "cpu"
    mesh = init_device_mesh(device_type, (ranks.world,))
    for block in found[0]:
        # a block called on its own is an FSDP root, which by default keeps its weights gathered after a call
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    model.to_empty(device=ranks.device)
    model.tie_weights()  # to_empty parts tied weights (a head tied to the embeddings has no tensor of its own)
    with torch.no_grad():
        for name, value in buffers.items():
            model.get_buffer(name).copy_(value)
        _read_weights(model, files, ranks)
    model.eval().requires_grad_(False)
    check_parameters(model, f"base model '{path}'")
    return model


def _read_weights(model: nn.Module, files: list[Path], ranks) -> None:
    """Each parameter from the checkpoint by its own name; of a sharded one, only this process's rows (as
    FSDP2 splits them: torch.chunk along dim 0)."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor

    params = dict(model.named_parameters())
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                param = params.pop(key, None)
                if param is None:
                    continue
                if not isinstance(param, DTensor):
                    param.copy_(f.get_tensor(key))
                    continue
                local = param.to_local()
                start, stop = rows_of(f.get_slice(key).get_shape()[0], ranks)
                if local.shape[0] != stop - start:
                    raise IterisError(f"'{key}': this process holds {local.shape[0]} rows of it, expected {stop - start}")
                if stop > start:
                    local.copy_(f.get_slice(key)[start:stop])
    if params:
        missing = sorted(params)
        raise IterisError(f"the checkpoint lacks {len(missing)} of the model's weights under their own names (e.g. "
                          f"{missing[:3]}); a sharded load reads them by name: set calibration.shard: off")
