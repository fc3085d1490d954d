"""A sweep's stage solves on a worker thread (and, on a GPU, a side stream), so that a block's solve runs
while the next block is captured."""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch

from .stats import map_tensors


class OverlappedSolves:
    """At most one solve is in flight: submitting the next waits for it (that wait, the only solve time the
    captures see, is ``waited``). Host syncs inside a solve (its factorisation checks) block only the
    worker. The statistics are marked as used on the side stream, so their memory is not reused before
    the solve has read them; the deltas, as used on the main stream afterwards."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.main = torch.cuda.current_stream(device) if self.cuda else None
        self.side = torch.cuda.Stream(device) if self.cuda else None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="iteris-solve")
        self.pending: Future | None = None
        self.waited = 0.0

    def submit(self, solve: Callable[[], dict], per_task: list[dict], before=None) -> dict:
        """Start ``solve()`` (reading ``per_task``'s statistics), after ``before()`` (run on the worker, on its
        stream); returns the previous stage's deltas (empty for the first)."""
        done = self._collect()
        if self.cuda:
            self.side.wait_stream(self.main)  # the statistics are complete when the solve starts
            for stats in per_task:
                for st in stats.values():
                    map_tensors(st, self._used_on_side)
        self.pending = self.pool.submit(self._run, solve, before)
        return done

    def _used_on_side(self, t: torch.Tensor) -> torch.Tensor:
        if t.device == self.side.device:
            t.record_stream(self.side)
        return t

    @torch.no_grad()  # grad mode is per thread
    def _run(self, solve, before) -> dict:
        if not self.cuda:
            if before is not None:
                before()
            return solve()
        with torch.cuda.stream(self.side):
            if before is not None:
                before()
            out = solve()
        for delta in out.values():
            for t in vars(delta).values():
                if isinstance(t, torch.Tensor) and t.device == self.main.device:
                    t.record_stream(self.main)
        return out

    def _collect(self) -> dict:
        if self.pending is None:
            return {}
        start = time.perf_counter()
        out = self.pending.result()
        self.pending = None
        if self.cuda:
            self.main.wait_stream(self.side)
        self.waited += time.perf_counter() - start
        return out

    def finish(self) -> dict:
        return self._collect()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
