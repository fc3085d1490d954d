"""Where a layer group's solve spends its time, piece by piece, at the Llama shapes' sizes (GPU).

    PYTHONPATH=src python benchmarks/solve_parts.py [--sizes 2048,4096,8192,14336] [--tasks 4] [--rank 16]

For each d_in: the whole ``iteris_solve_many`` of a group (q/k/v: 3 members; down: 1), then its parts —
float64 conversion and norms of the task Grams, forming Q, the Cholesky (single, batched, and a blocked
right-looking one built from GEMMs), the triangular solves — with each part's TFLOP/s where it counts.
"""

from __future__ import annotations

import argparse
import time

import torch


def timed(fn, repeats: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def blocked_cholesky(A: torch.Tensor, block: int) -> torch.Tensor:
    """Right-looking blocked Cholesky: small potrf on the diagonal, trsm below it, GEMMs on the lower
    trailing blocks only."""
    L = A.clone()
    n = L.shape[-1]
    edges = list(range(0, n, block)) + [n]
    for k in range(len(edges) - 1):
        a, b = edges[k], edges[k + 1]
        L[a:b, a:b] = torch.linalg.cholesky(L[a:b, a:b])
        if b == n:
            break
        panel = torch.linalg.solve_triangular(L[a:b, a:b].mT, L[b:, a:b], upper=True, left=False)
        L[b:, a:b] = panel
        for j in range(k + 1, len(edges) - 1):
            c, e = edges[j], edges[j + 1]
            L[c:, c:e].addmm_(panel[c - b:], panel[c - b:e - b].T, alpha=-1.0)
    return L.tril_()


def main():
    from iteris.adapters import LoraModule
    from iteris.solve import TaskLayerStats, iteris_solve_many

    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="2048,4096,8192,14336")
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    dev = "cuda"
    print(torch.cuda.get_device_name(0), torch.__version__)
    rows = []
    for d in map(int, args.sizes.split(",")):
        members = 1 if d > 8192 else 3
        gen = torch.Generator(device=dev).manual_seed(0)
        grams = []
        for _ in range(args.tasks):
            x = torch.randn(d, d, device=dev, generator=gen)
            grams.append(x @ x.T / d)
        del x
        k = args.tasks * args.rank
        loras = [[LoraModule(A=torch.randn(args.rank, d, device=dev, generator=gen),
                             B=torch.randn(512, args.rank, device=dev, generator=gen), scale=2.0)
                  for _ in range(args.tasks)] for _ in range(members)]
        layers = [([TaskLayerStats(gram=g, cross_proj=torch.randn(args.rank, d, device=dev, generator=gen),
                                   cross_norm=1.0, weight=1.0 + 0.1 * t) for t, g in enumerate(grams)], lo) for lo in loras]
        chol = d**3 / 3
        row = {"d": d, "members": members}
        row["group solve ms"] = 1e3 * timed(lambda: iteris_solve_many(layers, 1e-7, 1e-7))
        row["group TFLOP/s"] = members * (chol + 2 * d * d * k) / (row["group solve ms"] / 1e3) / 1e12
        row["to f64 ms"] = 1e3 * timed(lambda: [g.double() for g in grams])
        G64 = [g.double() for g in grams]
        row["norms ms"] = 1e3 * timed(lambda: [float(torch.linalg.matrix_norm(g)) for g in G64])
        Q = sum(G64) + 1e-3 * torch.eye(d, device=dev, dtype=torch.float64)
        row["form Q ms"] = 1e3 * timed(lambda: sum(G64))
        row["potrf ms"] = 1e3 * timed(lambda: torch.linalg.cholesky_ex(Q))
        row["potrf TFLOP/s"] = chol / (row["potrf ms"] / 1e3) / 1e12
        if members > 1:
            Qb = torch.stack([Q] * members)
            row["batched potrf ms/matrix"] = 1e3 * timed(lambda: torch.linalg.cholesky_ex(Qb)) / members
            del Qb
        for block in (512, 1024, 2048):
            if block < d:
                t = timed(lambda: blocked_cholesky(Q, block))
                row[f"blocked {block} TFLOP/s"] = chol / t / 1e12
        L_ref = torch.linalg.cholesky(Q)
        row["blocked err"] = float((blocked_cholesky(Q, 1024) - L_ref).norm() / L_ref.norm())
        R = torch.randn(k, d, device=dev, dtype=torch.float64)
        row["cholesky_solve ms"] = 1e3 * timed(lambda: torch.cholesky_solve(R.T, L_ref))
        row["2 trsm ms"] = 1e3 * timed(lambda: torch.linalg.solve_triangular(
            L_ref, torch.linalg.solve_triangular(L_ref.mT, R, upper=True, left=False), upper=False, left=False))
        from iteris.solve import blocked_right_solve

        for block in (256, 512, 1024, 2048):
            if block < d:
                row[f"blocked solve {block} ms"] = 1e3 * timed(lambda: blocked_right_solve(L_ref, R, block))
        row["blocked solve err"] = float((blocked_right_solve(L_ref, R) - torch.cholesky_solve(R.T, L_ref).T).norm()
                                         / torch.cholesky_solve(R.T, L_ref).norm())
        if members > 1:
            # independent factorisations on their own streams: do small potrfs overlap?
            streams = [torch.cuda.Stream() for _ in range(members)]
            Qs = [Q.clone() for _ in range(members)]

            def on_streams():
                main = torch.cuda.current_stream()
                for st, q in zip(streams, Qs):
                    st.wait_stream(main)
                    with torch.cuda.stream(st):
                        torch.linalg.cholesky_ex(q)
                for st in streams:
                    main.wait_stream(st)

            row["streams potrf ms/matrix"] = 1e3 * timed(on_streams) / members
            del Qs
        Qs = [Q.clone() for _ in range(members)]
        Rs = [R.clone() for _ in range(members)]
        from iteris.solve import solve_right_many

        row["solve_right_many ms/matrix"] = 1e3 * timed(lambda: solve_right_many(Qs, Rs)) / members
        del Qs, Rs
        try:
            torch.backends.cuda.preferred_linalg_library("magma")
            row["magma potrf TFLOP/s"] = chol / timed(lambda: torch.linalg.cholesky_ex(Q)) / 1e12
        except RuntimeError as e:
            row["magma potrf TFLOP/s"] = str(e)[:40]
        finally:
            torch.backends.cuda.preferred_linalg_library("default")
        rows.append(row)
        print(row, flush=True)
        del grams, G64, Q, L_ref, layers
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
