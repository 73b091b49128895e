#!/usr/bin/env python3
"""PyTorch side of the sparse-kernels benchmark (the Rust side is crates/sparse-kernels/benches/sparse.rs).

    python benchmarks/sparse_pytorch.py [--threads 2] [--densities 0.01] [--repeats 20]

Same shapes as the Rust bench: S = [out, in] at the given densities (uniformly random
structure), x = [tokens, in], dY = [tokens, out], float32, on the CPU.
- dense fwd: x @ W with W = [in, out];
- CSR SpMM: torch.sparse.mm(S_csr, xT) with xT = [in, tokens] contiguous (the form of the
  design's reference figure, 4096x4096 at 1 % times 4096x512; transposing x is not timed);
- dense dW: dY.T @ x;
- CSR SDDMM: torch.sparse.sampled_addmm(S_csr, dY.T, x, beta=0), the product dY.T @ x sampled
  on S's structure.
Prints one markdown row per case, medians over --repeats calls after two warm-up calls, in ms.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

SHAPES = [
    (4096, 4096, 512),
    (4096, 4096, 2048),
    (4096, 11008, 512),
    (384, 1536, 2048),
]


def median_ms(fn, repeats: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.001, 0.005, 0.01, 0.05])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(
        "| shape (S = out x in) | tokens | density | nnz | dense fwd ms | CSR SpMM ms | dense/SpMM "
        "| dense dW ms | CSR SDDMM ms | dense/SDDMM |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for out, inp, tokens in SHAPES:
        x = torch.rand(tokens, inp) - 0.5
        dy = torch.rand(tokens, out) - 0.5
        w = torch.rand(inp, out) - 0.5
        xt = x.t().contiguous()
        dyt = dy.t()
        dense = median_ms(lambda: x @ w, args.repeats)
        dense_dw = median_ms(lambda: dyt @ x, args.repeats)
        for density in args.densities:
            mask = torch.rand(out, inp) < density
            structure = mask.to_sparse_csr()
            s = torch.sparse_csr_tensor(
                structure.crow_indices(),
                structure.col_indices(),
                torch.rand(int(mask.sum())) - 0.5,
                size=(out, inp),
            )
            nnz = s.values().numel()
            spmm = median_ms(lambda: torch.sparse.mm(s, xt), args.repeats)
            sddmm = median_ms(
                lambda: torch.sparse.sampled_addmm(s, dyt, x, beta=0.0, alpha=1.0), args.repeats
            )
            print(
                f"| {out}x{inp} | {tokens} | {density * 100:g}% | {nnz} | {dense:.2f} | {spmm:.3f} "
                f"| {dense / spmm:.1f}x | {dense_dw:.2f} | {sddmm:.3f} | {dense_dw / sddmm:.1f}x |"
            )


if __name__ == "__main__":
    main()
