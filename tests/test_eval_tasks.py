"""Readers on small files in the owners' formats, the task registry, and the resumable
runner."""

import json
import os

import pytest

from fastvlm.errors import ConfigError, FastVLMError
from fastvlm.eval.metrics import MULTIPLE_CHOICE_PROMPT, SHORT_ANSWER_PROMPT
from fastvlm.eval.runner import evaluate, read_predictions, score_predictions
from fastvlm.eval.tasks import TASKS, Sample, get_task, text_size_bucket


def write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def write_lines(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------
# TextVQA
# ---------------------------------------------------------------------------


def textvqa_file(tmp_path):
    return write_json(
        tmp_path / "TextVQA_0.5.1_val.json",
        {
            "dataset_type": "val",
            "dataset_name": "textvqa",
            "dataset_version": "0.5.1",
            "data": [
                {
                    "question": "what is the brand of this camera?",
                    "image_id": "003a8ae2ef43b901",
                    "image_classes": ["Camera"],
                    "answers": ["nous les gosses", "dakota", "clos culombu", "dakota digital", "dakota",
                                "dakota", "dakota digital", "dakota", "dakota", "dakota"],
                    "question_id": 34602,
                    "set_name": "val",
                },
                {
                    "question": "what does the small white text spell?",
                    "image_id": "00685bc495504d61",
                    "answers": ["copenhagen"] * 10,
                    "question_id": 34603,
                    "set_name": "val",
                },
            ],
        },
    )  # fmt: skip


def test_read_textvqa(tmp_path):
    (tmp_path / "train_images").mkdir()
    samples = TASKS["textvqa"].load(textvqa_file(tmp_path))
    assert [s.id for s in samples] == ["34602", "34603"]
    s = samples[0]
    assert s.images == [str(tmp_path / "train_images" / "003a8ae2ef43b901.jpg")]
    assert len(s.references) == 10
    # lmms-eval: question.capitalize() + instruction
    assert s.prompt == f"What is the brand of this camera?\n{SHORT_ANSWER_PROMPT}"
    # image_root overrides the owner layout
    other = TASKS["textvqa"].load(textvqa_file(tmp_path), image_root=tmp_path / "imgs")
    assert other[1].image == str(tmp_path / "imgs" / "00685bc495504d61.jpg")
    # scoring: "Dakota" matches 6 of 10 -> 1.0; "copenhagen." -> 1.0
    result = TASKS["textvqa"].score(samples, ["Dakota", "nope"])
    assert result["scores"]["accuracy"] == pytest.approx(0.5)


def test_textvqa_malformed(tmp_path):
    p = write_json(tmp_path / "bad.json", {"data": [{"question": "q", "image_id": "x", "question_id": 7}]})
    with pytest.raises(FastVLMError, match=r"bad\.json: record 0 \(question_id=7\): missing field 'answers'"):
        TASKS["textvqa"].load(p)
    p = write_json(tmp_path / "nodata.json", {"questions": []})
    with pytest.raises(FastVLMError, match="nodata.json: expected a top-level 'data' list"):
        TASKS["textvqa"].load(p)
    p = tmp_path / "broken.json"
    p.write_text('{"data": [', encoding="utf-8")
    with pytest.raises(FastVLMError, match="broken.json: not valid JSON"):
        TASKS["textvqa"].load(p)
    with pytest.raises(FastVLMError, match="no such file"):
        TASKS["textvqa"].load(tmp_path / "missing.json")
    # a single answer (a string, or a list of one) would score every prediction 0 under VQA accuracy: refused
    for answers, message in (("12", "field 'answers' should be list"), (["12"], "field 'answers' holds 1 answer")):
        p = write_json(tmp_path / "one.json", {"data": [{"question": "q", "image_id": "x", "question_id": 8,
                                                         "answers": answers}]})
        with pytest.raises(FastVLMError, match=rf"one\.json: record 0 \(question_id=8\): {message}"):
            TASKS["textvqa"].load(p)


# ---------------------------------------------------------------------------
# DocVQA
# ---------------------------------------------------------------------------


def test_read_docvqa(tmp_path):
    p = write_json(
        tmp_path / "val" / "val_v1.0_withQT.json",
        {
            "dataset_name": "docvqa",
            "dataset_split": "val",
            "dataset_version": "1.0",
            "data": [
                {"questionId": 49153, "question": "What is the ‘actual’ value per 1000, during the year 1975?",
                 "question_types": ["figure/diagram"], "image": "documents/pybv0228_81.png", "docId": 14465,
                 "ucsf_document_id": "pybv0228", "ucsf_document_page_no": "81", "answers": ["0.28"],
                 "data_split": "val"},
                {"questionId": 24580, "question": "What is the name of the company?",
                 "question_types": ["layout", "others"], "image": "documents/nkbl0226_1.png", "docId": 1,
                 "answers": ["ITC Limited", "itc limited"], "data_split": "val"},
            ],
        },
    )  # fmt: skip
    samples = TASKS["docvqa"].load(p)
    assert samples[0].id == "49153"
    assert samples[0].image == str(tmp_path / "val" / "documents" / "pybv0228_81.png")
    assert samples[0].prompt.endswith("\n" + SHORT_ANSWER_PROMPT)
    result = TASKS["docvqa"].score(samples, ["0.28", "ITC Limted"])
    # 1.0 and 1 - 1/11 ("itc limited" vs "itc limted": 1 deletion over 11 chars)
    assert result["scores"]["anls"] == pytest.approx((1 + (1 - 1 / 11)) / 2)
    bd = result["breakdown"]["question_type"]
    assert bd["figure/diagram"] == {"n": 1, "anls": 1.0}
    assert bd["layout"]["n"] == 1 and bd["others"]["anls"] == pytest.approx(1 - 1 / 11)


def test_docvqa_malformed(tmp_path):
    p = write_json(tmp_path / "val.json", {"data": [{"questionId": 1, "question": "q", "image": "d.png", "answers": []}]})
    with pytest.raises(FastVLMError, match=r"record 0 \(questionId=1\): field 'answers' should be a non-empty list"):
        TASKS["docvqa"].load(p)


# ---------------------------------------------------------------------------
# ChartQA
# ---------------------------------------------------------------------------


def test_read_chartqa_file_and_folder(tmp_path):
    d = tmp_path / "test"
    write_json(d / "test_human.json", [
        {"imgname": "41699051005347.png", "query": "How many food item is shown in the bar graph?", "label": "14"},
        {"imgname": "multi_col_60.png", "query": "Which country has the highest value?", "label": "Brazil"},
    ])
    write_json(d / "test_augmented.json", [
        {"imgname": "two_col_1.png", "query": "What was the share in 2019?", "label": "21.5"},
    ])  # fmt: skip
    (d / "png").mkdir()
    human = TASKS["chartqa"].load(d / "test_human.json")
    assert [s.id for s in human] == ["human/0", "human/1"]
    assert human[0].image == str(d / "png" / "41699051005347.png")
    both = TASKS["chartqa"].load(d)
    assert [s.id for s in both] == ["human/0", "human/1", "augmented/0"]
    # 14.5 vs 14: 3.6% -> right; "brazil" right; 23 vs 21.5: 7% -> wrong
    result = TASKS["chartqa"].score(both, ["14.5", "brazil", "23"])
    assert result["scores"]["relaxed_accuracy"] == pytest.approx(2 / 3)
    assert result["breakdown"]["split"]["human"]["relaxed_accuracy"] == 1.0
    assert result["breakdown"]["split"]["augmented"]["relaxed_accuracy"] == 0.0


def test_chartqa_malformed(tmp_path):
    p = write_json(tmp_path / "test_human.json", [{"imgname": "a.png", "label": "1"}])
    with pytest.raises(FastVLMError, match=r"test_human.json: record 0 \(imgname='a.png'\): missing field 'query'"):
        TASKS["chartqa"].load(p)


# ---------------------------------------------------------------------------
# POPE
# ---------------------------------------------------------------------------


def pope_files(tmp_path):
    d = tmp_path / "coco"
    write_lines(d / "coco_pope_random.json", [
        {"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?", "label": "yes"},
        {"question_id": 2, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a dog in the image?", "label": "no"},
    ])
    write_lines(d / "coco_pope_adversarial.json", [
        {"question_id": 1, "image": "COCO_val2014_000000210789.jpg", "text": "Is there a car in the image?", "label": "yes"},
        {"question_id": 2, "image": "COCO_val2014_000000210789.jpg", "text": "Is there a bus in the image?", "label": "no"},
    ])  # fmt: skip
    return d


def test_read_pope(tmp_path):
    d = pope_files(tmp_path)
    one = TASKS["pope"].load(d / "coco_pope_random.json", image_root=tmp_path / "val2014")
    assert [s.id for s in one] == ["random/1", "random/2"]
    assert one[0].prompt == f"Is there a snowboard in the image?\n{SHORT_ANSWER_PROMPT}"
    assert one[0].image == str(tmp_path / "val2014" / "COCO_val2014_000000310196.jpg")
    both = TASKS["pope"].load(d)
    assert sorted(s.id for s in both) == ["adversarial/1", "adversarial/2", "random/1", "random/2"]
    preds = {"random/1": "Yes", "random/2": "No", "adversarial/1": "No", "adversarial/2": "Yes, there is."}
    result = TASKS["pope"].score(both, [preds[s.id] for s in both])
    # pooled: TP 1 (random/1), TN 1 (random/2), FN 1 (adv/1), FP 1 (adv/2): all 0.5
    sc = result["scores"]
    assert (sc["accuracy"], sc["precision"], sc["recall"], sc["f1"], sc["yes_ratio"]) == (0.5, 0.5, 0.5, 0.5, 0.5)
    cat = result["breakdown"]["category"]
    assert cat["random"]["f1"] == 1.0 and cat["adversarial"]["f1"] == 0.0
    assert sc["f1_category_mean"] == 0.5


def test_pope_malformed(tmp_path):
    p = write_lines(tmp_path / "coco_pope_random.json", [
        {"question_id": 1, "image": "a.jpg", "text": "Is there a cat?", "label": "yes"},
        {"question_id": 2, "image": "a.jpg", "text": "Is there a dog?", "label": "maybe"},
    ])  # fmt: skip
    with pytest.raises(FastVLMError, match=r"record 1 \(question_id=2\): field 'label' should be 'yes' or 'no'"):
        TASKS["pope"].load(p)
    p.write_text('{"question_id": 1, "image": "a.jpg", "text": "q", "label": "yes"}\n{"question_id": 2,\n')
    with pytest.raises(FastVLMError, match="line 2 is not valid JSON"):
        TASKS["pope"].load(p)


# ---------------------------------------------------------------------------
# GQA
# ---------------------------------------------------------------------------


def test_read_gqa(tmp_path):
    p = write_json(
        tmp_path / "testdev_balanced_questions.json",
        {
            "201307251": {"semantic": [], "entailed": [], "equivalent": ["201307251"], "question": "Is it overcast?",
                          "imageId": "n161313", "isBalanced": True, "groups": {"global": None, "local": "06-weather"},
                          "answer": "no", "semanticStr": "select: weather", "annotations": {},
                          "types": {"detailed": "weatherVerify", "semantic": "global", "structural": "verify"},
                          "fullAnswer": "No, it is clear."},
            "20515422": {"question": "Who is wearing the shirt?", "imageId": "n288870", "answer": "girl",
                         "types": {"detailed": "relS", "semantic": "rel", "structural": "query"}},
        },
    )  # fmt: skip
    (tmp_path / "images").mkdir()
    samples = TASKS["gqa"].load(p)
    assert samples[0].id == "201307251"
    assert samples[0].image == str(tmp_path / "images" / "n161313.jpg")
    result = TASKS["gqa"].score(samples, ["No.", "The girl"])
    assert result["scores"]["accuracy"] == 0.5  # "the girl" != "girl"
    assert result["breakdown"]["structural"] == {"query": {"n": 1, "accuracy": 0.0}, "verify": {"n": 1, "accuracy": 1.0}}


def test_gqa_malformed(tmp_path):
    p = write_json(tmp_path / "q.json", {"1": {"question": "q", "answer": "a"}})
    with pytest.raises(FastVLMError, match=r"q.json: record 1: missing field 'imageId'"):
        TASKS["gqa"].load(p)
    p = write_json(tmp_path / "q2.json", [{"question": "q"}])
    with pytest.raises(FastVLMError, match="expected an object"):
        TASKS["gqa"].load(p)


# ---------------------------------------------------------------------------
# ScienceQA-IMG
# ---------------------------------------------------------------------------


def scienceqa_dir(tmp_path):
    d = tmp_path / "scienceqa"
    base = {"task": "closed choice", "lecture": "", "solution": "", "grade": "grade2", "category": "Geography",
            "skill": "Read a map"}  # fmt: skip
    write_json(d / "problems.json", {
        "5": {**base, "question": "Which of these states is farthest north?",
              "choices": ["West Virginia", "Louisiana", "Arizona", "Oklahoma"], "answer": 0, "hint": "",
              "image": "image.png", "subject": "social science", "split": "test"},
        "6": {**base, "question": "Which tense does the sentence use?", "choices": ["past", "future", "present"],
              "answer": 2, "hint": "Mona will print her name.", "image": None, "subject": "language science",
              "split": "test"},
        "7": {**base, "question": "Identify the question that Tom's experiment can best answer.",
              "choices": ["Does the ball roll farther?", "Do more balls fall?"], "answer": 1,
              "hint": "The passage below describes an experiment.", "image": "image.png",
              "subject": "natural science", "split": "test"},
        "8": {**base, "question": "Train question?", "choices": ["a", "b"], "answer": 0, "hint": "",
              "image": "image.png", "subject": "natural science", "split": "train"},
    })
    write_json(d / "pid_splits.json", {"train": ["8"], "val": [], "test": ["5", "6", "7"]})
    (d / "images" / "test").mkdir(parents=True)
    return d  # fmt: skip


def test_read_scienceqa_img(tmp_path):
    d = scienceqa_dir(tmp_path)
    samples = TASKS["scienceqa_img"].load(d / "problems.json")
    assert [s.id for s in samples] == ["5", "7"]  # "6" has no image, "8" is train
    s5, s7 = samples
    assert s5.image == str(d / "images" / "test" / "5" / "image.png")
    assert s5.references == ["A"] and s7.references == ["B"]
    assert s5.prompt == (
        "Which of these states is farthest north?\n"
        "A. West Virginia\nB. Louisiana\nC. Arizona\nD. Oklahoma\n" + MULTIPLE_CHOICE_PROMPT
    )
    assert s7.prompt == (
        "Context: The passage below describes an experiment.\n"
        "Identify the question that Tom's experiment can best answer.\n"
        "A. Does the ball roll farther?\nB. Do more balls fall?\n" + MULTIPLE_CHOICE_PROMPT
    )
    # the folder works too, and another split
    assert [s.id for s in TASKS["scienceqa_img"].load(d, split="train")] == ["8"]
    result = TASKS["scienceqa_img"].score(samples, ["A", "(B)"])
    assert result["scores"]["accuracy"] == 0.5  # LLaVA-1.5's reading, the headline, cannot read "(B)"
    assert result["scores"]["accuracy_lenient"] == 1.0
    assert result["breakdown"]["subject"]["social science"]["accuracy"] == 1.0


def test_scienceqa_malformed(tmp_path):
    d = scienceqa_dir(tmp_path)
    with pytest.raises(ConfigError, match="no split 'minitest'"):
        TASKS["scienceqa_img"].load(d, split="minitest")
    problems = json.loads((d / "problems.json").read_text())
    problems["5"]["answer"] = 9
    write_json(d / "problems.json", problems)
    with pytest.raises(FastVLMError, match=r"problems.json: record 5: answer index 9 is outside the 4 choices"):
        TASKS["scienceqa_img"].load(d)


# ---------------------------------------------------------------------------
# LLaVA / synthetic
# ---------------------------------------------------------------------------


def test_read_llava_conversations_and_qa(tmp_path):
    p = write_json(tmp_path / "eval.json", [
        {"id": "a1", "image": "imgs/a1.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the car?"},
            {"from": "gpt", "value": "Red"},
            {"from": "human", "value": "And the sky?"},
            {"from": "gpt", "value": "Blue"},
        ]},
        {"id": 2, "question": "What number is written?", "answer": "42", "image": ["x.png", "y.png"]},
        {"id": "t", "question": "Text only?", "answers": ["yes", "yeah"], "prompt": "Custom prompt <image>"},
    ])  # fmt: skip
    samples = TASKS["llava"].load(p)
    a, b, c = samples
    assert a.prompt == "And the sky?" and a.references == ["Blue"]
    assert a.extra["history"][0]["value"] == "<image>\nWhat color is the car?"
    assert a.images == [str(tmp_path / "imgs" / "a1.png")]
    assert b.id == "2" and b.prompt == f"What number is written?\n{SHORT_ANSWER_PROMPT}"
    assert len(b.images) == 2
    assert c.images == [] and c.prompt == "Custom prompt" and c.references == ["yes", "yeah"]
    assert TASKS["jsonl"].load(p)[0].id == "a1"


def test_synth_breakdown_per_type_and_text_size(tmp_path):
    p = write_lines(tmp_path / "synth.jsonl", [
        {"id": "0", "image": "0.png", "question": "What does the sign say?", "answer": "STOP",
         "question_type": "read_text", "text_size": 10},
        {"id": "1", "image": "1.png", "question": "What does the sign say?", "answer": "EXIT",
         "question_type": "read_text", "text_size": 40},
        {"id": "2", "image": "2.png", "question": "How many circles?", "answer": "3",
         "question_type": "count", "text_size": 40},
    ])  # fmt: skip
    samples = TASKS["synth"].load(p)
    assert samples[0].extra["question_type"] == "read_text"
    result = TASKS["synth"].score(samples, ["stop", "EXT", "3"])
    assert result["scores"]["accuracy"] == pytest.approx(2 / 3)
    bd = result["breakdown"]
    assert bd["question_type"]["read_text"]["accuracy"] == 0.5
    assert bd["question_type"]["count"]["accuracy"] == 1.0
    assert bd["text_size"]["[8,12)"] == {"n": 1, "accuracy": 1.0, "anls": 1.0}
    # "ext" vs "exit": 1 edit / 4 -> ANLS 0.75
    assert bd["text_size"]["[32,48)"]["anls"] == pytest.approx((0.75 + 1) / 2)


def test_synth_breakdown_follows_the_asked_turn(tmp_path):
    # A two-turn synthetic record: the top level describes the first turn (a position question), but the
    # evaluation asks the last turn (a word); its breakdown must say "read_word", with that word's text size.
    # Before this was fixed, 29 of the bundled model's 143 "position" items were other questions.
    conv = [{"from": "human", "value": "<image>\nIs the red star above or below the blue circle?"},
            {"from": "gpt", "value": "below"},
            {"from": "human", "value": "What word is shown in the image?"}, {"from": "gpt", "value": "sun"}]
    qa = [{"question_type": "position", "question": "Is the red star above or below the blue circle?",
           "answer": "below", "text_size": None, "params": {}},
          {"question_type": "read_word", "question": "What word is shown in the image?", "answer": "sun",
           "text_size": 6, "params": {}}]
    p = write_json(tmp_path / "synth.json", [
        {"id": "m", "image": "m.png", "conversations": conv, "qa": qa, "question_type": "position",
         "answer": "below", "text_size": None},
        {"id": "s", "image": "s.png", "conversations": conv[:2], "qa": qa[:1], "question_type": "position",
         "answer": "below", "text_size": None},
        {"id": "x", "image": "x.png", "conversations": conv, "qa": qa[:1], "question_type": "position"},  # misaligned
    ])  # fmt: skip
    m, single, misaligned = TASKS["synth"].load(p)
    assert m.prompt == "What word is shown in the image?" and m.references == ["sun"]
    assert m.extra["question_type"] == "read_word" and m.extra["text_size"] == 6
    assert single.extra["question_type"] == "position" and single.extra["text_size"] is None
    assert misaligned.extra["question_type"] == "position"  # a qa list that does not match is ignored
    bd = TASKS["synth"].score([m, single], ["sun", "above"])["breakdown"]["question_type"]
    assert bd == {"read_word": {"n": 1, "accuracy": 1.0, "anls": 1.0},
                  "position": {"n": 1, "accuracy": 0.0, "anls": 0.0}}


def test_text_size_bucket():
    assert text_size_bucket(5) == "<8"
    assert text_size_bucket(8) == "[8,12)"
    assert text_size_bucket(11.5) == "[8,12)"
    assert text_size_bucket(64) == ">=64"
    assert text_size_bucket("small") == "small"
    assert text_size_bucket(None) is None


def test_llava_malformed(tmp_path):
    p = write_json(tmp_path / "e.json", [{"id": "x", "conversations": [{"from": "human", "value": "hi"}]}])
    with pytest.raises(FastVLMError, match=r"e.json: record 0 \(id='x'\): conversations has no 'gpt' turn"):
        TASKS["llava"].load(p)
    p = write_json(tmp_path / "f.json", [{"id": "x", "question": "q"}])
    with pytest.raises(FastVLMError, match="missing field 'answer'"):
        TASKS["llava"].load(p)
    p = write_json(tmp_path / "g.json", [{"id": "x", "question": "q", "answer": "a"}, {"id": "x", "question": "q", "answer": "b"}])
    with pytest.raises(FastVLMError, match="duplicate sample id 'x'"):
        TASKS["llava"].load(p)
    p = write_json(tmp_path / "h.json", [{"question": "q", "answer": "a"}])
    with pytest.raises(FastVLMError, match="missing field 'id'"):
        TASKS["llava"].load(p)


def test_registry_and_load_options(tmp_path):
    for name in ("textvqa", "docvqa", "chartqa", "pope", "gqa", "scienceqa_img", "llava", "jsonl", "synth"):
        t = get_task(name)
        assert t.name == name and callable(t.reader) and callable(t.metric) and t.primary
    with pytest.raises(ConfigError, match="unknown eval task 'mmmu'"):
        get_task("mmmu")
    p = textvqa_file(tmp_path)
    samples = TASKS["textvqa"].load(p, limit=1, prompt_builder=lambda s: "Q: " + s.question)
    assert len(samples) == 1 and samples[0].prompt.startswith("Q: what")
    with pytest.raises(FastVLMError, match="image file"):
        TASKS["textvqa"].load(p, check_images=True)


# ---------------------------------------------------------------------------
# runner
# ---------------------------------------------------------------------------


def make_samples(n):
    return [Sample(id=f"s{i}", question=f"q{i}", prompt=f"q{i}", references=[f"a{i}"]) for i in range(n)]


class Predictor:
    """Answers right for even samples; raises after ``fail_after`` batches."""

    def __init__(self, fail_after=None):
        self.fail_after = fail_after
        self.seen = []
        self.calls = 0

    def __call__(self, batch):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.calls += 1
        self.seen.extend(s.id for s in batch)
        return [f"a{s.id[1:]}" if int(s.id[1:]) % 2 == 0 else "wrong" for s in batch]


def test_evaluate_runs_and_writes_summary(tmp_path):
    samples = make_samples(5)
    summary = evaluate("synth", samples, Predictor(), out_dir=tmp_path, batch_size=2, progress=False,
                       extra_summary={"model": "tiny", "resolution": 256, "ttft_ms": 12.5})  # fmt: skip
    assert summary["n"] == 5 and summary["n_predicted_this_run"] == 5 and summary["n_resumed"] == 0
    assert summary["scores"]["accuracy"] == pytest.approx(3 / 5)  # s0, s2, s4 right
    assert summary["model"] == "tiny" and summary["ttft_ms"] == 12.5
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["scores"] == summary["scores"] and on_disk["task"] == "synth"
    assert on_disk["finished_at"] >= on_disk["run_started_at"]
    assert len((tmp_path / "scores.jsonl").read_text().splitlines()) == 5
    assert read_predictions(tmp_path / "predictions.jsonl")["s1"] == "wrong"


def test_evaluate_resumes_after_crash(tmp_path):
    samples = make_samples(10)
    crashing = Predictor(fail_after=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        evaluate("synth", samples, crashing, out_dir=tmp_path, batch_size=3, progress=False)
    # two batches of 3 were flushed before the crash
    assert crashing.seen == ["s0", "s1", "s2", "s3", "s4", "s5"]
    assert len(read_predictions(tmp_path / "predictions.jsonl")) == 6
    assert not (tmp_path / "summary.json").exists()

    rest = Predictor()
    summary = evaluate("synth", samples, rest, out_dir=tmp_path, batch_size=3, progress=False)
    assert rest.seen == ["s6", "s7", "s8", "s9"]  # only the remaining samples
    assert summary["n"] == 10 and summary["n_resumed"] == 6 and summary["n_predicted_this_run"] == 4
    assert summary["scores"]["accuracy"] == pytest.approx(0.5)  # 5 even ids of 10
    assert len((tmp_path / "predictions.jsonl").read_text().splitlines()) == 10

    # a third run predicts nothing and gives the same scores
    again = Predictor()
    summary3 = evaluate("synth", samples, again, out_dir=tmp_path, batch_size=3, progress=False)
    assert again.seen == [] and summary3["scores"] == summary["scores"]


def test_evaluate_tolerates_truncated_last_line(tmp_path):
    samples = make_samples(4)
    pred_file = tmp_path / "predictions.jsonl"
    pred_file.write_text(
        json.dumps({"id": "s0", "prediction": "a0"}) + "\n"
        + json.dumps({"id": "s1", "prediction": "a1"}) + "\n"
        + '{"id": "s2", "predic',  # cut short by a crash
        encoding="utf-8",
    )  # fmt: skip
    assert set(read_predictions(pred_file)) == {"s0", "s1"}
    p = Predictor()
    summary = evaluate("synth", samples, p, out_dir=tmp_path, batch_size=8, progress=False)
    assert p.seen == ["s2", "s3"]
    assert summary["scores"]["accuracy"] == pytest.approx(3 / 4)  # s0 a0, s1 a1, s2 a2 right; s3 wrong
    lines = pred_file.read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(line) for line in lines)  # the partial line is gone


def test_evaluate_complete_last_line_without_newline(tmp_path):
    pred_file = tmp_path / "predictions.jsonl"
    pred_file.write_text(json.dumps({"id": "s0", "prediction": "a0"}), encoding="utf-8")
    p = Predictor()
    evaluate("synth", make_samples(2), p, out_dir=tmp_path, progress=False)
    assert p.seen == ["s1"]
    assert [json.loads(x)["id"] for x in pred_file.read_text().splitlines()] == ["s0", "s1"]


def test_evaluate_errors(tmp_path):
    samples = make_samples(3)
    with pytest.raises(FastVLMError, match="returned 1 answers for a batch of 3"):
        evaluate("synth", samples, lambda b: ["x"], out_dir=tmp_path / "a", progress=False)
    with pytest.raises(FastVLMError, match="returned a int"):
        evaluate("synth", samples, lambda b: [1] * len(b), out_dir=tmp_path / "b", progress=False)
    with pytest.raises(FastVLMError, match="duplicate sample id 's0'"):
        evaluate("synth", samples + samples[:1], Predictor(), out_dir=tmp_path / "c", progress=False)
    with pytest.raises(ConfigError, match="clash"):
        evaluate("synth", samples, Predictor(), out_dir=tmp_path / "d", progress=False, extra_summary={"n": 1})
    evaluate("synth", samples, Predictor(), out_dir=tmp_path / "e", progress=False)
    with pytest.raises(ConfigError, match="holds a run of task 'synth'"):
        evaluate("gqa", samples, Predictor(), out_dir=tmp_path / "e", progress=False)
    bad = tmp_path / "f"
    bad.mkdir()
    (bad / "predictions.jsonl").write_text("garbage\n" + json.dumps({"id": "s0", "prediction": "a0"}) + "\n")
    with pytest.raises(FastVLMError, match="line 1 is not valid JSON"):
        evaluate("synth", samples, Predictor(), out_dir=bad, progress=False)


def test_resume_with_other_settings_is_refused(tmp_path):
    samples = make_samples(3)
    first = {"model": "/m/a", "resolution": 256, "decoding": {"greedy": True, "max_new_tokens": 8}}
    evaluate("synth", samples[:2], Predictor(), out_dir=tmp_path / "r", progress=False, settings=first)
    # the same settings resume: only the new sample is predicted
    p = Predictor()
    s = evaluate("synth", samples, p, out_dir=tmp_path / "r", progress=False, settings=dict(first))
    assert p.seen == ["s2"] and s["n_resumed"] == 2
    # another model or decoding would mix two runs' predictions into one score: refused, naming what changed
    for change, name in (({"model": "/m/b"}, "model: '/m/a' then, '/m/b' now"),
                         ({"decoding": {"greedy": True, "max_new_tokens": 1}}, "decoding:")):
        p = Predictor()
        with pytest.raises(ConfigError, match="other settings") as ei:
            evaluate("synth", samples, p, out_dir=tmp_path / "r", progress=False, settings={**first, **change})
        assert name in str(ei.value) and "--out" in str(ei.value) and p.seen == []
    # a folder from before settings were recorded is resumed, and records them from then on
    old = tmp_path / "old"
    evaluate("synth", samples[:1], Predictor(), out_dir=old, progress=False)
    evaluate("synth", samples, Predictor(), out_dir=old, progress=False, settings=first)
    assert json.loads((old / "run.json").read_text())["settings"] == first
    with pytest.raises(ConfigError, match="other settings"):
        evaluate("synth", samples, Predictor(), out_dir=old, progress=False, settings={**first, "resolution": 512})


def test_evaluate_limit_and_score_predictions(tmp_path):
    samples = make_samples(6)
    summary = evaluate("synth", samples, Predictor(), out_dir=tmp_path, limit=4, progress=False)
    assert summary["n"] == 4 and summary["limit"] == 4
    preds = read_predictions(tmp_path / "predictions.jsonl")
    rescored = score_predictions("synth", samples[:4], preds)
    assert rescored["scores"] == summary["scores"]
    with pytest.raises(FastVLMError, match="have no prediction"):
        score_predictions("synth", samples, preds)
    # raising the limit later predicts only the new samples
    p = Predictor()
    summary = evaluate("synth", samples, p, out_dir=tmp_path, progress=False)
    assert p.seen == ["s4", "s5"] and summary["n"] == 6


def test_evaluate_with_a_real_reader(tmp_path):
    d = pope_files(tmp_path)
    samples = TASKS["pope"].load(d)
    answers = {"random/1": "Yes", "random/2": "No", "adversarial/1": "Yes", "adversarial/2": "No"}
    summary = evaluate(
        "pope", samples, lambda batch: [answers[s.id] for s in batch], out_dir=tmp_path / "out", progress=False
    )
    assert summary["scores"]["f1"] == 1.0 and summary["primary_metric"] == "f1"
    assert set(summary["breakdown"]["category"]) == {"random", "adversarial"}
    assert os.path.exists(tmp_path / "out" / "run.json")
