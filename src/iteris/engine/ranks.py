"""One merge over several processes (``torchrun`` / ``accelerate launch``): torch.distributed, NCCL between
GPUs, gloo between CPUs.

Every rank loads the model. Each layer group is solved by one rank (dealt out by the cost of its solves), which
must hold every adapter's statistics of it exactly as a single process would. Two ways to get them there:

- split by adapters: each rank captures whole adapters (all their samples), so their statistics are complete
  where they are captured; a group's statistics then travel once, point to point, from the adapter's rank to
  the group's, and norms (the alpha1 term's ||X^T Xh||) need no traffic at all. With fewer adapters than
  ranks, each adapter has its own group of ranks, a share of its samples each, whose shares travel point to
  point to the solving rank and are summed there;
- split by samples: every rank captures a share of every adapter's samples, and the raw sums are ``reduce``d
  into the solving rank before anything is derived from them (norms, projections, the Gram's mirrored half).

The solving rank broadcasts the solved factors, so every rank runs the same merged model in the next round.
Only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import time
from dataclasses import dataclass

import torch

from ..deltas import DenseDelta, LowRankDelta
from ..errors import IterisError


@dataclass
class Ranks:
    """This process's place in the run, and what it has sent and received."""

    rank: int
    world: int
    device: str
    backend: str
    comm_bytes: int = 0
    comm_seconds: float = 0.0
    owns_group: bool = False  # this merge started the process group (torchrun's environment), so it ends it

    def close(self) -> None:
        """After the merge, once its model and statistics are dropped: what still refers to the process group
        (a sharded model's blocks do, in reference cycles) is collected while the interpreter is whole, then the
        group this merge started is ended. Left to the interpreter's exit, gloo's worker threads can outlive the
        objects they use and abort the process after a merge that succeeded."""
        gc.collect()
        if self.owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, samples: list, where: str, among: tuple[int, ...] | None = None) -> list:
        """This rank's samples: every n-th one of the ``among`` ranks' (all ranks by default), so all of them
        see the same mix of lengths; none for a rank outside ``among``."""
        among = tuple(range(self.world)) if among is None else among
        if len(samples) < len(among):
            raise IterisError(f"{where} has {len(samples)} calibration samples for {len(among)} processes; every "
                              "process needs at least one: give more samples, start fewer processes, or (with at least "
                              "as many adapters as processes) set calibration.split: adapters")
        if self.rank not in among:
            return []
        return samples[among.index(self.rank) :: len(among)]

    def holders(self, sizes: list[int], split: str) -> list[tuple[int, ...] | None]:
        """Which ranks capture each adapter (None: all ranks, their shares of its samples summed by ``reduce``).

        ``split`` adapters: with at least as many adapters as ranks, each adapter whole on one rank, dealt out by
        size (tokens); with fewer, each adapter on its own group of world / adapters ranks, a share of its
        samples each. samples: every adapter shared by all ranks. auto: adapters where either count divides
        the other."""
        n, world = len(sizes), self.world
        if split == "auto":
            split = "adapters" if n % world == 0 or world % n == 0 else "samples"
        if split == "samples":
            return [None] * n
        if n < world:
            if world % n:
                raise IterisError(f"calibration.split: adapters gives each of the {n} adapters an equal group of the "
                                  f"{world} processes; {world} is not a multiple of {n}: set calibration.split: "
                                  "samples (or auto), or start a multiple of the adapters' number")
            group = world // n
            return [tuple(range(i * group, (i + 1) * group)) for i in range(n)]
        dealt = _deal(dict(enumerate(sizes)), world)
        return [(dealt[i],) for i in range(n)]

    def owners(self, costs: dict[str, float]) -> dict[str, int]:
        """Which rank solves each layer group: the costliest first, each to the least loaded rank."""
        return _deal(costs, self.world)

    def sum_to(self, tensors_by_rank: dict[int, list[torch.Tensor]]) -> None:
        """Sum tensors over the ranks into the rank that will use them (in place there; the other ranks'
        copies are left as partial sums): large contiguous tensors reduced in place, the others packed into one
        reduce per destination, dtype and device."""
        start = time.perf_counter()
        with self._talking():
            self._sum_to(tensors_by_rank)
        self.comm_seconds += time.perf_counter() - start

    def _sum_to(self, tensors_by_rank: dict[int, list[torch.Tensor]]) -> None:
        import torch.distributed as dist

        for dst in sorted(tensors_by_rank):
            buckets: dict[tuple, list[torch.Tensor]] = {}
            for t in tensors_by_rank[dst]:
                if t.numel() >= 1 << 16 and t.is_contiguous():  # large: in place, no packing copies
                    dist.reduce(t, dst=dst)
                    self.comm_bytes += t.numel() * t.element_size()
                else:
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

    def exchange(self, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]]) -> list:
        """Point to point, in one batch: each tensor of ``sends`` to its rank, each of ``recvs`` filled from its
        rank (messages between two ranks pair up in the order given). Returns what is in flight, for
        ``settle``: nothing waits here, so the captures queued meanwhile never wait for a peer still capturing
        what it will send."""
        if not sends and not recvs:
            return []
        import torch.distributed as dist

        start = time.perf_counter()
        ops = [dist.P2POp(dist.isend, t, peer) for t, peer in sends]
        ops += [dist.P2POp(dist.irecv, t, peer) for t, peer in recvs]
        with self._talking():
            works = dist.batch_isend_irecv(ops)
        self.comm_bytes += sum(t.numel() * t.element_size() for t, _ in sends + recvs)
        self.comm_seconds += time.perf_counter() - start
        # what is sent stays alive until settled on the stream that allocated it; what is received lives in the
        # statistics it fills, read only after a settle
        return [(works, [t for t, _ in sends])]

    def settle(self, in_flight: list) -> None:
        """What ``exchange`` returned is complete for whatever the current stream runs next (on a GPU the
        stream waits, not the host; a solve's side stream can wait alone, leaving the captures running); then
        what was to follow the arrival (callables in ``in_flight``) runs, once, on this stream."""
        self._settle(in_flight, then=True)

    def wait_for(self, in_flight: list) -> None:
        """``settle`` without running what follows the arrival: the sent tensors may be reused after this."""
        self._settle(in_flight, then=False)

    def _settle(self, in_flight: list, then: bool) -> None:
        start = time.perf_counter()
        with self._talking():
            for entry in in_flight:
                if not callable(entry):
                    for work in entry[0]:
                        work.wait()
        if then:
            for entry in in_flight:
                if callable(entry):
                    entry()
        in_flight.clear()
        self.comm_seconds += time.perf_counter() - start

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


def _deal(costs: dict, world: int) -> dict:
    """Items to ranks, the costliest first, each to the least loaded rank (ties: the lowest rank)."""
    load = [0.0] * world
    out = {}
    for key in sorted(costs, key=lambda k: -costs[k]):
        rank = min(range(world), key=lambda r: load[r])
        out[key] = rank
        load[rank] += costs[key]
    return out


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

    started = not dist.is_initialized()
    if started:
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
    # every rank's first collective together (NCCL wants it so before point-to-point batches)
    dist.barrier(device_ids=[local]) if backend == "nccl" else dist.barrier()
    return Ranks(rank=rank, world=dist.get_world_size(), device=device, backend=backend, owns_group=started)
