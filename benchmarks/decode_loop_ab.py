#!/usr/bin/env python
"""Interleaved A/B of whole generations: the native decode loop against transformers' loop with lean layers.

  python benchmarks/decode_loop_ab.py --out benchmarks/results/decode-loop-ab-cpu-intel.json

Both variants are `model.generate` on the same model (--dtype) in the fast mode, batch 1, the same
prompt (random token ids, --context of them; decode speed does not depend on an image), greedy,
--new-tokens tokens with no end token:
  native   what `generate` does now: after the prefill, one native call per token over a KV cache
           allocated for the whole generation (fastvlm.kernels.decode_model), setup included;
  layers   the same with the native loop switched off: transformers' model and DynamicCache, in bf16
           each layer's step as three native calls (fastvlm.kernels.decode_layer), in fp32 transformers'
           layers around the native matrix-vector kernel.
Each round runs both, in an order that alternates every round, with the memory read bandwidth
read first; decode tokens/s is generate's own (Timings.decode_tokens_per_s: the tokens after the
first over the time after the first, which includes building the native decoder). In bf16 the two
loops' greedy tokens can part where two logits are within bf16 rounding of each other, so the
fp32 model, teacher-forced on each loop's tokens, says how often it picks the same token and, at
the first difference, how far apart its two best logits are (--no-fp32-check skips this). Writes JSON.
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


def _setup_ms(lm, ids, capacity: int, repeats: int = 10) -> float:
    from transformers import DynamicCache

    from fastvlm.generation import cache_argument, native_decoder

    times = []
    with torch.inference_mode():
        cache = DynamicCache()
        lm(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_argument(lm): cache})
        for _ in range(repeats):
            t = time.perf_counter()
            native_decoder(lm, capacity).load_cache(cache, ids.shape[1])
            times.append(time.perf_counter() - t)
    return round(1000 * statistics.median(times), 2)


def _fp32_check(lm, ids, tokens: dict, prefix: int) -> dict:
    """The fp32 copy of `lm` (PyTorch's matmuls), teacher-forced on each loop's tokens."""
    import copy
    import math

    from fastvlm import kernels

    m32 = copy.deepcopy(lm).float()
    kernels.use_decode_kernels(m32, False)
    n = ids.shape[1]
    out: dict = {"fp32_agrees": {}}
    with torch.inference_mode():
        for v, toks in tokens.items():
            logits = m32(input_ids=torch.cat([ids, torch.tensor([toks])], 1)).logits[0, n - 1:n - 1 + len(toks)]
            out["fp32_agrees"][v] = int((logits.argmax(-1) == torch.tensor(toks)).sum())
            if v == "native" and prefix < len(toks):
                top = logits[prefix].float().topk(2)
                step = 2.0 ** (math.floor(math.log2(abs(float(top.values[0])))) - 7)
                out["at_first_difference"] = {
                    "index": prefix, "native_token": toks[prefix], "layers_token": tokens["layers"][prefix],
                    "fp32_top2_tokens": top.indices.tolist(), "fp32_top2_logits": [round(float(x), 5) for x in top.values],
                    "fp32_top2_gap": round(float(top.values[0] - top.values[1]), 5),
                    "bf16_step_at_top": step, "logit_scale": round(float(logits[prefix].abs().max()), 4)}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="fastvlm-0.5b")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--context", type=int, default=288, help="prompt tokens (default 288: 256 image tokens and a question)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--no-fp32-check", action="store_true", help="skip the fp32 teacher-forced check of the tokens")
    p.add_argument("--out", default=os.path.join(HERE, "results", "decode-loop-ab-cpu.json"))
    a = p.parse_args()

    from fastvlm import FastVLM, generation, kernels
    from fastvlm.bench.core import lm_decode_bytes, machine_info, read_bandwidth
    from fastvlm.bench.report import write_json

    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    if not kernels.available(dtype):
        p.error(f"needs the native kernels for {a.dtype}: {kernels.status()}")
    kernels.tune_allocator()
    model = FastVLM.from_preset(a.preset, device="cpu", dtype=dtype).optimize_for_inference("fast")
    vocab = model.language_model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(3, min(1000, vocab), (1, a.context), generator=torch.Generator().manual_seed(0))
    real = generation.native_decoder
    variants = ("native", "layers")
    speed: dict[str, list[float]] = {v: [] for v in variants}
    tokens: dict[str, list[int]] = {}
    bandwidth = []
    for r in range(a.rounds + 1):  # round 0 warms up
        bw = read_bandwidth(torch.device("cpu"), repeats=3)["gbps_median"]
        for v in variants if r % 2 == 0 else variants[::-1]:
            generation.native_decoder = real if v == "native" else (lambda lm, capacity: None)
            try:
                out = model.generate(ids, max_new_tokens=a.new_tokens, eos_token_id=[], return_dict=True)
            finally:
                generation.native_decoder = real
            tokens[v] = out.sequences[0].tolist()
            if r:
                speed[v].append(out.timings.decode_tokens_per_s)
        if r:
            bandwidth.append(bw)
    setup_ms = _setup_ms(model.language_model, ids, a.context + a.new_tokens)
    nbytes = lm_decode_bytes(model.language_model, a.context)
    prefix = next((i for i, (x, y) in enumerate(zip(tokens["native"], tokens["layers"])) if x != y), a.new_tokens)
    fp32_check = None
    if dtype == torch.bfloat16 and not a.no_fp32_check:
        fp32_check = _fp32_check(model.language_model, ids, tokens, prefix)
    rows = {}
    for v, s in speed.items():
        rows[v] = {"decode_tokens_per_s_median": round(statistics.median(s), 2),
                   "fraction_of_bound_paired": round(statistics.median(
                       t * nbytes / (bw * 1e9) for t, bw in zip(s, bandwidth)), 3)}
    report = {
        "command": "python benchmarks/decode_loop_ab.py " + " ".join(sys.argv[1:]),
        "machine": {**machine_info(torch.device("cpu")), "threads": torch.get_num_threads(),
                    "python": platform.python_version()},
        "preset": a.preset, "dtype": a.dtype, "context": a.context, "new_tokens": a.new_tokens, "rounds": a.rounds,
        "decode_bytes_per_token": nbytes, "read_bandwidth_gbps_per_round": [round(b, 1) for b in bandwidth],
        "decode_tokens_per_s_per_round": {v: [round(t, 2) for t in s] for v, s in speed.items()},
        "variants": rows,
        "native_over_layers_per_round": [round(x / y, 3) for x, y in zip(speed["native"], speed["layers"])],
        # what the native loop does once per generation at its first step: build the decoder, copy the
        # prefill's cache into it (median of 10, in ms; counted in its decode time above)
        "native_setup_ms": setup_ms,
        "same_greedy_tokens": sum(x == y for x, y in zip(tokens["native"], tokens["layers"])),
        "same_greedy_prefix": prefix,
        "greedy_tokens": a.new_tokens,
        "fp32_check": fp32_check,
    }
    write_json(report, a.out)
    print(f"{a.preset} {a.dtype}, {a.context}-token prompt, {a.new_tokens} new tokens, {a.rounds} interleaved rounds, "
          f"read bandwidth median {statistics.median(bandwidth):.1f} GB/s")
    for v, row in rows.items():
        print(f"  {v:8s} {row['decode_tokens_per_s_median']:6.2f} tokens/s "
              f"({100 * row['fraction_of_bound_paired']:.0f}% of the paired bound)")
    print(f"  native loop's setup (decoder and cache copy): {setup_ms} ms per generation")
    print(f"  native / layers per round: median {statistics.median(report['native_over_layers_per_round']):.3f}; "
          f"greedy tokens the same: the first {prefix} of {a.new_tokens}")
    if fp32_check:
        print("  fp32, teacher-forced, picks the same token as: " + ", ".join(
            f"{v} {fp32_check['fp32_agrees'][v]} of {a.new_tokens}" for v in variants))
        if fp32_check.get("at_first_difference"):
            d = fp32_check["at_first_difference"]
            print(f"  at the first difference fp32's two best logits are {d['fp32_top2_gap']:.4f} apart "
                  f"(one bf16 step at that value: {d['bf16_step_at_top']:.4f})")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
