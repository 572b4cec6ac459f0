#!/usr/bin/env python
"""Variants of the bf16 matrix-vector kernel against plain reads of the same bytes (this CPU's decode floor).

  python benchmarks/gemv_variants/run.py [--rounds 12] [--huge-pages]

Compiles variants.c with the flags of fastvlm.kernels, then times, interleaved per round, on a
[2 x 151936, 896] bf16 matrix (two Qwen2-0.5B lm_heads, 544 MB; random values):
  a        the kernel fastvlm.kernels ships (compiled from its source; one row at a time, 4 accumulators),
           with its in-loop software prefetch off
  a_pf1k/2k/4k/8k  the same kernel with its prefetch 1 / 2 / 4 / 8 KB ahead (fastvlm_set_prefetch;
           fastvlm.kernels.default_prefetch_bytes picks per CPU)
  pf1k/4k  a whole row's prefetches issued 1 / 4 KB ahead before each row (the first experiment)
  2r       two rows per pass (two streams per thread)
  c_read   a plain AVX-512 read of the same bytes (no arithmetic)
  torch_sum  torch's fp32 sum over a buffer of the same size
With --huge-pages, `a` also runs on a copy of the matrix in memory advised for transparent huge pages.
GB/s are bytes over time per call; medians over rounds. Prints only (see benchmarks/results/gemv-variants-cpu.log).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def huge_page_copy(t: torch.Tensor):
    """A copy of t in memory advised MADV_HUGEPAGE (2 MB aligned); returns (copy, backing buffer)."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    hp, nbytes = 2 << 20, t.numel() * t.element_size()
    raw = torch.empty(nbytes + hp, dtype=torch.uint8)
    start = (raw.data_ptr() + hp - 1) // hp * hp
    if libc.madvise(start, nbytes // hp * hp, 14) != 0:  # MADV_HUGEPAGE, before the pages are touched
        raise OSError(ctypes.get_errno(), "madvise(MADV_HUGEPAGE) failed")
    off = start - raw.data_ptr()
    out = raw[off:off + nbytes].view(t.dtype).view(t.shape)
    out.copy_(t)
    return out, raw


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--huge-pages", action="store_true")
    a = p.parse_args()
    so = os.path.join(tempfile.mkdtemp(), "variants.so")
    subprocess.run(["gcc", "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11",
                    os.path.join(HERE, "variants.c"), "-o", so, "-lm"], check=True)
    lib = ctypes.CDLL(so)
    P, L, N = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for n in ("gv_a", "gv_2r"):
        getattr(lib, n).argtypes = [P, P, P, L, L, N]
    lib.gv_pf.argtypes = [P, P, P, L, L, N, L]
    lib.rd.argtypes = [P, L, N]
    lib.rd.restype = ctypes.c_float
    threads = torch.get_num_threads()
    O, I = 151936 * 2, 896
    w = torch.randn(O, I).bfloat16()
    x = torch.randn(I).bfloat16()
    y = torch.empty(O, dtype=torch.bfloat16)
    f = torch.randn(O * I // 2)
    nb = O * I * 2
    lib.fastvlm_set_prefetch.argtypes = [L]

    def shipped(dist: int):
        def call():
            lib.fastvlm_set_prefetch(dist)
            lib.gv_a(w.data_ptr(), x.data_ptr(), y.data_ptr(), O, I, threads)
        return call

    V = {"a": shipped(0), "a_pf1k": shipped(1024), "a_pf2k": shipped(2048), "a_pf4k": shipped(4096),
         "a_pf8k": shipped(8192),
         "pf1k": lambda: lib.gv_pf(w.data_ptr(), x.data_ptr(), y.data_ptr(), O, I, threads, 1024),
         "pf4k": lambda: lib.gv_pf(w.data_ptr(), x.data_ptr(), y.data_ptr(), O, I, threads, 4096),
         "2r": lambda: lib.gv_2r(w.data_ptr(), x.data_ptr(), y.data_ptr(), O, I, threads),
         "c_read": lambda: lib.rd(w.data_ptr(), O * I, threads),
         "torch_sum": lambda: f.sum()}
    if a.huge_pages:
        wh, _keep = huge_page_copy(w)
        def huge():
            lib.fastvlm_set_prefetch(0)
            lib.gv_a(wh.data_ptr(), x.data_ptr(), y.data_ptr(), O, I, threads)
        V["a_huge_pages"] = huge
    res = {k: [] for k in V}
    for _ in range(a.rounds):
        for k, fn in V.items():
            t = time.perf_counter()
            fn()
            res[k].append(nb / (time.perf_counter() - t) / 1e9)
    print(f"{time.strftime('%H:%M:%S')} {threads} threads, {nb / 1e6:.0f} MB, GB/s per call:")
    for k, v in res.items():
        print(f"  {k:13s} median {statistics.median(v):5.1f}   {[round(g) for g in v]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
