"""Training stack: label masking, data validation, collation, batching, recipes, stages, the loop.

The slower end-to-end checks (a real CLI subprocess killed and resumed, two processes
under torchrun) are in test_train_run.py.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from fastvlm.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from fastvlm.errors import ConfigError, FastVLMError
from fastvlm.processing import tokenize_prompt
from fastvlm.tokenization import train_bpe_tokenizer
from fastvlm.train.collate import (
    DataCollator,
    GlobalBatchSampler,
    epoch_batches,
    eval_batches,
    micro_batches,
    render_conversation,
    tokenize_conversation,
)
from fastvlm.train.data import ConversationDataset, DataError
from fastvlm.train.recipe import bundled_recipes, load_recipe, recipe_from_dict

SYSTEM = "You are a helpful assistant."
COLORS = {"red": (220, 30, 30), "green": (30, 160, 40), "blue": (30, 60, 220), "yellow": (240, 200, 0)}
N_IMG = 4  # image tokens used by the masking tests (the tiny model gives 4 at 128 px too)

CORPUS = [
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n",
    "What color is the picture? What colour is the square in the image? Describe it.",
    "And the other one? Is it bright? yes no The picture is red. It is blue and green.",
    "Hello there! Tell me a story about a cat. Once upon a time a small cat sat on a mat.",
] + list(COLORS) * 4


# ---------------------------------------------------------------------------------------
# helpers shared with test_train_run.py
# ---------------------------------------------------------------------------------------


def make_tokenizer(directory=None):
    tok = train_bpe_tokenizer(CORPUS, 320)
    if directory is not None:
        tok.save_pretrained(str(directory))
    return tok


def color_record(i: int, color: str, image: str | None) -> dict:
    if image is None:
        return {"id": f"t{i}", "conversations": [
            {"from": "human", "value": "Tell me a color."}, {"from": "gpt", "value": f"It is {color}."}]}
    return {"id": f"r{i}", "image": image, "conversations": [
        {"from": "human", "value": "<image>\nWhat color is the picture?"}, {"from": "gpt", "value": color}]}


def make_dataset(root, n: int, *, text_only: int = 0, seed: int = 0, val: int = 4) -> dict:
    """n image records (solid colour images) + text_only text records; returns paths."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    names = list(COLORS)
    records = []
    for i in range(n):
        c = names[int(rng.integers(len(names)))]
        w, h = int(rng.integers(24, 64)), int(rng.integers(24, 64))
        Image.new("RGB", (w, h), COLORS[c]).save(os.path.join(root, "images", f"{i}.png"))
        records.append(color_record(i, c, f"images/{i}.png"))
    for j in range(text_only):
        records.append(color_record(1000 + j, names[j % len(names)], None))
    train = os.path.join(root, "train.json")
    with open(train, "w") as f:
        json.dump(records, f)
    val_path = os.path.join(root, "val.jsonl")
    with open(val_path, "w") as f:
        for r in records[:val]:
            f.write(json.dumps(r) + "\n")
    return {"root": str(root), "train": train, "val": val_path, "records": records}


def tiny_recipe(data: dict, tok_dir, out_dir, **over) -> dict:
    recipe = {
        "stage": "stage2",
        "init": {"preset": "fastvlm-tiny", "seed": 0, "vision": {"image_size": 64}},
        "tokenizer": str(tok_dir),
        "data": {"train": data["train"], "image_folder": data["root"], "num_workers": 0},
        "optim": {"lr": 2e-3, "warmup_ratio": 0.1},
        "train": {"epochs": 1, "global_batch_size": 4, "per_device_batch_size": 2, "seed": 0},
        "output": {"dir": str(out_dir), "save_every": 0, "log_every": 1, "tensorboard": False},
    }
    for key, value in over.items():
        section, _, leaf = key.partition("__")
        if leaf:
            recipe.setdefault(section, {})[leaf] = value
        else:
            recipe[section] = value
    return recipe


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(str(d))
    return d


# ---------------------------------------------------------------------------------------
# Label masking (reference preprocess_qwen_2)
# ---------------------------------------------------------------------------------------


def frame(*turns, system=SYSTEM):
    text = f"<|im_start|>system\n{system}<|im_end|>\n" if system is not None else ""
    for role, t in turns:
        text += f"<|im_start|>{role}\n{t}<|im_end|>\n"
    return text


def labeled_runs(labels):
    """Contiguous runs [start, end) of labelled positions."""
    runs, start = [], None
    for i, x in enumerate(list(labels) + [IGNORE_INDEX]):
        if x != IGNORE_INDEX and start is None:
            start = i
        elif x == IGNORE_INDEX and start is not None:
            runs.append((start, i))
            start = None
    return runs


def test_training_renders_turns_as_inference_does(tok):
    """The training text of a conversation is build_prompt's for its user turns plus the answers, empty user turns
    included (conv_qwen_2 renders an empty message as its bare role)."""
    from fastvlm.processing import build_prompt

    turns = [("user", "<image>\nHi"), ("assistant", "a"), ("user", ""), ("assistant", "b")]
    text, spans = render_conversation(turns, SYSTEM)
    msgs = [{"role": r, "content": t} for r, t in turns[:-1]]
    assert text == build_prompt(msgs, system_prompt=SYSTEM) + "b<|im_end|>\n"
    assert [text[a:b] for a, b in spans] == ["a<|im_end|>\n", "b<|im_end|>\n"]


def test_single_turn_with_image(tok):
    turns = [("user", "<image>\nWhat color is the picture?"), ("assistant", "red")]
    out = tokenize_conversation(turns, tok, N_IMG, SYSTEM)
    text = frame(*turns)
    assert render_conversation(turns, SYSTEM)[0] == text
    # ids are exactly what inference tokenizes
    assert out.input_ids == tokenize_prompt(text, tok, N_IMG)
    assert out.input_ids.count(IMAGE_TOKEN_INDEX) == N_IMG
    # labels start right after "<|im_start|>assistant\n" and run to the end
    prefix = tokenize_prompt(frame(turns[0]) + "<|im_start|>assistant\n", tok, N_IMG)
    assert out.input_ids[:len(prefix)] == prefix
    assert labeled_runs(out.labels) == [(len(prefix), len(out.input_ids))]
    assert all(x == IGNORE_INDEX for x in out.labels[:len(prefix)])
    span = out.input_ids[len(prefix):]
    assert out.labels[len(prefix):] == span
    assert tok.decode(span, skip_special_tokens=False) == "red<|im_end|>\n"
    assert span[-2:] == tok("<|im_end|>\n", add_special_tokens=False)["input_ids"]
    # image positions never carry labels
    assert all(lab == IGNORE_INDEX for i, lab in zip(out.input_ids, out.labels) if i == IMAGE_TOKEN_INDEX)
    assert out.num_labels == len(span)


def test_multi_turn(tok):
    turns = [("user", "<image>\nWhat color is the picture?"), ("assistant", "The picture is red."),
             ("user", "And the other one?"), ("assistant", "It is blue and green.")]
    out = tokenize_conversation(turns, tok, N_IMG, SYSTEM)
    assert out.input_ids == tokenize_prompt(frame(*turns), tok, N_IMG)
    p1 = len(tokenize_prompt(frame(turns[0]) + "<|im_start|>assistant\n", tok, N_IMG))
    e1 = len(tokenize_prompt(frame(*turns[:2]), tok, N_IMG))
    p2 = len(tokenize_prompt(frame(*turns[:3]) + "<|im_start|>assistant\n", tok, N_IMG))
    assert labeled_runs(out.labels) == [(p1, e1), (p2, len(out.input_ids))]
    assert tok.decode(out.input_ids[p1:e1], skip_special_tokens=False) == "The picture is red.<|im_end|>\n"
    assert tok.decode(out.input_ids[p2:], skip_special_tokens=False) == "It is blue and green.<|im_end|>\n"
    # the second user turn (including its <|im_start|>user\n) is masked
    assert all(x == IGNORE_INDEX for x in out.labels[e1:p2])


def test_text_only_and_system_override(tok):
    turns = [("user", "Tell me a story about a cat."), ("assistant", "Once upon a time a small cat sat on a mat.")]
    out = tokenize_conversation(turns, tok, N_IMG, "Hello there!")
    assert IMAGE_TOKEN_INDEX not in out.input_ids
    text = frame(*turns, system="Hello there!")
    assert out.input_ids == tokenize_prompt(text, tok, N_IMG)
    (start, end), = labeled_runs(out.labels)
    assert end == len(out.input_ids)
    assert tok.decode(out.input_ids[start:], skip_special_tokens=False) == \
        "Once upon a time a small cat sat on a mat.<|im_end|>\n"
    # no system turn at all
    out2 = tokenize_conversation(turns, tok, N_IMG, None)
    assert out2.input_ids == tokenize_prompt(frame(*turns, system=None), tok, N_IMG)


def reference_labels(turns, tok, n_img):
    """The reference's preprocess_qwen_2 bookkeeping (train_qwen.py), with expanded image runs."""
    sep, split_sep = "<|im_end|>\n", "<|im_end|>\n<|im_start|>assistant\n"
    system = f"<|im_start|>system\n{SYSTEM}"
    conversation = frame(*turns)
    ids = tokenize_prompt(conversation, tok, n_img)
    target = list(ids)
    rounds_before = conversation.split(sep)
    if rounds_before[0] == system:
        rounds_before[1] = sep.join([rounds_before[0], rounds_before[1]])
        rounds_before = rounds_before[1:]
    rounds = [sep.join(rounds_before[i:i + 2]) for i in range(0, len(rounds_before), 2)]
    cur = 0
    for rou in rounds:
        if rou == "":
            break
        parts = rou.split(split_sep)
        if len(parts) != 2:
            break
        parts[0] += split_sep
        round_ids = tokenize_prompt(rou, tok, n_img)
        instr_ids = tokenize_prompt(parts[0], tok, n_img)
        eq = [x == y for x, y in zip(round_ids, instr_ids)]
        instr_len = eq.index(False) if False in eq else len(eq)
        target[cur:cur + instr_len] = [IGNORE_INDEX] * instr_len
        cur += len(round_ids) + 2
    target[cur:] = [IGNORE_INDEX] * (len(target) - cur)
    assert cur == len(ids), "reference bookkeeping mismatch"
    return ids, [IGNORE_INDEX if i == IMAGE_TOKEN_INDEX else t for i, t in zip(ids, target)]


@pytest.mark.parametrize("turns", [
    [("user", "<image>\nWhat color is the picture?"), ("assistant", "red")],
    [("user", "What color?\n<image>"), ("assistant", "\nblue")],  # answer starting with a newline
    [("user", "<image>\nDescribe it."), ("assistant", "The picture is red."), ("user", "Is it bright?"),
     ("assistant", "yes"), ("user", "And the other one?"), ("assistant", "no  ")],
    [("user", "Tell me a story."), ("assistant", "Once upon a time.")],
])
def test_labels_match_reference_algorithm(tok, turns):
    ids, labels = reference_labels(turns, tok, N_IMG)
    out = tokenize_conversation(turns, tok, N_IMG, SYSTEM)
    assert out.input_ids == ids
    assert out.labels == labels


# ---------------------------------------------------------------------------------------
# Dataset validation
# ---------------------------------------------------------------------------------------


def write_json(path, records):
    with open(path, "w") as f:
        json.dump(records, f)
    return str(path)


def ds(path, folder, tok, **kw):
    kw.setdefault("max_length", 512)
    return ConversationDataset(path, folder, tokenizer=tok, num_image_tokens=N_IMG, image_size=128, **kw)


@pytest.fixture(scope="module")
def img_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    Image.new("RGB", (40, 30), (200, 10, 10)).save(d / "a.png")
    Image.new("RGB", (30, 40), (10, 10, 200)).save(d / "b.png")
    (d / "garbage.png").write_bytes(b"this is not an image at all")
    good = (d / "a.png").read_bytes()
    (d / "truncated.png").write_bytes(good[: len(good) // 2])  # header fine, pixels missing
    # over the pixel limit (81 M > 67 M; under PIL's own bomb check), and a strip under it whose padded square
    # canvas is not: 1-bit images, small on disk
    Image.new("1", (9000, 9000)).save(d / "huge.png")
    Image.new("1", (65000, 750)).save(d / "strip.png")
    return d


GOOD = {"id": "good", "image": "a.png",
        "conversations": [{"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "red"}]}


def conv(*values):
    return [{"from": "human" if k % 2 == 0 else "gpt", "value": v} for k, v in enumerate(values)]


BAD_CASES = {
    "missing_image": {"id": "m1", "image": "nope.png", "conversations": conv("<image>\nWhat?", "red")},
    "unreadable_image": {"id": "u1", "image": "garbage.png", "conversations": conv("<image>\nWhat?", "red")},
    "placeholder_mismatch": {"id": "p1", "image": "a.png", "conversations": conv("<image>\n<image>\nWhat?", "red")},
    "placeholder_mismatch_multi": {"id": "p2", "image": ["a.png", "b.png"], "conversations": conv("What?", "red")},
    "placeholder_missing_one_image": {"id": "p3", "image": "a.png", "conversations": conv("What?", "red")},
    "placeholder_without_image": {"id": "p3", "conversations": conv("<image>\nWhat?", "red")},
    "empty_conversation": {"id": "e1", "image": "a.png", "conversations": []},
    "wrong_role": {"id": "w1", "conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "x"}]},
    "unknown_role": {"id": "w2", "conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "x"}]},
    "role_not_a_string": {"id": "w5", "conversations": [{"from": ["human"], "value": "hi"},
                                                        {"from": "gpt", "value": "x"}]},
    "image_over_pixel_limit": {"id": "big", "image": "huge.png", "conversations": conv("<image>\nWhat?", "red")},
    "image_canvas_over_limit": {"id": "strip", "image": "strip.png", "conversations": conv("<image>\nWhat?", "red")},
    "no_alternation": {"id": "w3", "conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"},
                                                     {"from": "gpt", "value": "c"}]},
    "ends_with_human": {"id": "w4", "conversations": conv("a", "b", "c")},
    "too_long": {"id": "l1", "conversations": conv("What color? " * 200, "red")},
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_record_raises_naming_record(tmp_path, img_dir, tok, case):
    path = write_json(tmp_path / "data.json", [GOOD, BAD_CASES[case], GOOD])
    with pytest.raises(DataError) as e:
        ds(path, str(img_dir), tok)
    msg = str(e.value)
    assert isinstance(e.value, FastVLMError)
    assert path in msg and "record 1" in msg and repr(BAD_CASES[case]["id"]) in msg, msg


def test_a_byte_order_mark_is_read_past_in_json_as_in_jsonl(tmp_path, img_dir, tok):
    body = json.dumps([GOOD])
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + body.encode())
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n")
    for name in ("bom.json", "bom.jsonl"):
        assert ds(str(tmp_path / name), str(img_dir), tok)[0]["id"] == "good"


def test_image_size_limits_hold_at_load_time_too(tmp_path, img_dir, tok):
    # without the header check, loading refuses them (a 65000x750 strip's padded square is 4.2 G pixels)
    for name, words in (("huge.png", "more than the limit of 67108864"),
                        ("strip.png", "padding it to a square makes a 65000x65000 canvas")):
        rec = {"id": "x", "image": name, "conversations": conv("<image>\nWhat?", "red")}
        d = ds(write_json(tmp_path / "d.json", [rec]), str(img_dir), tok, check_images="none")
        with pytest.raises(DataError, match=words) as e:
            d[0]
        assert "(id 'x')" in str(e.value)


def test_skip_bad_counts_and_never_substitutes(tmp_path, img_dir, tok):
    records = [GOOD] + [BAD_CASES[c] for c in sorted(BAD_CASES)] + [dict(GOOD, id="good2", image="b.png")]
    path = write_json(tmp_path / "data.json", records)
    d = ds(path, str(img_dir), tok, skip_bad=True)
    assert len(d) == 2
    assert d.num_bad == len(BAD_CASES)
    assert d.bad_counts["missing_image"] == 1 and d.bad_counts["unreadable_image"] == 3
    assert d.bad_counts["too_long"] == 1 and d.bad_counts["placeholder_mismatch"] == 4
    assert [d[i]["id"] for i in range(len(d))] == ["good", "good2"]


def test_llava_prepends_image_placeholder_only_for_one_image(tmp_path, img_dir, tok, caplog):
    rec = {"id": "x", "image": "a.png", "conversations": conv("What color?", "red")}
    # refused by default, with the recipe key that allows it named
    with pytest.raises(DataError, match=r"0 <image> placeholder\(s\) but 1 image\(s\) \(data.add_missing_placeholder"):
        ds(write_json(tmp_path / "d.json", [rec, dict(GOOD, id="g")]), str(img_dir), tok)
    with caplog.at_level("WARNING"):
        d = ds(write_json(tmp_path / "d.json", [rec, dict(GOOD, id="g")]), str(img_dir), tok,
               add_missing_placeholder=True)
    # not silent: counted (the run summary reports it) and logged with the first record named
    assert d.placeholders_added == 1
    assert "1 record(s) have one image and no <image> placeholder" in caplog.text and "(id 'x')" in caplog.text
    sample = d[0]
    want = tokenize_conversation([("user", "<image>\nWhat color?"), ("assistant", "red")], tok, N_IMG, SYSTEM)
    assert sample["input_ids"] == want.input_ids and sample["labels"] == want.labels
    assert sample["pixel_values"].shape == (1, 3, 128, 128)
    # a placeholder in a later turn is not "missing": nothing is prepended, the count must match
    rec2 = {"id": "y", "image": "a.png", "conversations": conv("Hi", "hello", "<image>\nAnd this?", "red")}
    d2 = ds(write_json(tmp_path / "d2.json", [rec2]), str(img_dir), tok, add_missing_placeholder=True)
    assert d2.placeholders_added == 0
    ids = d2[0]["input_ids"]
    assert ids.index(IMAGE_TOKEN_INDEX) > ids.index(tok.convert_tokens_to_ids("<|im_end|>"))


def test_one_image_placeholder_moves_to_the_front_of_its_turn_as_the_reference(tmp_path, img_dir, tok):
    """preprocess_multimodal: value.replace('<image>', '').strip(), then ('<image>\\n' + value).strip()."""
    from fastvlm.train.data import parse_record

    for question, trained in [("What color is this?\n<image>", "<image>\nWhat color is this?"),
                              ("What <image> color?", "<image>\nWhat  color?"),
                              ("<image>\nWhat color?", "<image>\nWhat color?"),
                              ("  <image> What color? ", "<image>\nWhat color?"),
                              (" <image> ", "<image>")]:
        rec = {"id": "m", "image": "a.png", "conversations": conv("Hi", "hello", question, "red")}
        turns = parse_record(rec, path="d.json", index=0, image_folder=str(img_dir)).turns
        assert turns == [("user", "Hi"), ("assistant", "hello"), ("user", trained), ("assistant", "red")], question
    # several images: every placeholder stays where the record put it
    rec = {"id": "two", "image": ["a.png", "b.png"], "conversations": conv("First <image> then <image>.", "ok")}
    assert parse_record(rec, path="d.json", index=0, image_folder=str(img_dir)).turns[0][1] == \
        "First <image> then <image>."
    d = ds(write_json(tmp_path / "m.json", [{"id": "e", "image": "a.png",
                                             "conversations": conv("What color?\n<image>", "red")}]), str(img_dir), tok)
    want = tokenize_conversation([("user", "<image>\nWhat color?"), ("assistant", "red")], tok, N_IMG, SYSTEM)
    assert d[0]["input_ids"] == want.input_ids and d[0]["labels"] == want.labels


def test_jsonl_is_read_lazily(tmp_path, img_dir, tok):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps(dict(GOOD, id=f"g{i}")) for i in range(5)]
    path.write_text("\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]) + "\n")
    d = ds(str(path), str(img_dir), tok)
    src = d.sources[0]
    assert src.buffer is None and len(src.offsets) == 5
    assert [d[i]["id"] for i in range(5)] == [f"g{i}" for i in range(5)]
    # a broken line names the file and the record
    path.write_text(lines[0] + "\n{not json\n")
    with pytest.raises(DataError, match=r"record 1 .*not valid JSON"):
        ds(str(path), str(img_dir), tok)


def test_json_list_is_kept_as_text_and_read_like_jsonl(tmp_path, img_dir, tok):
    # a .json list is held as one buffer of per-record JSON text (about the file's size, shared by forked
    # workers), not as Python objects; every record reads back as the same JSONL file gives it
    recs = [dict(GOOD, id=f"g{i}", note="é ü \u2603 \"q\" [,]") for i in range(4)]
    pretty = tmp_path / "d.json"
    pretty.write_text(" \n" + json.dumps(recs, indent=2, ensure_ascii=False) + "\n\n")
    lines = tmp_path / "d.jsonl"
    lines.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    a, b = ds(str(pretty), str(img_dir), tok), ds(str(lines), str(img_dir), tok)
    src = a.sources[0]
    assert isinstance(src.buffer, bytearray) and len(src) == 4
    assert [src.record(i) for i in range(4)] == [b.sources[0].record(i) for i in range(4)] == recs
    for i in range(4):
        assert a[i]["input_ids"] == b[i]["input_ids"] and a[i]["labels"] == b[i]["labels"]
    empty = write_json(tmp_path / "e.json", [])
    with pytest.raises(DataError, match="no usable records"):
        ds(empty, str(img_dir), tok)


@pytest.mark.parametrize("text,message", [
    ('{"id": 1}', "must hold a JSON list of records, got dict"),
    ('[{"id": 1}, {"id": 2', "is not valid JSON"),
    ('[{"id": 1}\n {"id": 2}]', r"expected ',' or '\]' after record 0, line 2"),
    ('[{"id": 1}] []', "extra data after the list"),
    ("{not json", "is not valid JSON"),
])
def test_broken_json_list_names_the_file_and_the_problem(tmp_path, img_dir, tok, text, message):
    path = tmp_path / "broken.json"
    path.write_text(text)
    with pytest.raises(DataError, match=message) as e:
        ds(str(path), str(img_dir), tok)
    assert "broken.json" in str(e.value)


def test_jsonl_line_that_is_not_utf8_or_json_names_its_line(tmp_path, img_dir, tok):
    # a Latin-1 byte was a UnicodeDecodeError traceback, which --skip-bad did not catch either
    good = json.dumps(GOOD).encode()
    path = tmp_path / "d.jsonl"
    path.write_bytes(good + b"\n\n" + b'{"id": "h\xe9"}\n' + good + b"\n{bad\n")
    with pytest.raises(DataError, match=r"d\.jsonl: record 1 \(line 3\) is not UTF-8 text"):
        ds(str(path), str(img_dir), tok)
    d = ds(str(path), str(img_dir), tok, skip_bad=True)
    assert len(d) == 2
    path.write_bytes(good + b"\n\n" + good + b"\n{bad\n")
    with pytest.raises(DataError, match=r"record 2 \(line 4\) is not valid JSON"):
        ds(str(path), str(img_dir), tok)


def test_errors_raised_in_dataloader_workers_print_as_one_line():
    from fastvlm.cli import error_message

    inner = DataError("d.json: record 3 (id 'x'): image is corrupt")
    wrapped = DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                        "last):\n  File \"worker.py\", line 1, in <module>\n    fetch()\n"
                        f"fastvlm.train.data.DataError: {inner}\n")
    assert error_message(wrapped) == str(inner) and error_message(inner) == str(inner)


def test_image_that_fails_to_decode_at_load(tmp_path, img_dir, tok):
    rec = {"id": "tr", "image": "truncated.png", "conversations": conv("<image>\nWhat?", "red")}
    path = write_json(tmp_path / "d.json", [GOOD, rec])
    d = ds(path, str(img_dir), tok)  # the header is readable, so the up-front check passes
    with pytest.raises(DataError, match=r"record 1 \(id 'tr'\)"):
        d[1]
    d = ds(path, str(img_dir), tok, skip_bad=True)
    skipped = d[1]
    assert "tr" in skipped["skipped"]
    batch = DataCollator(0)([d[0], skipped])
    assert batch["num_samples"] == 1 and batch["ids"] == ["good"] and len(batch["skipped"]) == 1


# ---------------------------------------------------------------------------------------
# Collation and batching
# ---------------------------------------------------------------------------------------


def test_collator_right_pads(tok):
    a = tokenize_conversation([("user", "<image>\nWhat color?"), ("assistant", "red")], tok, N_IMG, SYSTEM)
    b = tokenize_conversation([("user", "Tell me a story about a cat."), ("assistant", "Once upon a time.")], tok,
                              N_IMG, SYSTEM)
    c = tokenize_conversation([("user", "<image>\n<image>\nWhat?"), ("assistant", "blue")], tok, N_IMG, SYSTEM)
    pa, pc = torch.rand(1, 3, 8, 8), torch.rand(2, 3, 8, 8)
    samples = [{"input_ids": a.input_ids, "labels": a.labels, "pixel_values": pa, "id": "a"},
               {"input_ids": b.input_ids, "labels": b.labels, "pixel_values": None, "id": "b"},
               {"input_ids": c.input_ids, "labels": c.labels, "pixel_values": pc, "id": "c"}]
    pad = 7
    batch = DataCollator(pad)(samples)
    width = max(len(a.input_ids), len(b.input_ids), len(c.input_ids))
    assert batch["input_ids"].shape == (3, width)
    for row, t in enumerate((a, b, c)):
        n = len(t.input_ids)
        assert batch["input_ids"][row, :n].tolist() == t.input_ids
        assert batch["labels"][row, :n].tolist() == t.labels
        assert (batch["input_ids"][row, n:] == pad).all() and (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
    assert torch.equal(batch["pixel_values"], torch.cat([pa, pc]))  # placeholder order across the batch
    assert batch["num_label_tokens"] == a.num_labels + b.num_labels + c.num_labels
    # all samples skipped: a one-token dummy without labels
    empty = DataCollator(pad)([{"skipped": "x"}])
    assert empty["num_samples"] == 0 and empty["num_label_tokens"] == 0 and empty["input_ids"].shape == (1, 1)


def test_epoch_batches_deterministic_and_grouped():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 500, size=203)
    has_img = rng.random(203) < 0.7
    b1 = epoch_batches(lengths, 8, seed=3, epoch=0, has_images=has_img)
    assert [x.tolist() for x in b1] == [x.tolist() for x in epoch_batches(lengths, 8, seed=3, epoch=0,
                                                                          has_images=has_img)]
    b2 = epoch_batches(lengths, 8, seed=3, epoch=1, has_images=has_img)
    assert [x.tolist() for x in b1] != [x.tolist() for x in b2]
    flat = np.concatenate(b1)
    assert len(b1) == 203 // 8 and len(set(flat.tolist())) == len(flat)  # each sample at most once
    assert lengths[b1[0]].max() == lengths.max()  # the longest batch goes first
    # grouping cuts padding compared with random batches
    ungrouped = epoch_batches(lengths, 8, seed=3, epoch=0, group_by_length=False)

    def padding(batches):
        return sum(int(lengths[b].max() * len(b) - lengths[b].sum()) for b in batches)

    assert padding(b1) < 0.5 * padding(ungrouped)


def test_micro_batches_same_groups_for_any_world_size():
    gb = np.arange(16)
    one = micro_batches(gb, 2, 1, 0)
    two = [micro_batches(gb, 2, 2, r) for r in range(2)]
    for m in range(2):
        assert sorted(two[0][m] + two[1][m]) == sorted(one[m])
    four = [micro_batches(gb, 1, 4, r) for r in range(4)]
    assert sorted(sum((f[0] for f in four), [])) == list(range(16))


def test_sampler_resumes_mid_epoch():
    lengths = np.arange(40) % 7 + 5
    s = GlobalBatchSampler(lengths, global_batch_size=8, accumulation_steps=2, seed=1)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, start_step=3)
    assert list(s) == full[3 * 2:]
    assert len(s) == (5 - 3) * 2
    other = GlobalBatchSampler(lengths[:-1], global_batch_size=8, accumulation_steps=2, seed=1)
    with pytest.raises(ConfigError, match="num_samples"):
        other.check_compatible(s.state_dict())


def test_eval_batches_even_across_ranks():
    parts = [eval_batches(11, 2, 4, r) for r in range(4)]
    assert {len(p) for p in parts} == {2}
    assert sorted(i for p in parts for b in p for i in b) == list(range(11))


# ---------------------------------------------------------------------------------------
# Recipes
# ---------------------------------------------------------------------------------------


def test_bundled_recipes_load_with_llava_values():
    names = bundled_recipes()
    assert {"stage1", "stage1_5", "stage2", "lora", "synth_stage1", "synth_stage2"} <= set(names)
    for name in names:
        load_recipe(name)
    s1, s15, s2 = load_recipe("stage1"), load_recipe("stage1_5"), load_recipe("stage2")
    assert s1.stage == "stage1" and s1.optim.lr == 1e-3 and s1.train.global_batch_size == 256
    assert s1.trainable_modules() == {"vision_tower": False, "mm_projector": True, "language_model": False}
    for r in (s15, s2):
        assert r.optim.lr == 2e-5 and r.train.global_batch_size == 128 and all(r.trainable_modules().values())
    for r in (s1, s15, s2):
        assert r.optim.schedule == "cosine" and r.optim.warmup_ratio == 0.03 and r.train.epochs == 1


def test_recipe_errors_and_overrides(tmp_path):
    base = {"stage": "stage2", "model": "m", "data": {"train": "t.json"}, "output": {"dir": "o"}}
    r = recipe_from_dict(base)
    assert r.data.train == ["t.json"] and r.optim.lr == 2e-5
    with pytest.raises(ConfigError, match=r"unknown recipe key optim\.'lrr'.*did you mean 'lr'"):
        recipe_from_dict({**base, "optim": {"lrr": 1}})
    with pytest.raises(ConfigError, match="unknown recipe key 'trian'"):
        recipe_from_dict({**base, "trian": {}})
    # lora settings on a stage that trains in full would be ignored
    with pytest.raises(ConfigError, match=r"lora settings \(lora.r, lora.train_vision_tower\) apply only to stage: "
                                          "lora; this recipe's stage is stage2"):
        recipe_from_dict({**base, "lora": {"r": 8, "train_vision_tower": True}})
    with pytest.raises(ConfigError, match="output.resume: to start without resuming, use never"):
        recipe_from_dict({**base, "output": {"dir": "o", "resume": "no"}})
    with pytest.raises(ConfigError, match="exactly one model source"):
        recipe_from_dict({k: v for k, v in base.items() if k != "model"})
    with pytest.raises(ConfigError, match="stage must be"):
        recipe_from_dict({**base, "stage": "stage3"})
    with pytest.raises(ConfigError, match="must be a whole number"):
        recipe_from_dict({**base, "train": {"epochs": "two"}})
    with pytest.raises(ConfigError, match="not a multiple"):
        recipe_from_dict({**base, "train": {"global_batch_size": 10, "per_device_batch_size": 4}}
                         ).accumulation_steps(1)
    path = tmp_path / "r.yaml"
    path.write_text("stage: lora\nmodel: m\ndata: {train: t.json}\noptim: {lr: 1e-3}\noutput: {dir: o}\n")
    r = load_recipe(str(path), ["optim.lr_projector=2e-5", "train.global_batch_size=64", "data.train=[a.json, b.json]"])
    assert r.optim.lr == 1e-3 and r.module_lr("mm_projector") == 2e-5 and r.module_lr("language_model") == 1e-3
    assert r.data.train == ["a.json", "b.json"] and r.accumulation_steps(2) == 8
    # YAML 1.1 reads `no` as false: for a string key it still means "no"
    assert load_recipe(str(path), ["train.mixed_precision=no"]).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="mixed_precision must be one of"):
        load_recipe(str(path), ["train.mixed_precision=yes"])
    with pytest.raises(ConfigError, match=str(path)):
        load_recipe(str(path), ["optim.bogus=1"])


# ---------------------------------------------------------------------------------------
# Stages: which parameters learn
# ---------------------------------------------------------------------------------------


def _grads_after_step(tok, img_dir, stage, **extra):
    from fastvlm.model import FastVLM
    from fastvlm.train import build
    from fastvlm.train.trainer import TrainStep

    recipe = recipe_from_dict({"stage": stage, "model": "unused", "data": {"train": "x"}, "output": {"dir": "o"},
                               **extra})
    model = FastVLM.from_preset("fastvlm-tiny", tokenizer=tok, device="cpu", dtype=torch.float32)
    build.apply_stage(model, recipe)
    build.set_train_mode(model, recipe)
    d = ConversationDataset(write_json(img_dir / f"one_{stage}.json", [GOOD]), str(img_dir), tokenizer=tok,
                            num_image_tokens=model.num_image_tokens, image_size=model.config.image_size)
    batch = DataCollator(model.processor.pad_token_id)([d[0]])
    step = TrainStep(model)
    step.touch_vision = True
    loss = step(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["pixel_values"], 1.0)
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    groups = build.param_groups(model, recipe)
    return model, grads, groups


def test_stage1_trains_only_the_projector(tok, img_dir):
    model, grads, groups = _grads_after_step(tok, img_dir, "stage1")
    proj = {n for n, _ in model.named_parameters() if n.startswith("mm_projector.")}
    assert grads == proj
    assert {g["name"] for g in groups} == {"mm_projector", "mm_projector.no_decay"}
    assert not model.vision_tower.training  # frozen encoder: eval mode (BatchNorm statistics fixed)


def test_stage2_trains_everything(tok, img_dir):
    model, grads, groups = _grads_after_step(tok, img_dir, "stage2", optim={"lr": 1e-5, "lr_projector": 1e-4,
                                                                            "weight_decay": 0.1})
    everything = {n for n, _ in model.named_parameters() if not n.startswith("vision_tower.head.")}
    assert grads == everything
    lr = {g["name"]: g["lr"] for g in groups}
    assert lr["mm_projector"] == 1e-4 and lr["vision_tower"] == 1e-5 and lr["language_model"] == 1e-5
    # no weight decay on biases and normalisation weights
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        for p in g["params"]:
            n = names[id(p)]
            if n.endswith(".bias") or "norm" in n.lower():
                assert g["weight_decay"] == 0.0, n
            elif g["name"] in ("language_model", "mm_projector"):
                assert g["weight_decay"] == 0.1
    assert any("layernorm" in names[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"])


def test_stage1_5_trains_everything_at_the_base_lr(tok, img_dir):
    model, grads, groups = _grads_after_step(tok, img_dir, "stage1.5", optim={"lr": 2e-5})
    assert grads == {n for n, _ in model.named_parameters() if not n.startswith("vision_tower.head.")}
    assert {g["name"].split(".")[0] for g in groups} == {"mm_projector", "vision_tower", "language_model"}
    assert {g["lr"] for g in groups} == {2e-5}  # lr_projector and lr_vision_tower null: the base lr
    assert model.vision_tower.training


def test_lora_trains_adapters_and_projector(tok, img_dir):
    model, grads, groups = _grads_after_step(tok, img_dir, "lora", lora={"r": 4, "alpha": 8, "dropout": 0.0})
    assert grads, "no gradients"
    for n in grads:
        assert "lora_" in n or n.startswith("mm_projector."), n
    lora_params = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}
    assert lora_params and all("language_model" in n for n in lora_params)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == lora_params | {n for n, _ in model.named_parameters() if n.startswith("mm_projector.")}
    # merging for export gives a plain transformers LM again with the same function. lora_B starts at zero, so give
    # the adapters weights first: else merged and unmerged (and adapters dropped) would all agree trivially.
    from fastvlm.train import build

    assert build.is_lora(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.eval()
    ids = torch.randint(3, 200, (2, 9), generator=g)
    with torch.no_grad():
        adapted = model.language_model(input_ids=ids).logits
        with model.language_model.disable_adapter():
            base = model.language_model(input_ids=ids).logits
    assert (adapted - base).abs().max() > 1e-3  # the adapters change the function
    build.merged_for_export(model)
    assert not build.is_lora(model) and type(model.language_model).__name__ == "Qwen2ForCausalLM"
    with torch.no_grad():
        merged = model.language_model(input_ids=ids).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------
# A tiny end-to-end run
# ---------------------------------------------------------------------------------------


def test_tiny_run_loss_falls_and_exports(tmp_path, tok_dir, caplog):
    from fastvlm.model import FastVLM
    from fastvlm.train.trainer import train

    data = make_dataset(tmp_path / "data", 18)
    # two bad records, skipped and counted
    records = data["records"] + [
        {"id": "bad1", "image": "images/missing.png", "conversations": conv("<image>\nWhat?", "red")},
        {"id": "bad2", "conversations": []},
    ]
    write_json(data["train"], records)
    recipe = recipe_from_dict(tiny_recipe(
        data, tok_dir, tmp_path / "out",
        data__val=data["val"], data__skip_bad=True, optim={"lr": 3e-3, "warmup_ratio": 0.0},
        train={"epochs": 4, "global_batch_size": 6, "per_device_batch_size": 3, "seed": 0},
        output={"dir": str(tmp_path / "out"), "save_every": 0, "log_every": 1, "eval_every": 0,
                "tensorboard": False, "export_apple": True}))
    with caplog.at_level("WARNING", logger="fastvlm.train"):
        summary = train(recipe, progress=False)
    assert summary["steps"] == 12 and summary["samples"] == 12 * 6
    assert summary["skipped_bad_records"] == 2
    assert summary["skipped_by_kind"] == {"missing_image": 1, "empty_conversation": 1}
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping bad record")]
    assert len(skipped) == 2 and "missing.png" in skipped[0] and "'bad2'" in skipped[1], skipped
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "out" / "metrics.jsonl") if '"loss"' in line]
    assert len(losses) == 12
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    # each step logs the learning rate its own update used (step 1: the schedule's first value)
    from fastvlm.train.build import lr_factor

    lrs = [json.loads(line)["lr"]["language_model"] for line in open(tmp_path / "out" / "metrics.jsonl")
           if '"loss"' in line]
    assert lrs == pytest.approx([3e-3 * lr_factor(i, total=12, warmup=0, schedule="cosine") for i in range(12)])
    assert summary["final_val_loss"] is not None and summary["final_val_loss"] < losses[0]
    saved = json.load(open(tmp_path / "out" / "summary.json"))
    assert saved["steps"] == 12 and saved["wall_time_s"] > 0
    model = FastVLM.from_pretrained(str(tmp_path / "out" / "final"), device="cpu", dtype=torch.float32)
    assert model.processor is not None and model.config.vision.inference_mode
    answer = model.chat(os.path.join(data["root"], "images", "0.png"), "What color is the picture?",
                        max_new_tokens=4)
    assert isinstance(answer, str)
    # the export holds the trained weights: its validation loss, recomputed, is the one the run reported
    from fastvlm.train.trainer import TrainStep

    val = ConversationDataset(str(data["val"]), data["root"], tokenizer=model.processor.tokenizer,
                              num_image_tokens=model.num_image_tokens, image_size=model.config.image_size)
    batch = DataCollator(model.processor.pad_token_id)([val[i] for i in range(len(val))])
    model.eval()
    with torch.no_grad():
        loss_sum = TrainStep(model)(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                    batch["pixel_values"], 1.0)
    assert float(loss_sum) / float(batch["num_label_tokens"]) == pytest.approx(summary["final_val_loss"], rel=1e-3)
    # Apple's layout of the same weights (final_apple/) computes the same logits
    apple = FastVLM.from_pretrained(str(tmp_path / "out" / "final_apple"), device="cpu", dtype=torch.float32).eval()
    apple_keys = set(load_file(str(tmp_path / "out" / "final_apple" / "model.safetensors")))
    assert "model.mm_projector.0.weight" in apple_keys and any(k.startswith("model.vision_tower.") for k in apple_keys)
    inputs = dict(input_ids=batch["input_ids"][:2], attention_mask=batch["attention_mask"][:2],
                  pixel_values=batch["pixel_values"][:2])
    with torch.no_grad():
        torch.testing.assert_close(apple(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------
# Model sources and the command line
# ---------------------------------------------------------------------------------------


def test_init_from_language_model_and_encoder_weights(tmp_path, tok, tok_dir):
    from safetensors.torch import save_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from fastvlm.checkpoints.timm_keys import apple_to_timm
    from fastvlm.model import FastVLM
    from fastvlm.train import build

    lm_dir = tmp_path / "lm"
    lm = Qwen2ForCausalLM(Qwen2Config(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    lm.save_pretrained(str(lm_dir))
    tok.save_pretrained(str(lm_dir))
    donor = FastVLM.from_preset("fastvlm-tiny", device="cpu", dtype=torch.float32, seed=123)
    enc = {k: v.contiguous() for k, v in donor.vision_tower.state_dict().items()}
    for name, state in (("apple", {"model.vision_tower.vision_tower.model." + k: v for k, v in enc.items()}),
                        ("timm", apple_to_timm(enc, donor.config.vision))):
        save_file(state, str(tmp_path / f"{name}.safetensors"))
        recipe = recipe_from_dict({"stage": "stage1", "init": {"preset": "fastvlm-tiny", "language_model": str(lm_dir),
                                                              "vision_tower": str(tmp_path / f"{name}.safetensors")},
                                   "data": {"train": "x"}, "output": {"dir": "o"}})
        model = build.build_model(recipe)
        assert model.config.text["hidden_size"] == 64 and model.config.text["vocab_size"] == 384
        for k, v in lm.state_dict().items():
            assert torch.equal(model.language_model.state_dict()[k], v), k
        got = model.vision_tower.state_dict()
        for k, v in enc.items():
            if not k.startswith("head."):
                assert torch.equal(got[k], v), (name, k)
        assert model.processor is not None
    # train-form (multi-branch) encoder weights into the fused encoder: loaded, then fused
    branchy = FastVLM.from_config(donor.config.replace(vision=dataclasses.replace(donor.config.vision,
                                                                                 inference_mode=False)),
                                  device="cpu", dtype=torch.float32, seed=7)
    save_file({k: v.contiguous() for k, v in branchy.vision_tower.state_dict().items()},
              str(tmp_path / "branchy.safetensors"))
    init = {"preset": "fastvlm-tiny", "vision_tower": str(tmp_path / "branchy.safetensors")}
    recipe = recipe_from_dict({"stage": "stage1", "tokenizer": str(tok_dir), "init": init,
                               "data": {"train": "x"}, "output": {"dir": "o"}})
    model = build.build_model(recipe)
    fused = branchy.vision_tower.eval().reparameterize().state_dict()
    got = model.vision_tower.state_dict()
    for k, v in fused.items():
        if not k.startswith("head."):
            assert torch.equal(got[k], v), k


def test_multi_branch_encoder_carries_from_stage_to_stage(tmp_path, tok_dir):
    # the encoder trains in its multi-branch form when the checkpoint has it: stage 1 fuses it (frozen there) and
    # exports the branches beside the fused weights; stage 2 trains the branches; its export holds both again
    import shutil

    from safetensors.torch import save_file

    from fastvlm.model import FastVLM
    from fastvlm.train import build
    from fastvlm.train.trainer import train
    from fastvlm.vision import FastViTHD

    data = make_dataset(tmp_path / "data", 8)
    donor = FastVLM.from_preset("fastvlm-tiny", device="cpu", dtype=torch.float32, seed=7)
    branchy = FastViTHD(dataclasses.replace(donor.config.vision, inference_mode=False, image_size=64))
    torch.manual_seed(7)
    with torch.no_grad():  # BatchNorm statistics away from their defaults, so fusing them is not a no-op
        for name, b in branchy.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                b.copy_(torch.rand_like(b) + (0.5 if name.endswith("var") else -0.5))
    enc = {k: v.contiguous() for k, v in branchy.state_dict().items() if not k.startswith("head.")}
    save_file(enc, str(tmp_path / "branchy.safetensors"))
    s1 = tiny_recipe(data, tok_dir, tmp_path / "s1", stage="stage1",
                     init={"preset": "fastvlm-tiny", "seed": 0, "vision_tower": str(tmp_path / "branchy.safetensors"),
                           "vision": {"image_size": 64, "inference_mode": True}})
    train(recipe_from_dict(s1), progress=False)
    final1 = tmp_path / "s1" / "final"
    kept = load_file(str(final1 / build.TRAIN_FORM_FILE))
    assert set(enc) <= set(kept)
    for k, v in enc.items():
        assert torch.equal(kept[k], v), k
    assert FastVLM.from_pretrained(str(final1), device="cpu").config.vision.inference_mode  # still the fused layout

    s2 = tiny_recipe(data, tok_dir, tmp_path / "s2", init=None, model=str(final1))
    assert not build.build_model(recipe_from_dict(s2)).config.vision.inference_mode  # the branches train
    train(recipe_from_dict(s2), progress=False)
    final2 = tmp_path / "s2" / "final"
    trained = load_file(str(final2 / build.TRAIN_FORM_FILE))
    assert any(not torch.equal(trained[k], kept[k]) for k in enc if ".rbr_" in k)  # the branches themselves moved
    fused = FastViTHD(dataclasses.replace(branchy.config, inference_mode=False))
    fused.load_state_dict(trained)
    fused = fused.eval().reparameterize().state_dict()
    model2 = FastVLM.from_pretrained(str(final2), device="cpu", dtype=torch.float32)
    assert model2.config.vision.inference_mode
    for k, v in model2.vision_tower.state_dict().items():
        torch.testing.assert_close(v, fused[k], msg=k)

    # a stage that trains the encoder it fused from branches at load exports no (stale) branches
    s2init = tiny_recipe(data, tok_dir, tmp_path / "s2init",
                         init={"preset": "fastvlm-tiny", "seed": 0, "vision_tower": str(tmp_path / "branchy.safetensors"),
                               "vision": {"image_size": 64, "inference_mode": True}})
    train(recipe_from_dict(s2init), progress=False)
    assert (tmp_path / "s2init" / "final").is_dir() and not (tmp_path / "s2init" / "final" / "train_form").exists()

    # branches that are not the checkpoint's encoder are refused, not trained from silently
    mixed = tmp_path / "mixed"
    shutil.copytree(final1, mixed)
    shutil.copy(final2 / build.TRAIN_FORM_FILE, mixed / build.TRAIN_FORM_FILE)
    with pytest.raises(ConfigError, match="does not fuse to the encoder in .*mixed"):
        build.build_model(recipe_from_dict(dict(s2, model=str(mixed))))
    # a stage that keeps the encoder frozen runs the fused one and exports the branches unchanged
    s1b = tiny_recipe(data, tok_dir, tmp_path / "s1b", init=None, model=str(final2), stage="stage1")
    assert build.build_model(recipe_from_dict(s1b)).config.vision.inference_mode
    train(recipe_from_dict(s1b), progress=False)
    again = load_file(str(tmp_path / "s1b" / "final" / build.TRAIN_FORM_FILE))
    assert set(again) == set(trained) and all(torch.equal(again[k], trained[k]) for k in trained)


def test_resolution_scaling_stage_trains_at_the_new_size(tmp_path, tok_dir):
    # stage 1.5: a model exported at 64 px (1 token) trains at 128 px (4 tokens), everything trainable
    from fastvlm.model import FastVLM
    from fastvlm.train.trainer import train

    data = make_dataset(tmp_path / "data", 8)
    train(recipe_from_dict(tiny_recipe(data, tok_dir, tmp_path / "s64")), progress=False)
    low = FastVLM.from_pretrained(str(tmp_path / "s64" / "final"), device="cpu", dtype=torch.float32)
    assert low.config.image_size == 64 and low.num_image_tokens == 1
    s15 = tiny_recipe(data, tok_dir, tmp_path / "s128", stage="stage1.5", init=None,
                      model=str(tmp_path / "s64" / "final"), data__image_size=128,
                      optim={"lr": 3e-3, "warmup_ratio": 0.0}, train={"epochs": 4, "global_batch_size": 4,
                                                                      "per_device_batch_size": 2, "seed": 0})
    summary = train(recipe_from_dict(s15), progress=False)
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "s128" / "metrics.jsonl") if '"loss"' in line]
    assert summary["steps"] == 8 and np.mean(losses[-2:]) < np.mean(losses[:2]), losses
    high = FastVLM.from_pretrained(str(tmp_path / "s128" / "final"), device="cpu", dtype=torch.float32)
    assert high.config.image_size == 128 and high.num_image_tokens == 4
    # every module moved from the 64 px model's weights
    a, b = low.state_dict(), high.state_dict()
    for prefix in ("vision_tower.", "mm_projector.", "language_model."):
        assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith(prefix) and ".head." not in k), prefix
    out = high.processor(images=[Image.new("RGB", (50, 30), (255, 0, 0))], text="<image>\nWhat color?")
    assert tuple(out["pixel_values"].shape[-2:]) == (128, 128)


def test_bf16_with_gradient_checkpointing_matches_without_on_cpu(tmp_path, tok_dir, monkeypatch):
    # bf16 autocast on the CPU (as the synth recipes train), with gradient checkpointing of the LLM and the encoder:
    # recomputing activations must not change the training, so the two runs end with the same weights
    from safetensors.torch import load_file as load

    from fastvlm.train import build
    from fastvlm.train.trainer import train

    # what the trainer's models had switched on (a spy on the trainer's own call), so the second run did recompute
    switched = []
    enable = build.enable_gradient_checkpointing

    def spy(model, recipe):
        enable(model, recipe)
        lm = model.language_model
        on = lm.is_activation_checkpointing if hasattr(lm, "is_activation_checkpointing") else lm.is_gradient_checkpointing
        switched.append((bool(on), model.vision_tower.grad_checkpointing))

    monkeypatch.setattr(build, "enable_gradient_checkpointing", spy)
    data = make_dataset(tmp_path / "data", 8)
    finals = []
    for ckpt in (False, True):
        out = tmp_path / f"ckpt{int(ckpt)}"
        recipe = tiny_recipe(data, tok_dir, out, train={
            "epochs": 2, "global_batch_size": 4, "per_device_batch_size": 2, "seed": 0, "mixed_precision": "bf16",
            "gradient_checkpointing": ckpt, "vision_gradient_checkpointing": ckpt, "freeze_bn_stats": True})
        summary = train(recipe_from_dict(recipe), progress=False)
        assert summary["mixed_precision"] == "bf16" and summary["steps"] == 4
        finals.append(load(str(out / "final" / "model.safetensors")))
    assert switched == [(False, False), (True, True)]
    for k, v in finals[0].items():
        torch.testing.assert_close(finals[1][k], v, rtol=0, atol=0, msg=k)
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "ckpt1" / "metrics.jsonl") if '"loss"' in line]
    assert len(losses) == 4 and all(np.isfinite(losses))


def test_frozen_random_encoder_is_warned_about(tok_dir, caplog):
    # a stage that freezes an encoder built from init without weights would learn from noise features
    from fastvlm.train import build

    def built(stage: str, **init):
        recipe = recipe_from_dict({"stage": stage, "tokenizer": str(tok_dir), "init": {"preset": "fastvlm-tiny", **init},
                                   "data": {"train": "x"}, "output": {"dir": "o"}})
        caplog.clear()
        with caplog.at_level("WARNING", logger="fastvlm.train"):
            build.build_model(recipe)
        return [r.getMessage() for r in caplog.records if "init.vision_tower is not set" in r.getMessage()]

    (warning,) = built("stage1")
    assert "--set init.vision_tower=PATH" in warning
    assert built("stage2") == []  # the encoder trains there


def test_cli_train_options(tmp_path, capsys):
    import yaml

    from fastvlm.cli import main

    assert main(["train", "stage2", "--print-recipe", "--set", "optim.lr=3e-5", "--skip-bad", "--max-steps", "7",
                 "--output-dir", str(tmp_path / "o"), "--resume", "never"]) == 0
    d = yaml.safe_load(capsys.readouterr().out)
    assert d["optim"]["lr"] == 3e-5 and d["data"]["skip_bad"] is True and d["train"]["max_steps"] == 7
    assert d["output"]["dir"] == str(tmp_path / "o") and d["output"]["resume"] == "never"
    assert main(["train", "stage2", "--set", "optim.nope=1", "--print-recipe"]) == 1
    err = capsys.readouterr().err
    # the --set that gave the bad key or value is blamed, not the (correct) recipe file
    assert "--set optim.nope=1: unknown recipe key optim.'nope'" in err
    assert main(["train", "stage2", "--set", "optim.lr=abc", "--print-recipe"]) == 1
    assert "--set optim.lr=abc: optim.lr must be a number, got 'abc'" in capsys.readouterr().err


def test_cli_stops_at_a_bad_record(tmp_path, tok_dir, capsys):
    import yaml

    from fastvlm.cli import main

    data = make_dataset(tmp_path / "data", 4)
    write_json(data["train"], data["records"] + [BAD_CASES["missing_image"]])
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(data, tok_dir, tmp_path / "out")))
    assert main(["train", str(path), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "fastvlm train: error:" in err and "record 4 (id 'm1')" in err and data["train"] in err


def test_cli_names_the_recipe_key_of_a_missing_data_path(tmp_path, tok_dir, capsys):
    import yaml

    from fastvlm.cli import main

    data = make_dataset(tmp_path / "data", 4)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(data, tok_dir, tmp_path / "out")))
    (tmp_path / "afile").write_text("x")
    (tmp_path / "latin1.json").write_bytes(b'[{"id": "h\xe9llo"}]')
    run_dir = tmp_path / "run"
    (run_dir / "step_5").mkdir(parents=True)
    (run_dir / "step_5" / "trainer_state.json").write_text("{}")
    for override, message in ((f"data.val={tmp_path / 'none.json'}", "data.val: no such data file"),
                              (f"data.image_folder={tmp_path / 'nodir'}", "data.image_folder: no such data folder"),
                              (f"init.language_model={tmp_path / 'nolm'}", "init.language_model: no model directory"),
                              # walkthrough of session 21: each of these was a traceback or a misleading message
                              (f"init.vision_tower={data['train']}", "is not a readable safetensors file"),
                              (f"output.dir={tmp_path / 'afile'}", "exists and is not a directory"),
                              (f"output.resume={tmp_path / 'nockpt'}", "no such checkpoint"),
                              (f"output.resume={run_dir}", "give one of its step folders (step_5 is the latest)"),
                              (f"data.train={tmp_path}", "is a folder"),
                              (f"data.train={tmp_path / 'latin1.json'}", "is not UTF-8 text")):
        assert main(["train", str(path), "--no-progress", "--set", override]) == 1
        err = capsys.readouterr().err.strip()
        assert message in err and str(tmp_path) in err, err
        assert len(err.splitlines()) == 1 or "Traceback" not in err, err


@pytest.mark.parametrize("saved,expected", [
    (5, "interrupted at step 7; the last checkpoint is {out}/step_5: the same command resumes from it (steps 6-7 "
        "run again)"),
    (6, "interrupted at step 7; the last checkpoint is {out}/step_6: the same command resumes from it (step 7 runs "
        "again)"),
    (None, "interrupted at step 7; no checkpoint was written yet: the same command starts again"),
])
def test_ctrl_c_says_where_the_run_stopped_and_how_to_resume(tmp_path, tok_dir, capsys, monkeypatch, saved, expected):
    import yaml

    from fastvlm.cli import main

    class Interrupted:
        def __init__(self, recipe, progress=True):
            self.is_main, self.step, self.last_saved_step = True, None, None

        def train(self):
            self.step, self.last_saved_step = 7, saved
            raise KeyboardInterrupt

    monkeypatch.setattr("fastvlm.train.trainer.Trainer", Interrupted)
    data = make_dataset(tmp_path / "data", 2)
    path = tmp_path / "r.yaml"
    out = tmp_path / "out"
    path.write_text(yaml.safe_dump(tiny_recipe(data, tok_dir, out)))
    assert main(["train", str(path), "--no-progress"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == expected.format(out=out)


def _two_step_run(tmp_path, tok_dir):
    """A finished two-step tiny run that saved every step: (data, output dir, the recipe's overrides)."""
    from fastvlm.train.trainer import train

    data = make_dataset(tmp_path / "data", 8)
    out = tmp_path / "out"
    base = dict(train={"max_steps": 2, "global_batch_size": 4, "per_device_batch_size": 2, "seed": 0},
                output={"dir": str(out), "save_every": 1, "log_every": 1, "eval_every": 0, "tensorboard": False,
                        "export_apple": False})
    train(recipe_from_dict(tiny_recipe(data, tok_dir, out, **base)), progress=False)
    return data, out, base


def test_resume_of_another_model_or_other_trainable_parts_is_a_clear_error(tmp_path, tok_dir, monkeypatch, caplog):
    from fastvlm.errors import CheckpointError
    from fastvlm.train.trainer import train

    data, out, base = _two_step_run(tmp_path, tok_dir)
    step = str(out / "step_2")
    # another model (a wider LM): one CheckpointError naming the checkpoint, not torch's size mismatch
    wider = tiny_recipe(data, tok_dir, tmp_path / "o2", **base,
                        init={"preset": "fastvlm-tiny", "seed": 0, "vision": {"image_size": 64},
                              "text": {"intermediate_size": 96}})
    wider["output"] = {**base["output"], "dir": str(tmp_path / "o2"), "resume": step}
    with pytest.raises(CheckpointError, match="cannot resume from .*another model's weights"):
        train(recipe_from_dict(wider), progress=False)
    # other trainable parts: the optimizer state has other parameter groups
    frozen = tiny_recipe(data, tok_dir, tmp_path / "o3", **base)
    frozen["train"] = {**base["train"], "trainable": {"vision_tower": False}}
    frozen["output"] = {**base["output"], "dir": str(tmp_path / "o3"), "resume": step}
    with pytest.raises(CheckpointError, match="optimizer state does not fit this run"):
        train(recipe_from_dict(frozen), progress=False)
    # a checkpoint already past this run's steps: said so, then exported as it is
    past = tiny_recipe(data, tok_dir, tmp_path / "o5", **base)
    past["train"] = {**base["train"], "max_steps": 1}
    past["output"] = {**base["output"], "dir": str(tmp_path / "o5"), "resume": step}
    with caplog.at_level("WARNING", logger="fastvlm"):
        assert train(recipe_from_dict(past), progress=False)["steps"] == 2
    assert "is at step 2, at or past this run's 1 steps: nothing is trained" in caplog.text
    # another learning rate: the resumed optimizer would keep the old one while recipe.yaml said the new
    lr = tiny_recipe(data, tok_dir, tmp_path / "o6", **base)
    lr["optim"] = {**lr["optim"], "lr": 5e-2}
    lr["output"] = {**base["output"], "dir": str(tmp_path / "o6"), "resume": step}
    with pytest.raises(ConfigError, match=r"cannot resume from .*step_2 with another optimizer setting \(lr of "
                                          r"group vision_tower: 0.002 -> 0.05; .*\): resuming restores the optimizer"):
        train(recipe_from_dict(lr), progress=False)
    assert not (tmp_path / "o6" / "recipe.yaml").exists()
    # the same rates spelt out (lr_projector null means lr) are no change
    same = tiny_recipe(data, tok_dir, tmp_path / "o7", **base)
    same["optim"] = {**same["optim"], "lr_projector": same["optim"]["lr"]}
    same["train"] = {**base["train"], "max_steps": 3}
    same["output"] = {**base["output"], "dir": str(tmp_path / "o7"), "resume": step}
    assert train(recipe_from_dict(same), progress=False)["steps"] == 3
    # an accelerate config that asks for FSDP, which accelerate drops on CPUs: refused, not run as DDP
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="asks for FSDP"):
        train(recipe_from_dict(tiny_recipe(data, tok_dir, tmp_path / "o4", **base)), progress=False)


def test_damaged_trainer_state_is_refused_naming_the_file(tmp_path, tok_dir):
    import json
    import shutil

    from fastvlm.errors import CheckpointError
    from fastvlm.train.trainer import train

    data, out, base = _two_step_run(tmp_path, tok_dir)
    good = json.loads((out / "step_1" / "trainer_state.json").read_text())
    cases = [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        (json.dumps({**good, "step": "four"}), "step must be a non-negative integer, got 'four'"),
        (json.dumps({k: v for k, v in good.items() if k != "sampler"}), "sampler must be a JSON object"),
        # values that once resumed silently: replayed or skipped batches, or an epoch far away
        (json.dumps({**good, "step_in_epoch": -5}), "step_in_epoch must be a non-negative integer, got -5"),
        (json.dumps({**good, "step_in_epoch": 100}), "does not fit epoch 0, step 100 of its 2 steps per epoch"),
        (json.dumps({**good, "epoch": 1000000}), "step 1 does not fit epoch 1000000"),
    ]
    for i, (text, message) in enumerate(cases):
        step = tmp_path / f"bad{i}"
        shutil.copytree(out / "step_1", step)
        (step / "trainer_state.json").write_text(text)
        r = tiny_recipe(data, tok_dir, tmp_path / f"o{i}", **base)
        r["output"] = {**base["output"], "dir": str(tmp_path / f"o{i}"), "resume": str(step)}
        with pytest.raises(CheckpointError) as e:
            train(recipe_from_dict(r), progress=False)
        assert message in str(e.value) and "trainer_state.json" in str(e.value), str(e.value)


def test_bundled_recipe_name_is_not_hidden_by_a_folder_of_that_name(tmp_path, monkeypatch):
    from fastvlm.train.recipe import resolve_recipe_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "lora").mkdir()  # e.g. an earlier run's output directory
    assert resolve_recipe_path("lora") == bundled_recipes()["lora"]
    with pytest.raises(ConfigError, match="is a directory, not a recipe file"):
        resolve_recipe_path(str(tmp_path / "lora"))


@pytest.mark.parametrize("name", ["ds_zero2.json", "ds_zero3.json"])
def test_deepspeed_configs_are_checked_against_the_recipe(name):
    from importlib import resources

    from fastvlm.train.trainer import deepspeed_config_problem

    ds = json.loads(resources.files("fastvlm.recipes").joinpath(name).read_text())
    micro = ds["train_micro_batch_size_per_gpu"]

    def recipe(per_device, save_every=0):
        return recipe_from_dict({"stage": "stage2", "model": "m", "data": {"train": "x"},
                                 "train": {"global_batch_size": per_device * 2, "per_device_batch_size": per_device},
                                 "output": {"dir": "o", "save_every": save_every}})

    assert deepspeed_config_problem(ds, recipe(micro)) is None
    assert "is 4, but the recipe's train.per_device_batch_size is 32: set them equal" in \
        deepspeed_config_problem(ds, recipe(32))
    assert "set output.save_every: 0" in deepspeed_config_problem(ds, recipe(micro, save_every=100))
    assert "not 'auto'" in deepspeed_config_problem(dict(ds, train_micro_batch_size_per_gpu="auto"), recipe(micro))
    assert "gradient_clipping is 0.5, but the recipe's optim.max_grad_norm is 1.0" in \
        deepspeed_config_problem(dict(ds, gradient_clipping=0.5), recipe(micro))
    # as DeepSpeed reads them: 'auto' clips at 1.0 (the recipe's default), a missing key not at all
    assert deepspeed_config_problem(dict(ds, gradient_clipping="auto"), recipe(micro)) is None
    no_clip = {k: v for k, v in ds.items() if k != "gradient_clipping"}
    assert "gradient_clipping is missing (0)" in deepspeed_config_problem(no_clip, recipe(micro))
    # the recipe accumulates 2 micro-batches per step: DeepSpeed must too
    assert deepspeed_config_problem(ds, recipe(micro), accum=2) is None  # "auto"
    assert "gradient_accumulation_steps is 1, but the recipe accumulates 2" in \
        deepspeed_config_problem(dict(ds, gradient_accumulation_steps=1), recipe(micro), accum=2)


def test_accelerate_accumulation_setting_that_disagrees_with_the_recipe_is_refused(monkeypatch):
    from fastvlm.train.trainer import Trainer

    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    r = recipe_from_dict({"stage": "stage2", "model": "m", "data": {"train": "x"}, "output": {"dir": "o"},
                          "train": {"global_batch_size": 8, "per_device_batch_size": 4, "cpu": True}})
    with pytest.raises(ConfigError, match="accelerate was told to accumulate 4 micro-batches .* the recipe needs 2"):
        Trainer(r).train()  # refused while setting up, and accelerate's process-wide state is released
    from accelerate.state import AcceleratorState

    assert not AcceleratorState._shared_state


def test_deepspeed_with_several_processes_refuses_mixed_text_only_data():
    from fastvlm.train.trainer import deepspeed_data_problem

    assert "DeepSpeed with 2 processes needs an image in every sample, and 1 of the 3 training records are " \
        "text-only" in deepspeed_data_problem([True, False, True], 2)
    assert deepspeed_data_problem([True, False, True], 1) is None  # one process: nothing to wait for
    assert deepspeed_data_problem([True, True], 4) is None
    assert deepspeed_data_problem([False, False], 4) is None  # the encoder runs nowhere


def test_deepspeed_asked_for_but_not_installed_is_one_error(monkeypatch):
    import importlib.util

    from fastvlm.train.trainer import Trainer

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "deepspeed" else real(n, *a))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    r = recipe_from_dict({"stage": "stage2", "model": "m", "data": {"train": "x"}, "output": {"dir": "o"}})
    with pytest.raises(ConfigError, match="asks for DeepSpeed, which is not installed: pip install deepspeed"):
        Trainer(r).train()


def test_resume_of_trainable_only_checkpoints_needs_the_same_frozen_weights(tmp_path, tok_dir):
    """Checkpoints that hold only the trained weights (the lora recipe's) take the rest from the recipe's model on
    resume: another model of the same shapes is refused, the same one resumes."""
    from fastvlm.errors import CheckpointError
    from fastvlm.train.trainer import train

    data = make_dataset(tmp_path / "data", 8)
    out = tmp_path / "out"

    def recipe(seed, steps):
        return recipe_from_dict(tiny_recipe(
            data, tok_dir, out, init={"preset": "fastvlm-tiny", "seed": seed, "vision": {"image_size": 64}},
            train={"max_steps": steps, "global_batch_size": 4, "per_device_batch_size": 2, "seed": 0,
                   "trainable": {"vision_tower": False}},
            output={"dir": str(out), "save_every": 1, "log_every": 1, "tensorboard": False,
                    "checkpoint_weights": "trainable"}))

    train(recipe(0, 1), progress=False)
    with pytest.raises(CheckpointError, match=r"cannot resume from .*step_1: its run trained on other frozen "
                                              "weights than the recipe's init gives"):
        train(recipe(1, 2), progress=False)
    assert train(recipe(0, 2), progress=False)["resumed_from"].endswith("step_1")


def test_misspelt_text_config_keys_and_lora_targets_are_errors(tok):
    """Qwen2Config keeps an unknown key as an attribute and peft refuses targets only when none matches: both
    would have trained another model than the recipe says."""
    from fastvlm.model import FastVLM
    from fastvlm.train import build

    base = {"stage": "stage2", "tokenizer": "tok", "data": {"train": "x"}, "output": {"dir": "o"}}
    with pytest.raises(ConfigError, match=r"init.text: unknown keys 'hiden_size' \(did you mean 'hidden_size'\?\), "
                                          "'num_layers'"):
        build.build_config(recipe_from_dict({**base, "init": {"preset": "fastvlm-tiny",
                                                             "text": {"num_layers": 1, "hiden_size": 32}}}), tok)
    cfg = build.build_config(recipe_from_dict({**base, "init": {"preset": "fastvlm-tiny",
                                                               "text": {"num_hidden_layers": 1}}}), tok)
    assert cfg.text["num_hidden_layers"] == 1
    lora = {"stage": "lora", "model": "m", "data": {"train": "x"}, "output": {"dir": "o"},
            "lora": {"r": 4, "target_modules": ["q_proj", "vproj"]}}
    model = FastVLM.from_preset("fastvlm-tiny", tokenizer=tok, device="cpu", dtype=torch.float32)
    with pytest.raises(ConfigError, match=r"lora.target_modules: \['vproj'\] match no module of the language "
                                          "model; its linear layers are .*v_proj"):
        build.apply_stage(model, recipe_from_dict(lora))
