#!/usr/bin/env python
"""A/B of the LLM prefill with oneDNN-prepacked linear weights against the plain ones (an idea measured, not taken).

  python benchmarks/prepack_ab.py       # 0.5B, 288 tokens, bf16 and fp32; writes benchmarks/results/prepack-ab-cpu.json

PyTorch runs a CPU `F.linear` on a plain [out, in] weight through oneDNN, which lays the weight out for its
kernels on every call. `torch.ops.mkldnn._reorder_linear_weight` does that once (what inductor's CPU path and IPEX
do), and `torch.ops.mkldnn._linear_pointwise` then takes the packed copy. The fast path's decode kernels read the
plain [out, in] weights (the native whole-model step, `fastvlm.kernels.decode_model`), so packing for prefill
means keeping both: the report gives that extra memory next to the time saved.

Random 0.5B weights in the fast mode; the prefill of 288 positions (256 image tokens and 32 of text) with logits
for the last one, as `generate` runs it; every linear of the decoder layers packed for 288 rows. The two ways
alternate round by round, in alternating order; medians, and the median of the per-round ratios.
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
TOKENS = 288


def run(dtype: torch.dtype, rounds: int) -> dict:
    from transformers import DynamicCache

    from fastvlm.model import FastVLM

    model = FastVLM.from_preset("fastvlm-0.5b").to(dtype).eval()
    model.optimize_for_inference("fast")
    lm = model.language_model
    linears = [m for name, m in lm.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in name]
    packed = {m: torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), TOKENS) for m in linears}
    use_packed = {"on": False}

    def forward(self, x):
        if use_packed["on"] and x.numel() != x.shape[-1]:  # prompt rows; one-token steps keep their kernels
            return torch.ops.mkldnn._linear_pointwise(x, packed[self], self.bias, "none", [], "")
        return type(self).forward(self, x)

    for m in linears:
        m.forward = forward.__get__(m)
    embeds = torch.randn(1, TOKENS, lm.config.hidden_size, dtype=dtype, generator=torch.Generator().manual_seed(0))

    def prefill() -> torch.Tensor:
        with torch.inference_mode():
            return lm(inputs_embeds=embeds, use_cache=True, past_key_values=DynamicCache(), logits_to_keep=1).logits

    outputs = {}
    for on in (False, True):
        use_packed["on"] = on
        outputs[on] = prefill().float()
        prefill()
    times: dict[bool, list[float]] = {False: [], True: []}
    for r in range(rounds):
        for on in ((False, True) if r % 2 == 0 else (True, False)):
            use_packed["on"] = on
            t = time.perf_counter()
            prefill()
            times[on].append(time.perf_counter() - t)
    ratios = [p / q for p, q in zip(times[True], times[False])]
    extra = sum(p.numel() * p.element_size() for p in packed.values())
    weights = sum(p.numel() * p.element_size() for p in lm.parameters())
    return {
        "dtype": str(dtype).replace("torch.", ""),
        "linears_packed": len(linears),
        "plain_ms": {"median": 1000 * statistics.median(times[False]), "samples": [1000 * t for t in times[False]]},
        "packed_ms": {"median": 1000 * statistics.median(times[True]), "samples": [1000 * t for t in times[True]]},
        "packed_over_plain_per_round": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
        "same_logits": bool(torch.equal(outputs[False], outputs[True])),
        "max_abs_logit_difference": float((outputs[False] - outputs[True]).abs().max()),
        "extra_memory_mb": extra / 2**20,
        "llm_weights_mb": weights / 2**20,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    p.add_argument("--rounds", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "prepack-ab-cpu.json"))
    args = p.parse_args()
    sys.path.insert(0, os.path.dirname(HERE))
    import transformers

    from fastvlm import kernels
    from fastvlm.bench.report import write_json

    if args.threads:
        torch.set_num_threads(args.threads)
    kernels.tune_allocator()
    report = {
        "command": "python benchmarks/prepack_ab.py " + " ".join(sys.argv[1:]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpu": kernels.cpuinfo_field("model name") or platform.processor(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "load_average_start": list(os.getloadavg())},
        "tokens": TOKENS,
        "results": [],
    }
    for name in args.dtypes:
        r = run({"bf16": torch.bfloat16, "fp32": torch.float32}[name], args.rounds)
        report["results"].append(r)
        print(f"{r['dtype']}: plain {r['plain_ms']['median']:.1f} ms, packed {r['packed_ms']['median']:.1f} ms, "
              f"packed/plain per round {r['packed_over_plain_per_round']['median']:.3f} "
              f"({r['packed_over_plain_per_round']['min']:.3f}-{r['packed_over_plain_per_round']['max']:.3f}); "
              f"same logits {r['same_logits']} (max diff {r['max_abs_logit_difference']:.2e}); "
              f"+{r['extra_memory_mb']:.0f} MB on {r['llm_weights_mb']:.0f} MB of LLM weights", flush=True)
    report["machine"]["load_average_end"] = list(os.getloadavg())
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_json(report, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
