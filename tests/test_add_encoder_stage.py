"""scripts/add_encoder_stage.py: a sixth FastViTHD stage that keeps every weight of the five-stage encoder."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastvlm.commands.common import bundled_model_path
from fastvlm.config import FastVLMConfig
from fastvlm.errors import ConfigError
from fastvlm.train.build import build_model, encoder_weights
from fastvlm.train.recipe import load_recipe
from fastvlm.vision import FastViTHD

from helpers import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "add_encoder_stage.py"


@pytest.fixture(scope="module")
def aes():
    return load_script("add_encoder_stage")


@pytest.fixture(scope="module")
def bundled():
    path = Path(bundled_model_path())
    config = FastVLMConfig.from_dict(__import__("json").loads((path / "config.json").read_text()))
    return path, config.vision, encoder_weights(load_file(str(path / "model.safetensors")))


def test_old_stages_compute_what_they_did_and_the_stride_doubles(aes, bundled):
    _, vision, state = bundled
    config, new, kept = aes.extend(state, vision, image_size=512)
    assert config.patch_size == 2 * vision.patch_size == 128 and config.num_tokens() == 16
    assert kept == len(state)  # conv_exp keeps its weights: the new stage is as wide as the last one
    old = FastViTHD(vision).eval()
    old.load_state_dict(state)
    ext = FastViTHD(config).eval()
    ext.load_state_dict(new)  # strict: the file is a whole six-stage encoder
    x = torch.randn(1, 3, 512, 512)
    with torch.no_grad():
        a, b = old.patch_embed(x), ext.patch_embed(x)
        for i in range(len(old.network)):
            a, b = old.network[i](a), ext.network[i](b)
        torch.testing.assert_close(b, a, rtol=0, atol=0)
        assert ext(x).shape[1] == 16 and old(x).shape[1] == 64


def test_a_wider_stage_renews_conv_exp_and_a_wrong_config_is_refused(aes, bundled):
    _, vision, state = bundled
    config, new, kept = aes.extend(state, vision, dim=512, image_size=512)
    assert config.embed_dims[-1] == 512 and kept == len(state) - sum(k.startswith("conv_exp.") for k in state)
    narrow = dataclasses.replace(vision, embed_dims=(16, 32, 64, 64, 128))
    with pytest.raises(ConfigError, match="has shape .* give the --config the encoder was made with"):
        aes.extend(state, narrow, image_size=512)
    with pytest.raises(ConfigError, match="first unknown key: nonsense"):
        aes.extend({**state, "nonsense": torch.zeros(1)}, vision, image_size=512)


def test_the_printed_settings_build_a_model_that_loads_the_file(bundled, tmp_path):
    path, _, _ = bundled
    out = tmp_path / "enc.safetensors"
    run = subprocess.run([sys.executable, str(SCRIPT), "--encoder", str(path / "model.safetensors"),
                          "--config", str(path / "config.json"), "--image-size", "512", "--out", str(out)],
                         capture_output=True, text=True, check=True)
    assert "stride 128, 16 tokens at 512 px" in run.stdout
    sets = run.stdout.split("recipe settings: ", 1)[1].split()
    overrides = [s for s in sets if s != "--set"]
    recipe = load_recipe("synth_stage1", [f"tokenizer={path}", "data.image_size=512", "init.vision.image_size=512",
                                          "init.vision.inference_mode=true", f"init.vision_tower={out}", *overrides],
                         validate=False)
    model = build_model(recipe)
    assert model.num_image_tokens == 16
    saved = load_file(str(out))
    got = model.vision_tower.state_dict()
    assert set(got) == set(saved)
    for k, v in saved.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=k)


def test_an_encoder_missing_old_weights_is_refused(aes, bundled):
    _, vision, state = bundled
    partial = {k: v for k, v in state.items() if not k.startswith("network.10.")}
    with pytest.raises(ConfigError, match=r"lack \d+ of a 5-stage FastViTHD's tensors \(first: network\.10\."):
        aes.extend(partial, vision, image_size=512)
