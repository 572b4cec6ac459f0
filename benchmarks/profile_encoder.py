#!/usr/bin/env python
"""Where FastViTHD's time goes (torch.profiler), per encoder configuration, and where a decode step's goes.

  python benchmarks/profile_encoder.py                       # 1024 px, CPU, writes benchmarks/results/profile-cpu.json
  python benchmarks/profile_encoder.py --resolution 512 --configs bf16-cl-eager bf16-fused
  python benchmarks/profile_encoder.py --decode               # also one 0.5B decode step, torch vs native kernels

Encoder configurations (random weights at trained-model scales; same weights in all):
  fp32-nchw-eager   the reference arithmetic as the checkpoint lays it out
  fp32-cl-eager     channels-last convolutions
  fp32-fused        optimize_for_inference(): BN/layer scales folded, oneDNN conv+GELU / conv+add, SDPA
  bf16-cl-eager     true bf16 weights, channels-last, module tree, reference attention
  bf16-cl-sdpa      ... with SDPA attention
  bf16-fused        the fast default on this CPU
  autocast-cl-sdpa  fp32 weights under torch.autocast(bf16) instead of bf16 weights
Operators are grouped into categories (pointwise 1x1 convs, depthwise convs, GELU, BN,
attention, norm, elementwise, layout copies); times are the profiler's self CPU time of
one forward after warm-up, and wall times are medians of --repeats interleaved runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = ("fp32-nchw-eager", "fp32-cl-eager", "fp32-fused", "bf16-cl-eager", "bf16-cl-sdpa", "bf16-fused",
           "autocast-cl-sdpa")


def category(name: str, shapes) -> str:
    if name == "aten::mkldnn_convolution" or name == "aten::convolution_overrideable":
        w = shapes[1] if len(shapes) > 1 else []
        if len(w) == 4:
            if w[2] == 1 and w[3] == 1:
                return "conv 1x1 (pointwise)"
            if w[1] == 1:
                return "conv depthwise/grouped kxk"
            return "conv dense kxk (stem)"
        return "conv other"
    if name.startswith("mkldnn::_convolution_pointwise"):
        binary = len(shapes) > 10  # the .binary overload takes the residual as its 2nd input
        w = shapes[2] if binary else shapes[1]
        kind = "1x1" if len(w) == 4 and w[2] == 1 and w[3] == 1 else "kxk"
        return f"conv {kind} + fused residual add (oneDNN)" if binary else f"conv {kind} + fused GELU (oneDNN)"
    if name == "aten::gelu":
        return "GELU"
    if "batch_norm" in name:
        return "BatchNorm"
    if "scaled_dot_product" in name or name in ("aten::bmm", "aten::_softmax", "aten::softmax"):
        return "attention (sdpa / bmm / softmax)"
    if name in ("aten::mm", "aten::addmm", "aten::linear"):
        return "linear (qkv, proj)"
    if "layer_norm" in name or name in ("aten::mean", "aten::pow", "aten::sqrt", "aten::div", "aten::sub"):
        return "norm (LayerNorm / by hand)"
    if name in ("aten::add", "aten::mul", "aten::add_", "aten::mul_", "aten::sigmoid", "aten::relu",
                "aten::avg_pool2d", "aten::_adaptive_avg_pool2d"):
        return "elementwise / SE"
    if name in ("aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy", "aten::to"):
        return "copies / layout and dtype conversions"
    return "other"


def build_encoder(config: str, seed: int = 0):
    from fastvlm.bench.weights import realistic_encoder_
    from fastvlm.vision import FastViTHD

    enc = realistic_encoder_(FastViTHD().eval(), seed=seed)
    dtype = torch.bfloat16 if config.startswith("bf16") else torch.float32
    enc = enc.to(dtype)
    if "nchw" not in config:
        enc = enc.to(memory_format=torch.channels_last)
    enc.set_attention_implementation("sdpa" if "sdpa" in config else "eager")
    if config.endswith("fused"):
        enc.optimize_for_inference()
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if config.startswith("autocast") else contextlib.nullcontext
    return enc, dtype, ctx


def quiet(max_wait: float) -> None:
    from fastvlm.bench.core import wait_for_quiet

    wait_for_quiet(max_wait)


def profile_encoders(configs, resolution: int, repeats: int, max_wait: float = 0.0) -> dict:
    from torch.profiler import ProfilerActivity, profile

    x0 = torch.rand(1, 3, resolution, resolution, generator=torch.Generator().manual_seed(0))
    built = {}
    for c in configs:
        enc, dtype, ctx = build_encoder(c)
        x = x0.to(dtype)
        if "nchw" not in c:
            x = x.contiguous(memory_format=torch.channels_last)
        built[c] = (enc, x, ctx)
        with torch.inference_mode(), ctx():
            enc(x)  # warm-up (and builds the fused program)
        print(f"built {c}", file=sys.stderr, flush=True)
    walls = {c: [] for c in configs}
    for _ in range(repeats):  # interleaved, so load from elsewhere hits every config alike
        for c, (enc, x, ctx) in built.items():
            quiet(max_wait)
            with torch.inference_mode(), ctx():
                t0 = time.perf_counter()
                enc(x)
                walls[c].append(time.perf_counter() - t0)
    out = {}
    for c, (enc, x, ctx) in built.items():
        quiet(max_wait)
        with torch.inference_mode(), ctx(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            enc(x)
        cats: dict[str, float] = {}
        top = []
        for evt in prof.key_averages(group_by_input_shape=True):
            if evt.self_cpu_time_total <= 0:
                continue
            cat = category(evt.key, evt.input_shapes)
            cats[cat] = cats.get(cat, 0.0) + evt.self_cpu_time_total / 1e6
            top.append((evt.self_cpu_time_total / 1e6, evt.key, str(evt.input_shapes)[:120], evt.count))
        total = sum(cats.values())
        top.sort(reverse=True)
        out[c] = {
            "wall_s": {"median": statistics.median(walls[c]), "min": min(walls[c]), "samples": walls[c]},
            "profiled_self_cpu_s": total,
            "categories_s": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
            "categories_share": {k: v / total for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
            "top_ops": [{"self_s": t, "op": k, "shapes": s, "calls": n} for t, k, s, n in top[:15]],
        }
    return out


def profile_decode(steps: int, max_wait: float = 0.0) -> dict:
    from torch.profiler import ProfilerActivity, profile
    from transformers import DynamicCache

    from fastvlm import FastVLM, kernels
    from fastvlm.generation import cache_argument

    model = FastVLM.from_preset("fastvlm-0.5b", device="cpu", dtype=torch.bfloat16)
    lm = model.language_model
    kw = cache_argument(lm)
    ids = torch.randint(3, 1000, (1, 288), generator=torch.Generator().manual_seed(0))
    res = {}
    variants = {"torch": False}
    if kernels.available(torch.bfloat16):
        variants["native kernels"] = True
    for name, on in variants.items():
        model.optimize_for_inference("fast", decode_kernels=on)  # the fast path's decode attention too
        with torch.inference_mode():
            cache = DynamicCache()
            out = lm(input_ids=ids, use_cache=True, logits_to_keep=1, **{kw: cache})
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            pos = ids.shape[1]

            def step():
                nonlocal tok, pos
                o = lm(input_ids=tok, position_ids=torch.tensor([[pos]]), use_cache=True, **{kw: cache})
                tok = o.logits[:, -1].argmax(-1, keepdim=True)
                pos += 1

            for _ in range(3):
                step()
            times = []
            for _ in range(steps):
                quiet(max_wait)
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
            quiet(max_wait)
            with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
                step()
        cats: dict[str, float] = {}
        ops = {evt.key: (evt.self_cpu_time_total / 1e6, evt.count) for evt in prof.key_averages()
               if evt.self_cpu_time_total > 0}
        for evt in prof.key_averages():
            k = evt.key
            if evt.self_cpu_time_total <= 0:
                continue
            if k in ("aten::mm", "aten::addmm", "aten::linear") or "gemv" in k:
                c = "linear layers (weight streaming)"
            elif "scaled_dot_product" in k:
                c = "attention"
            elif k in ("aten::cat", "aten::index_copy_", "aten::slice_scatter"):
                c = "KV cache updates"
            elif k == "aten::argmax":
                c = "argmax"
            else:
                c = "other ops (norms, rotary, elementwise, dispatch)"
            cats[c] = cats.get(c, 0.0) + evt.self_cpu_time_total / 1e6
        total = sum(cats.values())
        res[name] = {"step_s": {"median": statistics.median(times), "min": min(times)},
                     "tokens_per_s_median": 1 / statistics.median(times),
                     "profiled_self_cpu_s": total,
                     "categories_s": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
                     "top_ops": [{"op": k, "self_cpu_s": round(t, 6), "calls": n}
                                 for k, (t, n) in sorted(ops.items(), key=lambda kv: -kv[1][0])[:15]]}
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--decode", action="store_true", help="also profile 0.5B decode steps")
    p.add_argument("--decode-steps", type=int, default=20)
    p.add_argument("--default-allocator", action="store_true",
                   help="keep glibc's default mmap thresholds (default: fastvlm.kernels.tune_allocator(), as the CLI)")
    p.add_argument("--quiet-wait", type=float, default=0.0,
                   help="before each timed run wait up to this many seconds for the CPUs to go idle")
    p.add_argument("--out", default=os.path.join(HERE, "results", "profile-cpu.json"))
    args = p.parse_args()

    import transformers

    from fastvlm import kernels

    tuned = False if args.default_allocator else kernels.tune_allocator()
    report = {
        "command": "python benchmarks/profile_encoder.py " + " ".join(sys.argv[1:]),
        "machine": {"cpu": platform.processor(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "transformers": transformers.__version__, "load_average_start": list(os.getloadavg()),
                    "allocator": "glibc, mmap/trim thresholds raised" if tuned else "default"},
        "resolution": args.resolution,
        "encoder": profile_encoders(args.configs, args.resolution, args.repeats, args.quiet_wait),
    }
    try:
        with open("/proc/cpuinfo") as f:
            report["machine"]["cpu"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if args.decode:
        report["decode"] = profile_decode(args.decode_steps, args.quiet_wait)
    report["machine"]["load_average_end"] = list(os.getloadavg())
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")

    for c, r in report["encoder"].items():
        print(f"\n{c}: wall median {r['wall_s']['median'] * 1000:.0f} ms (min {r['wall_s']['min'] * 1000:.0f}), "
              f"profiled {r['profiled_self_cpu_s'] * 1000:.0f} ms")
        for k, v in r["categories_s"].items():
            print(f"  {k:42s} {v * 1000:8.1f} ms  {100 * r['categories_share'][k]:5.1f}%")
    for name, r in report.get("decode", {}).items():
        print(f"\ndecode step, {name}: median {r['step_s']['median'] * 1000:.1f} ms "
              f"({r['tokens_per_s_median']:.1f} tokens/s)")
        for k, v in r["categories_s"].items():
            print(f"  {k:50s} {v * 1000:8.1f} ms")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
