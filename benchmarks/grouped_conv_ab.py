#!/usr/bin/env python
"""A/B of the fused encoder's grouped convs: oneDNN's grouped kernel against a depthwise conv on repeated channels.

  python benchmarks/grouped_conv_ab.py            # 1024 px, bf16 and fp32, writes benchmarks/results/grouped-conv-ab-cpu.json

FastViTHD's 7x7 stride-2 downsamplers (and the 3x3 expansion before the head) are grouped convs with one input
and two outputs per group. `fastvlm.vision.fused.FusedConv` runs them on CPUs as depthwise convs over the input
with every channel repeated (`_repeat_channels`). This times, on the same weights (random, at trained-model
scales), each such conv on its real input alone, both ways, and the whole fused encoder with the rewrite on and
off, interleaved round by round in alternating order. Medians; the feature difference between the two is
reported too (the sums are the same, their order may differ).
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

HERE = os.path.dirname(os.path.abspath(__file__))


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def run(config: str, resolution: int, rounds: int) -> dict:
    sys.path.insert(0, HERE)
    from profile_encoder import build_encoder

    from fastvlm.vision.fused import FusedConv

    enc, dtype, _ = build_encoder(config)
    x = torch.rand(1, 3, resolution, resolution, generator=torch.Generator().manual_seed(0))
    x = x.to(dtype).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        program = enc.fused_program()
        convs = [m for m in program.modules() if isinstance(m, FusedConv) and m.multiplier > 1]
        multipliers = [m.multiplier for m in convs]

        def rewrite(on: bool) -> None:
            for m, k in zip(convs, multipliers):
                m.multiplier = k if on else 1

        inputs = {}
        hooks = [m.register_forward_pre_hook(lambda mod, args: inputs.setdefault(mod, args[0].clone()))
                 for m in convs]
        rewrite(False)
        ref = enc(x).double()
        for h in hooks:
            h.remove()
        rewrite(True)
        new = enc(x).double()
        per_conv = []
        for m in convs:
            xi = inputs[m]
            row = {"input": list(xi.shape), "weight": list(m.weight.shape), "stride": m.stride, "groups": m.groups}
            for on in (False, True):
                rewrite(on)
                row["depthwise_on_repeated_ms" if on else "grouped_ms"] = round(_median_ms(lambda m=m, xi=xi: m(xi), 7), 3)
            per_conv.append(row)
        walls = {"grouped": [], "depthwise_on_repeated": []}
        for r in range(rounds):
            for on in ((False, True) if r % 2 == 0 else (True, False)):
                rewrite(on)
                t = time.perf_counter()
                enc(x)
                walls["depthwise_on_repeated" if on else "grouped"].append(time.perf_counter() - t)
        rewrite(True)
    return {
        "config": config, "resolution": resolution, "rounds": rounds,
        "encoder_ms_median": {k: round(1000 * statistics.median(v), 1) for k, v in walls.items()},
        "encoder_ms_per_round": {k: [round(1000 * t, 1) for t in v] for k, v in walls.items()},
        "convs": per_conv,
        "convs_total_ms": {k: round(sum(c[f"{k}_ms"] for c in per_conv), 2) for k in walls},
        "feature_cosine": torch.nn.functional.cosine_similarity(ref.flatten(), new.flatten(), dim=0).item(),
        "feature_max_abs_diff": (ref - new).abs().max().item(),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--configs", nargs="+", default=["bf16-fused", "fp32-fused"], choices=["bf16-fused", "fp32-fused"])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--out", default=os.path.join(HERE, "results", "grouped-conv-ab-cpu.json"))
    a = p.parse_args()
    from fastvlm.bench.core import machine_info
    from fastvlm.kernels import tune_allocator

    tune_allocator()
    report = {"command": "python benchmarks/grouped_conv_ab.py " + " ".join(sys.argv[1:]),
              "machine": {**machine_info(torch.device("cpu")), "threads": torch.get_num_threads(),
                          "python": platform.python_version()},
              "results": [run(c, a.resolution, a.rounds) for c in a.configs]}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    for r in report["results"]:
        e, c = r["encoder_ms_median"], r["convs_total_ms"]
        print(f"{r['config']} {r['resolution']} px: encoder {e['grouped']:.0f} -> {e['depthwise_on_repeated']:.0f} ms; "
              f"the {len(r['convs'])} convs alone {c['grouped']:.1f} -> {c['depthwise_on_repeated']:.1f} ms; "
              f"feature cosine {r['feature_cosine']:.6f}")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
