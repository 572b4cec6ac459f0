"""The bundled model's encoder pretraining objective (scripts/pretrain_synth_encoder.py): the
per-cell targets, the loss and the decision rule that the pretraining and the probe share."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from fastvlm.data.synth import LEVELS, generate_reading_scene

from helpers import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "pretrain_synth_encoder.py"
WORDS = LEVELS["basic"].words


@pytest.fixture(scope="module")
def pse():
    return load_script("pretrain_synth_encoder")  # registered: worker processes unpickle its functions


def _names(labels, row):
    inv = {i: n for n, i in labels.items()}
    return sorted(inv[i] for i in row.nonzero().flatten().tolist())


def test_targets_per_cell(pse):
    labels = pse.label_space(WORDS, where="cell")
    scene = {"image_size": 256,
             "objects": [{"color": "red", "shape": "circle", "center": [70, 10]},
                         {"color": "blue", "shape": "star", "center": [250, 250]}],
             "texts": [{"kind": "word", "text": "apple", "bbox": [130, 70, 160, 80]},
                       {"kind": "number", "text": "47", "bbox": [10, 200, 30, 215]}]}
    y = pse.targets(scene, 4, labels)  # 4x4 cells of 64 px, row-major
    assert _names(labels, y[1]) == ["color red", "red circle", "shape circle", "xbin red 0", "ybin red 0"]
    assert _names(labels, y[15]) == ["blue star", "color blue", "shape star", "xbin blue 3", "ybin blue 3"]
    assert _names(labels, y[6]) == ["word apple"]
    assert _names(labels, y[12]) == ["tens 4", "units 7"]
    assert y.sum() == 13  # nothing anywhere else
    # a 2x2 grid puts both objects' sub-cell bins elsewhere: 70 px is in the first half of cell 0
    y2 = pse.targets(scene, 2, labels)
    assert "xbin red 2" in _names(labels, y2[0])
    # without the sub-cell labels (the binary objective's label space) the rest is unchanged
    plain = pse.label_space(WORDS)
    assert not any(n.startswith(("xbin", "ybin")) for n in plain)
    assert _names(plain, pse.targets(scene, 4, plain)[1]) == ["color red", "red circle", "shape circle"]


def test_image_position_labels_are_ordinal_thresholds(pse):
    labels = pse.label_space(WORDS, where="image", grid=4)  # K = 16 bins of 16 px per axis
    assert sum(n.startswith("xgt red ") for n in labels) == 15
    scene = {"image_size": 256, "texts": [],
             "objects": [{"color": "red", "shape": "circle", "center": [70, 10]},
                         {"color": "blue", "shape": "star", "center": [250, 250]}]}
    y = pse.targets(scene, 4, labels)
    # 70 px is past 4 of the 16-px thresholds (16, 32, 48, 64), 10 px past none
    assert _names(labels, y[1]) == ["color red", "red circle", "shape circle"] + [f"xgt red {b}" for b in range(1, 5)]
    assert sum(n.startswith("xgt blue") for n in _names(labels, y[15])) == 15
    assert sum(n.startswith("ygt blue") for n in _names(labels, y[15])) == 15
    assert "where" in pse.label_groups(labels) and len(pse.label_groups(labels)["where"]) == 2 * 7 * 15
    with pytest.raises(ValueError, match="unknown where"):
        pse.label_space(WORDS, where="grid")

    # the encoder-level position metric: exact targets score 1, swapped coordinates score 0
    scene = {"image_size": 256, "texts": [],
             "objects": [{"color": "red", "shape": "circle", "center": [40, 40], "bbox": [30, 30, 50, 50]},
                         {"color": "blue", "shape": "star", "center": [200, 150], "bbox": [190, 140, 210, 160]}]}
    y = pse.targets(scene, 4, labels) > 0
    assert pse.position_accuracy(y[None], [scene], 4, labels) == 1.0
    swapped = {**scene, "objects": [dict(scene["objects"][0], center=[200, 150]),
                                     dict(scene["objects"][1], center=[40, 40])]}
    wrong = pse.targets(swapped, 4, labels) > 0
    # the labels now sit in the other objects' cells: each object reads no thresholds, a tie, wrong
    assert pse.position_accuracy(wrong[None], [scene], 4, labels) == 0.0


def test_count_labels_are_global_thresholds(pse):
    labels = pse.label_space(WORDS, counts=True)
    scene = {"image_size": 256, "texts": [],
             "objects": [{"color": "red", "shape": "circle", "center": [70, 10]},
                         {"color": "red", "shape": "star", "center": [250, 250]},
                         {"color": "blue", "shape": "star", "center": [130, 130]}]}
    y = pse.targets(scene, 4, labels)
    want = ["count all 1", "count all 2", "count all 3", "count blue 1", "count circle 1", "count red 1",
            "count red 2", "count star 1", "count star 2"]
    for cell in (0, 5, 15):  # the same totals in every cell, empty or not
        assert [n for n in _names(labels, y[cell]) if n.startswith("count")] == want
    assert pse.label_groups(labels)["count"] == [labels[n] for n in labels if n.startswith("count")]
    # the count read back from exact targets is right for every present kind; one threshold off is wrong
    assert pse.count_accuracy((y > 0)[None], [scene], labels) == 1.0
    off = (y > 0).clone()
    off[:, labels["count all 3"]] = False
    assert pse.count_accuracy(off[None], [scene], labels) == 0.8  # red, blue, circle, star right; all wrong


def test_binary_objective_is_weighted_bce(pse):
    labels = pse.label_space(WORDS)
    obj = pse.Objective("binary", labels, WORDS)
    assert obj.num_outputs == len(labels)
    z, y = torch.randn(2, 3, len(labels)), (torch.rand(2, 3, len(labels)) < 0.05).float()
    ref = torch.nn.functional.binary_cross_entropy_with_logits(z, y, pos_weight=torch.full((len(labels),), 4.0))
    torch.testing.assert_close(obj.loss(z, y), ref)
    assert torch.equal(obj.predict(z), z > 0)
    with pytest.raises(ValueError, match="unknown objective"):
        pse.Objective("softmax", labels, WORDS)


def test_objective_text_is_a_softmax_over_words_and_nothing(pse):
    labels = pse.label_space(WORDS, where="cell")
    obj = pse.Objective("reading", labels, WORDS)
    n_out = obj.num_outputs
    assert n_out == len(labels) + 3
    y = torch.zeros(3, len(labels))
    y[0, labels["word apple"]] = 1                             # one word
    y[1, labels["word apple"]] = y[1, labels["word cat"]] = 1  # two words share the cell
    # row 2: no text at all

    def logits_for(words_per_row):
        z = torch.full((3, n_out), -8.0)
        z[:, [labels[f"tens {d}"] for d in range(10)] + [labels[f"units {d}"] for d in range(10)]] = -8.0
        z[:, len(labels) + 1:] = 8.0  # no digits anywhere
        for r, words in enumerate(words_per_row):
            if not words:
                z[r, len(labels)] = 8.0  # "no word"
            for w in words:
                z[r, labels[f"word {w}"]] = 8.0
        return z

    right = logits_for([["apple"], ["apple", "cat"], []])
    wrong = logits_for([["cat"], ["apple"], ["dog"]])
    # the two-word cell's soft target (1/2, 1/2) leaves its entropy, ln 2, averaged over 3 cells and 3 groups
    floor = torch.log(torch.tensor(2.0)) / 9
    assert abs(obj.loss(right, y) - floor) < 0.01 and obj.loss(wrong, y) > 1.0
    pred = obj.predict(right)
    assert _names(labels, pred[0]) == ["word apple"] and _names(labels, pred[2]) == []
    assert len(_names(labels, pred[1])) == 1  # at most one word per cell is predicted
    # the gradient of a word cell pushes its word up and the others down
    z = torch.zeros(1, n_out, requires_grad=True)
    obj.loss(z, y[:1]).backward()
    g = z.grad[0]
    assert g[labels["word apple"]] < 0 and g[labels["word cat"]] > 0 and g[len(labels)] > 0


def test_reading_scenes_give_many_text_targets(pse):
    labels = pse.label_space(WORDS)
    words = [labels[f"word {w}"] for w in WORDS]
    total = 0
    for i in range(10):
        _, scene = generate_reading_scene(0, i, 256, level="basic")
        y = pse.targets(scene, 4, labels)
        n_words = sum(t["kind"] == "word" for t in scene["texts"])
        assert y[:, words].sum() == n_words  # every word of the basic level lands in exactly one cell
        total += len(scene["texts"])
    assert total >= 30


def test_parallel_loading_matches_serial(pse, tmp_path):
    from fastvlm.data.synth import generate_dataset, load_split

    generate_dataset(tmp_path, num_train=6, num_val=0, num_test=0, image_size=128, level="basic", progress=False)
    records = load_split(tmp_path / "train.json")
    one = pse.load_images(records, str(tmp_path), 128, "x", workers=1)
    assert one.shape == (6, 3, 128, 128) and one.dtype == torch.uint8
    assert torch.equal(one, pse.load_images(records, str(tmp_path), 128, "x", workers=2))
    x1, s1 = pse.reading_images(5, 0, 128, 128, "basic", workers=1)
    x2, s2 = pse.reading_images(5, 0, 128, 128, "basic", workers=2)
    assert torch.equal(x1, x2) and s1 == s2


def test_small_conv_init_is_the_pre_session_21_rule(pse):
    import dataclasses

    from fastvlm.config import get_preset
    from fastvlm.vision import FastViTHD

    torch.manual_seed(0)
    encoder = FastViTHD(dataclasses.replace(get_preset("fastvlm-tiny").vision, inference_mode=False))
    convs = [m for m in encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    big = [m for m in convs if m.weight.numel() >= 2000]
    assert any(abs(float(m.weight.detach().std()) - 0.02) > 0.01 for m in big)  # the reference init: mostly PyTorch's default
    pse.small_conv_init_(encoder)
    assert all(abs(float(m.weight.detach().std()) - 0.02) < 0.004 for m in big)
    assert all(m.bias is None or not m.bias.any() for m in convs)


@pytest.mark.parametrize("extra", [[], ["--bf16"]], ids=["fp32", "bf16-autocast"])
def test_max_seconds_shortens_the_run(tmp_path, extra):
    import json
    import subprocess

    from fastvlm.data.synth import generate_dataset
    from fastvlm.tokenization import train_bpe_tokenizer

    data = tmp_path / "data"
    generate_dataset(data, num_train=12, num_val=4, num_test=0, image_size=128, level="basic", progress=False)
    train_bpe_tokenizer((data / "corpus.txt").read_text().splitlines(), 300).save_pretrained(str(data / "tokenizer"))
    out = tmp_path / "enc.safetensors"
    cmd = [sys.executable, str(SCRIPT), "--data", str(data), "--image-size", "128", "--steps", "5000",
           "--batch-size", "2", "--max-seconds", "2", "--device", "cpu", "--out", str(out), *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    log = json.loads((tmp_path / "enc.log.json").read_text())
    steps = log["steps_run"]
    assert log["device"] == "cpu" and 1 <= steps < 5000 and log["log"][-1]["step"] == steps

    # the same run as --steps with that number: the timing passes leave no trace in the weights
    again = tmp_path / "again.safetensors"
    cmd = [c if c != str(out) else str(again) for c in cmd]
    cmd[cmd.index("--steps") + 1] = str(steps)
    del cmd[cmd.index("--max-seconds"):cmd.index("--max-seconds") + 2]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    from safetensors.torch import load_file

    a, b = load_file(str(out)), load_file(str(again))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gpu_resolution_script_help_and_arguments():
    """scripts/gpu_resolution_run.sh starts a long GPU run: --help prints its header and exits, any argument is
    refused before anything runs (its settings are environment variables)."""
    import subprocess

    script = str(SCRIPT.parent / "gpu_resolution_run.sh")
    r = subprocess.run(["bash", script, "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stderr == "" and "VARIANTS picks among" in r.stdout
    assert "set -u" not in r.stdout and not r.stdout.startswith("#")
    r = subprocess.run(["bash", script, "enc512"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "takes no arguments" in r.stderr and r.stdout == ""
