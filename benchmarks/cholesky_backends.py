"""float64 Cholesky on the GPU at the sizes a merge solves: cuSOLVER against MAGMA, one matrix at a time
against batched, and a blocked factorisation built from batched GEMMs (what a layer group's same-sized
solves could share).

    PYTHONPATH=src python benchmarks/cholesky_backends.py [--sizes 2048,4096,8192,14336] [--batch 6]

Prints ms per matrix and TFLOP/s (n^3 / 3 flops each) and the largest relative residual of each variant.
"""

from __future__ import annotations

import argparse

import torch

from solve_parts import timed


def blocked_cholesky(a: torch.Tensor, block: int) -> torch.Tensor:
    """Right-looking blocked Cholesky of a batch (..., n, n): small Choleskys of the diagonal blocks, their
    triangular inverses, and GEMMs for the panels and the lower part of the trailing matrix."""
    a = a.clone()
    n = a.shape[-1]
    eye = torch.eye(block, dtype=a.dtype, device=a.device)
    for k in range(0, n, block):
        e = min(k + block, n)
        diag = torch.linalg.cholesky(a[..., k:e, k:e])
        a[..., k:e, k:e] = diag
        if e == n:
            break
        inv = torch.linalg.solve_triangular(diag, eye[: e - k, : e - k], upper=False)
        panel = a[..., e:, k:e] @ inv.mT
        a[..., e:, k:e] = panel
        # trailing update, lower block triangle only: block column j gets rows j.. of panel x panel_j^T
        for j in range(e, n, block):
            f = min(j + block, n)
            a[..., j:, j:f].sub_(panel[..., j - e:, :] @ panel[..., j - e:f - e, :].mT)
    return a.tril()


def residual(a: torch.Tensor, l: torch.Tensor) -> float:
    return float(((l @ l.mT - a).flatten(-2).norm(dim=-1) / a.flatten(-2).norm(dim=-1)).max())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="2048,4096,8192,14336")
    parser.add_argument("--batch", type=int, default=6)
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print("n | variant | ms per matrix | TFLOP/s | max rel. residual")
    for n in map(int, args.sizes.split(",")):
        batch = args.batch if n <= 8192 else 1
        x = torch.randn(batch, n, n, dtype=torch.float64, device="cuda")
        a = x @ x.mT / n + 1e-3 * torch.eye(n, dtype=torch.float64, device="cuda")
        del x
        for lib in ("cusolver", "magma"):
            torch.backends.cuda.preferred_linalg_library(lib)
            try:
                ms = timed(lambda: [torch.linalg.cholesky(m) for m in a]) / batch * 1e3
                out = torch.stack([torch.linalg.cholesky(m) for m in a])
                print(f"{n} | {lib} loop | {ms:.2f} | {n**3 / 3 / ms / 1e9:.1f} | {residual(a, out):.1e}")
                if batch > 1:
                    ms = timed(lambda: torch.linalg.cholesky(a)) / batch * 1e3
                    print(f"{n} | {lib} batched | {ms:.2f} | {n**3 / 3 / ms / 1e9:.1f} | {residual(a, torch.linalg.cholesky(a)):.1e}")
            except RuntimeError as err:  # a torch built without MAGMA
                print(f"{n} | {lib} | failed: {str(err).splitlines()[0]}")
        torch.backends.cuda.preferred_linalg_library("default")
        for block in (256, 512, 1024, 2048):
            if block >= n:
                continue
            ms = timed(lambda: blocked_cholesky(a, block)) / batch * 1e3
            print(f"{n} | blocked {block} (batch {batch}) | {ms:.2f} | {n**3 / 3 / ms / 1e9:.1f} | "
                  f"{residual(a, blocked_cholesky(a, block)):.1e}")
        a = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
