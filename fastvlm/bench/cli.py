"""Measure time to first token (image encoding, projector, LLM prefill), decode speed and peak memory.

Batch 1, medians over repeated runs after warm-up, every configuration interleaved round
by round. In the same run: transformers' FastVlmForConditionalGeneration on identical
weights, the encoders the FastVLM paper compares with (CLIP ViT-L/14, SigLIP-SO400M,
LLaVA-OneVision tiling, ConvLLaVA's ConvNeXt-L) feeding the same LLM, the machine's
matmul and memory-bandwidth roofline, and the accuracy of every mode against the fp32
exact path. Random weights unless --model is given (no download).

  fastvlm bench --preset fastvlm-tiny                       # seconds: a smoke test
  fastvlm bench --preset fastvlm-0.5b --dtypes fp32 bf16    # the 0.5B architecture at 1024 px
  fastvlm bench --preset fastvlm-0.5b --modes fast --resolutions 256:2048:64 --baselines none
  fastvlm bench --model DIR --device cuda --dtypes bf16 fp16

Writes <out>/<name>.json and <name>-ttft.png / <name>-breakdown.png.
"""

from __future__ import annotations

import argparse
import sys

MODES = ("exact", "fast", "compile", "int8")


def parse_resolutions(values: list[str]) -> list[int]:
    """'256 512 1024' or ranges 'START:STOP:STEP' (STOP included), e.g. 256:2048:64."""
    from ..errors import ConfigError

    out: list[int] = []
    for v in values:
        for part in str(v).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                if ":" in part:
                    bits = [int(b) for b in part.split(":")]
                    start, stop = bits[0], bits[1]
                    step = bits[2] if len(bits) > 2 else 64
                    if step <= 0:
                        raise ValueError
                    out += list(range(start, stop + 1, step))
                else:
                    out.append(int(part))
            except ValueError:
                raise ConfigError(f"cannot read resolution {part!r}; use e.g. 1024 or 256:2048:64") from None
    for r in out:
        if r <= 0 or r % 64:
            raise ConfigError(f"resolution {r} is not a positive multiple of 64 (the encoder's stride)")
    return list(dict.fromkeys(out))


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", nargs="+", default=None,
                     help="preset architecture(s) with random weights: fastvlm-tiny, fastvlm-0.5b, fastvlm-1.5b, "
                          "fastvlm-7b (the 7B needs ~15 GB in bf16; default fastvlm-0.5b)")
    src.add_argument("--model", "-m", default=None, help="benchmark this checkpoint directory or Hub id instead")
    p.add_argument("--device", default="auto", help="cuda, mps, cpu or auto")
    p.add_argument("--dtypes", nargs="+", default=["auto"],
                   help="fp32, bf16, fp16, auto (bf16 on CUDA and native-bf16 CPUs, fp16 on MPS, else fp32)")
    p.add_argument("--modes", nargs="+", default=["exact", "fast", "int8"], choices=MODES,
                   help="exact: reference arithmetic; fast: fused encoder, channels-last, SDPA, native decode "
                        "kernels; compile: fast + torch.compile of the encoder; int8: fast + int8 LLM linears (CPU)")
    p.add_argument("--resolutions", nargs="+", default=None,
                   help="square input sizes, multiples of 64, or ranges START:STOP:STEP (default: the model's)")
    p.add_argument("--text-tokens", type=int, default=32, help="text tokens around the image (default 32)")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated per run for the decode rate (default 16)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (default 5)")
    p.add_argument("--baselines", default="auto", choices=("auto", "none", "transformers", "encoders", "all"),
                   help="transformers' FastVLM port and/or the paper's encoders (auto: both, only the port for "
                        "fastvlm-tiny)")
    p.add_argument("--baseline-resolutions", nargs="+", default=None,
                   help="resolutions at which transformers' port runs too (default 1024 if measured, else the first)")
    p.add_argument("--baseline-repeats", type=int, default=3, help="timed rounds per paper encoder (default 3)")
    p.add_argument("--baseline-dtypes", nargs="+", default=None,
                   help="dtypes for the paper encoders (default: the last of --dtypes)")
    p.add_argument("--no-accuracy", action="store_true", help="skip the accuracy comparison against fp32 exact")
    p.add_argument("--accuracy-resolution", type=int, default=None)
    p.add_argument("--no-roofline", action="store_true", help="skip the matmul and bandwidth measurements")
    p.add_argument("--matmul-size", type=int, default=None, help="n of the n^3 matmul peak (default 2048 CPU, 8192 GPU)")
    p.add_argument("--bandwidth-mb", type=int, default=1024, help="buffer read for the bandwidth figure (default 1024)")
    p.add_argument("--plain-init", action="store_true",
                   help="keep from_preset's training init for the encoder (default: trained-model scales)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--quiet-wait", type=float, default=0.0,
                   help="on a shared machine: before each timed run, wait up to this many seconds for the CPUs "
                        "to go idle (others using < --quiet-below %%); waits are recorded (default 0: off)")
    p.add_argument("--quiet-below", type=float, default=15.0)
    p.add_argument("--default-allocator", action="store_true",
                   help="keep glibc's default mmap thresholds (default: raise them, as the CLI does; "
                        "see fastvlm.kernels.tune_allocator)")
    p.add_argument("--transformers-fresh-process", action="store_true",
                   help="also time transformers' port in a separate, fresh process with glibc's default allocator "
                        "settings (how it runs on its own); reported as transformers-fresh with our TTFT over it. "
                        "The in-process baseline shares this process's allocator tuning and warm heap")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results", help="output directory (default benchmarks/results)")
    p.add_argument("--name", default=None, help="file name stem (default bench-<model>-<device>)")
    p.add_argument("--no-plots", action="store_true")


def run(args) -> int:
    import os

    import torch

    from ..model import resolve_device
    from . import report as rep
    from .runner import BenchConfig, default_output_name, run_benchmark

    from .. import kernels
    from . import suite

    # every variant runs in this one process: fix the allocator's behaviour up front rather
    # than let it drift with what ran before (see kernels.tune_allocator)
    allocator_tuned = False if args.default_allocator else kernels.tune_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    suite.QUIET.update(max_wait_s=args.quiet_wait, busy_below=args.quiet_below)
    cfg = BenchConfig(
        presets=args.preset or (["fastvlm-0.5b"] if not args.model else []),
        model_dir=args.model,
        device=args.device,
        dtypes=args.dtypes,
        modes=list(dict.fromkeys(args.modes)),
        resolutions=parse_resolutions(args.resolutions) if args.resolutions else None,
        text_tokens=args.text_tokens,
        new_tokens=max(args.new_tokens, 1),
        warmup=max(args.warmup, 0),
        repeats=max(args.repeats, 1),
        baselines=args.baselines,
        baseline_resolutions=parse_resolutions(args.baseline_resolutions) if args.baseline_resolutions else None,
        baseline_repeats=max(args.baseline_repeats, 1),
        baseline_dtypes=args.baseline_dtypes,
        accuracy=not args.no_accuracy,
        accuracy_resolution=args.accuracy_resolution,
        roofline=not args.no_roofline,
        matmul_size=args.matmul_size,
        bandwidth_mb=args.bandwidth_mb,
        realistic_weights=not args.plain_init,
        seed=args.seed,
        transformers_fresh=args.transformers_fresh_process,
        command=["fastvlm", "bench", *sys.argv[2:]] if len(sys.argv) > 1 and sys.argv[1] == "bench" else sys.argv,
    )
    report = run_benchmark(cfg)
    report["machine"]["allocator"] = "glibc, mmap/trim thresholds raised" if allocator_tuned else "default"
    name = args.name or default_output_name(cfg, resolve_device(args.device))
    stem = os.path.join(args.out, name)
    rep.write_json(report, stem + ".json")
    print(rep.format_report(report))
    written = [stem + ".json"]
    if not args.no_plots:
        written += rep.write_plots(report, stem)
    print("wrote " + ", ".join(written))
    return 0
