"""Orchestration of `fastvlm bench`: builds the models, runs the suite, and returns one JSON-able report."""

from __future__ import annotations

import gc
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from . import core, suite
from .suite import log

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# Memory a model needs beyond its weights (activations at 2048 px, the HF port's copy, slack).
_GB = 1e9


@dataclass
class BenchConfig:
    presets: list[str] = field(default_factory=lambda: ["fastvlm-0.5b"])
    model_dir: Optional[str] = None
    model_name: Optional[str] = None  # the report's name for model_dir (default: its last path component)
    device: str = "auto"
    dtypes: list[str] = field(default_factory=lambda: ["auto"])
    modes: list[str] = field(default_factory=lambda: ["exact", "fast", "int8"])
    resolutions: Optional[list[int]] = None
    text_tokens: int = suite.TEXT_TOKENS
    new_tokens: int = 16
    warmup: int = 1
    repeats: int = 5
    baselines: str = "auto"  # none | transformers | encoders | all | auto
    baseline_resolutions: Optional[list[int]] = None
    baseline_repeats: int = 3
    baseline_dtypes: Optional[list[str]] = None
    accuracy: bool = True
    accuracy_resolution: Optional[int] = None
    accuracy_tokens: int = 16
    roofline: bool = True
    matmul_size: Optional[int] = None
    bandwidth_mb: int = 1024
    realistic_weights: bool = True
    seed: int = 0
    transformers_fresh: bool = False  # also time the port in a fresh process (fastvlm.bench.fresh)
    command: list[str] = field(default_factory=list)


def _dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def _baselines_wanted(cfg: BenchConfig, config) -> tuple[bool, bool]:
    """auto: transformers' port always; the paper's encoders when the LLM is Qwen2-0.5B-sized (as in the paper)."""
    b = cfg.baselines
    if b == "auto":
        t = config.text
        return True, t.get("hidden_size") == 896 and t.get("num_hidden_layers") == 24
    return b in ("transformers", "all"), b in ("encoders", "all")


def _build_ours(cfg: BenchConfig, preset: Optional[str], device: torch.device, dtype: torch.dtype):
    from ..model import FastVLM
    from .weights import realistic_encoder_

    if cfg.model_dir:
        model = FastVLM.from_pretrained(cfg.model_dir, device=device, dtype=dtype, progress=False)
    else:
        model = FastVLM.from_preset(preset, device="cpu", dtype=dtype, seed=cfg.seed)
        if cfg.realistic_weights:
            realistic_encoder_(model.vision_tower, seed=cfg.seed + 1)
        model = model.to(device)
    return model.eval()


def _encoder_params(config) -> int:
    """Parameters of this config's vision tower and projector, counted on the meta device (no memory, no init)."""
    from ..model import build_projector
    from ..vision.fastvithd import FastViTHD

    with torch.device("meta"):
        modules = (FastViTHD(config.vision), build_projector(config))
    return sum(p.numel() for m in modules for p in m.parameters())


def _weights_gb(config, dtype: torch.dtype) -> float:
    """Rough size of a model of this config in this dtype (parameters only): the LLM estimated, the encoder counted."""
    t = config.text
    h, L, inter, vocab = t["hidden_size"], t["num_hidden_layers"], t["intermediate_size"], t["vocab_size"]
    kv = t.get("num_key_value_heads", t["num_attention_heads"]) * (h // t["num_attention_heads"])
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * inter
    lm = L * per_layer + 2 * vocab * h
    return (lm + _encoder_params(config)) * (2 if dtype in (torch.bfloat16, torch.float16) else 4) / _GB


def _gb_text(gb: float) -> str:
    return f"{gb:.1f} GB" if gb >= 0.1 else f"{gb * 1000:.1f} MB"


def busy_machine_note(machine: dict[str, Any]) -> Optional[str]:
    """A note when the 1-minute load average at the start of the run was above the CPUs this process may use
    (the load at the end counts the benchmark's own threads, so it says nothing about other work)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    start = machine.get("load_average_start")
    if isinstance(start, (list, tuple)) and start and start[0] > cpus:
        return (f"the machine was busy: 1-minute load average {start[0]:.1f} at the start on {cpus} CPUs; other "
                "work competed with these timings, so trust ratios measured within a round more than absolute times")
    return None


def settings_notes(cfg: BenchConfig) -> list[str]:
    """Notes on settings that leave a figure missing or skewed; they go into the report and the log."""
    notes = []
    if cfg.new_tokens == 1:
        notes.append("decode rate: not measured (null) with --new-tokens 1: the first token is the prefill's, "
                     "so a decode rate needs at least 2 generated tokens")
    if "int8" in cfg.modes and cfg.roofline:
        notes.append("int8 rows: no prefill fraction or TTFT/roofline (their LLM runs int8 matmuls, whose peak "
                     "is not measured); the encoder's fraction and the decode bound (one byte per int8 weight) "
                     "stand")
    if "compile" in cfg.modes and cfg.warmup == 0:
        notes.append("compile measured with --warmup 0: its first timed run at each resolution includes "
                     "torch.compile's compilation (unless the accuracy probe compiled that shape first), so its "
                     "encode and TTFT figures may be compile time, not inference; use --warmup 1 or more")
    on_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    if on_cuda and "graph-decode" in cfg.modes:
        notes.append("graph-decode: each generation captures its decode graph at its third step, and the decode "
                     f"rate counts that capture over the {cfg.new_tokens} tokens generated; use --new-tokens 64 or "
                     "more to see the replay rate")
    if on_cuda and "fast" in cfg.modes and cfg.warmup == 0:
        notes.append("fast measured on CUDA with --warmup 0: its first timed run at each resolution includes the "
                     "CUDA graph's capture (three encoder runs); use --warmup 1 or more")
    return notes


def _accuracy_missing_note(cfg: BenchConfig, dtypes: list[torch.dtype]) -> str:
    missing = []
    if torch.float32 not in dtypes:
        missing.append("fp32 to --dtypes")
    if "exact" not in cfg.modes:
        missing.append("exact to --modes")
    if missing:
        return f"accuracy: no fp32 exact reference in this run (add {' and '.join(missing)})"
    return "accuracy: no fp32 exact reference in this run (the fp32 model was skipped; see the note above)"


def _roofline_fields(res: dict[str, Any], enc_flops: int, pre_flops: int, peak: Optional[float],
                     decode_bytes: Optional[int], bandwidth: Optional[float], *,
                     llm_peak_known: bool = True) -> dict[str, Any]:
    """Throughput and fractions of the measured ceilings. With `llm_peak_known` false (the int8 mode: its LLM
    runs int8 matmuls, whose peak is not measured) only the encoder gets a fraction of the matmul peak."""
    out: dict[str, Any] = {"encoder_gflop": enc_flops / 1e9, "prefill_gflop": pre_flops / 1e9}
    enc = res.get("encode_s") or {}
    pre = res.get("prefill_s") or {}
    ttft = res.get("ttft_s") or {}
    if enc.get("median"):
        out["encoder_gflops"] = enc_flops / enc["median"] / 1e9
    if pre.get("median"):
        out["prefill_gflops"] = pre_flops / pre["median"] / 1e9
    if peak:
        out["matmul_peak_gflops"] = peak
        if "encoder_gflops" in out:
            out["encoder_fraction_of_peak"] = out["encoder_gflops"] / peak
        if not llm_peak_known:
            return _decode_bound_fields(out, res, decode_bytes, bandwidth)
        if "prefill_gflops" in out:
            out["prefill_fraction_of_peak"] = out["prefill_gflops"] / peak
        roof = (enc_flops + pre_flops) / (peak * 1e9)
        out["ttft_roofline_s"] = roof
        if ttft.get("median"):
            out["ttft_over_roofline"] = ttft["median"] / roof
    return _decode_bound_fields(out, res, decode_bytes, bandwidth)


def _decode_bound_fields(out: dict[str, Any], res: dict[str, Any], decode_bytes: Optional[int],
                         bandwidth: Optional[float]) -> dict[str, Any]:
    dec = res.get("decode_tokens_per_s") or {}
    if decode_bytes and bandwidth:
        bound = bandwidth * 1e9 / decode_bytes
        out["decode_bytes_per_token"] = decode_bytes
        out["decode_bound_tokens_per_s"] = bound
        if dec.get("median"):
            out["decode_fraction_of_bound"] = dec["median"] / bound
    return out


def _paired_decode_fields(rounds: list[dict[str, Any]], mode: str, decode_bytes: int) -> dict[str, Any]:
    """Each run's decode speed over the bound from the bandwidth read right before that run; the median."""
    pairs = [(r[mode]["before_run"], r[mode]["decode_tokens_per_s"]) for r in rounds
             if mode in r and r[mode].get("before_run") and r[mode].get("decode_tokens_per_s")]
    if not pairs:
        return {}
    import statistics

    return {"read_bandwidth_per_run_gbps": [bw for bw, _ in pairs],
            "decode_fraction_of_bound_paired": statistics.median(tps * decode_bytes / (bw * 1e9) for bw, tps in pairs)}


def check_resolutions(cfg: BenchConfig) -> None:
    """--baseline-resolutions must be among the resolutions measured (the port runs beside our model there)."""
    from ..checkpoints import read_config
    from ..config import get_preset
    from ..errors import ConfigError

    if not cfg.baseline_resolutions:
        return
    for preset in [None] if cfg.model_dir else cfg.presets:
        config = read_config(cfg.model_dir)[0] if cfg.model_dir else get_preset(preset)
        measured = cfg.resolutions or [config.image_size]
        extra = [r for r in cfg.baseline_resolutions if r not in measured]
        if extra:
            raise ConfigError(f"--baseline-resolutions {' '.join(map(str, extra))}: not among the resolutions "
                              f"measured for {preset or _model_name(cfg)} ({' '.join(map(str, measured))}); "
                              "transformers' port runs beside our model at those, so add them to --resolutions")


def run_benchmark(cfg: BenchConfig) -> dict[str, Any]:
    from ..model import resolve_device

    check_resolutions(cfg)  # before anything is measured
    with core.strict_fp32(resolve_device(cfg.device)):  # fp32 rows are fp32 on CUDA too (TF32 off)
        return _run_benchmark(cfg)


def _run_benchmark(cfg: BenchConfig) -> dict[str, Any]:
    from ..checkpoints import read_config
    from ..config import get_preset
    from ..model import resolve_device, resolve_dtype, text_config_object

    device = resolve_device(cfg.device)
    dtypes = []
    for d in cfg.dtypes:
        dt = resolve_dtype(d, device)
        if dt not in dtypes:
            dtypes.append(dt)
    if device.type == "cpu" and torch.float16 in dtypes:
        fp16_note = ("fp16 on a CPU: most CPUs have no fast fp16 matmul, and PyTorch's CPU fp16 kernels are far "
                     "slower than its bf16 and fp32 ones; these rows say nothing about fp16 on GPUs or Macs")
    else:
        fp16_note = None
    # fp32 first: it is the accuracy reference for the others
    dtypes.sort(key=lambda d: d != torch.float32)
    report: dict[str, Any] = {
        "schema": "fastvlm-bench/1",
        "command": cfg.command,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": core.machine_info(device),
        "settings": {
            "dtypes": [_dtype_name(d) for d in dtypes], "modes": cfg.modes, "text_tokens": cfg.text_tokens,
            "new_tokens": cfg.new_tokens, "warmup": cfg.warmup, "repeats": cfg.repeats,
            "baseline_repeats": cfg.baseline_repeats, "batch_size": 1,
            "weights": "checkpoint" if cfg.model_dir else (
                "random (encoder at trained-model scales)" if cfg.realistic_weights else "random (from_preset init)"),
            "statistic": "median over repeats after warm-up; ratios are medians of per-round ratios; "
                         "roofline ceilings are the best of their repeats",
            "quiet_wait": dict(suite.QUIET),
        },
        "roofline": {},
        "results": [],
        "transformers": [],
        "encoder_baselines": [],
        "accuracy": [],
        "notes": [],
    }
    log(f"device {device} | {report['machine']['cpu_model']} | torch {torch.__version__} | "
        f"{torch.get_num_threads()} threads | load {report['machine']['load_average_start']}")
    busy = busy_machine_note(report["machine"])  # from the load at the start: said before the timings
    for note in settings_notes(cfg) + [n for n in (fp16_note, busy) if n]:
        log(f"note: {note}")
        report["notes"].append(note)

    # ------------------------------------------------------------------ roofline
    peaks: dict[torch.dtype, float] = {}
    bandwidth = None
    if cfg.roofline:
        n = cfg.matmul_size or (8192 if device.type == "cuda" else 2048)
        for dt in sorted(set(dtypes) | {torch.float32}, key=lambda d: d != torch.float32):
            m = core.matmul_peak(device, dt, n=n)
            peaks[dt] = m["gflops_best"]  # a ceiling: the best of the repeats
            report["roofline"].setdefault("matmul", {})[_dtype_name(dt)] = m
            log(f"roofline: {_dtype_name(dt)} matmul {n}^3: {m['gflops_median']:.0f} GFLOP/s (best {m['gflops_best']:.0f})")
        bw = core.read_bandwidth(device, mbytes=cfg.bandwidth_mb)
        bandwidth = bw["gbps_best"]
        report["roofline"]["read_bandwidth"] = bw
        log(f"roofline: memory read {bw['gbps_median']:.1f} GB/s (best {bandwidth:.1f})")

    targets = [None] if cfg.model_dir else cfg.presets
    workdir = suite.temp_workdir()
    try:
        for preset in targets:
            config = read_config(cfg.model_dir)[0] if cfg.model_dir else get_preset(preset)
            name = _model_name(cfg) if cfg.model_dir else preset
            resolutions = cfg.resolutions or [config.image_size]
            want_hf, want_enc = _baselines_wanted(cfg, config)
            hf_res = set(cfg.baseline_resolutions or [1024 if 1024 in resolutions else resolutions[0]])
            text_cfg = text_config_object(config)
            flops = {"encoder": {}, "prefill": {}}
            for r in sorted(set(resolutions) | hf_res):
                flops["encoder"][r] = core.encoder_flops(config.vision, r)
                flops["prefill"][r] = core.lm_prefill_flops(text_cfg, config.vision.num_tokens(r) + cfg.text_tokens)
            report.setdefault("flops", {})[name] = {k: {str(r): v for r, v in d.items()} for k, d in flops.items()}
            acc_res = cfg.accuracy_resolution or (1024 if 1024 in resolutions else resolutions[0])
            ref_probe = None
            for dtype in dtypes:
                dname = _dtype_name(dtype)
                need = _weights_gb(config, dtype)
                free = suite.free_memory_gb(device)
                if free is not None and need > free * 0.9:  # on a GPU too: a note, not an out-of-memory error
                    msg = (f"{name} {dname}: skipped, needs ~{_gb_text(need)} for weights, {free:.1f} GB available "
                           f"on {device.type}")
                    log(msg)
                    report["notes"].append(msg)
                    continue
                log(f"building {name} in {dname} (~{_gb_text(need)} of weights)")
                t0 = time.perf_counter()
                base = _build_ours(cfg, preset, device, dtype)
                log(f"built in {time.perf_counter() - t0:.0f} s")
                hf = None
                free = suite.free_memory_gb(device)
                hf_fits = free is None or need * 1.4 < free * 0.9
                if want_hf and hf_fits:
                    try:
                        hf_dir = os.path.join(workdir, f"{name}-{dname}")
                        hf = suite.TransformersVariant.from_ours(base, dtype, hf_dir)
                        if not cfg.transformers_fresh:
                            suite.remove(hf_dir)
                        log("transformers FastVlmForConditionalGeneration loaded on the same weights")
                    except Exception as e:  # noqa: BLE001 - a missing port must not stop our own numbers
                        note = f"transformers baseline unavailable: {e}"
                        if note not in report["notes"]:  # the same reason for every dtype: said once
                            report["notes"].append(note)
                            log(note)
                elif want_hf:
                    report["notes"].append(f"{name} {dname}: transformers baseline skipped (not enough memory for a second copy)")
                modes = list(cfg.modes)
                if "int8" in modes and device.type == "cpu":
                    free = suite.free_memory_gb()
                    lm_fp32 = need * (2 if dtype != torch.float32 else 1)
                    if free is not None and lm_fp32 * 0.8 > free * 0.9:
                        modes.remove("int8")
                        report["notes"].append(f"{name} {dname}: int8 skipped (not enough memory for its copy)")
                variants = suite.build_variants(base, modes)
                for m in modes:
                    only = suite.DEVICE_ONLY_MODES.get(m)
                    if only and only[0] != device.type:
                        note = f"{m}: not run on {device.type} ({only[1]})"
                        if note not in report["notes"]:
                            log(f"note: {note}")
                            report["notes"].append(note)
                kinds = {k: v.model.inference_settings for k, v in variants.items()}
                log(f"variants: {', '.join(variants)}" + (" + transformers" if hf else ""))

                # ------------------------------------------------------ accuracy
                if cfg.accuracy:
                    ids = suite.prompt_ids(config.vision.num_tokens(acc_res), cfg.text_tokens,
                                           vocab=min(1000, text_cfg.vocab_size), seed=cfg.seed)
                    px = suite.image(acc_res, seed=cfg.seed + 7)
                    if ref_probe is None and dtype == torch.float32 and "exact" in variants:
                        variants["exact"].activate()
                        ref_probe = suite.accuracy_probe(variants["exact"].model, ids, px, cfg.accuracy_tokens)
                    if ref_probe is None:
                        note = _accuracy_missing_note(cfg, dtypes)
                        if note not in report["notes"]:
                            report["notes"].append(note)
                    else:
                        for mode, v in variants.items():
                            if mode == "compile" and device.type == "cpu" and acc_res not in resolutions:
                                continue  # a shape not timed would compile again, minutes on a small CPU
                            v.activate()
                            row = {"model": name, "dtype": dname, "mode": mode, "resolution": acc_res,
                                   **suite.compare(suite.accuracy_probe(v.model, ids, px, cfg.accuracy_tokens), ref_probe)}
                            report["accuracy"].append(row)
                            log(f"accuracy {dname} {mode}: feature cosine {row['feature_cosine']:.6f}, "
                                f"max|dlogit| {row['logits_max_abs_diff']:.3g}, greedy same {row['greedy_tokens_same']}")

                # ------------------------------------------------------ timings
                for res in resolutions:
                    tokens = config.vision.num_tokens(res)
                    ids = suite.prompt_ids(tokens, cfg.text_tokens, vocab=min(1000, text_cfg.vocab_size), seed=cfg.seed)
                    px = suite.image(res, seed=cfg.seed + 1)
                    runners = {m: (lambda v=v: v.run(ids, px, cfg.new_tokens)) for m, v in variants.items()}
                    if hf is not None and res in hf_res:
                        runners["transformers"] = lambda: hf.run(ids, px, cfg.new_tokens)
                    # the memory read bandwidth drifts by 2x within minutes on a shared machine: read it right
                    # before every timed run too, so that each decode is compared with its own bound
                    before = ((lambda: core.read_bandwidth(device, mbytes=cfg.bandwidth_mb, repeats=3)["gbps_best"])
                              if cfg.roofline and cfg.new_tokens > 1 else None)
                    samples, rounds = suite.interleaved(runners, cfg.warmup, cfg.repeats,
                                                        label=f"{name} {dname} {res}px", before_run=before)
                    for m, smp in samples.items():
                        summ = smp.summary()
                        # the port holds the same LLM weights (its vocabulary padded by <1%): count ours
                        lm = variants[m if m != "transformers" else next(iter(variants))].model.language_model
                        dec_bytes = core.lm_decode_bytes(lm, tokens + cfg.text_tokens + cfg.new_tokens // 2)
                        row = {
                            "model": name, "dtype": dname, "mode": m, "resolution": res, "image_tokens": tokens,
                            "prompt_tokens": tokens + cfg.text_tokens, "new_tokens": cfg.new_tokens,
                            "settings": kinds.get(m, {"library": "transformers"}),
                            **summ,
                        }
                        row["roofline"] = _roofline_fields(summ, flops["encoder"][res], flops["prefill"][res],
                                                           peaks.get(dtype), dec_bytes, bandwidth,
                                                           llm_peak_known=m != "int8")
                        row["roofline"].update(_paired_decode_fields(rounds, m, dec_bytes))
                        if m != "transformers" and "transformers" in samples:
                            row["ttft_over_transformers"] = suite.ratio_of_medians_per_round(rounds, m, "transformers")
                            row["encode_over_transformers"] = suite.ratio_of_medians_per_round(
                                rounds, m, "transformers", "encode_s")
                            dec = [r[m]["decode_tokens_per_s"] / r["transformers"]["decode_tokens_per_s"]
                                   for r in rounds if r[m].get("decode_tokens_per_s") and r["transformers"].get("decode_tokens_per_s")]
                            row["decode_speed_over_transformers"] = suite._median(dec)
                        if m == "transformers":
                            report["transformers"].append(row)
                        else:
                            report["results"].append(row)
                    if hf is not None and res in hf_res and cfg.transformers_fresh:
                        _fresh_baseline(report, cfg, device, hf_dir, name, dname, res, tokens,
                                        min(1000, text_cfg.vocab_size), flops, peaks.get(dtype))
                    gc.collect()

                if cfg.accuracy and hf is not None and ref_probe is not None:
                    report["accuracy"].append(_hf_accuracy(hf, name, dname, acc_res, config, cfg, text_cfg, ref_probe))

                # ------------------------------------------------------ paper encoders
                if want_enc and (cfg.baseline_dtypes is None and dtype == dtypes[-1]
                                 or cfg.baseline_dtypes is not None and dname in cfg.baseline_dtypes):
                    ours = variants.get("fast") or next(iter(variants.values()))
                    report["encoder_baselines"] += _encoder_baselines(cfg, ours, device, dtype, name, config,
                                                                      peaks.get(dtype), flops, report["notes"])
                del variants, hf, base
                suite.release()
    finally:
        suite.remove(workdir)
    report["machine"]["load_average_end"] = core.load_average()
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return report


def _fresh_baseline(report, cfg: BenchConfig, device, hf_dir: str, name: str, dname: str, res: int, tokens: int,
                    vocab: int, flops, peak) -> None:
    """transformers' port in a process of its own, glibc defaults (see fastvlm.bench.fresh); after our rounds."""
    from .fresh import run_fresh

    log(f"{name} {dname} {res}px: timing transformers in a fresh process")
    try:
        summ = run_fresh(os.path.join(hf_dir, "hf"), dtype=dname, device=str(device), resolution=res,
                         image_tokens=tokens, text_tokens=cfg.text_tokens, vocab=vocab, new_tokens=cfg.new_tokens,
                         warmup=cfg.warmup, repeats=cfg.repeats, seed=cfg.seed, threads=torch.get_num_threads(),
                         quiet_wait=suite.QUIET["max_wait_s"], quiet_below=suite.QUIET["busy_below"])
    except Exception as e:  # noqa: BLE001 - the run's own numbers stand without it
        report["notes"].append(f"{name} {dname} {res}px: fresh-process transformers baseline failed: {e}")
        log(f"fresh-process transformers baseline failed: {e}")
        return
    row = {"model": name, "dtype": dname, "mode": "transformers-fresh", "resolution": res, "image_tokens": tokens,
           "prompt_tokens": tokens + cfg.text_tokens, "new_tokens": cfg.new_tokens,
           "settings": {"library": "transformers", "process": "fresh", "allocator": "glibc default",
                        "timed": "after the interleaved rounds, not interleaved with them"},
           **summ}
    row["roofline"] = _roofline_fields(summ, flops["encoder"][res], flops["prefill"][res], peak, None, None)
    report["transformers"].append(row)
    theirs = (summ.get("ttft_s") or {}).get("median")
    log(f"fresh-process transformers TTFT {theirs * 1000:.0f} ms" if theirs else "fresh-process transformers: no TTFT")
    for r in report["results"]:
        if r["model"] == name and r["dtype"] == dname and r["resolution"] == res and theirs:
            r["ttft_over_transformers_fresh"] = r["ttft_s"]["median"] / theirs


@torch.inference_mode()
def _hf_accuracy(hf, name, dname, res, config, cfg, text_cfg, ref_probe) -> dict[str, Any]:
    from ..config import IMAGE_TOKEN_INDEX

    ids = suite.prompt_ids(config.vision.num_tokens(res), cfg.text_tokens, vocab=min(1000, text_cfg.vocab_size),
                           seed=cfg.seed)
    px = suite.image(res, seed=cfg.seed + 7)
    dev = hf.model.device
    hf_ids = ids.masked_fill(ids == IMAGE_TOKEN_INDEX, hf.image_token_id).to(dev)
    pv = px.to(device=dev, dtype=hf.model.dtype)
    logits = hf.model(input_ids=hf_ids, pixel_values=pv, logits_to_keep=1).logits[:, -1].float().cpu()
    logits = logits[:, : ref_probe["logits"].shape[-1]]  # the port pads its vocabulary
    out = hf.model.generate(input_ids=hf_ids, attention_mask=torch.ones_like(hf_ids), pixel_values=pv,
                            max_new_tokens=cfg.accuracy_tokens, min_new_tokens=cfg.accuracy_tokens,
                            do_sample=False, pad_token_id=hf.pad_token_id)
    feats = hf.model.model.vision_tower(pv).last_hidden_state.flatten(2).transpose(1, 2).float().cpu()
    probe = {"features": feats, "logits": logits, "tokens": out[0, hf_ids.shape[1]:].tolist()}
    row = {"model": name, "dtype": dname, "mode": "transformers", "resolution": res, **suite.compare(probe, ref_probe)}
    log(f"accuracy {dname} transformers: feature cosine {row['feature_cosine']:.6f}, "
        f"max|dlogit| {row['logits_max_abs_diff']:.3g}, greedy same {row['greedy_tokens_same']}")
    return row


def _encoder_baselines(cfg: BenchConfig, ours, device, dtype, name, config, peak, flops,
                       notes: list[str]) -> list[dict[str, Any]]:
    from transformers import DynamicCache

    from ..errors import missing_package_hint
    from ..generation import cache_argument
    from . import baselines as B

    rows = []
    lm = ours.model.language_model
    hidden = config.hidden_size
    cache_kw = cache_argument(lm)
    for b in B.paper_baselines():
        log(f"baseline {b.name}: building ({b.library})")
        try:
            enc = B.build(b, device, dtype, seed=cfg.seed)
        except ModuleNotFoundError as e:  # e.g. timm for ConvNeXt: the other baselines and our numbers still count
            hint = missing_package_hint(e)
            if hint is None:
                raise
            note = f"baseline {b.name} skipped: it needs {hint}"
            if note not in notes:
                notes.append(note)
            log(note)
            continue
        proj = B.projector(b.width, hidden).to(device=device, dtype=dtype).eval()
        px = B.pixels(b, device, dtype, seed=cfg.seed)
        text = suite.prompt_ids(0, cfg.text_tokens, vocab=min(1000, lm.config.vocab_size), seed=cfg.seed).to(device)
        before = cfg.text_tokens // 3
        emb = lm.get_input_embeddings()
        enc_flops = core.count_flops(lambda: _meta_forward(b))
        pre_flops = core.lm_prefill_flops(lm.config, b.tokens + cfg.text_tokens)

        def run_baseline() -> dict[str, Any]:
            ours.activate()
            with core.PeakMemory(device) as mem, torch.inference_mode():
                core.sync(device)
                t0 = time.perf_counter()
                feats = b.features(enc, px)
                core.sync(device)
                t1 = time.perf_counter()
                v = proj(feats.to(dtype))
                core.sync(device)
                t2 = time.perf_counter()
                e = emb(text)
                e = torch.cat([e[:, :before], v.to(e.dtype), e[:, before:]], dim=1)
                out = lm(inputs_embeds=e, use_cache=True, logits_to_keep=1, **{cache_kw: DynamicCache()})
                out.logits[:, -1].float().argmax(-1)
                core.sync(device)
                t3 = time.perf_counter()
            return {"encode_s": t1 - t0, "projector_s": t2 - t1, "prefill_s": t3 - t2, "ttft_s": t3 - t0,
                    "peak_mb": mem.peak / 2**20, "peak_delta_mb": mem.delta / 2**20}

        res = b.compare_resolution
        tokens = config.vision.num_tokens(res)
        ids = suite.prompt_ids(tokens, cfg.text_tokens, vocab=min(1000, lm.config.vocab_size), seed=cfg.seed)
        opx = suite.image(res, seed=cfg.seed + 1)
        runners = {"fastvlm": lambda: ours.run(ids, opx, 1), b.name: run_baseline}
        warm = min(cfg.warmup, 1)
        samples, rounds = suite.interleaved(runners, warm, cfg.baseline_repeats, label=f"{b.name} {_dtype_name(dtype)}")
        summ = samples[b.name].summary()
        fv = samples["fastvlm"].summary()
        row = {
            "name": b.name, "description": b.description, "library": b.library, "model": name,
            "dtype": _dtype_name(dtype), "input_resolution": b.resolution, "encoder_passes": b.passes,
            "visual_tokens": b.tokens, "encoder_params": B.count_params(enc),
            "attention": B.attention_impl(enc), "channels_last": b.channels_last,
            "prompt_tokens": b.tokens + cfg.text_tokens, **summ,
            "fastvlm_resolution": res, "fastvlm_mode": ours.name,
            "fastvlm_ttft_s": fv["ttft_s"], "fastvlm_encode_s": fv["encode_s"],
            "ttft_ratio": suite.ratio_of_medians_per_round(rounds, b.name, "fastvlm"),
            "encoder_ratio": suite.ratio_of_medians_per_round(rounds, b.name, "fastvlm", "encode_s"),
            "paper": [{"what": w, "ratio": r, "paper_numbers": s} for w, r, s in b.paper],
            "roofline": _roofline_fields(summ, enc_flops, pre_flops, peak, None, None),
        }
        rows.append(row)
        log(f"baseline {b.name}: TTFT {summ['ttft_s']['median'] * 1000:.0f} ms = {row['ttft_ratio']:.2f}x FastVLM@{res} "
            f"(encoder {row['encoder_ratio']:.2f}x)")
        del enc, proj, px
        suite.release()
    return rows


def _meta_forward(b) -> Any:
    with torch.device("meta"):
        m = b.build().eval()
    x = torch.empty(b.passes, 3, b.resolution, b.resolution, device="meta")
    return b.features(m, x)


def _model_name(cfg: BenchConfig) -> str:
    return cfg.model_name or os.path.basename(os.path.normpath(cfg.model_dir))


def default_output_name(cfg: BenchConfig, device: torch.device) -> str:
    if device.type == "cuda":
        dev = torch.cuda.get_device_name(device).lower().replace("nvidia ", "").split()[0]
    else:
        dev = device.type  # cpu, mps
    model = _model_name(cfg) if cfg.model_dir else "+".join(cfg.presets)
    return f"bench-{model}-{dev}"


def _print(msg: str) -> None:
    print(msg, file=sys.stdout, flush=True)
