#!/usr/bin/env python
"""Where the FastViTHD encoder's time goes on a GPU: each part of the fast path switched on alone.

The first GPU run (H100, 2026-11-25) found the fast path slower than the exact one in bf16 and fp16 at
batch 1. This measures the encoder alone, at the 0.5B preset's size with trained-model weight scales, in
each combination: the module tree or the fused program, NCHW or channels-last, eager or SDPA attention,
and the fused program replayed as one CUDA graph. For each: the GPU time (CUDA events, median), the host
time to issue the call (when it exceeds the GPU time the call is launch-bound), the feature cosine
against the fp32 exact path (TF32 off), and the first call's time (the H200 bench's first `fast` call at a new
shape took 1.6-2.1 s; one-time costs fall on the first variant, in the order of VARIANTS, that needs them; for a
graph variant the first call is a replay, its capture having run before). gpu-encoder-ab-h200.json predates
first_call_ms.

  python benchmarks/gpu_encoder_ab.py --out benchmarks/results/gpu-encoder-ab-h200.json
  python benchmarks/gpu_encoder_ab.py --preset fastvlm-tiny --device cpu --resolutions 256   # a smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# name: (fused program, channels-last, attention)
VARIANTS = {
    "exact": (False, False, "eager"),
    "tree-sdpa": (False, False, "sdpa"),
    "tree-sdpa-cl": (False, True, "sdpa"),
    "fused-nchw": (True, False, "sdpa"),
    "fused-cl (fast)": (True, True, "sdpa"),
}


def build(preset: str, device: torch.device, dtype: torch.dtype):
    from fastvlm.bench.weights import realistic_encoder_
    from fastvlm.config import get_preset
    from fastvlm.vision.fastvithd import FastViTHD

    torch.manual_seed(0)
    enc = FastViTHD(get_preset(preset).vision)
    realistic_encoder_(enc)
    return enc.to(device=device, dtype=dtype).eval()


def configure(enc, fused: bool, channels_last: bool, attn: str):
    enc.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    enc.set_attention_implementation(attn)
    enc.optimize_for_inference(fused)
    return enc


def as_graph(fn, x: torch.Tensor):
    """fn(x) captured once as a CUDA graph by the package's own capture (`fastvlm.graphs.capture`); returns a
    replay function (the same input buffer each time). gpu-encoder-ab-h200.json was made with an in-script
    capture of the same kind (three warm-up runs on a side stream, then `torch.cuda.graph`)."""
    from fastvlm.graphs import capture

    static = x.clone()
    graph, out = capture(lambda: fn(static), x.device, warmup=3)

    def replay(_x):
        graph.replay()
        return out
    return replay


def timed(fn, x, device: torch.device, warmup: int, repeats: int) -> dict:
    from fastvlm.bench.core import sync as device_sync

    def sync():
        device_sync(device)

    sync()
    t0 = time.perf_counter()
    out = fn(x)  # the first call: one-time costs (kernel selection or compilation) land here
    sync()
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        out = fn(x)
    sync()
    gpu, host = [], []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            start.record()
            out = fn(x)
            end.record()
            host.append(time.perf_counter() - t0)
            torch.cuda.synchronize()
            gpu.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            out = fn(x)
            host.append(time.perf_counter() - t0)
            gpu.append(host[-1])
    return {"device_ms": round(statistics.median(gpu) * 1e3, 3), "host_issue_ms": round(statistics.median(host) * 1e3, 3),
            "first_call_ms": round(first * 1e3, 1),
            "device_ms_min": round(min(gpu) * 1e3, 3), "out": out}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="fastvlm-0.5b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp16", "fp32"], choices=sorted(DTYPES))
    ap.add_argument("--resolutions", nargs="+", type=int, default=[512, 1024, 2048])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--compile", nargs="*", default=[], metavar="MODE",
                    help="also torch.compile the fused program in these modes (default, reduce-overhead, ...), "
                         "at the first dtype and 1024 px (or the first resolution)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from fastvlm.bench.core import machine_info, strict_fp32
    from fastvlm.bench.suite import cosine

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    rows = []
    result = {"preset": args.preset, "weights": "random, trained-model scales (fastvlm.bench.weights)",
              "batch": 1, "statistic": f"median of {args.repeats} calls after {args.warmup} warm-up calls",
              "machine": machine_info(device), "rows": rows}
    with torch.inference_mode():
        refs = {}
        with strict_fp32(device):
            enc = configure(build(args.preset, device, torch.float32), False, False, "eager")
            for r in args.resolutions:
                x = torch.rand(1, 3, r, r, generator=torch.Generator().manual_seed(r)).to(device)
                refs[r] = (x, enc(x).float())
            del enc
        for dname in args.dtypes:
            dtype = DTYPES[dname]
            enc = build(args.preset, device, dtype)
            for vname, (fused, cl, attn) in VARIANTS.items():
                configure(enc, fused, cl, attn)
                graphs = [False, True] if cuda and fused else [False]
                for graph in graphs:
                    for r in args.resolutions:
                        x, ref = refs[r]
                        x = x.to(dtype)
                        if cl:
                            x = x.contiguous(memory_format=torch.channels_last)
                        try:
                            fn = as_graph(enc, x) if graph else enc
                            t = timed(fn, x, device, args.warmup, args.repeats)
                        except Exception as e:  # noqa: BLE001 - recorded, the other rows still run
                            rows.append({"dtype": dname, "variant": vname + (" +graph" if graph else ""),
                                         "resolution": r, "error": f"{type(e).__name__}: {e}"[:300]})
                            print(rows[-1], flush=True)
                            continue
                        row = {"dtype": dname, "variant": vname + (" +graph" if graph else ""), "resolution": r,
                               **{k: v for k, v in t.items() if k != "out"},
                               "cosine_vs_fp32_exact": round(cosine(t["out"], ref), 6)}
                        rows.append(row)
                        print(row, flush=True)
                        del fn
                        if cuda:
                            torch.cuda.empty_cache()
            del enc
        if args.out:  # compiles are slow: keep what is done if a time limit cuts them
            with open(args.out, "w") as f:
                f.write(json.dumps(result, indent=1) + "\n")
        if args.compile:
            dname = args.dtypes[0]
            r = 1024 if 1024 in args.resolutions else args.resolutions[0]
            x, ref = refs[r]
            x = x.to(DTYPES[dname]).contiguous(memory_format=torch.channels_last)
            for mode in args.compile:
                enc = configure(build(args.preset, device, DTYPES[dname]), True, True, "sdpa")
                enc.optimize_for_inference(True, onednn=False, compile={} if mode == "default" else {"mode": mode})
                t0 = time.perf_counter()
                enc(x)
                compile_s = time.perf_counter() - t0
                t = timed(enc, x, device, args.warmup, args.repeats)
                rows.append({"dtype": dname, "variant": f"compile {mode}", "resolution": r,
                             **{k: v for k, v in t.items() if k != "out"}, "compile_s": round(compile_s, 1),
                             "cosine_vs_fp32_exact": round(cosine(t["out"], ref), 6)})
                print(rows[-1], flush=True)
                del enc
                if args.out:
                    with open(args.out, "w") as f:
                        f.write(json.dumps(result, indent=1) + "\n")
    text = json.dumps(result, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(f"{'dtype':5} {'variant':24} {'res':>5} {'device ms':>10} {'host ms':>8} {'first ms':>9} {'cosine':>9}")
    for row in rows:
        if "error" in row:
            print(f"{row['dtype']:5} {row['variant']:24} {row['resolution']:5} {row['error']}")
        else:
            print(f"{row['dtype']:5} {row['variant']:24} {row['resolution']:5} {row['device_ms']:10.2f} "
                  f"{row['host_issue_ms']:8.2f} {row['first_call_ms']:9.1f} {row['cosine_vs_fp32_exact']:9.6f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
