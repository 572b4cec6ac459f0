"""Measure time to first token (image encoding, projector, LLM prefill), decode speed and peak memory.

Batch 1, medians over repeated runs after warm-up, every configuration interleaved round
by round. In the same run: transformers' FastVlmForConditionalGeneration on identical
weights, the encoders the FastVLM paper compares with (CLIP ViT-L/14, SigLIP-SO400M,
LLaVA-OneVision tiling, ConvLLaVA's ConvNeXt-L) feeding the same LLM (see --baselines for
which run by default), and the machine's matmul and memory-bandwidth roofline. The accuracy
of every mode against the fp32 exact path is measured only when the run has both fp32 in
--dtypes and exact in --modes (the default dtype is bf16 on CPUs with native bf16, so add
e.g. --dtypes fp32 bf16). Random weights (no download) unless --model is given.

  fastvlm bench --preset fastvlm-tiny                       # under a minute: a smoke test
  fastvlm bench --preset fastvlm-0.5b --dtypes fp32 bf16    # the 0.5B architecture at 1024 px, with accuracy
  fastvlm bench --preset fastvlm-0.5b --modes fast --resolutions 256:2048:64 --baselines none
  fastvlm bench --model DIR --device cuda --dtypes bf16 fp16

Writes <out>/<name>.json and <name>-ttft.png / <name>-breakdown.png.
"""

from __future__ import annotations

import argparse
import sys

from ..commands.common import _checked, _float_arg, _int_arg, seconds_arg

MODES = ("exact", "fast", "compile", "int8", "no-graphs", "graph-decode")
DEFAULT_MODES = ["exact", "fast", "int8"]
RESOLUTION_STEP = 64  # STEP of a START:STOP range when left out

# dtype names accepted (resolve_dtype's), each mapped to the name the report uses
_DTYPE_NAMES = {"fp32": "fp32", "float32": "fp32", "float": "fp32", "bf16": "bf16", "bfloat16": "bf16",
                "fp16": "fp16", "float16": "fp16", "half": "fp16", "auto": "auto"}


def _dtype_arg(text: str) -> str:
    try:
        return _DTYPE_NAMES[text.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; use one of fp32, bf16, fp16, auto") from None


_percent_arg = _checked(_float_arg, lambda v: 0 <= v <= 100, "must be a percentage from 0 to 100")


def _at_least(minimum: int, what: str):
    return _checked(_int_arg, lambda v: v >= minimum, f"{what} must be at least {minimum}")


def _resolution_arg(text: str) -> int:
    value = _int_arg(text)
    if value <= 0 or value % 64:
        raise argparse.ArgumentTypeError(f"must be a positive multiple of 64 (the encoder's stride), got {text}")
    return value


def parse_resolutions(values: list[str]) -> list[int]:
    """'256 512 1024' or ranges 'START:STOP[:STEP]' (STOP included, STEP 64 if left out), e.g. 256:2048:64."""
    from ..errors import ConfigError

    out: list[int] = []
    for v in values:
        for part in str(v).split(","):
            part = part.strip()
            if not part:
                continue
            if ":" in part:
                fields = part.split(":")
                if len(fields) > 3:
                    raise ConfigError(f"cannot read resolution range {part!r}: it has {len(fields)} fields; "
                                      "use START:STOP or START:STOP:STEP, e.g. 256:2048:64")
                try:
                    bits = [int(b) for b in fields]
                except ValueError:
                    raise ConfigError(f"cannot read resolution {part!r}; use e.g. 1024 or 256:2048:64") from None
                start, stop = bits[0], bits[1]
                step = bits[2] if len(bits) > 2 else RESOLUTION_STEP
                if step <= 0:
                    raise ConfigError(f"resolution range {part!r}: STEP must be positive")
                if start > stop:
                    raise ConfigError(f"resolution range {part!r} is empty: START {start} is above STOP {stop} "
                                      f"(write {stop}:{start}" + (f":{step}" if len(bits) > 2 else "") + ")")
                out += list(range(start, stop + 1, step))
            else:
                try:
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
    src.add_argument("--model", "-m", default=None,
                     help="benchmark this checkpoint directory or Hugging Face Hub id instead (a Hub id is "
                          "downloaded, as by `fastvlm generate`)")
    p.add_argument("--device", default="auto", help="cuda, mps, cpu or auto")
    p.add_argument("--dtypes", nargs="+", default=["auto"], type=_dtype_arg, metavar="DTYPE",
                   help="fp32, bf16, fp16, auto (bf16 on Ampere or later GPUs and native-bf16 CPUs, fp16 on older GPUs and "
                        "MPS, else fp32; "
                        "default auto). The accuracy comparison needs fp32 here")
    p.add_argument("--modes", nargs="+", default=list(DEFAULT_MODES), choices=MODES,
                   help="exact: reference arithmetic; fast: fused encoder, channels-last, SDPA, native decode "
                        "kernels (CPU), the encoder replayed as a CUDA graph per input shape (CUDA); compile: "
                        "fast + torch.compile of the encoder (give --warmup >= 1, or TTFT includes the "
                        "compilation); int8: fast + int8 LLM linears (CPU); no-graphs: fast without "
                        "the CUDA graphs; graph-decode: fast + batch-1 decode steps as a CUDA graph (CUDA, "
                        "experimental). "
                        f"Default: {' '.join(DEFAULT_MODES)}. The accuracy comparison needs exact here")
    p.add_argument("--resolutions", nargs="+", default=None,
                   help="square input sizes, multiples of 64, or ranges START:STOP[:STEP] (STOP included, "
                        f"STEP {RESOLUTION_STEP} if left out) (default: the model's)")
    p.add_argument("--text-tokens", type=_at_least(0, "--text-tokens"), default=32,
                   help="text tokens around the image, >= 0 (default 32)")
    p.add_argument("--new-tokens", type=_at_least(1, "--new-tokens"), default=16,
                   help="tokens generated per run, >= 1; the decode rate needs at least 2 (with 1, decode tok/s "
                        "is reported as null) (default 16)")
    p.add_argument("--warmup", type=_at_least(0, "--warmup"), default=1, help="untimed rounds first, >= 0 (default 1)")
    p.add_argument("--repeats", type=_at_least(1, "--repeats"), default=5, help="timed rounds, >= 1 (default 5)")
    p.add_argument("--baselines", default="auto", choices=("auto", "none", "transformers", "encoders", "all"),
                   help="transformers' FastVLM port and/or the paper's encoders. auto: the port whenever it can "
                        "hold the model (the full FastViTHD encoder and a Qwen2 LLM: every preset but "
                        "fastvlm-tiny, which gets a note instead), and the paper's encoders only for a "
                        "Qwen2-0.5B-sized LLM (fastvlm-0.5b, as in the paper) (default auto)")
    p.add_argument("--baseline-resolutions", nargs="+", default=None,
                   help="resolutions at which transformers' port runs too (default 1024 if measured, else the first)")
    p.add_argument("--baseline-repeats", type=_at_least(1, "--baseline-repeats"), default=3,
                   help="timed rounds per paper encoder, >= 1 (default 3)")
    p.add_argument("--baseline-dtypes", nargs="+", default=None, type=_dtype_arg, metavar="DTYPE",
                   help="dtypes for the paper encoders, each one of --dtypes (default: the last of --dtypes once "
                        "fp32 is moved first, as it runs first: bf16 for --dtypes bf16 fp32 and for fp32 bf16)")
    p.add_argument("--no-accuracy", action="store_true",
                   help="skip the accuracy comparison against fp32 exact (it runs only when fp32 is in --dtypes "
                        "and exact in --modes)")
    p.add_argument("--accuracy-resolution", type=_resolution_arg, default=None,
                   help="resolution of the accuracy comparison, a multiple of 64 (default 1024 if measured, "
                        "else the first of --resolutions)")
    p.add_argument("--no-roofline", action="store_true", help="skip the matmul and bandwidth measurements")
    p.add_argument("--matmul-size", type=_at_least(1, "--matmul-size"), default=None,
                   help="n of the n^3 matmul peak, >= 1 (default 2048 CPU, 8192 GPU)")
    p.add_argument("--bandwidth-mb", type=_at_least(1, "--bandwidth-mb"), default=1024,
                   help="MiB of buffer read for the bandwidth figure, >= 1 (default 1024)")
    p.add_argument("--plain-init", action="store_true",
                   help="keep from_preset's training init for the encoder (default: trained-model scales)")
    p.add_argument("--threads", type=_at_least(1, "--threads"), default=None,
                   help="torch threads, >= 1 (default: torch's choice)")
    p.add_argument("--quiet-wait", type=seconds_arg, default=0.0,
                   help="on a shared machine: before each timed run, wait up to this many seconds for the CPUs "
                        "to go idle (others using < --quiet-below %%); waits are recorded (default 0: off)")
    p.add_argument("--quiet-below", type=_percent_arg, default=15.0,
                   help="with --quiet-wait: the CPU use by other processes, in percent of the machine, under which "
                        "it counts as idle (0-100, default 15)")
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


def check_output_name(name: str) -> None:
    """--name is a file name stem: no directories (those are --out's), not empty."""
    import os

    from ..errors import ConfigError

    if not name or name in (".", "..") or os.sep in name or (os.altsep and os.altsep in name):
        raise ConfigError(f"--name {name!r} is not a file name stem: give the directory with --out, and a name "
                          "without slashes (e.g. --out runs --name bench-0.5b)")


def check_writable(out: str) -> None:
    """Files can be created in --out (a read-only or permission-less directory fails here, not at the end)."""
    import tempfile

    from ..errors import ConfigError

    try:
        with tempfile.NamedTemporaryFile(dir=out, prefix=".fastvlm-bench-", suffix=".tmp"):
            pass
    except OSError as e:
        raise ConfigError(f"cannot write the results into --out {out!r}: {e.strerror or e}") from None


def _baseline_dtype_names(args, device) -> list[str] | None:
    """--baseline-dtypes as the report's names (auto resolved); each must be one of --dtypes."""
    from ..errors import ConfigError
    from ..model import resolve_dtype
    from .runner import DTYPE_NAMES

    if args.baseline_dtypes is None:
        return None
    measured = [DTYPE_NAMES[resolve_dtype(d, device)] for d in args.dtypes]
    names = list(dict.fromkeys(DTYPE_NAMES[resolve_dtype(d, device)] for d in args.baseline_dtypes))
    missing = [n for n in names if n not in measured]
    if missing:
        raise ConfigError(f"--baseline-dtypes {' '.join(missing)}: not among the measured --dtypes "
                          f"({' '.join(dict.fromkeys(measured))}); the paper's encoders run beside our model "
                          "in one of its dtypes")
    return names


def run(args) -> int:
    from ..commands.common import prepare_output_dir, remove_if_empty

    if not args.no_plots:  # the plots come last: a missing matplotlib fails now, not after the whole benchmark
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            from ..errors import ConfigError, install_hint

            raise ConfigError(f"the plots need matplotlib, which is not installed: {install_hint('bench')}; "
                              "or pass --no-plots") from None
    # a bad --out or --name fails now, in one line, not after the whole benchmark has run
    if args.name is not None:
        check_output_name(args.name)
    created = prepare_output_dir(args.out)
    try:
        check_writable(args.out)
        return _run(args)
    except BaseException:
        if created:
            remove_if_empty(args.out)
        raise


def _run(args) -> int:
    import os

    import torch

    from .. import checkpoints, kernels
    from ..config import get_preset
    from ..model import resolve_device
    from . import report as rep
    from . import suite
    from .runner import BenchConfig, default_output_name, run_benchmark

    # everything that can be refused is checked before any measurement
    device = resolve_device(args.device)
    model_dir = model_name = None
    if args.model:
        # a local directory, or a Hub id downloaded like `fastvlm generate` does (a clear error offline)
        model_dir = checkpoints.resolve_path(args.model)
        model_name = os.path.basename(os.path.normpath(os.path.expanduser(args.model)))
        checkpoints.read_config(model_dir)
    presets = args.preset or (["fastvlm-0.5b"] if not args.model else [])
    for preset in presets:
        get_preset(preset)
    baseline_dtypes = _baseline_dtype_names(args, device)
    resolutions = parse_resolutions(args.resolutions) if args.resolutions else None
    baseline_resolutions = parse_resolutions(args.baseline_resolutions) if args.baseline_resolutions else None

    # every variant runs in this one process: fix the allocator's behaviour up front rather
    # than let it drift with what ran before (see kernels.tune_allocator)
    allocator_tuned = False if args.default_allocator else kernels.tune_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    suite.QUIET.update(max_wait_s=args.quiet_wait, busy_below=args.quiet_below)
    cfg = BenchConfig(
        presets=presets,
        model_dir=model_dir,
        model_name=model_name,
        device=args.device,
        dtypes=args.dtypes,
        modes=list(dict.fromkeys(args.modes)),
        resolutions=resolutions,
        text_tokens=args.text_tokens,
        new_tokens=args.new_tokens,
        warmup=args.warmup,
        repeats=args.repeats,
        baselines=args.baselines,
        baseline_resolutions=baseline_resolutions,
        baseline_repeats=args.baseline_repeats,
        baseline_dtypes=baseline_dtypes,
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
    name = args.name or default_output_name(cfg, device)
    stem = os.path.join(args.out, name)
    print(rep.format_report(report))  # first: the table is not lost if writing fails
    rep.write_json(report, stem + ".json")
    written = [stem + ".json"]
    if not args.no_plots:
        written += rep.write_plots(report, stem)
    print("wrote " + ", ".join(written))
    return 0
