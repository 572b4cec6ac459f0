"""scripts/add_relation_turns.py: the relational curriculum for the bundled model's training split.
Every added answer must follow from the scene, no added pair may repeat one already asked (either way
round), and the first turn (the one with <image>) must stay first."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from fastvlm.data.synth import (
    _TEMPLATES,
    COLORS,
    SHAPES,
    _unique,
    derive_answer,
    generate_dataset,
    load_split,
    validate_record,
)

from helpers import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "add_relation_turns.py"


_script = load_script


@pytest.fixture(scope="module")
def art():
    return _script("add_relation_turns")


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    out = tmp_path_factory.mktemp("rel")
    generate_dataset(out, num_train=35, num_val=0, num_test=0, image_size=256, level="basic", train_turns=7,
                     progress=False)
    return out


def _name(text: str) -> tuple[str, str]:
    color, shape = text.split()
    return color, shape


def half(scene, color, shape, axis):
    return derive_answer(scene, "half", {"a": [color, shape], "axis": axis})


def test_half_answer():
    scene = {"image_size": 256, "objects": [
        {"color": "red", "shape": "circle", "bbox": [10, 10, 40, 40]},       # top left
        {"color": "blue", "shape": "star", "bbox": [200, 120, 230, 150]},    # right; straddles the middle row
        {"color": "blue", "shape": "circle", "bbox": [140, 200, 170, 230]}], "texts": []}  # bottom right
    assert half(scene, "red", "circle", "x") == "left"
    assert half(scene, "red", "circle", "y") == "above"
    assert half(scene, "blue", "star", "x") == "right"
    assert half(scene, "blue", "circle", "y") == "below"
    with pytest.raises(Exception, match="not clearly inside one half"):
        half(scene, "blue", "star", "y")
    with pytest.raises(Exception, match="not exactly one"):
        half(scene, "green", "star", "y")


def test_added_turns_follow_from_the_scene(art, split, tmp_path):
    out = tmp_path / "train_rel.json"
    assert art.main(["--data", str(split / "train.json"), "--out", str(out), "--position", "3", "--halves", "2"]) == 0
    before, after = load_split(split / "train.json"), load_split(out)
    assert len(before) == len(after)
    added = {"position": 0, "half": 0}
    for b, a in zip(before, after):
        validate_record(a, split)  # every turn, added or not, re-derives from the scene
        as_qa = [art.turn_qa(t) for t in a["added_turns"]]
        assert [q for q in a["qa"] if q not in as_qa] == b["qa"]  # the added turns, and nothing else
        assert a["question_type"] == b["question_type"]
        assert a["conversations"][:2] == b["conversations"][:2]  # <image> turn first
        assert len(a["conversations"]) == len(b["conversations"]) + 2 * len(a["added_turns"])
        asked = {t["value"] for t in a["conversations"] if t["from"] == "human"}
        pairs = set()
        for q in b["qa"]:
            if q["question_type"] == "position":
                p = q["params"]
                pairs.add((frozenset((tuple(p["a"]), tuple(p["b"]))), p["axis"]))
        for t in a["added_turns"]:
            added[t["kind"]] += 1
            assert t["question"] in asked
            i = [c["value"] for c in a["conversations"]].index(t["question"])
            assert a["conversations"][i + 1] == {"from": "gpt", "value": t["answer"]}
            q = t["question"]
            if t["kind"] == "position":
                axis = "x" if "left or right of" in q else "y"
                first, second = q[len("Is the "):-1].split(" left or right of the " if axis == "x" else
                                                          " above or below the ")
                params = {"a": list(_name(first)), "b": list(_name(second)), "axis": axis}
                assert derive_answer(a["scene"], "position", params) == t["answer"]
                key = (frozenset((tuple(params["a"]), tuple(params["b"]))), axis)
                assert key not in pairs, "a pair was asked twice (the answer could be copied)"
                pairs.add(key)
            else:
                axis = "x" if "left or right of the middle" in q else "y"
                color, shape = _name(q[len("Is the "):q.index(" left or right" if axis == "x" else " above or below")])
                assert half(a["scene"], color, shape, axis) == t["answer"]
        assert sum(t["kind"] == "position" for t in a["added_turns"]) <= 3
        assert sum(t["kind"] == "half" for t in a["added_turns"]) <= 2
    assert added["position"] > 0 and added["half"] > 0
    # deterministic by seed
    again = tmp_path / "again.json"
    art.main(["--data", str(split / "train.json"), "--out", str(again), "--position", "3", "--halves", "2"])
    assert again.read_bytes() == out.read_bytes()


def test_binding_turns_need_colour_and_shape_together(art, split, tmp_path):
    out = tmp_path / "binding.json"
    args = ["--data", str(split / "train.json"), "--out", str(out), "--position", "0", "--halves", "0"]
    assert art.main([*args, "--binding", "4"]) == 0
    before, after = load_split(split / "train.json"), load_split(out)
    answers = Counter()
    for b, a in zip(before, after):
        validate_record(a, split)  # the added existence turns re-derive from the scene like the generator's own
        objs = a["scene"]["objects"]
        present = {(o["color"], o["shape"]) for o in objs}
        asked = [(q["params"]["color"], q["params"]["shape"]) for q in a["qa"] if q["question_type"] == "exists"]
        assert len(asked) == len(set(asked)), "an existence question was asked twice in one record"
        assert all(t["kind"] == "exists" for t in a["added_turns"]) and len(a["added_turns"]) <= 4
        for i, t in enumerate(a["added_turns"]):
            color, shape = t["params"]["color"], t["params"]["shape"]
            assert t["question"] in {f.format(color=color, shape=shape) for f in _TEMPLATES["exists"]}
            assert t["answer"] == ("yes" if (color, shape) in present else "no")
            if t["answer"] == "no":  # hard: the colour or the shape alone is in the scene
                assert any(o["color"] == color for o in objs) or any(o["shape"] == shape for o in objs)
            answers[t["answer"]] += 1
        kinds = [t["answer"] for t in a["added_turns"]]
        if len(kinds) >= 2 and len(set(kinds)) == 2:
            assert kinds[0] == "no" and kinds[1] == "yes", kinds  # alternating, a hard "no" first
    assert answers["no"] > 0 and answers["yes"] > 0
    # without --binding the output is what it was before the option existed
    plain, zero = tmp_path / "plain.json", tmp_path / "zero.json"
    art.main(args[:3] + [str(plain), "--position", "2", "--halves", "2"])
    art.main(args[:3] + [str(zero), "--position", "2", "--halves", "2", "--binding", "0"])
    assert plain.read_bytes() == zero.read_bytes()


def test_colour_turns_ask_a_unique_shape_among_several_objects(art, split, tmp_path):
    out = tmp_path / "colour.json"
    args = ["--data", str(split / "train.json"), "--out", str(out), "--position", "0", "--halves", "0"]
    assert art.main([*args, "--binding", "1", "--colour", "2"]) == 0
    before, after = load_split(split / "train.json"), load_split(out)
    n_colour = n_other_colour_in_view = 0
    for b, a in zip(before, after):
        validate_record(a, split)  # every added colour answer re-derives from the scene
        objs = a["scene"]["objects"]
        colour = [t for t in a["added_turns"] if t["kind"] == "color"]
        assert len(colour) <= 2 and len([t for t in a["added_turns"] if t["kind"] == "exists"]) <= 1
        if len(objs) < 2:
            assert not colour, "a colour turn in a one-object scene binds nothing"
        asked = [q["params"]["shape"] for q in a["qa"] if q["question_type"] == "color"]
        assert len(asked) == len(set(asked)), "a colour question was asked twice in one record"
        for t in colour:
            shape = t["params"]["shape"]
            assert t["question"] in {f.format(shape=shape) for f in _TEMPLATES["color"]}
            (obj,) = [o for o in objs if o["shape"] == shape]  # the shape is in the scene exactly once
            assert t["answer"] == obj["color"]
            n_colour += 1
            n_other_colour_in_view += any(o["color"] != obj["color"] for o in objs)
        # the record's own turns are all still there, in order, with <image> in the first
        assert a["conversations"][:2] == b["conversations"][:2]
        assert len(a["conversations"]) == len(b["conversations"]) + 2 * len(a["added_turns"])
        rest = iter(a["conversations"])
        assert all(any(c == x for x in rest) for c in b["conversations"]), "an original turn was lost or moved"
    assert n_colour > 0 and n_other_colour_in_view > 0
    # hand-made scenes: nothing for one object; for two, only the shape that is there once, unless already asked
    rng = random.Random(0)
    one = {"scene": {"objects": [{"shape": "circle", "color": "red"}], "texts": []}, "qa": []}
    assert art.colour_turns(one, rng, 2) == []
    objs = [{"shape": "circle", "color": "red"}, {"shape": "square", "color": "blue"},
            {"shape": "square", "color": "green"}]
    three = {"scene": {"objects": objs, "texts": []}, "qa": []}
    assert [(t["params"], t["answer"]) for t in art.colour_turns(three, rng, 2)] == [({"shape": "circle"}, "red")]
    three["qa"] = [{"question_type": "color", "params": {"shape": "circle"}}]
    assert art.colour_turns(three, rng, 2) == []
    # --colour 0 leaves the output as it was before the option existed
    plain, zero = tmp_path / "plain.json", tmp_path / "zero.json"
    art.main([*args[:3], str(plain), "--binding", "2"])
    art.main([*args[:3], str(zero), "--binding", "2", "--colour", "0"])
    assert plain.read_bytes() == zero.read_bytes()


def test_bad_arguments(art, split, tmp_path, capsys):
    with pytest.raises(SystemExit):
        art.main(["--data", str(split / "train.json"), "--out", str(split / "train.json")])
    assert "--out must differ" in capsys.readouterr().err
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps([{"id": "a", "conversations": []}]))
    with pytest.raises(SystemExit):
        art.main(["--data", str(plain), "--out", str(tmp_path / "o.json")])
    assert "no 'scene'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        art.main(["--data", str(split / "train.json"), "--out", str(tmp_path / "o.json"), "--halves", "-1"])


def test_turn_slots_are_after_the_first(art):
    rec = {"conversations": [{"from": "human", "value": "<image>\nq0"}, {"from": "gpt", "value": "a0"},
                             {"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"}]}
    turns = [{"question": f"x{i}", "answer": f"y{i}", "kind": "half", "params": {}} for i in range(5)]
    for seed in range(20):
        out = art.add_turns(rec, turns, random.Random(seed))["conversations"]
        assert out[0]["value"].startswith("<image>") and len(out) == 14
        assert [c["from"] for c in out] == ["human", "gpt"] * 7
        for i in range(5):
            j = [c["value"] for c in out].index(f"x{i}")
            assert out[j + 1]["value"] == f"y{i}"


@pytest.fixture(scope="module")
def sqs(art):  # imports add_relation_turns itself; `art` first so both scripts share one module
    return _script("single_question_split")


def test_single_question_split_position(sqs, split, tmp_path):
    records = load_split(split / "train.json")
    out = tmp_path / "pos.json"
    assert sqs.main(["--data", str(split / "train.json"), "--out", str(out), "--kind", "position"]) == 0
    got = load_split(out)
    want = [(r["id"], q["question"], q["answer"]) for r in records for q in r["qa"] if q["question_type"] == "position"]
    assert [(g["id"].rsplit("-p", 1)[0], g["conversations"][0]["value"], g["answer"]) for g in got] == \
        [(i, "<image>\n" + q, a) for i, q, a in want]
    for g in got:
        validate_record(g, split)  # the answer re-derives from the scene
        assert len(g["conversations"]) == 2 and g["question_type"] == "position"
    # --asked-only keeps the turn an evaluation asks: the last; here (7-turn training records) only where it is a
    # position question
    asked = sqs.split_records(records, "position", asked_only=True)
    assert [a["id"] for a in asked] == [f"{r['id']}-p{len(r['qa']) - 1}" for r in records
                                        if r["qa"][-1]["question_type"] == "position"]


def test_single_question_split_half(sqs, split, tmp_path):
    got = sqs.split_records(load_split(split / "train.json"), "half", per_record=2)
    assert got and {g["answer"] for g in got} <= {"left", "right", "above", "below"}
    for g in got:
        validate_record(g, split)
        q = g["conversations"][0]["value"]
        assert q.startswith("<image>\nIs the ") and q.endswith(" the middle of the image?")
        assert g["qa"][0]["question_type"] == "half" and "question_type" not in g
    assert max(Counter(g["id"].rsplit("-h", 1)[0] for g in got).values()) <= 2
    assert sqs.split_records(load_split(split / "train.json"), "half", per_record=2) == got  # deterministic


def test_single_question_split_bad_input(sqs, tmp_path, capsys):
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps([{"id": "a", "conversations": []}]))
    with pytest.raises(SystemExit):
        sqs.main(["--data", str(plain), "--out", str(tmp_path / "o.json"), "--kind", "position"])
    assert "record 'a' has no 'scene'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown kind"):
        sqs.split_records([], "count")


@pytest.fixture(scope="module")
def toy():
    return _script("position_toy")


def test_position_toy_reversed_questions(toy, sqs, split):
    halves = sqs.split_records(load_split(split / "train.json"), "half", per_record=2)
    flip = {"left": "right", "right": "left", "above": "below", "below": "above"}
    for h in halves:
        r = toy.reversed_record(h)
        q = h["qa"][0]
        name = " ".join(q["params"]["a"])
        rel = "left or right of" if q["params"]["axis"] == "x" else "above or below"
        assert r["conversations"][0]["value"] == f"<image>\nIs the middle of the image {rel} the {name}?"
        # the middle lies on the other side of the object than the object of the middle
        assert r["answer"] == r["conversations"][1]["value"] == flip[derive_answer(h["scene"], "half", q["params"])]
        assert h["conversations"][0]["value"].endswith(" the middle of the image?")  # the original is untouched
    pair = sqs.split_records(load_split(split / "train.json"), "position")[0]
    with pytest.raises(ValueError, match="not a one-object question"):
        toy.reversed_record(pair)


def test_position_toy_ideal_tokens(toy, split):
    scene = load_split(split / "train.json")[0]["scene"]
    ideal = toy.IdealTokens(grid=4, dim=16)
    tokens = ideal(scene)
    assert torch.equal(tokens, toy.IdealTokens(grid=4, dim=16)(scene))  # fixed by the seed
    size, want = scene["image_size"], ideal.cells.clone()
    for o in scene["objects"]:
        (cx, cy), obj = o["center"], ideal.objects[list(COLORS).index(o["color"]) * len(SHAPES) + SHAPES.index(o["shape"])]
        cell = int(cy * 4 // size) * 4 + int(cx * 4 // size)
        want[cell] += obj + (cx / size - 0.5) * ideal.coords[0] + (cy / size - 0.5) * ideal.coords[1]
    assert torch.allclose(tokens, want)
    first = next(o for o in scene["objects"] if _unique(scene["objects"], color=o["color"], shape=o["shape"]))
    left_out = ideal(scene, leave_out=[first["color"], first["shape"]])  # a pair question's objects are unique
    changed = (left_out != tokens).any(dim=1).nonzero().flatten().tolist()
    assert changed == [int(first["center"][1] * 4 // size) * 4 + int(first["center"][0] * 4 // size)]
    # keep_only: the named object alone on the bare cells, as if it were the scene's only object
    alone = ideal(scene, keep_only=[[first["color"], first["shape"]]])
    only_first = dict(scene, objects=[first])
    assert torch.equal(alone, ideal(only_first))
    assert torch.equal(ideal(scene, keep_only=[[o["color"], o["shape"]] for o in scene["objects"]]), tokens)


def test_position_toy_left_out_object(toy):
    pair = {"question_type": "position", "qa": [{"params": {"a": ["red", "circle"], "b": ["blue", "square"]}}]}
    rng = random.Random(0)
    assert toy.left_out_object(pair, 1.0, 0.0, rng) == ["red", "circle"]
    assert toy.left_out_object(pair, 0.0, 1.0, rng) == ["blue", "square"]
    assert toy.left_out_object(pair, 0.0, 0.0, rng) is None
    assert toy.left_out_object({"question_type": "half"}, 1.0, 0.0, rng) is None
    picks = Counter(str(toy.left_out_object(pair, 0.3, 0.5, rng)) for _ in range(4000))
    assert abs(picks[str(["blue", "square"])] / 4000 - 0.5) < 0.03
    assert abs(picks[str(["red", "circle"])] / 4000 - 0.3) < 0.03 and abs(picks["None"] / 4000 - 0.2) < 0.03


def test_position_toy_all_pairs(toy, split):
    records = load_split(split / "train.json")
    pairs = toy.pair_records(records)
    assert pairs
    by_scene = Counter()
    for p in pairs:
        params = p["qa"][0]["params"]
        # every answer follows from the scene, and the record asks it in the test's own words
        assert p["answer"] == p["conversations"][1]["value"] == derive_answer(p["scene"], "position", params)
        rel = "left or right of" if params["axis"] == "x" else "above or below"
        assert p["conversations"][0]["value"] == f"<image>\nIs the {' '.join(params['a'])} {rel} the {' '.join(params['b'])}?"
        by_scene[p["id"].split("-")[1]] += 1
    keys = {(p["id"].split("-")[1], tuple(p["qa"][0]["params"]["a"]), tuple(p["qa"][0]["params"]["b"]),
             p["qa"][0]["params"]["axis"]): p["answer"] for p in pairs}
    flip = {"left": "right", "right": "left", "above": "below", "below": "above"}
    for (rid, a, b, axis), answer in keys.items():  # both orders of every pair, with the answer flipped
        assert keys[(rid, b, a, axis)] == flip[answer]
    # every pair question the split itself asks is among them, and no scene gives more than its ordered pairs allow
    asked = 0
    for r in records:
        rid, n = r["id"].split("-")[1], len(r["scene"]["objects"])
        assert by_scene[rid] <= 2 * n * (n - 1)
        for q in r["qa"]:
            if q["question_type"] == "position":
                p = q["params"]
                assert keys[(rid, tuple(p["a"]), tuple(p["b"]), p["axis"])] == q["answer"]
                asked += 1
    assert asked and len(pairs) > asked


def test_position_toy_trains_and_reports(toy, sqs, split, tmp_path):
    from helpers import small_tokenizer

    data = tmp_path / "data"
    data.mkdir()
    for kind in ("position", "half"):
        recs = sqs.split_records(load_split(split / "train.json"), kind)
        (data / f"{kind}.json").write_text(json.dumps(recs))
    small_tokenizer().save_pretrained(tmp_path / "tok")
    out = tmp_path / "toy.json"
    assert toy.main(["--data", str(data), "--tokenizer", str(tmp_path / "tok"), "--train", "position",
                     "--warm-start", "half", "--warm-steps", "1", "--reverse", "half", "--test", "position",
                     "--test", "half:reversed", "--test", "position:no-b", "--test", "position:no-a",
                     "--drop-b", "0.5", "--drop-a", "0.5", "--steps", "3",
                     "--eval-every", "2", "--batch-size", "4", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [h["step"] for h in report["history"]] == [2, 3]
    for h in report["history"]:
        assert set(h["accuracy"]) == {"position", "half:reversed", "position:no-b", "position:no-a"}
        assert all(0 <= a <= 1 for a in h["accuracy"].values()) and math.isfinite(h["train_loss_ema"])
    assert report["args"]["warm_steps"] == 1
    # every pair about the training scenes added, and the visual tokens after the question
    assert toy.main(["--data", str(data), "--tokenizer", str(tmp_path / "tok"), "--train", "position",
                     "--pairs-from", str(split / "train.json"), "--image-last", "--only-named", "--test", "position",
                     "--steps", "2",
                     "--eval-every", "2", "--batch-size", "4", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["args"]["image_last"] is True
    assert json.loads(out.read_text())["args"]["only_named"] is True
    # the second object moved towards the middle: on a schedule, then as a random mix, answers derived
    assert toy.main(["--data", str(data), "--tokenizer", str(tmp_path / "tok"), "--train", "position",
                     "--test", "position", "--centre-b", "2", "--centre-b-mix", "0.5", "--centre-b-answers", "derived",
                     "--steps", "4", "--eval-every", "2", "--batch-size", "4", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["args"]["centre_b"] == 2 and report["args"]["centre_b_answers"] == "derived"
    assert all(math.isfinite(h["train_loss_ema"]) for h in report["history"])
    for bad in (["--warm-steps", "2"], ["--drop-b", "1.5"], ["--drop-a", "0.6", "--drop-b", "0.6"],
                ["--centre-b", "5", "--drop-b", "0.5"], ["--centre-b-mix", "1.5"], ["--centre-b", "-1"]):
        with pytest.raises(SystemExit):
            toy.main(["--data", str(data), "--tokenizer", "x", "--train", "position", "--test", "position",
                      "--out", str(out), *bad])


def test_position_toy_moved_b(toy, split):
    """--centre-b: the second object moved towards the middle along the asked axis, by the given fraction of its
    distance; answers kept (the true ones) or derived again from the moved scene."""
    pairs = toy.pair_records(load_split(split / "train.json"))
    ideal = toy.IdealTokens(4, 64)
    flipped = 0
    for p in pairs[:200]:
        params = p["qa"][0]["params"]
        i = 0 if params["axis"] == "x" else 1
        b0 = next(o for o in p["scene"]["objects"] if [o["color"], o["shape"]] == params["b"])
        before = json.dumps(p["scene"], sort_keys=True)
        mid = p["scene"]["image_size"] / 2
        for alpha in (0.0, 0.5, 1.0):
            kept = toy.moved_b_record(p, alpha, "kept")
            b = next(o for o in kept["scene"]["objects"] if [o["color"], o["shape"]] == params["b"])
            assert b["center"][i] == pytest.approx(mid + alpha * (b0["center"][i] - mid))
            assert b["center"][1 - i] == b0["center"][1 - i]
            assert b["bbox"][i] - b0["bbox"][i] == pytest.approx(b["center"][i] - b0["center"][i])
            assert kept["answer"] == kept["conversations"][1]["value"] == p["answer"]
            if alpha == 1.0:
                assert torch.equal(ideal(kept["scene"]), ideal(p["scene"]))
            derived = toy.moved_b_record(p, alpha, "derived")
            if derived is not None:
                assert derived["answer"] == derived["conversations"][1]["value"] == derive_answer(
                    derived["scene"], "position", params)
                flipped += derived["answer"] != p["answer"]
        assert json.dumps(p["scene"], sort_keys=True) == before  # the input scene is left as it was
    assert flipped  # moving b to the middle changes some answers
    assert toy.moved_b_record({"question_type": "count", "qa": [{"params": {}}]}, 0.5) is None
    with pytest.raises(ValueError):
        toy.moved_b_record(pairs[0], 0.5, "guessed")


def test_moved_pair_split(split, tmp_path):
    import shutil

    mps = _script("moved_pair_split")
    data = tmp_path / "data"
    shutil.copytree(split, data)
    out = tmp_path / "moved.json"
    assert mps.main(["--data", str(data), "--out", str(out), "--per-scene", "2", "--seed", "3"]) == 0
    moved = load_split(out)
    originals = {r["id"]: r for r in load_split(data / "train.json")}
    assert moved and len(moved) <= 2 * len(originals)
    for m in moved:
        validate_record(m, data)  # the image exists at the scene's size and the answer re-derives from it
        src = originals[m["id"].rsplit("-moved", 1)[0]]
        q = m["qa"][0]
        params, alpha = q["params"], q["alpha"]
        i = 0 if params["axis"] == "x" else 1
        size = m["scene"]["image_size"]
        before = next(o for o in src["scene"]["objects"] if [o["color"], o["shape"]] == params["b"])
        after = next(o for o in m["scene"]["objects"] if [o["color"], o["shape"]] == params["b"])
        # moved by whole pixels: within half a pixel of the exact fraction
        assert abs(after["center"][i] - (size / 2 + alpha * (before["center"][i] - size / 2))) <= 0.5
        assert after["center"][1 - i] == before["center"][1 - i]
        # nothing else moved
        rest = [o for o in m["scene"]["objects"] if o is not after]
        assert rest == [o for o in src["scene"]["objects"] if o is not before]
        assert m["scene"]["texts"] == src["scene"]["texts"]
    # the same seed gives the same split
    again = tmp_path / "again.json"
    assert mps.main(["--data", str(data), "--out", str(again), "--per-scene", "2", "--seed", "3"]) == 0
    assert [(m["id"], m["answer"], m["qa"][0]["alpha"]) for m in load_split(again)] == \
        [(m["id"], m["answer"], m["qa"][0]["alpha"]) for m in moved]
    with pytest.raises(SystemExit):
        mps.main(["--data", str(data), "--out", str(out), "--alpha", "1.5"])
    # --all-pairs: every answerable pair of the scenes (add_relation_turns.pair_records, tested above through the
    # toy), unmoved, on the split's own images
    allp = tmp_path / "all.json"
    assert mps.main(["--data", str(data), "--out", str(allp), "--all-pairs"]) == 0
    got = load_split(allp)
    assert got == mps.pair_records(list(originals.values()))
    assert len(got) == sum(len(mps.answerable_pairs(r["scene"])) for r in originals.values())
    for g in got:
        validate_record(g, data)
        assert g["image"] == originals[g["id"].split("-")[0] + "-" + g["id"].split("-")[1]]["image"]


def test_prefix_image_paths_rewrites_single_and_listed_images(tmp_path):
    mod = load_script("prefix_image_paths")
    records = [{"id": "a", "image": "images/0.png", "conversations": []},
               {"id": "b", "image": ["images/1.png", "images/2.png"], "conversations": []},
               {"id": "c", "conversations": []}]
    (tmp_path / "in.json").write_text(json.dumps(records))
    assert mod.main([str(tmp_path / "in.json"), str(tmp_path / "out.json"), "--prefix", "extra/"]) == 0
    out = json.loads((tmp_path / "out.json").read_text())
    assert [r.get("image") for r in out] == ["extra/images/0.png", ["extra/images/1.png", "extra/images/2.png"], None]
    assert [r["id"] for r in out] == ["a", "b", "c"]
