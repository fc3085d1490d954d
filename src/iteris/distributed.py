"""One merge over several processes (``torchrun`` / ``accelerate launch``): torch.distributed, NCCL between
GPUs, gloo between CPUs.

Every rank loads the model, captures its share of every adapter's samples, and the statistics are summed with
``all_reduce`` before anything is derived from them (norms, projections, the Gram's mirrored half), so every
rank holds what a single process would. Each rank solves its share of a stage's layer groups and broadcasts
the results, so every rank runs the same merged model in the next round. Only rank 0 writes.
"""

from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass, field

import torch

from .deltas import DenseDelta, LowRankDelta
from .errors import IterisError


@dataclass
class Ranks:
    """This process's place in the run, and what it has sent and received."""

    rank: int
    world: int
    device: str
    backend: str
    comm_bytes: int = 0
    comm_seconds: float = 0.0
    timings: dict = field(default_factory=dict)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, samples: list, where: str) -> list:
        """This rank's samples: every world-th one, so all ranks see the same mix of lengths."""
        if len(samples) < self.world:
            raise IterisError(f"{where} has {len(samples)} calibration samples for {self.world} processes; every "
                              "process needs at least one: give more samples or start fewer processes")
        return samples[self.rank :: self.world]

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        """Sum each tensor over the ranks, in place: one all_reduce per dtype and device."""
        import torch.distributed as dist

        start = time.perf_counter()
        buckets: dict[tuple, list[torch.Tensor]] = {}
        for t in tensors:
            buckets.setdefault((t.dtype, t.device), []).append(t)
        for group in buckets.values():
            flat = torch.cat([t.reshape(-1) for t in group])
            dist.all_reduce(flat)
            self.comm_bytes += flat.numel() * flat.element_size()
            offset = 0
            for t in group:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()
        self.comm_seconds += time.perf_counter() - start

    def share(self, mine: dict, owner: dict[str, int], order: list[str], device_of) -> dict:
        """Every rank's solved deltas on every rank: each layer's broadcast from the rank that solved it."""
        import torch.distributed as dist

        start = time.perf_counter()
        out = {}
        for src in range(self.world):
            names = [n for n in order if owner[n] == src]
            if not names:
                continue
            meta = [None]
            if src == self.rank:
                meta = [{n: _describe(mine[n]) for n in names}]
            dist.broadcast_object_list(meta, src=src, device=self._object_device())
            for name in names:
                kind, shapes, dtype = meta[0][name]
                if src == self.rank:
                    tensors = [t.contiguous() for t in _tensors(mine[name])]
                else:
                    tensors = [torch.empty(s, dtype=dtype, device=device_of(name)) for s in shapes]
                for t in tensors:
                    dist.broadcast(t, src=src)
                    self.comm_bytes += t.numel() * t.element_size()
                out[name] = LowRankDelta(B=tensors[0], A=tensors[1]) if kind == "lowrank" else DenseDelta(D=tensors[0])
        self.comm_seconds += time.perf_counter() - start
        return out

    def _object_device(self):
        return torch.device(self.device) if self.backend == "nccl" else None

    def gather(self, value) -> list:
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()


def _describe(delta) -> tuple:
    tensors = _tensors(delta)
    return ("lowrank" if isinstance(delta, LowRankDelta) else "dense", [tuple(t.shape) for t in tensors], tensors[0].dtype)


def _tensors(delta) -> list[torch.Tensor]:
    return [delta.B, delta.A] if isinstance(delta, LowRankDelta) else [delta.D]


def from_environment() -> Ranks | None:
    """The process group torchrun (or accelerate) describes in the environment; None for a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        minutes = float(os.environ.get("ITERIS_DIST_TIMEOUT_MINUTES", "30"))
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=minutes))
    backend = dist.get_backend()
    rank = dist.get_rank()
    local = int(os.environ.get("LOCAL_RANK", rank))
    if backend == "nccl":
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    else:
        device = "cpu"
    return Ranks(rank=rank, world=dist.get_world_size(), device=device, backend=backend)
