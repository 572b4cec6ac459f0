#!/usr/bin/env python
"""Three ways to run the fast path's 1x1 convs and linears differently, timed against what it does now.

  python benchmarks/onednn_variants.py        # writes benchmarks/results/onednn-variants-cpu.json

None of them is used: this keeps the measurements that decided so, to rerun on another CPU.

- ``ffn_bands``: a ConvFFN's fc1 + GELU and fc2 + residual one band of rows at a time (bands of 2, 4 and 8 MB
  of the 4x-wide hidden map), so that each band of the hidden map could stay in cache; fc2 adds into the
  residual in place (``_convolution_pointwise_.binary``). Against the whole map at once, as
  `fastvlm.vision.fused.FusedFFN` runs it.
- ``gelu``: fc1 with oneDNN's exact GELU post-op (what runs now), with its tanh GELU post-op, and without a
  post-op followed by an in-place GELU.
- ``prepacked``: weights reordered once into oneDNN's blocked layout (``mkldnn_reorder_conv2d_weight``,
  ``_reorder_linear_weight``) against plain weights, which oneDNN reorders at every call: the encoder's FFN 1x1
  convs at 1024 px, and the Qwen2-0.5B linears at a 288-token prefill. Packed linear weights would be a second
  copy of the LLM (the decode kernels read the plain ones).

Shapes are FastViTHD's at 1024 px (channels 96-1536, hidden 4x) and Qwen2-0.5B's (hidden 896, MLP 4864, 2 KV heads
of 64); weights random at unit-variance scale. Every variant runs in the same rounds, in rotated order; medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
PW = ([0, 0], [1, 1], [1, 1], 1)
STAGES = ((96, 256), (192, 128), (384, 64), (768, 32), (1536, 16))  # FastViTHD's FFN inputs at 1024 px
LINEARS = {"q_proj, o_proj": (896, 896), "k_proj, v_proj": (896, 128), "gate_proj, up_proj": (896, 4864),
           "down_proj": (4864, 896)}


def _conv(*args):
    return torch.ops.mkldnn._convolution_pointwise(*args)


def _time(variants: dict, rounds: int) -> dict:
    """Median ms of each variant, all timed in the same rounds, the order rotated every round."""
    names = list(variants)
    for f in variants.values():
        f()
    times: dict = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            variants[n]()
            times[n].append(time.perf_counter() - t)
    return {n: round(1000 * statistics.median(v), 3) for n, v in times.items()}


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _ffn_tensors(c: int, s: int, dtype: torch.dtype, g: torch.Generator):
    cl = torch.channels_last
    h = torch.randn(1, c, s, s, generator=g).to(dtype).contiguous(memory_format=cl)
    x = torch.randn(1, c, s, s, generator=g).to(dtype).contiguous(memory_format=cl)
    w1 = (torch.randn(4 * c, c, 1, 1, generator=g) / c ** 0.5).to(dtype)
    b1 = (torch.randn(4 * c, generator=g) * 0.1).to(dtype)
    w2 = (torch.randn(c, 4 * c, 1, 1, generator=g) / (4 * c) ** 0.5).to(dtype)
    b2 = (torch.randn(c, generator=g) * 0.1).to(dtype)
    return h, x, w1, b1, w2, b2


def _ffn_band_row(c: int, s: int, dtype: torch.dtype, g: torch.Generator, rounds: int) -> dict:
    h, x, w1, b1, w2, b2 = _ffn_tensors(c, s, dtype, g)

    def whole():
        hidden = _conv(h, w1, b1, *PW, "gelu", [None], "none")
        return torch.ops.mkldnn._convolution_pointwise.binary(hidden, x, w2, b2, *PW, "add", None, None, [], None)

    def banded(rows: int, out: torch.Tensor):
        for r in range(0, s, rows):
            band = _conv(h[:, :, r:r + rows], w1, b1, *PW, "gelu", [None], "none")
            torch.ops.mkldnn._convolution_pointwise_.binary(out[:, :, r:r + rows], band, w2, b2, *PW, "add",
                                                            None, None, [], None)
        return out

    row_bytes = 4 * c * s * x.element_size()  # one row of the hidden map
    variants, diffs = {"whole map": whole}, {}
    ref = whole()
    for mb in (2, 4, 8):
        rows = max(1, (mb << 20) // row_bytes)
        if rows >= s:
            continue
        name = f"bands of {mb} MB ({rows} rows)"
        diffs[name] = _diff(banded(rows, x.clone(memory_format=torch.channels_last)), ref)
        scratch = x.clone(memory_format=torch.channels_last)  # timed runs add into it again and again
        variants[name] = lambda rows=rows, scratch=scratch: banded(rows, scratch)
    return {"input": [1, c, s, s], "hidden_mb": round(row_bytes * s / 2**20, 1), "ms": _time(variants, rounds),
            "max_abs_diff_vs_whole": diffs}


def ffn_bands(dtype: torch.dtype, rounds: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [_ffn_band_row(c, s, dtype, g, rounds) for c, s in STAGES]


def _gelu_row(c: int, s: int, dtype: torch.dtype, g: torch.Generator, rounds: int) -> dict:
    h, _, w1, b1, _, _ = _ffn_tensors(c, s, dtype, g)
    variants = {
        "exact GELU post-op (now)": lambda: _conv(h, w1, b1, *PW, "gelu", [None], "none"),
        "tanh GELU post-op": lambda: _conv(h, w1, b1, *PW, "gelu", [None], "tanh"),
        "no post-op, then GELU in place": lambda: torch._C._nn.gelu_(_conv(h, w1, b1, *PW, "none", [], "")),
        "no post-op (no GELU at all)": lambda: _conv(h, w1, b1, *PW, "none", [], ""),
    }
    ref = variants["exact GELU post-op (now)"]()
    return {"input": [1, c, s, s], "ms": _time(variants, rounds),
            "max_abs_diff_vs_now": {k: _diff(f(), ref) for k, f in list(variants.items())[1:3]}}


def gelu(dtype: torch.dtype, rounds: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [_gelu_row(c, s, dtype, g, rounds) for c, s in STAGES]


def _packed_conv_row(c: int, s: int, dtype: torch.dtype, g: torch.Generator, rounds: int) -> dict:
    h, x, w1, b1, w2, b2 = _ffn_tensors(c, s, dtype, g)
    hid = _conv(h, w1, b1, *PW, "gelu", [None], "none")
    p1 = torch._C._nn.mkldnn_reorder_conv2d_weight(w1.to_mkldnn(), *PW[:3], 1, list(h.shape))
    p2 = torch._C._nn.mkldnn_reorder_conv2d_weight(w2.to_mkldnn(), *PW[:3], 1, list(hid.shape))
    binary = torch.ops.mkldnn._convolution_pointwise.binary
    variants = {
        "fc1 + GELU": lambda: _conv(h, w1, b1, *PW, "gelu", [None], "none"),
        "fc1 + GELU, prepacked": lambda: _conv(h, p1, b1, *PW, "gelu", [None], "none"),
        "fc2 + add": lambda: binary(hid, x, w2, b2, *PW, "add", None, None, [], None),
        "fc2 + add, prepacked": lambda: binary(hid, x, p2, b2, *PW, "add", None, None, [], None),
    }
    diff = max(_diff(variants["fc1 + GELU, prepacked"](), variants["fc1 + GELU"]()),
               _diff(variants["fc2 + add, prepacked"](), variants["fc2 + add"]()))
    return {"input": [1, c, s, s], "ms": _time(variants, rounds), "max_abs_diff": diff}


def _packed_linear_row(name: str, k: int, n: int, tokens: int, dtype: torch.dtype, g: torch.Generator,
                       rounds: int) -> dict:
    x = torch.randn(1, tokens, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    b = (torch.randn(n, generator=g) * 0.1).to(dtype)
    packed = torch.ops.mkldnn._reorder_linear_weight(w, tokens)
    variants = {"F.linear": lambda: F.linear(x, w, b),
                "prepacked": lambda: torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")}
    ms = _time(variants, rounds)
    gflop = 2 * tokens * k * n / 1e9
    return {"linear": name, "in_out": [k, n], "tokens": tokens, "ms": ms,
            "gflops": {v: round(gflop / t * 1000, 1) for v, t in ms.items()},
            "max_abs_diff": _diff(variants["prepacked"](), variants["F.linear"]())}


def prepacked(dtype: torch.dtype, rounds: int, tokens: int) -> dict:
    g = torch.Generator().manual_seed(2)
    return {"encoder_ffn_convs": [_packed_conv_row(c, s, dtype, g, rounds) for c, s in STAGES],
            "qwen2_0.5b_linears": [_packed_linear_row(name, k, n, tokens, dtype, g, rounds)
                                   for name, (k, n) in LINEARS.items()]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--tokens", type=int, default=288, help="prefill rows for the linears (256 image + 32 text)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "onednn-variants-cpu.json"))
    a = p.parse_args()
    from fastvlm.bench.core import machine_info
    from fastvlm.kernels import tune_allocator
    from fastvlm.vision.fused import onednn_fusion_available

    if not onednn_fusion_available():
        p.error("this PyTorch has no oneDNN fused kernels (a CPU build with mkldnn is needed)")
    tune_allocator()
    results = {}
    with torch.inference_mode():
        for name in a.dtypes:
            dtype = torch.bfloat16 if name == "bf16" else torch.float32
            results[name] = {"ffn_bands": ffn_bands(dtype, a.rounds), "gelu": gelu(dtype, a.rounds),
                             "prepacked": prepacked(dtype, a.rounds, a.tokens)}
            print(f"{name} done", flush=True)
    report = {"command": "python benchmarks/onednn_variants.py " + " ".join(sys.argv[1:]),
              "machine": {**machine_info(torch.device("cpu")), "threads": torch.get_num_threads(),
                          "python": platform.python_version()},
              "rounds": a.rounds, "results": results}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    for name, r in results.items():
        for row in r["ffn_bands"]:
            print(name, "FFN", row["input"], row["ms"])
        for row in r["gelu"]:
            print(name, "GELU", row["input"], row["ms"])
        for row in r["prepacked"]["encoder_ffn_convs"]:
            print(name, "packed conv", row["input"], row["ms"])
        for row in r["prepacked"]["qwen2_0.5b_linears"]:
            print(name, "packed linear", row["linear"], row["ms"])
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
