#!/usr/bin/env python
"""Interleaved A/B of the bf16 decode step: this checkout's lean decoder layers against a git revision's.

  python benchmarks/decode_ab.py --ref 45b6670 --out benchmarks/results/decode-ab-cpu-intel.json

The revision's `fastvlm/kernels/decode_layer.py` is loaded beside this checkout's (same native
kernels, same model, same weights); each round runs --steps decode steps of each variant back to
back, in an order that alternates every round, each variant on its own KV cache so that both
see the same context lengths. Two models:
  0.5b   the 0.5B architecture (random weights; 992 MB read per token), where the step is the
         weight stream plus everything around it;
  tiny   the same 24 layers, 14 query and 2 KV heads, with hidden size 112 and tiny MLPs and
         vocabulary: the weights fit in cache, so the step is nearly all per-step overhead
         (Python, dispatch, attention, KV-cache appends).
Greedy tokens of the two variants are compared (they should be the same). Writes JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def load_ref_module(rev: str):
    src = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:fastvlm/kernels/decode_layer.py"], check=True,
                         capture_output=True, text=True).stdout
    # the module imports its kernels relatively; point that at the installed package
    src = src.replace("from . import (", "from fastvlm.kernels import (")
    path = os.path.join(tempfile.mkdtemp(), "decode_layer_ref.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("decode_layer_ref", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build(which: str):
    from fastvlm import FastVLM
    from fastvlm.config import FastVLMConfig, _qwen2

    if which == "0.5b":
        model = FastVLM.from_preset("fastvlm-0.5b", device="cpu", dtype=torch.bfloat16)
    else:
        torch.manual_seed(0)
        cfg = FastVLMConfig(text=_qwen2(112, 24, 14, 2, 64, 1000, bos_token_id=None, eos_token_id=2, pad_token_id=0))
        model = FastVLM(cfg).to(torch.bfloat16)
    model.optimize_for_inference("fast")
    return model.language_model


def run(which: str, classes: dict, rounds: int, steps: int, context: int) -> dict:
    from transformers import DynamicCache

    from fastvlm.bench.core import lm_decode_bytes, read_bandwidth
    from fastvlm.generation import cache_argument

    lm = build(which)
    kw = cache_argument(lm)
    layers = list(lm.model.layers)
    vocab = lm.get_input_embeddings().weight.shape[0]
    ids = torch.randint(3, min(1000, vocab), (1, context), generator=torch.Generator().manual_seed(0))
    state, times, tokens, bandwidth = {}, {v: [] for v in classes}, {v: [] for v in classes}, []

    def put(v):
        for layer in layers:
            layer.__class__ = classes[v]

    with torch.inference_mode():
        for v in classes:
            put(v)
            cache = DynamicCache()
            out = lm(input_ids=ids, use_cache=True, logits_to_keep=1, **{kw: cache})
            state[v] = [cache, out.logits[:, -1].float().argmax(-1, keepdim=True), context]
        for r in range(rounds + 2):  # two rounds of warm-up
            if which == "0.5b":
                bw = read_bandwidth(torch.device("cpu"), repeats=3)["gbps_median"]
            for v in (list(classes) if r % 2 == 0 else list(classes)[::-1]):
                put(v)
                cache, tok, pos = state[v]
                for _ in range(steps):
                    t = time.perf_counter()
                    out = lm(input_ids=tok, position_ids=torch.tensor([[pos]]), use_cache=True, **{kw: cache})
                    tok = out.logits[:, -1].float().argmax(-1, keepdim=True)
                    dt = time.perf_counter() - t
                    pos += 1
                    tokens[v].append(int(tok))
                    if r >= 2:
                        times[v].append(dt)
                state[v][1:] = [tok, pos]
            if r >= 2 and which == "0.5b":
                bandwidth.append(bw)
    a, b = list(classes)
    out = {
        "steps_timed_per_variant": len(times[a]),
        "step_ms": {v: {"median": round(1e3 * statistics.median(ts), 2), "min": round(1e3 * min(ts), 2)}
                    for v, ts in times.items()},
        "step_ms_saved_median_of_paired": round(1e3 * statistics.median(x - y for x, y in zip(times[b], times[a])), 2),
        "greedy_tokens_same": sum(x == y for x, y in zip(tokens[a], tokens[b])),
        "greedy_tokens": len(tokens[a]),
    }
    if bandwidth:
        nbytes = lm_decode_bytes(lm, context)
        bound_ms = 1e3 * nbytes / (statistics.median(bandwidth) * 1e9)
        out.update({"decode_bytes_per_token": nbytes, "read_bandwidth_gbps_median": round(statistics.median(bandwidth), 1),
                    "bound_ms": round(bound_ms, 2),
                    "fraction_of_bound": {v: round(bound_ms / r["median"], 3) for v, r in out["step_ms"].items()}})
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", required=True, help="git revision whose decode_layer.py is the baseline")
    p.add_argument("--models", nargs="+", default=["tiny", "0.5b"], choices=("tiny", "0.5b"))
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--steps", type=int, default=4, help="decode steps per variant per round")
    p.add_argument("--context", type=int, default=288)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    from fastvlm import kernels
    from fastvlm.bench.core import machine_info
    from fastvlm.kernels import decode_layer

    if not kernels.available(torch.bfloat16):
        p.error(f"needs the bf16 native kernels: {kernels.status()}")
    kernels.tune_allocator()
    ref = load_ref_module(a.ref)
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "fastvlm/kernels"],
                                check=False, capture_output=True, text=True).stdout.strip())
    classes = {"this checkout": decode_layer.LeanQwen2DecoderLayer, f"at {a.ref}": ref.LeanQwen2DecoderLayer}
    report = {"command": "python benchmarks/decode_ab.py " + " ".join(sys.argv[1:]),
              "checkout": head + (" + uncommitted changes" if dirty else ""),
              "machine": {**machine_info(torch.device("cpu")), "threads": torch.get_num_threads(),
                          "python": platform.python_version()},
              "dtype": "bf16", "context": a.context, "rounds": a.rounds, "steps_per_round": a.steps, "models": {}}
    for which in a.models:
        report["models"][which] = r = run(which, classes, a.rounds, a.steps, a.context)
        print(f"{which}: " + ", ".join(f"{v} {s['median']:.2f} ms" for v, s in r["step_ms"].items())
              + f"; saved {r['step_ms_saved_median_of_paired']:.2f} ms per step (median of pairs); "
              f"greedy tokens same {r['greedy_tokens_same']}/{r['greedy_tokens']}", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
