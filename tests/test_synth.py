"""The synthetic text-rich VQA generator: determinism, format, correctness, CLI."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastvlm.cli import main
from fastvlm.data import synth
from fastvlm.data.synth import (
    COLORS,
    QUESTION_TYPES,
    SynthDataError,
    derive_answer,
    generate_dataset,
    generate_reading_scene,
    generate_sample,
    load_split,
    validate_record,
)
from fastvlm.errors import FastVLMError

SPLITS = ("train", "val", "test")
COUNTS = {"num_train": 28, "num_val": 7, "num_test": 14}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "ds"
    generate_dataset(out, **COUNTS, seed=0, progress=False)
    return out


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _all_records(root: Path) -> list[dict]:
    return [r for s in SPLITS for r in load_split(root / f"{s}.json")]


# ----------------------------------------------------------------------------- determinism


def test_same_seed_is_byte_identical(dataset, tmp_path):
    again = tmp_path / "again"
    generate_dataset(again, **COUNTS, seed=0, progress=False)
    for name in ("train.json", "val.json", "test.json", "meta.json", "corpus.txt"):
        assert (dataset / name).read_bytes() == (again / name).read_bytes(), name
    pngs = sorted(p.relative_to(dataset) for p in (dataset / "images").rglob("*.png"))
    assert len(pngs) == sum(COUNTS.values())
    assert pngs == sorted(p.relative_to(again) for p in (again / "images").rglob("*.png"))
    for rel in pngs:
        assert np.array_equal(_pixels(dataset / rel), _pixels(again / rel)), rel
        assert (dataset / rel).read_bytes() == (again / rel).read_bytes(), rel


def test_workers_give_the_same_bytes(dataset, tmp_path):
    again = tmp_path / "parallel"
    generate_dataset(again, **COUNTS, seed=0, progress=False, workers=3)
    files = sorted(p.relative_to(dataset) for p in dataset.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (dataset / rel).read_bytes() == (again / rel).read_bytes(), rel
    with pytest.raises(SynthDataError, match="workers must be a positive integer"):
        generate_dataset(tmp_path / "w0", **COUNTS, progress=False, workers=0)


def test_duplicate_image_is_drawn_again(tmp_path, monkeypatch):
    # Sample 1's first draw repeats sample 0's image: it must be redrawn (attempt 1), never kept.
    import fastvlm.data.synth as synth

    real = synth.generate_sample

    def fake(seed, split, index, image_size=512, *, attempt=0, **kw):
        return real(seed, split, 0 if (index, attempt) == (1, 0) else index, image_size, attempt=attempt, **kw)

    monkeypatch.setattr(synth, "generate_sample", fake)
    out = tmp_path / "dup"
    generate_dataset(out, num_train=3, num_val=0, num_test=0, progress=False)
    pngs = [(out / "images" / "train" / f"{i:06d}.png").read_bytes() for i in range(3)]
    assert len(set(pngs)) == 3
    img, _ = real(0, "train", 1, 512, attempt=1)
    assert np.array_equal(_pixels(out / "images" / "train" / "000001.png"), np.asarray(img.convert("RGB")))


def test_different_seed_differs(dataset, tmp_path):
    other = tmp_path / "other"
    generate_dataset(other, num_train=7, num_val=0, num_test=0, seed=1, progress=False)
    assert (other / "train.json").read_bytes() != (dataset / "train.json").read_bytes()
    for i in range(7):
        rel = f"images/train/{i:06d}.png"
        assert not np.array_equal(_pixels(other / rel), _pixels(dataset / rel))


def test_samples_are_prefix_stable(dataset):
    # A sample depends only on (seed, split, index): a smaller run is a prefix of a larger one.
    records = load_split(dataset / "val.json")
    img, rec = generate_sample(0, "val", 3)
    assert {"image": records[3]["image"], **rec} == records[3]
    assert np.array_equal(np.asarray(img), _pixels(dataset / records[3]["image"]))


def test_no_global_rng_use(tmp_path):
    import random

    random.seed(123)
    np.random.seed(123)
    state, np_state = random.getstate(), np.random.get_state()
    generate_sample(0, "train", 0)
    assert random.getstate() == state
    assert np.array_equal(np.random.get_state()[1], np_state[1])


# ----------------------------------------------------------------------------- splits, format


def test_splits_disjoint_and_balanced(dataset):
    digests: dict[str, set[bytes]] = {}
    for split in SPLITS:
        digests[split] = {hashlib.sha1(_pixels(p).tobytes()).digest()
                          for p in (dataset / "images" / split).glob("*.png")}
        assert len(digests[split]) == len(list((dataset / "images" / split).glob("*.png")))
    assert not digests["train"] & digests["val"]
    assert not digests["train"] & digests["test"]
    assert not digests["val"] & digests["test"]
    ids = [r["id"] for r in _all_records(dataset)]
    assert len(ids) == len(set(ids))
    # Every block of 7 consecutive records holds each question type once.
    for split in SPLITS:
        types = [r["question_type"] for r in load_split(dataset / f"{split}.json")]
        for b in range(0, len(types) - len(types) % 7, 7):
            assert sorted(types[b:b + 7]) == sorted(QUESTION_TYPES)
    meta = json.loads((dataset / "meta.json").read_text())
    assert meta["seed"] == 0 and meta["image_size"] == 512
    assert meta["counts"]["train"]["records"] == COUNTS["num_train"]
    assert meta["counts"]["test"]["question_types"] == {t: 2 for t in QUESTION_TYPES}


def test_record_format(dataset):
    records = _all_records(dataset)
    multi = 0
    for r in records:
        validate_record(r, dataset)
        assert (dataset / r["image"]).is_file() and not Path(r["image"]).is_absolute()
        assert r["image"].startswith(f"images/{r['id'].split('-')[0]}/")
        conv = r["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        assert conv[0]["value"].startswith("<image>\n")
        assert sum(t["value"].count("<image>") for t in conv) == 1
        assert all(t["value"].strip() for t in conv)
        assert r["answer"] == conv[1]["value"] and r["question_type"] in QUESTION_TYPES
        for t in conv[1::2]:  # canonical short answers
            assert t["value"] == t["value"].strip().lower() and " " not in t["value"]
        if r["question_type"] in ("read_word", "read_number"):
            assert r["text_size"] in synth.text_sizes(512)
        else:
            assert r["text_size"] is None
        multi += len(conv) > 2
    assert multi > 0, "expected some multi-turn records"
    corpus = (dataset / "corpus.txt").read_text()
    assert records[0]["qa"][0]["question"] in corpus and "<image>" not in corpus


def test_validator_rejects_bad_records(dataset):
    good = load_split(dataset / "train.json")[0]
    validate_record(good, dataset)
    cases = []
    r = json.loads(json.dumps(good))
    r["conversations"][1]["value"] = r["answer"] = "banana" if r["answer"] != "banana" else "apple"
    r["qa"][0]["answer"] = r["answer"]
    cases.append(r)  # wrong answer for the scene
    r = json.loads(json.dumps(good))
    r["conversations"][0]["value"] = "<image>\n<image>\n" + r["qa"][0]["question"]
    cases.append(r)  # two image tokens
    r = json.loads(json.dumps(good))
    r["image"] = "images/train/999999.png"
    cases.append(r)  # missing image
    r = json.loads(json.dumps(good))
    r["conversations"][1]["value"] = " "
    cases.append(r)  # empty answer
    for bad in cases:
        with pytest.raises(SynthDataError):
            validate_record(bad, dataset)


def test_load_split_errors(tmp_path):
    with pytest.raises(SynthDataError, match="no such"):
        load_split(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SynthDataError, match="not valid JSON"):
        load_split(tmp_path / "bad.json")


# ----------------------------------------------------------------------------- correctness


def _independent_answer(scene: dict, qtype: str, params: dict) -> str:
    """A second, deliberately naive re-derivation (by centres, not the generator's code)."""
    objs = scene["objects"]
    if qtype == "count":
        return str(len([o for o in objs if o["shape"] == params.get("shape", o["shape"])
                        and o["color"] == params.get("color", o["color"])]))
    if qtype == "color":
        (o,) = [o for o in objs if o["shape"] == params["shape"]]
        return o["color"]
    if qtype == "shape":
        (o,) = [o for o in objs if o["color"] == params["color"]]
        return o["shape"]
    if qtype == "exists":
        return "yes" if [params["color"], params["shape"]] in [[o["color"], o["shape"]] for o in objs] else "no"
    if qtype == "position":
        (a,) = [o for o in objs if [o["color"], o["shape"]] == params["a"]]
        (b,) = [o for o in objs if [o["color"], o["shape"]] == params["b"]]
        k = 0 if params["axis"] == "x" else 1
        assert abs(a["center"][k] - b["center"][k]) > 20  # clearly separated
        if k == 0:
            return "left" if a["center"][0] < b["center"][0] else "right"
        return "above" if a["center"][1] < b["center"][1] else "below"
    kind = "word" if qtype == "read_word" else "number"
    (t,) = [t for t in scene["texts"] if t["kind"] == kind and params["color"] in (None, t["color"])]
    return t["text"]


def test_answers_correct_by_construction(dataset):
    seen = Counter()
    for r in _all_records(dataset):
        for q in r["qa"]:
            assert _independent_answer(r["scene"], q["question_type"], q["params"]) == q["answer"]
            assert derive_answer(r["scene"], q["question_type"], q["params"]) == q["answer"]
            seen[q["question_type"]] += 1
            if q["question_type"] in ("read_word", "read_number"):
                assert q["answer"] not in q["question"].rstrip("?.").split()  # not given away
            if q["question_type"] == "read_number":
                assert q["answer"].isdigit() and 2 <= len(q["answer"]) <= 4 and q["answer"][0] != "0"
    assert set(seen) == set(QUESTION_TYPES)


def test_scene_matches_pixels(dataset):
    """Objects are drawn where and in the colour the scene says; nothing overlaps; every
    non-background pixel lies inside a recorded box (checked on plain backgrounds)."""
    checked_plain = 0
    for r in _all_records(dataset)[:30]:
        scene, px = r["scene"], _pixels(dataset / r["image"])
        boxes = [o["bbox"] for o in scene["objects"]] + [t["bbox"] for t in scene["texts"]]
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (r["id"], a, b)
        for o in scene["objects"]:
            cx, cy = o["center"]
            assert tuple(px[cy, cx]) == COLORS[o["color"]], (r["id"], o)
        for t in scene["texts"]:
            x0, y0, x1, y1 = t["bbox"]
            region = px[y0:y1 + 1, x0:x1 + 1].astype(int)
            dist = np.abs(region - np.array(COLORS[t["color"]])).sum(-1)
            bg_dist = np.abs(np.array(scene["background"]["color"]) - np.array(COLORS[t["color"]])).sum()
            assert dist.min() < 0.8 * bg_dist, (r["id"], t)  # ink of the text's colour is there
        if scene["background"]["style"] == "plain":
            checked_plain += 1
            mask = np.any(px != np.array(scene["background"]["color"], dtype=np.uint8), axis=-1)
            for x0, y0, x1, y1 in boxes:
                mask[max(0, y0 - 1):y1 + 2, max(0, x0 - 1):x1 + 2] = False
            assert not mask.any(), (r["id"], np.argwhere(mask)[:5])
    assert checked_plain > 0


def test_other_image_size_scales():
    img, rec = generate_sample(3, "train", 5, image_size=256)
    assert img.size == (256, 256) and rec["scene"]["image_size"] == 256
    assert synth.text_sizes(256)[0] < synth.text_sizes(512)[0] < synth.text_sizes(1024)[0]
    assert all(max(o["bbox"]) <= 256 for o in rec["scene"]["objects"])


def test_reading_scene():
    """The encoder-pretraining scenes: deterministic, text-rich, vocabulary and sizes of the level,
    texts distinct and drawn where the scene says."""
    level = synth.get_level("basic")
    a_img, a = generate_reading_scene(0, 7, 256, level="basic")
    b_img, b = generate_reading_scene(0, 7, 256, level="basic")
    assert a == b and np.array_equal(np.asarray(a_img), np.asarray(b_img))
    assert generate_reading_scene(0, 8, 256, level="basic")[1] != a
    for i in range(20):
        img, scene = generate_reading_scene(1, i, 256, level="basic")
        texts = scene["texts"]
        assert 3 <= len(texts) <= 6 and len(scene["objects"]) <= 2
        assert len({t["text"] for t in texts}) == len(texts)
        for t in texts:
            assert t["size"] in synth.text_sizes(256, level)
            assert t["text"] in level.words if t["kind"] == "word" else len(t["text"]) == 2
            x0, y0, x1, y1 = t["bbox"]
            assert 0 <= x0 < x1 <= 256 and 0 <= y0 < y1 <= 256
            ink = np.array(COLORS[t["color"]])
            px = np.asarray(img)[y0:y1 + 1, x0:x1 + 1].astype(int)
            bg_dist = np.abs(np.array(scene["background"]["color"]) - ink).sum()
            assert np.abs(px - ink).sum(-1).min() < 0.8 * bg_dist, t
    with pytest.raises(SynthDataError, match="num_texts"):
        generate_reading_scene(0, 0, 256, num_texts=(4, 2))


def test_basic_level_and_training_turns(tmp_path):
    out = tmp_path / "basic"
    generate_dataset(out, num_train=21, num_val=7, num_test=7, image_size=256, level="basic", train_turns=7,
                     progress=False)
    basic = synth.LEVELS["basic"]
    train, val = load_split(out / "train.json"), load_split(out / "val.json")
    # every training image is asked about several types (one turn each); val keeps one or two turns
    assert all(len({q["question_type"] for q in r["qa"]}) == len(r["qa"]) for r in train)
    assert sum(len(r["qa"]) for r in train) >= 4 * len(train)
    assert max(len(r["qa"]) for r in train) == 7 and max(len(r["qa"]) for r in val) <= 2
    for r in train + val:
        validate_record(r, out)  # every turn re-derives from the scene
        scene = r["scene"]
        assert len(scene["objects"]) <= basic.max_objects
        for t in scene["texts"]:
            assert t["size"] in synth.text_sizes(256, "basic")
            if t["kind"] == "word":
                assert t["text"] in basic.words
            else:
                assert len(t["text"]) == 2 and t["text"].isdigit()
    # the first turn (what evaluation asks) keeps the balanced type order of the standard level
    assert [r["question_type"] for r in train] == [synth.question_type_for(0, "train", i) for i in range(21)]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["level"]["name"] == "basic" and meta["train_turns"] == 7
    assert synth.text_sizes(256, "basic")[0] == 6 and synth.text_sizes(256)[0] == 4
    with pytest.raises(SynthDataError, match="unknown level 'hard'"):
        generate_dataset(tmp_path / "x", num_train=1, num_val=0, num_test=0, level="hard", progress=False)
    with pytest.raises(SynthDataError, match="train_turns"):
        generate_dataset(tmp_path / "x", num_train=1, num_val=0, num_test=0, train_turns=8, progress=False)


def test_standard_level_unchanged_by_options():
    # Adding levels and training turns must not change the standard dataset: this digest is the
    # record the generator produced before they existed (commit ed7f34a), and the defaults must
    # still reproduce it.
    import hashlib

    _, rec = generate_sample(0, "train", 11)
    digest = hashlib.sha256(json.dumps(rec, sort_keys=True).encode()).hexdigest()
    assert digest == "555ffde98fc2ea0c767783b87a49983c8f412388c4e01bc0c22f696a42e37ea6"
    _, rec_b = generate_sample(0, "train", 11, level="standard", turns=None)
    assert rec_b == rec


# ----------------------------------------------------------------------------- errors and CLI


def test_bad_arguments(tmp_path):
    with pytest.raises(SynthDataError, match="num_train"):
        generate_dataset(tmp_path / "a", num_train=-1, num_val=0, num_test=0, progress=False)
    with pytest.raises(SynthDataError, match="image_size"):
        generate_dataset(tmp_path / "a", num_train=1, num_val=0, num_test=0, image_size=16, progress=False)
    with pytest.raises(SynthDataError, match="nothing to generate"):
        generate_dataset(tmp_path / "a", num_train=0, num_val=0, num_test=0, progress=False)
    assert not (tmp_path / "a").exists()


def test_non_empty_out_dir(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(synth.OutputDirNotEmptyError, match="not empty") as info:
        generate_dataset(out, num_train=1, num_val=0, num_test=0, progress=False)
    assert isinstance(info.value, FastVLMError)
    generate_dataset(out, num_train=1, num_val=0, num_test=0, progress=False, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"  # overwrite touches only our own files
    assert (out / "train.json").is_file()


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["data", "synth", "--out", str(out), "--num-train", "9", "--num-val", "2", "--num-test", "3",
            "--seed", "5", "--no-progress"]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "wrote 14 images" in stdout and str(out) in stdout and "read_number" in stdout
    meta = json.loads((out / "meta.json").read_text())
    assert meta["seed"] == 5 and meta["counts"]["train"]["records"] == 9
    for split, n in (("train", 9), ("val", 2), ("test", 3)):
        records = load_split(out / f"{split}.json")
        assert len(records) == n
        for r in records:
            validate_record(r, out)

    # Again into the same, now non-empty, directory: a one-line error, not a traceback.
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err and "Traceback" not in err

    # --overwrite replaces the dataset and removes stale images.
    assert main([*argv[:4], "--num-train", "4", "--num-val", "0", "--num-test", "0", "--no-progress",
                 "--overwrite"]) == 0
    assert len(list((out / "images" / "train").glob("*.png"))) == 4
    assert not list((out / "images" / "val").glob("*.png"))
    assert load_split(out / "val.json") == []


def test_cli_help_is_module_docstring(capsys):
    with pytest.raises(SystemExit):
        main(["data", "synth", "--help"])
    assert "read_number" in capsys.readouterr().out
