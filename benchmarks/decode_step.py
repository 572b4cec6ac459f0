#!/usr/bin/env python
"""One decode step of the LLM, interleaved A/B of the CPU decode paths, against what its weights cost to read.

  python benchmarks/decode_step.py                  # 0.5B, bf16, writes benchmarks/results/decode-step-cpu-bf16.json

Each round times one step of every variant back to back, in an order rotated every round (each
variant keeps its own KV cache, so all see the same context length), plus one pass of every
weight matrix through the native matrix-vector kernel alone (the floor for any path that reads
the weights once), plus the memory read bandwidth. Variants:
  native      the fast path's generation loop: the whole step, every layer, attention over a
              preallocated KV cache and the LM head, as one native call (fastvlm.kernels.decode_model)
  lean        native matrix-vector kernels and, in bf16, Qwen2 decode steps as three native calls per
              layer (fastvlm.kernels.decode_layer) inside transformers' model, with its DynamicCache
              (in fp32 the same as "modules")
  modules     transformers' decoder layers around the same native kernels (the fast path before
              the lean layers)
  torch       transformers' layers and PyTorch's matmuls (no native kernels)
  native@NB, lean@NB   with --prefetch N ...: those paths with the kernels' software prefetch N bytes
              ahead (the other variants keep this CPU's default, fastvlm.kernels.default_prefetch_bytes)
Random weights (time does not depend on their values); the prompt is random token ids.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ("native", "lean", "modules", "torch")


def _random_read_gbps(buf: torch.Tensor, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t)
    return buf.numel() * buf.element_size() / best / 1e9


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="fastvlm-0.5b")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--context", type=int, default=288, help="prompt tokens before the timed steps (default 288: "
                                                              "256 image tokens and a short question)")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--prefetch", type=int, nargs="*", default=[], metavar="BYTES",
                   help="also time the native and lean paths with each of these prefetch distances (0: off)")
    p.add_argument("--out", default=None, help="JSON output (default benchmarks/results/decode-step-cpu-DTYPE.json)")
    a = p.parse_args()
    from transformers import DynamicCache

    from fastvlm import FastVLM, kernels
    from fastvlm.bench.core import lm_decode_bytes, machine_info, read_bandwidth
    from fastvlm.bench.report import write_json
    from fastvlm.generation import cache_argument
    from fastvlm.kernels.decode_layer import use_lean_decode_layers
    from fastvlm.kernels.decode_model import NativeQwen2Decoder

    if not kernels.available(torch.bfloat16 if a.dtype == "bf16" else torch.float32):
        p.error(f"needs the native kernels: {kernels.status()}")
    kernels.tune_allocator()
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    model = FastVLM.from_preset(a.preset, device="cpu", dtype=dtype)
    model.optimize_for_inference("fast")
    lm = model.language_model
    kw = cache_argument(lm)
    vocab = lm.get_input_embeddings().weight.shape[0]
    ids = torch.randint(3, min(1000, vocab), (1, a.context), generator=torch.Generator().manual_seed(0))
    lins = [m for m in lm.modules() if isinstance(m, torch.nn.Linear)]
    xs = [torch.randn(1, 1, m.in_features).to(dtype) for m in lins]

    variants = VARIANTS
    variants += tuple(f"{v}@{n}B" for n in a.prefetch for v in ("native", "lean"))
    default_pf = kernels.prefetch_bytes()

    def put(variant: str) -> None:
        lean = variant.startswith(("lean", "native"))
        kernels.set_prefetch(int(variant.split("@")[1][:-1]) if "@" in variant else default_pf)
        kernels.use_decode_kernels(lm, variant != "torch")
        use_lean_decode_layers(lm, lean)

    # the bench's reader sums a buffer of ones; this one sums random values, as weights are, to see
    # whether the readings' ups and downs are the machine's or the buffer's
    random_buf = torch.rand(2**28, generator=torch.Generator().manual_seed(1))
    random_bw: list[float] = []
    times: dict[str, list[float]] = {v: [] for v in (*variants, "weights through the kernel")}
    tokens: dict[str, list[int]] = {v: [] for v in variants}
    bandwidth = []
    state = {}
    with torch.inference_mode():
        for v in variants:
            put(v)
            cache = DynamicCache()
            out = lm(input_ids=ids, use_cache=True, logits_to_keep=1, **{kw: cache})
            if v.startswith("native"):
                native = NativeQwen2Decoder.for_model(lm, a.context + a.rounds + 2)
                native.load_cache(cache, a.context)
                cache = native
            state[v] = [cache, out.logits[:, -1].argmax(-1, keepdim=True), a.context]
        for r in range(a.rounds + 2):  # the first two rounds warm up
            bw = read_bandwidth(torch.device("cpu"), repeats=3)["gbps_median"]
            random_bw.append(_random_read_gbps(random_buf))
            # rotated every round: the first variant after the bandwidth reads starts from a cold cache
            for v in variants[r % len(variants):] + variants[:r % len(variants)]:
                put(v)
                cache, tok, pos = state[v]
                t = time.perf_counter()
                if v.startswith("native"):
                    tok = cache.step(int(tok), pos).argmax(-1, keepdim=True)
                else:
                    out = lm(input_ids=tok, position_ids=torch.tensor([[pos]]), use_cache=True, **{kw: cache})
                    tok = out.logits[:, -1].argmax(-1, keepdim=True)
                dt = time.perf_counter() - t
                state[v][1:] = [tok, pos + 1]
                tokens[v].append(int(tok))
                if r >= 2:
                    times[v].append(dt)
            kernels.set_prefetch(default_pf)
            t = time.perf_counter()
            for m, x in zip(lins, xs):
                kernels.gemv(x, m.weight, m.bias)
            if r >= 2:
                times["weights through the kernel"].append(time.perf_counter() - t)
                bandwidth.append(bw)
    nbytes = lm_decode_bytes(lm, a.context)
    bound_s = [nbytes / (bw * 1e9) for bw in bandwidth]
    rows = {}
    for v, ts in times.items():
        rows[v] = {"step_ms_median": round(1000 * statistics.median(ts), 2), "step_ms_min": round(1000 * min(ts), 2),
                   "tokens_per_s": round(1 / statistics.median(ts), 2),
                   "fraction_of_bound_paired": round(statistics.median(b / t for b, t in zip(bound_s, ts)), 3)}
    report = {
        "command": "python benchmarks/decode_step.py " + " ".join(sys.argv[1:]),
        "machine": {**machine_info(torch.device("cpu")), "threads": torch.get_num_threads(),
                    "python": platform.python_version()},
        "prefetch_bytes_default": default_pf,
        "preset": a.preset, "dtype": a.dtype, "context": a.context, "rounds": a.rounds,
        "decode_bytes_per_token": nbytes, "read_bandwidth_gbps_per_round": [round(b, 1) for b in bandwidth],
        "random_buffer_read_gbps_per_round": [round(b, 1) for b in random_bw[2:]],
        "step_ms_per_round": {v: [round(1000 * t, 2) for t in ts] for v, ts in times.items()},
        "variants": rows,
        # the lean layers round where transformers' modules do: the same greedy tokens as "modules"
        "greedy_tokens_same_as_modules": {v: sum(x == y for x, y in zip(tokens[v], tokens["modules"]))
                                          for v in variants if v != "modules"},
        "greedy_tokens": len(tokens["modules"]),
    }
    out = a.out or os.path.join(HERE, "results", f"decode-step-cpu-{a.dtype}.json")
    write_json(report, out)
    print(f"{a.preset} {a.dtype}, context {a.context}, {a.rounds} interleaved rounds, "
          f"{nbytes / 1e6:.0f} MB of weights per token, read bandwidth median "
          f"{statistics.median(bandwidth):.1f} GB/s")
    for v, r in rows.items():
        print(f"  {v:28s} {r['step_ms_median']:7.2f} ms  ({r['tokens_per_s']:5.1f} tok/s, "
              f"{100 * r['fraction_of_bound_paired']:.0f}% of the paired bound)")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
