"""`fastvlm bench`: argument parsing, FLOP counts, and end-to-end runs that write JSON and PNG (no timing asserts)."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from fastvlm.bench import core
from fastvlm.bench.cli import parse_resolutions
from fastvlm.cli import main
from fastvlm.config import VisionConfig, get_preset
from fastvlm.errors import ConfigError

PNG = b"\x89PNG\r\n\x1a\n"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_resolutions():
    assert parse_resolutions(["256", "512", "1024"]) == [256, 512, 1024]
    assert parse_resolutions(["256:512:64"]) == [256, 320, 384, 448, 512]
    assert parse_resolutions(["256:2048:64"])[-1] == 2048 and len(parse_resolutions(["256:2048:64"])) == 29
    assert parse_resolutions(["1024,512", "1024"]) == [1024, 512]
    for bad in ("1000", "abc", "256:512:0"):
        with pytest.raises(ConfigError):
            parse_resolutions([bad])


def test_analytic_flops_match_the_targets():
    # targets.md: FastViTHD 30 / 119 / 270 / 487 GFLOP at 256 / 512 / 768 / 1024 px; Qwen2-0.5B prefill of 288 ~ 210
    got = {r: core.encoder_flops(VisionConfig(), r) / 1e9 for r in (256, 512, 768, 1024)}
    for r, want in {256: 30, 512: 119, 768: 270, 1024: 487}.items():
        assert abs(got[r] - want) / want < 0.02, (r, got[r])
    from fastvlm.model import text_config_object

    prefill = core.lm_prefill_flops(text_config_object(get_preset("fastvlm-0.5b")), 288) / 1e9
    assert 200 < prefill < 225


def _read(out, name):
    path = os.path.join(out, name + ".json")
    with open(path) as f:
        report = json.load(f)
    for png in ("-ttft.png", "-breakdown.png"):
        with open(os.path.join(out, name + png), "rb") as f:
            assert f.read(8) == PNG
    return report


def test_bench_tiny_end_to_end(tmp_path, capsys):
    out = str(tmp_path / "results")
    rc = main(["bench", "--preset", "fastvlm-tiny", "--dtypes", "fp32", "bf16", "--modes", "exact", "fast", "int8",
               "--resolutions", "128", "192", "--warmup", "0", "--repeats", "1", "--new-tokens", "3",
               "--matmul-size", "128", "--bandwidth-mb", "8", "--out", out, "--name", "tiny"])
    assert rc == 0
    report = _read(out, "tiny")
    m = report["machine"]
    for key in ("cpu_model", "logical_cores", "torch_threads", "torch", "transformers", "load_average_start",
                "load_average_end"):
        assert key in m
    # the code that made the numbers: the checkout's commit (None when installed outside one)
    import re

    assert m["fastvlm_commit"] is None or re.fullmatch(r"[0-9a-f]{40}(-dirty)?", m["fastvlm_commit"])
    rows = report["results"]
    assert {(r["dtype"], r["mode"], r["resolution"]) for r in rows} == {
        (d, mode, r) for d in ("fp32", "bf16") for mode in ("exact", "fast", "int8") for r in (128, 192)}
    for r in rows:
        assert r["ttft_s"]["median"] > 0 and r["encode_s"]["median"] > 0 and r["prefill_s"]["median"] > 0
        assert r["image_tokens"] == (r["resolution"] // 64) ** 2 and r["peak_mb"] > 0
        assert r["roofline"]["encoder_gflop"] > 0 and r["roofline"]["encoder_fraction_of_peak"] > 0
        if r["mode"] == "int8":  # its LLM runs int8 matmuls, whose peak is not measured: no fraction of a float peak
            assert not {"ttft_roofline_s", "ttft_over_roofline", "prefill_fraction_of_peak"} & set(r["roofline"])
        else:
            assert r["roofline"]["ttft_roofline_s"] > 0 and r["roofline"]["prefill_fraction_of_peak"] > 0
        assert r["decode_tokens_per_s"]["median"] > 0
        # each run's decode against the bandwidth read right before it (one timed round here)
        rf = r["roofline"]
        (bw,) = rf["read_bandwidth_per_run_gbps"]
        bytes_per_token = rf["decode_bytes_per_token"]
        assert rf["decode_fraction_of_bound_paired"] == pytest.approx(
            r["decode_tokens_per_s"]["median"] * bytes_per_token / (bw * 1e9))
    assert set(report["roofline"]["matmul"]) == {"fp32", "bf16"}
    acc = {(a["dtype"], a["mode"]): a for a in report["accuracy"]}
    assert acc[("fp32", "exact")]["feature_cosine"] > 0.999999 and acc[("fp32", "exact")]["logits_max_abs_diff"] == 0
    assert acc[("fp32", "fast")]["feature_cosine"] > 0.99999
    assert acc[("bf16", "fast")]["feature_cosine"] > 0.999
    # the port only holds the full-size encoder: skipped with a note, not an error
    assert any("transformers" in n for n in report["notes"])
    printed = capsys.readouterr().out
    assert "TTFT ms" in printed and "accuracy against our fp32 exact path" in printed
    assert any(n.startswith("int8 rows: no prefill fraction") for n in report["notes"])
    assert "dec %bound/run" in printed and "GB/s right before the timed runs" in printed


@pytest.mark.slow
def test_bench_checkpoint_with_transformers_baseline(tmp_path):
    """A checkpoint with the full FastViTHD (256 px) and a tiny LLM: transformers' port runs beside ours."""
    pytest.importorskip("timm")
    import transformers

    if not hasattr(transformers, "FastVlmForConditionalGeneration"):
        pytest.skip("this transformers has no FastVLM port")
    from fastvlm import FastVLM, FastVLMConfig

    cfg = FastVLMConfig(vision=VisionConfig(image_size=256), text=get_preset("fastvlm-tiny").text)
    FastVLM.from_config(cfg, dtype=torch.float32).save_pretrained(str(tmp_path / "ckpt"))
    out = str(tmp_path / "results")
    rc = main(["bench", "--model", str(tmp_path / "ckpt"), "--dtypes", "fp32", "--modes", "exact", "fast",
               "--warmup", "0", "--repeats", "1", "--new-tokens", "3", "--no-roofline", "--out", out, "--name", "ck",
               "--transformers-fresh-process"])
    assert rc == 0
    report = _read(out, "ck")
    assert not report["notes"], report["notes"]
    assert [r["mode"] for r in report["transformers"]] == ["transformers", "transformers-fresh"]
    fresh = report["transformers"][1]
    assert fresh["settings"]["process"] == "fresh" and fresh["ttft_s"]["n"] == 1 and len(fresh["tokens"]) == 3
    assert all(r["ttft_over_transformers"] > 0 and r["ttft_over_transformers_fresh"] > 0 for r in report["results"])
    acc = {a["mode"]: a for a in report["accuracy"]}
    assert acc["transformers"]["logits_max_abs_diff"] < 1e-4 and acc["transformers"]["greedy_tokens_same"]


# --- bad input is refused before any measurement (a new-user audit) ------------------------------------------


def _tiny(out, *extra):
    """The quickest real run: the tiny preset, one timed round, no roofline, baselines or plots."""
    return ["bench", "--preset", "fastvlm-tiny", "--repeats", "1", "--warmup", "0", "--no-roofline",
            "--baselines", "none", "--modes", "fast", "--no-plots", "--out", str(out), "--name", "t", *extra]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the note of a machine without CUDA")
def test_a_mode_this_device_cannot_run_is_noted_not_silently_dropped(tmp_path):
    assert main(_tiny(tmp_path, "--modes", "fast", "no-graphs", "graph-decode", "--dtypes", "fp32",
                      "--resolutions", "128")) == 0
    with open(tmp_path / "t.json") as f:
        report = json.load(f)
    assert {r["mode"] for r in report["results"]} == {"fast"}
    assert "no-graphs: not run on cpu (fast uses CUDA graphs only on CUDA GPUs)" in report["notes"]
    assert "graph-decode: not run on cpu (CUDA graphs need a CUDA GPU)" in report["notes"]


def _argparse_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastvlm bench: error: "), err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def _help(capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())


@pytest.fixture
def no_measuring(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("the benchmark ran before the bad input was refused")

    # the measuring part: run_benchmark's own up-front checks still run
    monkeypatch.setattr("fastvlm.bench.runner._run_benchmark", fail)


@pytest.mark.parametrize("flag, value, minimum", [
    ("--text-tokens", "-5", 0),       # was a RuntimeError traceback (negative tensor dimension)
    ("--threads", "-1", 1),           # was a RuntimeError traceback from torch.set_num_threads
    ("--threads", "0", 1),            # was silently ignored
    ("--repeats", "0", 1),            # was silently changed to 1
    ("--warmup", "-1", 0),            # ... to 0
    ("--new-tokens", "0", 1),         # ... to 1
    ("--new-tokens", "-3", 1),
    ("--baseline-repeats", "0", 1),   # ... to 1
    ("--bandwidth-mb", "0", 1),       # was a 0.0 GB/s roofline
    ("--matmul-size", "0", 1),        # was silently 2048
])
def test_out_of_range_counts_are_refused_at_parse_time(flag, value, minimum, tmp_path, capsys, no_measuring):
    err = _argparse_error(capsys, _tiny(tmp_path / "r", flag, value))
    assert f"{flag} must be at least {minimum}, got {value}" in err


def test_in_range_counts_are_accepted():
    from fastvlm.cli import build_parser

    args = build_parser().parse_args(["bench", "--text-tokens", "0", "--warmup", "0", "--threads", "1",
                                      "--new-tokens", "1", "--repeats", "1", "--baseline-repeats", "1",
                                      "--bandwidth-mb", "1", "--matmul-size", "1"])
    assert (args.text_tokens, args.warmup, args.threads, args.new_tokens, args.repeats) == (0, 0, 1, 1, 1)


def test_unusable_out_path_is_refused_before_measuring(tmp_path, capsys, no_measuring):
    afile = tmp_path / "afile"
    afile.write_text("not a directory\n")
    for path, words in ((str(afile), "exists and is not a directory"),
                        (str(afile / "sub"), "cannot create output directory")):
        assert main(_tiny(path)) == 1
        err = _one_line_error(capsys)
        assert path in err and words in err


def test_bad_name_unwritable_out_and_unmeasured_baseline_resolutions_are_refused_before_measuring(
        tmp_path, capsys, no_measuring):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(_tiny(tmp_path / "r", "--name", "afile/x")) == 1
    assert "--name 'afile/x' is not a file name stem" in _one_line_error(capsys)
    if os.path.isdir("/proc/self"):  # a directory nobody can create files in, root included
        assert main(_tiny("/proc/self")) == 1
        assert "cannot write the results into --out '/proc/self'" in _one_line_error(capsys)
    # the port runs beside our model: a resolution it would run at must be measured
    assert main(_tiny(tmp_path / "r", "--resolutions", "128", "--baseline-resolutions", "192")) == 1
    err = _one_line_error(capsys)
    assert "--baseline-resolutions 192: not among the resolutions measured" in err and "(128)" in err
    assert not (tmp_path / "r").exists()  # the directory made for the run is removed again


@pytest.mark.parametrize("flag, value, words", [
    ("--quiet-wait", "-5", "at least 0"),
    ("--quiet-wait", "inf", "finite"),
    ("--quiet-below", "150", "from 0 to 100"),
])
def test_quiet_settings_out_of_range_are_refused(flag, value, words, tmp_path, capsys, no_measuring):
    assert words in _argparse_error(capsys, _tiny(tmp_path / "r", flag, value))


def test_peak_memory_sees_an_allocation_inside_the_block_without_a_sampler_thread():
    import threading

    import torch

    from fastvlm.bench import core

    if not core._reset_rss_peak():
        pytest.skip("no resettable peak-RSS mark (not Linux)")
    try:  # heap pages freed by earlier tests would be reused without raising RSS: give them back first
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    before = threading.active_count()
    with core.PeakMemory(torch.device("cpu")) as mem:
        assert threading.active_count() == before  # nothing runs beside the measured call
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del x
    assert mem.delta >= 60 * 2**20, mem.delta


def test_parse_resolutions_refuses_empty_ranges_and_extra_fields():
    with pytest.raises(ConfigError, match="empty"):
        parse_resolutions(["2048:256:256"])  # was [] and a silent fallback to the model's size
    with pytest.raises(ConfigError, match="4 fields"):
        parse_resolutions(["64:128:64:5"])  # the 5 was silently dropped
    assert parse_resolutions(["256:256"]) == [256] and parse_resolutions(["128:256"]) == [128, 192, 256]


def test_help_states_range_step_default_and_new_tokens_minimum(capsys):
    out = _help(capsys)
    assert "START:STOP[:STEP] (STOP included, STEP 64 if left out)" in out
    assert "the decode rate needs at least 2 (with 1, decode tok/s is reported as null)" in out


def test_new_tokens_1_notes_the_missing_decode_rate(tmp_path):
    assert main(_tiny(tmp_path, "--new-tokens", "1")) == 0
    with open(tmp_path / "t.json") as f:
        report = json.load(f)
    assert report["results"] and all(r["decode_tokens_per_s"] is None for r in report["results"])
    assert any("--new-tokens 1" in n and "at least 2" in n for n in report["notes"]), report["notes"]


def test_encoder_baseline_with_a_missing_package_is_skipped_with_a_note(tmp_path, monkeypatch):
    # e.g. the ConvNeXt baseline without timm: our numbers and the run still come out
    from fastvlm.bench import baselines as B

    real = B.paper_baselines

    missing = ["timm"]

    def build_without(*a, **k):
        raise ModuleNotFoundError(f"No module named '{missing[0]}'", name=missing[0])

    monkeypatch.setattr(B, "paper_baselines", lambda: real()[:1])
    monkeypatch.setattr(B, "build", build_without)
    argv = _tiny(tmp_path, "--dtypes", "fp32", "--resolutions", "128", "--baselines", "encoders")
    assert main(argv) == 0
    with open(tmp_path / "t.json") as f:
        report = json.load(f)
    assert report["results"] and report["encoder_baselines"] == []
    assert ("baseline clip-vit-l14-336 skipped: it needs the optional package 'timm', which is not installed: "
            "pip install 'fastvlm[bench]' (in a checkout: pip install -e \".[bench]\")") in report["notes"], report["notes"]
    # a module that no extra provides is a defect, not a skipped baseline
    missing[0] = "not_an_optional_package"
    with pytest.raises(ModuleNotFoundError):
        main(argv)


def test_missing_matplotlib_fails_before_measuring(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "r"
    argv = [a for a in _tiny(out) if a != "--no-plots"]
    assert main(argv) == 1
    err = _one_line_error(capsys)
    assert "plots need matplotlib" in err and "fastvlm[bench]" in err and "--no-plots" in err
    assert not out.exists()  # nothing measured, nothing left behind
    assert main(argv + ["--no-plots"]) == 0 and (out / "t.json").is_file()


def test_accuracy_note_names_what_is_missing(tmp_path):
    # fp32 is in --dtypes, exact is not in --modes: the note used to ask for fp32
    assert main(_tiny(tmp_path, "--dtypes", "fp32", "--resolutions", "128")) == 0
    with open(tmp_path / "t.json") as f:
        notes = [n for n in json.load(f)["notes"] if n.startswith("accuracy")]
    assert notes == ["accuracy: no fp32 exact reference in this run (add exact to --modes)"]
    from fastvlm.bench.runner import BenchConfig, _accuracy_missing_note

    note = _accuracy_missing_note(BenchConfig(modes=["fast"]), [torch.bfloat16])
    assert note.endswith("(add fp32 to --dtypes and exact to --modes)")
    assert _accuracy_missing_note(BenchConfig(modes=["exact"]), [torch.bfloat16]).endswith("(add fp32 to --dtypes)")


@pytest.mark.filterwarnings("ignore:.*no tokenizer files")
def test_model_takes_a_hub_id_like_generate(tmp_path, monkeypatch, capsys):
    from fastvlm import FastVLM

    ckpt = str(tmp_path / "ckpt")
    FastVLM.from_preset("fastvlm-tiny", dtype=torch.float32).save_pretrained(ckpt)
    asked = []

    def resolve(path, revision=None):
        if os.path.isdir(path):
            return path
        asked.append(path)
        if path == "someone/tiny-vlm":
            return ckpt  # what a download returns: a snapshot directory
        raise ConfigError(f"no model directory at {path}")

    monkeypatch.setattr("fastvlm.checkpoints.resolve_path", resolve)
    argv = _tiny(tmp_path / "r", "--resolutions", "128")
    argv[argv.index("--preset"):argv.index("--preset") + 2] = ["--model", "someone/tiny-vlm"]
    argv.remove("--name"), argv.remove("t")
    assert main(argv) == 0 and asked == ["someone/tiny-vlm"]
    # named after the Hub id, not after the snapshot directory
    with open(tmp_path / "r" / "bench-tiny-vlm-cpu.json") as f:
        assert {r["model"] for r in json.load(f)["results"]} == {"tiny-vlm"}
    capsys.readouterr()


def test_model_missing_local_directory_is_a_clear_error(tmp_path, capsys, no_measuring):
    missing = str(tmp_path / "no-such-model")
    argv = _tiny(tmp_path / "r")
    argv[argv.index("--preset"):argv.index("--preset") + 2] = ["--model", missing]
    assert main(argv) == 1
    err = _one_line_error(capsys)
    assert f"no model directory at {missing}" in err
    assert not os.path.exists(tmp_path / "r")  # the output directory made up front is removed again


def test_unknown_dtypes_are_refused(tmp_path, capsys, no_measuring):
    for flag in ("--dtypes", "--baseline-dtypes"):
        err = _argparse_error(capsys, _tiny(tmp_path / "r", flag, "fp64"))
        assert "unknown dtype 'fp64'; use one of fp32, bf16, fp16, auto" in err
    # a paper-encoder dtype that is not measured used to run nothing, silently
    assert main(_tiny(tmp_path / "r", "--dtypes", "fp32", "--baseline-dtypes", "bf16")) == 1
    assert "--baseline-dtypes bf16: not among the measured --dtypes (fp32)" in _one_line_error(capsys)
    from fastvlm.cli import build_parser

    args = build_parser().parse_args(["bench", "--dtypes", "float32", "BF16", "--baseline-dtypes", "bfloat16"])
    assert args.dtypes == ["fp32", "bf16"] and args.baseline_dtypes == ["bf16"]


def test_baselines_help_says_what_auto_does(capsys):
    out = _help(capsys)
    assert "only the port for fastvlm-tiny" not in out
    assert "every preset but fastvlm-tiny" in out and "Qwen2-0.5B-sized LLM (fastvlm-0.5b" in out


def test_weights_estimate_counts_the_encoder():
    from fastvlm.bench.runner import _weights_gb

    # fastvlm-tiny has ~0.5M parameters: ~1 MB in bf16, not the 0.3 GB of a fixed 125M-parameter encoder
    assert _weights_gb(get_preset("fastvlm-tiny"), torch.bfloat16) < 0.002
    # the 0.5B: Qwen2-0.5B (~0.63B with an untied head) + FastViTHD (125M) + projector, in bf16
    assert 1.4 < _weights_gb(get_preset("fastvlm-0.5b"), torch.bfloat16) < 1.6


def test_help_says_accuracy_needs_fp32_and_exact_and_the_default_modes(capsys):
    out = _help(capsys)
    assert "the accuracy of every mode against the fp32 exact path." not in out  # the old, unconditional claim
    assert "is measured only when the run has both fp32 in --dtypes and exact in --modes" in out
    assert "Default: exact fast int8." in out


def test_compile_with_warmup_0_is_noted(tmp_path, monkeypatch, capsys):
    from fastvlm.bench import suite

    build = suite.build_variants
    # stand-in for compile (torch.compile would take minutes here): the fast variant under compile's name
    monkeypatch.setattr(suite, "build_variants", lambda base, modes, **k: {"compile": build(base, ["fast"])["fast"]})
    argv = _tiny(tmp_path, "--resolutions", "128", "--no-accuracy")
    argv[argv.index("--modes") + 1] = "compile"
    assert main(argv) == 0
    with open(tmp_path / "t.json") as f:
        report = json.load(f)
    assert [r["mode"] for r in report["results"]] == ["compile"]
    assert any("--warmup 0" in n and "compil" in n for n in report["notes"]), report["notes"]
    assert "note: compile measured with --warmup 0" in capsys.readouterr().out


@pytest.mark.parametrize("accuracy_at,measured", [("128", True), ("192", False)])
def test_compile_accuracy_is_measured_at_a_timed_resolution_only(tmp_path, monkeypatch, accuracy_at, measured):
    # on a CPU the compiled encoder is compared with the fp32 exact path at a resolution it was timed at (already
    # compiled for that shape); another resolution would compile again, which takes minutes, so it is left out
    from fastvlm.bench import suite

    build = suite.build_variants
    monkeypatch.setattr(suite, "build_variants", lambda base, modes, **k: {
        m: build(base, ["fast" if m == "compile" else m])["fast" if m == "compile" else m] for m in modes})
    argv = _tiny(tmp_path, "--resolutions", "128", "--dtypes", "fp32", "--warmup", "1",
                 "--accuracy-resolution", accuracy_at)
    argv[argv.index("--modes") + 1: argv.index("--modes") + 2] = ["exact", "compile"]
    assert main(argv) == 0
    with open(tmp_path / "t.json") as f:
        report = json.load(f)
    modes = {a["mode"] for a in report["accuracy"]}
    assert modes == ({"exact", "compile"} if measured else {"exact"})
    if measured:
        row = next(a for a in report["accuracy"] if a["mode"] == "compile")
        assert row["feature_cosine"] > 0.99999 and row["greedy_tokens_same"]


def test_readme_modes_line_is_not_about_bench():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    perf = readme[readme.index("## Performance"):]
    modes = " ".join(perf[perf.index("\nModes ("):perf.index("\n- `exact`")].split())
    assert "CLI default `fast`, `--exact` for the other" not in modes
    assert "`bench` has no `--exact`" in modes and "`--modes`" in modes


def test_run_cpu_script_refuses_an_unknown_step():
    # an unknown step used to run nothing and exit 0
    import subprocess

    r = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "run_cpu.sh"), "mian"], capture_output=True,
                       text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 2 and "unknown step 'mian'" in r.stderr and "main" in r.stderr


def _script(name, *args, timeout=240):
    """Run a script of benchmarks/ as the GPU check does (python3 benchmarks/NAME ...), on the CPU."""
    import subprocess

    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", name), *args], capture_output=True,
                       text=True, cwd=ROOT, timeout=timeout, env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_gpu_check_scripts_run_on_the_cpu(tmp_path):
    """The scripts run_gpu.sh's check step runs (they are first run on a lent GPU, with minutes to spare): a
    tiny CPU run of each, so that a change here does not break them unseen."""
    ab = tmp_path / "ab.json"
    _script("gpu_encoder_ab.py", "--preset", "fastvlm-tiny", "--device", "cpu", "--resolutions", "128",
            "--dtypes", "fp32", "--repeats", "1", "--warmup", "1", "--out", str(ab))
    rows = json.loads(ab.read_text())["rows"]
    variants = {r["variant"] for r in rows}
    assert variants == {"exact", "tree-sdpa", "tree-sdpa-cl", "fused-nchw", "fused-cl (fast)"}  # no graphs off CUDA
    for r in rows:
        assert r["first_call_ms"] > 0 and r["device_ms"] > 0 and r["cosine_vs_fp32_exact"] > 0.9999
    prof = tmp_path / "prof.txt"
    _script("profile_ttft.py", "--preset", "fastvlm-tiny", "--device", "cpu", "--resolution", "128", "--dtype",
            "fp32", "--out", str(prof))
    text = prof.read_text()
    assert "=== mode exact" in text and "=== mode fast" in text and "no-graphs" not in text  # CUDA only
    assert "by host time" in text


def test_accuracy_comparison_measures_a_known_perturbation():
    # the bench's accuracy rows come from suite.compare; the fp32 exact row compares a path with itself, so this
    # checks that the numbers move as they should when the probe differs
    from fastvlm.bench.suite import compare

    g = torch.Generator().manual_seed(0)
    ref = {"features": torch.randn(2, 16, 8, generator=g), "logits": torch.randn(3, 50, generator=g),
           "tokens": [5, 9, 11, 4]}
    same = compare({k: (v.clone() if torch.is_tensor(v) else list(v)) for k, v in ref.items()}, ref)
    assert same["feature_cosine"] == pytest.approx(1.0) and same["logits_max_abs_diff"] == 0
    assert same["greedy_tokens_same"] and same["greedy_matching_prefix"] == 4
    logits = ref["logits"].clone()
    logits[1, 7] += 0.25
    probe = {"features": -ref["features"], "logits": logits, "tokens": [5, 9, 12, 4]}
    got = compare(probe, ref)
    assert got["feature_cosine"] == pytest.approx(-1.0) and got["feature_max_abs_diff"] > 0
    assert got["logits_max_abs_diff"] == pytest.approx(0.25)
    assert got["logits_rel_diff"] == pytest.approx(0.25 / ref["logits"].abs().max().item())
    assert not got["greedy_tokens_same"] and got["greedy_matching_prefix"] == 2 and got["greedy_tokens"] == 4


def test_table_shows_each_rows_share_of_the_roofline():
    from fastvlm.bench.report import format_report

    row = {"model": "m", "dtype": "bf16", "mode": "fast", "resolution": 1024, "image_tokens": 256,
           "ttft_s": {"median": 1.0}, "encode_s": {"median": 0.6}, "prefill_s": {"median": 0.4}, "peak_mb": 900.0,
           "roofline": {"ttft_over_roofline": 1.49, "encoder_fraction_of_peak": 0.4321, "prefill_fraction_of_peak": 0.87,
                        "decode_fraction_of_bound": 0.76}}
    report = {"machine": {"cpu_model": "cpu", "logical_cores": 2, "torch_threads": 2, "torch": "2", "transformers": "5"},
              "results": [row], "transformers": []}
    lines = format_report(report).splitlines()
    header = next(i for i, line in enumerate(lines) if "enc %peak" in line)
    cols = [c.strip() for c in lines[header].split("  ") if c.strip()]  # headers may hold single spaces
    values = lines[header + 2].split()
    assert len(cols) == len(values), (cols, values)
    got = dict(zip(cols, values))
    assert got["enc %peak"] == "43%" and got["prefill %peak"] == "87%" and got["dec %bound"] == "76%"
    assert got["TTFT/roof"] == "1.49" and got["peak MiB"] == "900" and got["dec %bound/run"] == "-"


def test_strict_fp32_turns_tf32_off_on_cuda_and_restores_it():
    from fastvlm.bench import core

    flags = lambda: (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)  # noqa: E731
    before = flags()
    with core.strict_fp32(torch.device("cuda")):
        assert flags() == (False, False)  # cuDNN's default would run "fp32" convolutions in TF32
    assert flags() == before
    with core.strict_fp32(torch.device("cpu")):
        assert flags() == before


def test_free_memory_is_the_devices_own(monkeypatch):
    from fastvlm.bench import suite

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * 10**9, 24 * 10**9))
    assert suite.free_memory_gb(torch.device("cuda")) == pytest.approx(3.0)
    assert suite.free_memory_gb(torch.device("cpu")) > 0  # the machine's available RAM
