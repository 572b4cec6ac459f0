"""scripts/binding_errors.py: the colour-shape binding breakdown docs/bundled-model.md quotes."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from fastvlm.data.synth import generate_dataset, load_split

from helpers import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "binding_errors.py"


def _script():
    return load_script("binding_errors")


def test_shortcut_answers_are_counted_as_binding_errors(tmp_path, capsys):
    mod = _script()
    generate_dataset(tmp_path, num_train=60, num_val=0, num_test=200, image_size=256, level="basic", train_turns=7,
                     progress=False)
    test = load_split(tmp_path / "test.json")
    # the shortcut: existence from the shape alone; colour always the first object's
    preds = {}
    for r in test:
        q, objs = mod.asked(r), r["scene"]["objects"]
        if q["question_type"] == "exists":
            preds[r["id"]] = "yes" if any(o["shape"] == q["params"]["shape"] for o in objs) else "no"
        elif q["question_type"] == "color":
            preds[r["id"]] = objs[0]["color"]
        elif q["question_type"] == "shape":  # the last object's shape; a shape no scene has for every 5th
            preds[r["id"]] = "hexagon" if len(preds) % 5 == 0 else objs[-1]["shape"]
        else:
            preds[r["id"]] = q["answer"]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"id": k, "prediction": v}) + "\n" for k, v in preds.items()))
    out = tmp_path / "b.json"
    assert mod.main(["--split", str(tmp_path / "test.json"), "--train", str(tmp_path / "train.json"),
                     f"m={path}", "--out", str(out)]) == 0
    got = json.loads(out.read_text())["models"]["m"]
    assert got["exists_no_shape_present/n"] > 0 and got["exists_no_shape_present/wrong"] == got["exists_no_shape_present/n"]
    assert got["exists_no_other/wrong"] == 0
    wrong_colour = [r for r in test if mod.asked(r)["question_type"] == "color" and preds[r["id"]] != mod.asked(r)["answer"]]
    assert got.get("color/wrong", 0) == got.get("color/wrong_in_scene", 0) == len(wrong_colour)
    assert all(len(r["scene"]["objects"]) >= 2 for r in wrong_colour)
    shape_qs = [r for r in test if mod.asked(r)["question_type"] == "shape"]
    wrong_shape = [r for r in shape_qs if preds[r["id"]] != mod.asked(r)["answer"]]
    in_scene = [r for r in wrong_shape if preds[r["id"]] != "hexagon"]
    assert got["shape/n"] == len(shape_qs) and got.get("shape/wrong", 0) == len(wrong_shape)
    assert 0 < got.get("shape/wrong_in_scene", 0) == len(in_scene) < len(wrong_shape)
    rate = json.loads(out.read_text())["train_shape_only_existence"]
    assert 0 < rate["right"] < rate["n"]
    # bad predictions arguments exit with a message that names the problem
    for arg, message in ((str(path), "give NAME=PATH"), (f"m={tmp_path / 'none.jsonl'}", "no such predictions file")):
        with pytest.raises(SystemExit):
            mod.main(["--split", str(tmp_path / "test.json"), arg])
        assert message in capsys.readouterr().err
    path.write_text("".join(json.dumps({"id": k, "prediction": v}) + "\n" for k, v in list(preds.items())[1:]))
    with pytest.raises(SystemExit):
        mod.main(["--split", str(tmp_path / "test.json"), f"m={path}"])
    assert "no prediction for 1 records" in capsys.readouterr().err


def test_reading_errors_split_by_size_scene_and_digit(tmp_path):
    mod = _script()
    generate_dataset(tmp_path, num_train=0, num_val=0, num_test=300, image_size=256, level="basic", train_turns=1,
                     progress=False)
    test = load_split(tmp_path / "test.json")
    preds, expect = {}, {"tens": 0, "other_text": 0, "not_in_scene": 0, "words": Counter(), "one_text_words": Counter()}
    for r in test:
        q, texts = mod.asked(r), r["scene"]["texts"]
        a = q["answer"]
        if q["question_type"] == "read_number":
            # the tens digit right, the units digit wrong
            preds[r["id"]] = a[0] + str((int(a[1]) + 1) % 10)
            expect["tens"] += 1
        elif q["question_type"] == "read_word" and q["params"].get("color") and len(texts) > 1:
            # colour-named words, answered in turn with another text of the scene and with a word not in it
            if expect["other_text"] <= expect["not_in_scene"]:
                preds[r["id"]] = next(t["text"] for t in texts if t["text"] != a)
                expect["other_text"] += 1
            else:
                preds[r["id"]] = "zebra-not-in-scene"
                expect["not_in_scene"] += 1
        else:
            preds[r["id"]] = a + "."  # a closing full stop does not count against it
            if q["question_type"] == "read_word":
                expect["words"][q["text_size"]] += 1
                expect["one_text_words"][q["text_size"]] += len(texts) == 1
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"id": k, "prediction": v}) + "\n" for k, v in preds.items()))
    out = tmp_path / "r.json"
    assert mod.main(["--split", str(tmp_path / "test.json"), "--reading", f"m={path}", "--out", str(out)]) == 0
    got = json.loads(out.read_text())["models"]["m"]["reading"]
    px = json.loads(out.read_text())["number_text_px_median"]
    sizes = sorted({t["size"] for r in test for t in r["scene"]["texts"] if t["kind"] == "number"})
    assert list(px) == [f"size_{k}" for k in sizes]
    heights = [px[f"size_{k}"][1] for k in sizes]
    assert heights == sorted(heights) and heights[0] < heights[-1]  # bigger text, taller boxes
    assert expect["tens"] > 0 and expect["other_text"] > 0 and expect["not_in_scene"] > 0
    assert got["read_number/wrong/tens_right"] == expect["tens"]
    assert "read_number/wrong/units_right" not in got and "read_number/wrong/neither_right" not in got
    assert sum(v for k, v in got.items() if k.startswith("read_number/size_") and k.endswith("/right")) == 0
    assert got["read_word/colour_named/wrong_other_text"] == expect["other_text"]
    assert got["read_word/colour_named/n"] - got["read_word/colour_named/right"] == expect["other_text"] + expect["not_in_scene"]
    for size, n in expect["words"].items():
        assert got[f"read_word/size_{size}/right"] == n
        assert got.get(f"read_word/one_text/size_{size}/right", 0) == expect["one_text_words"][size]
