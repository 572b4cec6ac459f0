"""scripts/average_models.py: a uniform weight average of exported models of one architecture."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastvlm.commands.common import bundled_model_path
from fastvlm.model import FastVLM

from helpers import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "average_models.py"


@pytest.fixture(scope="module")
def avg():
    return load_script("average_models")


def _shifted_copy(src: Path, dst: Path, delta: float) -> dict[str, torch.Tensor]:
    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    state = {k: (v + delta if v.is_floating_point() else v) for k, v in state.items()}
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return state


def test_mean_of_bundled_model_copies_loads_and_equals_the_midpoint(avg, tmp_path):
    src = Path(bundled_model_path())
    a = _shifted_copy(src, tmp_path / "a", 0.0)
    b = _shifted_copy(src, tmp_path / "b", 0.25)
    assert avg.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "soup")]) == 0
    soup = load_file(str(tmp_path / "soup" / "model.safetensors"))
    assert set(soup) == set(a)
    for k, v in soup.items():
        assert v.dtype == a[k].dtype
        if v.is_floating_point():
            torch.testing.assert_close(v, (a[k] + b[k]) / 2, rtol=0, atol=1e-6)
        else:
            assert torch.equal(v, a[k])
    assert json.loads((tmp_path / "soup" / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    # the averaged folder is a model the package loads, with the averaged weights in place
    model = FastVLM.from_pretrained(str(tmp_path / "soup"), device="cpu", dtype="float32", progress=False)
    name = "language_model.model.embed_tokens.weight"
    torch.testing.assert_close(dict(model.named_parameters())[name], soup[name])


def test_averaging_a_model_with_itself_changes_nothing(avg, tmp_path):
    src = Path(bundled_model_path())
    assert avg.main([str(src), str(src), "--out", str(tmp_path / "same")]) == 0
    before, after = load_file(str(src / "model.safetensors")), load_file(str(tmp_path / "same" / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_mismatches_are_named(avg, tmp_path, capsys):
    x = {"w": torch.zeros(2, 3), "step": torch.tensor([1])}
    with pytest.raises(avg.AverageError, match=r"b: w is \(3, 2\)"):
        avg.average_state_dicts([x, {"w": torch.zeros(3, 2), "step": torch.tensor([1])}], ["a", "b"])
    with pytest.raises(avg.AverageError, match="b: different tensors.*missing \\['step'\\]"):
        avg.average_state_dicts([x, {"w": torch.zeros(2, 3)}], ["a", "b"])
    with pytest.raises(avg.AverageError, match="non-float tensor step differs"):
        avg.average_state_dicts([x, {"w": torch.ones(2, 3), "step": torch.tensor([2])}], ["a", "b"])
    with pytest.raises(avg.AverageError, match="at least two"):
        avg.average_state_dicts([x], ["a"])
    src = Path(bundled_model_path())
    other = tmp_path / "other"
    shutil.copytree(src, other)
    config = json.loads((other / "config.json").read_text())
    config["image_size_override_for_test"] = 1
    (other / "config.json").write_text(json.dumps(config))
    assert avg.main([str(src), str(other), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "config differs" in err and "image_size_override_for_test" in err
    (other / "config.json").unlink()
    assert avg.main([str(src), str(other), "--out", str(tmp_path / "o")]) == 2
    assert "no config.json" in capsys.readouterr().err
