"""IterIS: alternate between running the merged model (inference) and per-layer closed-form solves."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..engine import BlockFit, CaptureSpec, DistilledSweep, GlobalSweep, GroupStats, LayerGroup, SequentialSweep
from ..deltas import LowRankDelta, relative_change
from ..errors import IterisError
from ..solve import (
    TaskLayerStats, adaptive_weight, iteris_solve, iteris_solve_many, iteris_solve_samples, pretrain_rhs,
)
from .base import MergeContext, param, register
from .blockfit import fit_block


DEFAULT_ITERATIONS = 10  # the paper's
DEFAULT_REFINE_STEPS = 256  # chosen on the 8-task validation split (benchmarks/quality/results/protocol)


def _on_gpu(device: str) -> bool:
    return str(device).startswith("cuda")


@dataclass
class IterISParams:
    iterations: int | None = param(
        None, "inference-solving rounds after the initial solve under the global schedule (default 10; 0: the "
        "initial, RegMean-like solve only); setting it asks for the global schedule where schedule is auto"
    )
    gamma: float = param(0.0, "Xh = (1 - gamma) X_merged + gamma X_own: pulls the inputs back to each adapter's own")
    alpha1: float = param(1e-7, "Tikhonov weight on X^T Xh, times its Frobenius norm")
    alpha2: float = param(1e-7, "Tikhonov weight on Xh^T Xh, times its Frobenius norm")
    adaptive_weights: bool = param(True, "c_i = ||W0 + dW_i||^2 / ||X_i (W0 + dW_i)^T||^2, balancing task scales")
    with_pretrain_matrix: bool = param(False, "fit the whole weight W0 + dW instead of the delta (dense result)")
    tol: float | None = param(None, "stop early once the merged deltas change by less than this (relative)")
    solve_space: str = param(
        "auto",
        "auto: solve a layer group in sample space (an n x n Cholesky, n the tokens of all tasks) when there are "
        "fewer tokens than input features, else with its Grams; features: always the Grams; samples: always the "
        "tokens (alpha2 > 0; the inputs are then kept, not their Gram)",
    )
    schedule: str = param(
        "auto",
        "sequential: one sweep in depth order, each layer solved on the inputs of the already-merged layers before "
        "it (iterations unused; as good as the paper's rounds at a fifth of their time on a GPU); global: the "
        "paper's rounds (solve every layer, then rerun the merged model); auto: sequential where the model runs "
        "as a plain chain of blocks and no iterations, tol or with_pretrain_matrix is set, else global",
    )
    refine_steps: int | None = param(
        None,
        "after each block's closed-form solve (schedule: sequential), Adam steps on the block's merged LoRA "
        "factors so that the merged block, on the merged model's input, gives each adapter's own block output "
        "(task-balanced); the result stays an exact rank sum r_i LoRA. 0: the closed form alone; default: 256 "
        "on a GPU, 0 on a CPU (where the steps would take most of the time)",
    )
    refine_lr: float = param(3e-2, "the refinement's step size, relative to each factor's root mean square "
                                   "(chosen on validation from 3e-3, 1e-2, 3e-2)")
    refine_loss: str = param(
        "balanced",
        "balanced: each task's mean per-token residual over its own block's energy per token (every task counts "
        "alike); sum: the plain sum of squares over all tokens (ProDistill's; tasks with long prompts count more)",
    )

    def resolved_schedule(self, walks_blocks: bool) -> str:
        """auto: sequential where the model is a plain chain of blocks and no setting only the paper's rounds
        read is given; elsewhere the paper's global rounds."""
        if self.schedule != "auto":
            return self.schedule
        plain = walks_blocks and not self.with_pretrain_matrix and self.tol is None and self.iterations is None
        return "sequential" if plain else "global"

    def resolved_refine_steps(self, schedule: str, device: str) -> int:
        if self.refine_steps is not None:
            return self.refine_steps
        fits = schedule == "sequential" and not self.with_pretrain_matrix and _on_gpu(device)
        return DEFAULT_REFINE_STEPS if fits else 0

    def overlaps_solves(self) -> bool:
        """The global rounds solve a block while the next is captured (on a GPU)."""
        return self.resolved_schedule(True) == "global"

    def wants_responses(self, device: str) -> bool:
        """Calibrate on each adapter's own continuations where the merge refines (chosen on the validation
        split: 1.009 against 0.990 at N = 8, benchmarks/quality/results/protocol)."""
        return bool(self.resolved_refine_steps(self.resolved_schedule(True), device))

    def validate(self):
        if self.iterations is not None and self.iterations < 0:
            raise IterisError("iteris: iterations must be >= 0")
        if not 0.0 <= self.gamma <= 1.0:
            raise IterisError(f"iteris: gamma must be in [0, 1], got {self.gamma}")
        if self.alpha1 < 0 or self.alpha2 < 0:
            raise IterisError("iteris: alpha1 and alpha2 must be >= 0")
        if self.solve_space not in ("auto", "features", "samples"):
            raise IterisError(f"iteris: solve_space must be auto, features or samples, got '{self.solve_space}'")
        if self.solve_space == "samples" and (self.alpha2 == 0 or self.with_pretrain_matrix):
            raise IterisError("iteris: solve_space: samples needs alpha2 > 0 and with_pretrain_matrix: false")
        if self.schedule not in ("auto", "global", "sequential"):
            raise IterisError(f"iteris: schedule must be auto, global or sequential, got '{self.schedule}'")
        if self.refine_loss not in ("balanced", "sum"):
            raise IterisError(f"iteris: refine_loss must be balanced or sum, got '{self.refine_loss}'")
        if (self.refine_steps is not None and self.refine_steps < 0) or self.refine_lr <= 0:
            raise IterisError("iteris: refine_steps must be >= 0 and refine_lr > 0")
        if self.refine_steps and (self.schedule == "global" or self.with_pretrain_matrix):
            raise IterisError("iteris: refine_steps needs schedule: sequential and with_pretrain_matrix: false "
                              "(the refinement follows each block's sequential solve)")
        if self.tol is not None and self.tol <= 0:
            raise IterisError("iteris: tol must be > 0")


def _task_weights(ctx: MergeContext, group: LayerGroup, stats: list[GroupStats]) -> dict[str, list[float]]:
    """c_i per layer, from what each layer outputs in each adapter's own model: fixed for the run."""
    if not ctx.params.adaptive_weights:
        return {name: list(ctx.weights) for name in group.members}
    return {
        name: [manual * adaptive_weight(norm, float(st.out_sq[name]))
               for st, norm, manual in zip(stats, ctx.engine.adapted_weight_norms(name), ctx.weights)]
        for name in group.members
    }


def _solve_group(ctx: MergeContext, group: LayerGroup, stats: list[GroupStats], coef) -> dict:
    """Every member of one layer group: its members share the group's statistics (and the float64 copies of
    its Grams), solved together."""
    p = ctx.params
    # sample space where every task kept its rows (fewer tokens than features), the Grams elsewhere; rows are
    # kept only when the capture was asked for them (alpha2 > 0, no with_pretrain_matrix)
    rows = all(st.rows is not None for st in stats) and (
        p.solve_space == "samples" or sum(st.rows.shape[0] for st in stats) < group.in_features)
    problems = []
    for name in group.members:
        tasks = [
            TaskLayerStats(gram=None if rows else st.full_gram(), cross_proj=st.proj.get(name),
                           cross_norm=st.cross_norm if p.alpha1 else 0.0, weight=c,
                           rows=st.rows if rows else None, own_proj=st.own_proj.get(name) if rows else None)
            for st, c in zip(stats, coef[name])
        ]
        problems.append((tasks, ctx.loras(name)))
    if p.with_pretrain_matrix:
        solved = []
        for name, (tasks, loras) in zip(group.members, problems):
            W0 = ctx.engine.base_weight(name).to(torch.float64)
            base_rhs = sum(pretrain_rhs(W0, st.cross_or_gram, t.weight, p.alpha1, t.cross_norm)
                           for st, t in zip(stats, tasks))
            solved.append(iteris_solve(tasks, loras, p.alpha1, p.alpha2, base_weight=W0, base_rhs=base_rhs))
    else:
        solved = (iteris_solve_samples if rows else iteris_solve_many)(problems, p.alpha1, p.alpha2)
    if rows:  # which layer groups were solved in sample space (in any sweep)
        ctx.report["sample_space_groups"] = sorted(set(ctx.report.get("sample_space_groups", [])) | {group.name})
    deltas = {}
    for name, (delta, how) in zip(group.members, solved):
        deltas[name] = delta
        if how != "cholesky":
            ctx.report.setdefault("singular_layers", []).append(name)
    return deltas


def _refiner(ctx: MergeContext, steps: int):
    """The block-level refinement: Adam on the factors B, A of each layer's closed-form B A."""
    p = ctx.params

    def refine(data: BlockFit) -> dict:
        factors = {name: tuple(t.to(data.device, data.dtype).clone().requires_grad_(True)
                               for t in (delta.B, delta.A)) for name, delta in data.start.items()}

        def build():
            return {name: LowRankDelta(B=B, A=A) for name, (B, A) in factors.items()}

        fitted = fit_block(data, [t for pair in factors.values() for t in pair], build, steps, p.refine_lr,
                           list(ctx.weights), balanced=p.refine_loss == "balanced", relative_lr=True)
        ctx.report.setdefault("refinement", {})[data.layers[0]] = {
            "loss_before": fitted.before, "loss_after": fitted.after, "kept_closed_form": fitted.kept_start}
        if fitted.kept_start:
            return data.start
        return {name: LowRankDelta(B=B.detach(), A=A.detach()) for name, (B, A) in factors.items()}

    return refine


def describe(report: dict) -> str | None:
    fits = report.get("refinement")
    if fits:
        before = sum(f["loss_before"] for f in fits.values())
        after = sum(f["loss_after"] for f in fits.values())
        return (f"refined {len(fits)} blocks after their closed-form solves: the blocks' residual "
                f"fell from {before:.4g} to {after:.4g} in sum")
    its = report.get("iterations")
    if not its or len(its) <= 1:
        return None
    return (f"{len(its) - 1} inference-solving iterations after the initial solve; the merged deltas moved by "
            f"{its[-1]['relative_change']:.2e} (relative) in the last one.")


@register(
    "iteris",
    IterISParams,
    "IterIS (CVPR 2025): iterative inference-solving alignment, closed form per layer (exact, rank sum r_i)",
    needs_calibration=True,
    per_layer_report=("adaptive_weights", "singular_layers"),
    describe_report=describe,
)
def iteris(ctx: MergeContext):
    p = ctx.params
    calib = ctx.engine
    coef: dict[str, list[float]] = {}

    def solve_group(group, stats):
        if group.members[0] not in coef:
            coef.update(_task_weights(ctx, group, stats))
        return _solve_group(ctx, group, stats, coef)

    rows = None
    if p.alpha2 > 0 and not p.with_pretrain_matrix and p.solve_space != "features":
        rows = "always" if p.solve_space == "samples" else "auto"
    cross = "keep" if p.with_pretrain_matrix else "norm" if p.alpha1 != 0.0 else "none"
    capture = CaptureSpec(gamma=p.gamma, cross=cross, out_norms=p.adaptive_weights, rows=rows)
    history = []

    def timed(entry: dict, start: float, before: tuple[float, float]) -> dict:
        """Wall, capture and solve seconds of one sweep."""
        entry["seconds"] = time.perf_counter() - start
        entry["capture_seconds"] = calib.capture_seconds - before[0]
        entry["solve_seconds"] = calib.solve_seconds - before[1]
        return entry

    start, before = time.perf_counter(), (calib.capture_seconds, calib.solve_seconds)
    schedule_name = p.resolved_schedule(calib.walks_blocks)
    if schedule_name == "sequential":
        steps = p.resolved_refine_steps(schedule_name, ctx.device)
        schedule = DistilledSweep(capture, _refiner(ctx, steps)) if steps else SequentialSweep(capture)
        deltas = calib.sweep(schedule, solve_group, label="sequential")
        history.append(timed({"iteration": "sequential", "relative_change": None}, start, before))
        ctx.report["iterations"] = history
        ctx.report["schedule"] = "sequential"
        ctx.report["adaptive_weights"] = coef
        return deltas

    # With gamma = 0 and no cross term, later rounds need only the adapters' inputs projected on their A:
    # remembered now, they spare re-running every adapter's own model in every round.
    iterations = p.iterations if p.iterations is not None else DEFAULT_ITERATIONS
    remember = iterations > 0 and p.gamma == 0.0 and p.alpha1 == 0.0 and not p.with_pretrain_matrix
    own_only = capture.replace(gamma=0.0, remember=remember)
    deltas = calib.sweep(GlobalSweep(own_only), solve_group, label="iteration 0")
    history.append(timed({"iteration": 0, "relative_change": None}, start, before))
    converged = False
    rounds = tqdm(range(1, iterations + 1), desc="IterIS", disable=not ctx.progress or iterations == 0, unit="iter")
    for iteration in rounds:
        start, before = time.perf_counter(), (calib.capture_seconds, calib.solve_seconds)
        calib.set_merged(deltas)
        new = calib.sweep(GlobalSweep(capture.replace(paired=True, out_norms=False)), solve_group,
                          label=f"iteration {iteration}")
        per_module, diff_total, base_total = {}, 0.0, 0.0
        for name in ctx.targets:
            diff, base = relative_change(new[name], deltas[name])
            per_module[name] = (diff / base) ** 0.5 if base > 0 else 0.0
            diff_total += diff
            base_total += base
        change = (diff_total / base_total) ** 0.5 if base_total > 0 else 0.0
        history.append(timed({"iteration": iteration, "relative_change": change, "per_module": per_module}, start, before))
        deltas = new
        rounds.set_postfix(change=f"{change:.2e}")
        if p.tol is not None and change < p.tol:
            converged = True
            break

    ctx.report["iterations"] = history
    ctx.report["schedule"] = "global"
    ctx.report["converged"] = converged if p.tol is not None else None
    ctx.report["adaptive_weights"] = coef
    return deltas
