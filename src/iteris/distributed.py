"""One merge over several processes (``torchrun`` / ``accelerate launch``): torch.distributed, NCCL between
GPUs, gloo between CPUs.

Every rank loads the model and captures its share of every adapter's samples. Each layer group of a stage is
solved by one rank (dealt out by the cost of its solves); the raw statistics are summed into that rank with
``reduce`` before anything is derived from them (norms, projections, the Gram's mirrored half), so it holds
what a single process would, and it broadcasts the solved factors, so every rank runs the same merged model
in the next round. Only rank 0 writes.
"""

from __future__ import annotations

import contextlib
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

    def owners(self, costs: dict[str, float]) -> dict[str, int]:
        """Which rank solves each layer group: the costliest first, each to the least loaded rank."""
        load = [0.0] * self.world
        out = {}
        for name in sorted(costs, key=lambda n: -costs[n]):
            rank = min(range(self.world), key=lambda r: load[r])
            out[name] = rank
            load[rank] += costs[name]
        return out

    def sum_to(self, tensors_by_rank: dict[int, list[torch.Tensor]]) -> None:
        """Sum tensors over the ranks into the rank that will use them (in place there; the other ranks'
        copies are left as partial sums): one reduce per destination, dtype and device."""
        start = time.perf_counter()
        with self._talking():
            self._sum_to(tensors_by_rank)
        self.comm_seconds += time.perf_counter() - start

    def _sum_to(self, tensors_by_rank: dict[int, list[torch.Tensor]]) -> None:
        import torch.distributed as dist

        for dst in sorted(tensors_by_rank):
            buckets: dict[tuple, list[torch.Tensor]] = {}
            for t in tensors_by_rank[dst]:
                buckets.setdefault((t.dtype, t.device), []).append(t)
            for group in buckets.values():
                flat = torch.cat([t.reshape(-1) for t in group])
                dist.reduce(flat, dst=dst)
                self.comm_bytes += flat.numel() * flat.element_size()
                if dst == self.rank:
                    offset = 0
                    for t in group:
                        t.copy_(flat[offset : offset + t.numel()].view_as(t))
                        offset += t.numel()

    def share(self, mine: dict, owner: dict[str, int], order: list[str], device_of) -> dict:
        """Every rank's solved deltas on every rank: each layer's broadcast from the rank that solved it."""
        start = time.perf_counter()
        with self._talking():
            out = self._share(mine, owner, order, device_of)
        self.comm_seconds += time.perf_counter() - start
        return out

    def _share(self, mine: dict, owner: dict[str, int], order: list[str], device_of) -> dict:
        import torch.distributed as dist

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
        return out

    @contextlib.contextmanager
    def _talking(self):
        """A collective whose peer died surfaces as an error that says so, not as a transport message."""
        try:
            yield
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise IterisError(f"process {self.rank} of {self.world}: another process of this merge stopped (its own "
                              f"error says why); here: {first}") from exc

    def _object_device(self):
        return torch.device(self.device) if self.backend == "nccl" else None

    def gather(self, value) -> list:
        import torch.distributed as dist

        out = [None] * self.world
        with self._talking():
            dist.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        import torch.distributed as dist

        with self._talking():
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
