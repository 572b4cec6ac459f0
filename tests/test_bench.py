"""`fastvlm bench`: argument parsing, FLOP counts, and end-to-end runs that write JSON and PNG (no timing asserts)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from fastvlm.bench import core
from fastvlm.bench.cli import parse_resolutions
from fastvlm.cli import main
from fastvlm.config import VisionConfig, get_preset
from fastvlm.errors import ConfigError

PNG = b"\x89PNG\r\n\x1a\n"


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
    rows = report["results"]
    assert {(r["dtype"], r["mode"], r["resolution"]) for r in rows} == {
        (d, mode, r) for d in ("fp32", "bf16") for mode in ("exact", "fast", "int8") for r in (128, 192)}
    for r in rows:
        assert r["ttft_s"]["median"] > 0 and r["encode_s"]["median"] > 0 and r["prefill_s"]["median"] > 0
        assert r["image_tokens"] == (r["resolution"] // 64) ** 2 and r["peak_mb"] > 0
        assert r["roofline"]["encoder_gflop"] > 0 and r["roofline"]["ttft_roofline_s"] > 0
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
