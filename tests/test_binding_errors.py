"""scripts/binding_errors.py: the colour-shape binding breakdown the README quotes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from fastvlm.data.synth import generate_dataset, load_split

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "binding_errors.py"


def test_shortcut_answers_are_counted_as_binding_errors(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("binding_errors", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
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
