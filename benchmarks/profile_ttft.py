#!/usr/bin/env python
"""torch.profiler tables of one time-to-first-token call (`generate` with one new token), per inference mode.

Where the TTFT goes on a GPU, where batch 1 is bound by kernel launches and host work: the ops with the most
host time, the kernels with the most device time, and the number of kernel launches and host-device syncs.
The 0.5B preset with random weights; the prompt is the bench's (an image and 32 text tokens). Modes: exact, fast
(on CUDA the encoder replayed as a CUDA graph) and no-graphs (fast without them). profile-ttft-h200.txt predates
the graphs as fast's default: its "fast" is no-graphs and its "graphs" is fast.

  python benchmarks/profile_ttft.py --device cuda --dtype bf16 --out benchmarks/results/profile-ttft-h200.txt
  python benchmarks/profile_ttft.py --preset fastvlm-tiny --device cpu --resolution 256   # a smoke test
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="fastvlm-0.5b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--modes", nargs="+", default=["exact", "fast", "no-graphs"],
                    choices=["exact", "fast", "no-graphs"], help="no-graphs: fast without CUDA graphs (CUDA only)")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from fastvlm import FastVLM
    from fastvlm.bench import core
    from fastvlm.bench.suite import image, prompt_ids
    from fastvlm.generation import generate

    device = torch.device(args.device)
    model = FastVLM.from_preset(args.preset, device=device, dtype=DTYPES[args.dtype])
    vocab = min(1000, model.language_model.config.vocab_size)
    ids = prompt_ids(model.vision_tower.num_tokens(args.resolution), vocab=vocab).to(device)
    px = image(args.resolution).to(device=device, dtype=model.dtype)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    lines = [f"{args.preset} random weights, {args.dtype}, {args.resolution} px, batch 1, "
             f"{ids.shape[1]} prompt tokens, one new token; {core.machine_info(device).get('gpu', 'cpu')}, "
             f"torch {torch.__version__}"]

    def run():
        with torch.inference_mode():
            return generate(model, ids, pixel_values=px, max_new_tokens=1, eos_token_id=[])

    for mode in args.modes:
        if mode == "no-graphs" and device.type != "cuda":
            continue
        model.optimize_for_inference("exact" if mode == "exact" else "fast",
                                     cuda_graphs=False if mode == "no-graphs" else None)
        for _ in range(3):
            run()
        core.sync(device)
        walls = []
        for _ in range(5):
            t0 = time.perf_counter()
            out = run()
            core.sync(device)
            walls.append(time.perf_counter() - t0)
        t = out.timings
        with profile(activities=activities) as prof:
            run()
            core.sync(device)
        events = prof.key_averages()
        launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel",
                                                               "cuLaunchKernelEx"))
        syncs = sum(e.count for e in events if "Synchronize" in e.key or e.key in ("cudaMemcpyAsync",))
        lines += ["", f"=== mode {mode}: wall {sorted(walls)[2] * 1e3:.1f} ms (median of 5), encode "
                      f"{t.encode_s * 1e3:.1f} ms, prefill {t.prefill_s * 1e3:.1f} ms, TTFT {t.ttft_s * 1e3:.1f} ms; "
                      f"kernel launches {launches}, synchronizing calls/copies {syncs}",
                  "--- by host time (self) ---",
                  events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60)]
        if device.type == "cuda":
            lines += ["--- by device time (self) ---",
                      events.table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=60)]
        print("\n".join(lines[-5:-1] if device.type == "cuda" else lines[-3:-1]), flush=True)
    text = "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
