"""data.cache_image_features: training on cached encoder outputs is the same training."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from fastvlm.errors import ConfigError
from fastvlm.train.data import DataError
from fastvlm.train.recipe import recipe_from_dict

sys.path.insert(0, os.path.dirname(__file__))
from helpers import train_in_process  # noqa: E402
from test_train import conv, make_dataset, tiny_recipe, write_json  # noqa: E402


def _frozen_encoder_recipe(data, tok_dir, out, **data_over) -> dict:
    # the encoder in its multi-branch form with BatchNorm: frozen, it runs in eval mode
    recipe = tiny_recipe(
        data, tok_dir, out,
        init={"preset": "fastvlm-tiny", "seed": 0, "vision": {"image_size": 64, "inference_mode": False}},
        train={"epochs": 2, "global_batch_size": 4, "per_device_batch_size": 2, "seed": 3,
               "trainable": {"vision_tower": False}, "cpu": True},
        optim={"lr": 3e-3, "warmup_ratio": 0.1, "weight_decay": 0.01})
    recipe["data"].update(val=data["val"], **data_over)
    return recipe


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from test_train import make_tokenizer

    d = tmp_path_factory.mktemp("tok")
    make_tokenizer(d)
    return d


def test_cached_features_train_the_same_weights(tmp_path, tok_dir):
    data = make_dataset(tmp_path / "data", 12, text_only=3)
    ref = train_in_process(_frozen_encoder_recipe(data, tok_dir, tmp_path / "ref"))
    cached = train_in_process(_frozen_encoder_recipe(data, tok_dir, tmp_path / "cached", cache_image_features=True))
    assert cached["steps"] == ref["steps"] >= 4
    a = load_file(str(tmp_path / "ref" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "cached" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    # ... and that training moved the projector from its initial weights (the same seed builds them again)
    from fastvlm.train.build import build_model

    init = build_model(recipe_from_dict(_frozen_encoder_recipe(data, tok_dir, tmp_path / "init"))).state_dict()
    projector = [k for k in a if k.startswith("mm_projector.")]
    assert projector and all(k in init for k in projector), (projector, list(init)[:5])
    assert not any(torch.equal(a[k], init[k]) for k in projector), projector
    assert max((a[k] - init[k]).abs().max().item() for k in projector) > 1e-3  # 0.008 here, lr 3e-3
    losses = [[json.loads(line)["loss"] for line in open(tmp_path / d / "metrics.jsonl") if '"loss"' in line]
              for d in ("ref", "cached")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert cached["final_val_loss"] == pytest.approx(ref["final_val_loss"], rel=1e-5)
    # the summary says what the cache held and what it cost; a run without one says so
    assert ref["feature_cache"] is None
    assert cached["feature_cache"]["images"] == 12 and cached["feature_cache"]["seconds"] >= 0


def test_cache_needs_a_frozen_encoder(tmp_path, tok_dir):
    data = make_dataset(tmp_path / "data", 4)
    recipe = tiny_recipe(data, tok_dir, tmp_path / "out", data__cache_image_features=True)
    with pytest.raises(ConfigError, match="cache_image_features needs a frozen vision tower"):
        recipe_from_dict(recipe)
    recipe["stage"] = "stage1"
    recipe_from_dict(recipe)  # stage 1 freezes the encoder


def test_unreadable_image_while_caching(tmp_path, tok_dir):
    data = make_dataset(tmp_path / "data", 7, val=0)
    good = (tmp_path / "data" / "images" / "0.png").read_bytes()
    (tmp_path / "data" / "images" / "cut.png").write_bytes(good[: len(good) // 2])
    records = data["records"] + [{"id": "cut", "image": "images/cut.png", "conversations": conv("<image>\nWhat?", "red")}]
    write_json(data["train"], records)
    recipe = _frozen_encoder_recipe(data, tok_dir, tmp_path / "out", cache_image_features=True)
    recipe["data"].pop("val")
    with pytest.raises(DataError, match=r"record 7 \(id 'cut'\)"):
        train_in_process(recipe)
    recipe["data"]["skip_bad"] = True
    recipe["output"]["dir"] = str(tmp_path / "out2")
    summary = train_in_process(recipe)
    # 8 records, 2 steps of 4 per epoch: the bad sample is skipped once per epoch, never replaced
    assert summary["skipped_by_kind"] == {"unreadable_image_at_load": 2}
    assert summary["steps"] == 4 and summary["samples"] == 4 * 4 - 2
    assert len(summary["skipped_examples"]) == 2 and all("id 'cut'" in m for m in summary["skipped_examples"])


def test_threaded_cache_matches_serial(tmp_path, tok_dir):
    """workers > 1 decodes in threads: the same features in the same rows, the same failures named."""
    from transformers import AutoTokenizer

    from fastvlm.train.build import build_model
    from fastvlm.train.data import ConversationDataset
    from fastvlm.train.features import FeatureCache

    data = make_dataset(tmp_path / "data", 9, val=0)
    (tmp_path / "data" / "images" / "cut.png").write_bytes((tmp_path / "data" / "images" / "0.png").read_bytes()[:40])
    records = data["records"] + [{"id": "cut", "image": "images/cut.png", "conversations": conv("<image>\nWhat?", "red")}]
    write_json(data["train"], records)
    recipe = recipe_from_dict(_frozen_encoder_recipe(data, tok_dir, tmp_path / "out"))
    vlm = build_model(recipe).eval()
    vlm.vision_tower.requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    dset = ConversationDataset(data["train"], data["root"], tokenizer=tok, num_image_tokens=4, image_size=64,
                               max_length=512, skip_bad=True, check_images="none")
    serial = FeatureCache.build(vlm, [dset], batch_size=4)
    threaded = FeatureCache.build(vlm, [dset], batch_size=4, workers=3)
    assert len(serial) == 9 and serial.rows == threaded.rows and threaded.seconds > 0
    assert list(threaded.failed) == [os.path.join(data["root"], "images", "cut.png")] and threaded.failed == serial.failed
    torch.testing.assert_close(threaded.features, serial.features, rtol=0, atol=0)
    dset.skip_bad = False
    with pytest.raises(DataError, match=r"record 9 \(id 'cut'\)"):
        FeatureCache.build(vlm, [dset], batch_size=4, workers=3)


def test_cache_on_disk_is_reused_and_keyed(tmp_path, tok_dir, caplog):
    # data.feature_cache_dir: a second run (another seed, or a resumed one) loads the features instead of encoding,
    # and trains exactly as with freshly encoded ones; another encoder or a changed image gets its own file
    data = make_dataset(tmp_path / "data", 12, text_only=3)
    cache_dir = tmp_path / "features"
    first = train_in_process(_frozen_encoder_recipe(data, tok_dir, tmp_path / "a", cache_image_features=True,
                                                    feature_cache_dir=str(cache_dir)))
    files = sorted(cache_dir.iterdir())
    assert len(files) == 1 and first["feature_cache"]["loaded"] is False
    assert first["feature_cache"]["file"] == str(files[0])
    with caplog.at_level("INFO", logger="fastvlm.train"):
        second = train_in_process(_frozen_encoder_recipe(data, tok_dir, tmp_path / "b", cache_image_features=True,
                                                         feature_cache_dir=str(cache_dir)))
    assert second["feature_cache"]["loaded"] is True and second["feature_cache"]["images"] == 12
    assert any("loaded the encoder features of 12 images" in r.getMessage() for r in caplog.records)
    a = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # another encoder (init seed): another key, another file
    other = _frozen_encoder_recipe(data, tok_dir, tmp_path / "c", cache_image_features=True,
                                   feature_cache_dir=str(cache_dir))
    other["init"]["seed"] = 1
    assert train_in_process(other)["feature_cache"]["loaded"] is False
    assert len(list(cache_dir.iterdir())) == 2
    # a touched image file changes the key too
    img = os.path.join(data["root"], "images", "0.png")
    os.utime(img, ns=(os.stat(img).st_atime_ns, os.stat(img).st_mtime_ns + 10**9))
    assert train_in_process(_frozen_encoder_recipe(data, tok_dir, tmp_path / "d", cache_image_features=True,
                                                   feature_cache_dir=str(cache_dir)))["feature_cache"]["loaded"] is False
    # an unreadable cache file is encoded again and rewritten, with a warning, not a crash
    newest = max(cache_dir.iterdir(), key=lambda p: p.stat().st_mtime_ns)
    newest.write_bytes(b"not safetensors")
    caplog.clear()
    with caplog.at_level("WARNING", logger="fastvlm.train"):
        again = train_in_process(_frozen_encoder_recipe(data, tok_dir, tmp_path / "e", cache_image_features=True,
                                                        feature_cache_dir=str(cache_dir)))
    assert again["feature_cache"]["loaded"] is False
    assert any("is not a readable feature cache" in r.getMessage() for r in caplog.records)
    assert load_file(str(newest))["features"].shape[0] == 12


def test_feature_cache_dir_needs_the_cache_and_skip_bad_changes_the_key(tmp_path, tok_dir):
    from fastvlm.train.data import ConversationDataset
    from fastvlm.train.features import cache_key, first_uses

    data = make_dataset(tmp_path / "data", 4)
    recipe = _frozen_encoder_recipe(data, tok_dir, tmp_path / "out", feature_cache_dir=str(tmp_path / "f"))
    with pytest.raises(ConfigError, match="set data.cache_image_features: true too"):
        recipe_from_dict(recipe)
    # a cache built with --skip-bad may hold failed images: a run without it must not load it and skip them
    from fastvlm.train.build import build_model

    model = build_model(recipe_from_dict(_frozen_encoder_recipe(data, tok_dir, tmp_path / "o",
                                                                cache_image_features=True)))
    keys = []
    for skip in (False, True):
        ds = ConversationDataset(data["train"], data["root"], tokenizer=model.processor.tokenizer,
                                 num_image_tokens=model.num_image_tokens, image_size=64, skip_bad=skip)
        keys.append(cache_key(model, [ds], "no", list(first_uses([ds]))))
    assert keys[0] != keys[1]
