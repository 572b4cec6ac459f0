"""`fastvlm eval` end to end on a tiny random model and a LLaVA-format file: summary,
scores, TTFT, resuming after --limit and after an interruption."""

import json

import pytest

from fastvlm.cli import main
from fastvlm.eval.glue import TimingLog, stats
from fastvlm.eval.tasks import TASKS

N_SAMPLES = 7


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "model"
    assert main(["init", "--preset", "fastvlm-tiny", "--out", str(out), "--dtype", "fp32"]) == 0
    return out


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    from PIL import Image, ImageDraw

    root = tmp_path_factory.mktemp("data")
    (root / "images").mkdir()
    for k, color in enumerate(("red", "blue", "green")):
        img = Image.new("RGB", (96, 64), "white")
        ImageDraw.Draw(img).ellipse([10 + 10 * k, 10, 50 + 10 * k, 50], fill=color)
        img.save(root / "images" / f"{k}.png")
    records = []
    for i in range(N_SAMPLES):
        rec = {"id": f"q{i}", "image": f"images/{i % 3}.png", "question_type": ["count", "color"][i % 2],
               "text_size": 8 + 4 * i}
        if i % 2:
            rec.update(question="What color is the circle?", answer=["red", "blue", "green"][i % 3])
        else:
            rec["conversations"] = [{"from": "human", "value": "<image>\nHow many circles are there?"},
                                    {"from": "gpt", "value": "1"}]
        records.append(rec)
    path = root / "test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def run_eval(tiny_dir, data_file, out, *extra):
    return main(["eval", "--model", str(tiny_dir), "--task", "synth", "--data", str(data_file), "--out", str(out),
                 "--device", "cpu", "--dtype", "fp32", "--no-progress", "--ttft-samples", "2",
                 "--max-new-tokens", "4", *extra])


def read_lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture
def count_requests(monkeypatch):
    """Counts the requests that reach FastVLM.chat_batch (the batched eval path)."""
    from fastvlm.model import FastVLM

    seen = []
    original = FastVLM.chat_batch

    def counting(self, requests, **kw):
        seen.append(len(requests))
        return original(self, requests, **kw)

    monkeypatch.setattr(FastVLM, "chat_batch", counting)
    return seen


def test_eval_end_to_end_then_resume_after_limit(tiny_dir, data_file, tmp_path, capsys, count_requests):
    out = tmp_path / "run"
    assert run_eval(tiny_dir, data_file, out, "--limit", "2", "--batch-size", "2") == 0
    assert len(read_lines(out / "predictions.jsonl")) == 2
    assert sum(count_requests) == 2
    first = json.loads((out / "summary.json").read_text())
    assert first["n"] == 2 and first["limit"] == 2 and first["n_predicted_this_run"] == 2

    count_requests.clear()
    assert run_eval(tiny_dir, data_file, out, "--batch-size", "3") == 0
    preds = read_lines(out / "predictions.jsonl")
    assert len(preds) == N_SAMPLES and [p["id"] for p in preds] == [f"q{i}" for i in range(N_SAMPLES)]
    assert sum(count_requests) == N_SAMPLES - 2 and count_requests == [3, 2]  # only the rest was predicted

    s = json.loads((out / "summary.json").read_text())
    assert s["task"] == "synth" and s["n"] == N_SAMPLES
    assert s["n_resumed"] == 2 and s["n_predicted_this_run"] == N_SAMPLES - 2
    assert set(s["scores"]) == {"accuracy", "anls"} and all(0.0 <= v <= 1.0 for v in s["scores"].values())
    assert "question_type" in s["breakdown"] and "text_size" in s["breakdown"]
    assert s["model"] == str(tiny_dir)
    assert s["resolution"] == 128 and s["num_image_tokens"] > 0
    assert s["device"] == "cpu" and s["dtype"] == "float32"
    assert s["decoding"] == {"greedy": True, "max_new_tokens": 4}
    # TTFT: batch 1 on the first samples, and per request of this run's batches
    t1 = s["ttft_batch1"]
    assert t1["batch_size"] == 1 and t1["ttft_s"]["n"] == 2 and t1["ttft_s"]["median"] > 0
    assert t1["sample_ids"] == ["q0", "q1"]
    tb = s["ttft"]
    assert tb["batch_size"] == 3 and tb["n_requests"] == N_SAMPLES - 2 and tb["n_batches"] == 2
    assert tb["ttft_s"]["n"] == N_SAMPLES - 2 and tb["ttft_s"]["median"] > 0
    # scores.jsonl agrees with the predictions
    scores = read_lines(out / "scores.jsonl")
    assert [r["prediction"] for r in scores] == [p["prediction"] for p in preds]
    for metric in ("accuracy", "anls"):  # the summary's scores are the per-sample scores' means
        assert s["scores"][metric] == pytest.approx(sum(r[metric] for r in scores) / len(scores)), metric
    by_type = s["breakdown"]["question_type"]
    assert by_type["count"]["n"] + by_type["color"]["n"] == N_SAMPLES
    printed = capsys.readouterr().out
    assert "synth: n=7" in printed and "accuracy" in printed and "TTFT batch 1" in printed


def test_rerun_with_other_settings_is_refused_before_ttft(tiny_dir, data_file, tmp_path, capsys, monkeypatch):
    import fastvlm.eval.glue as glue

    out = tmp_path / "run"
    assert run_eval(tiny_dir, data_file, out, "--limit", "1", "--ttft-samples", "0") == 0
    measured = []
    monkeypatch.setattr(glue, "measure_batch1_ttft", lambda *a, **k: measured.append(1))
    capsys.readouterr()
    assert run_eval(tiny_dir, data_file, out, "--exact") == 1  # the attention mode is a setting
    err = capsys.readouterr().err
    assert "other settings (attention: 'sdpa' then, 'eager' now)" in err, err
    assert measured == []  # refused before the (slow) TTFT measurement


def test_weights_changed_in_place_are_refused_and_the_same_weights_resume(
        tiny_dir, data_file, tmp_path, capsys):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    model = tmp_path / "m"
    shutil.copytree(tiny_dir, model)
    out = tmp_path / "run"
    assert run_eval(model, data_file, out, "--limit", "2", "--ttft-samples", "0") == 0
    # the same path, other weights (retrained or converted in place): its predictions are not this model's
    w = load_file(str(model / "model.safetensors"))
    w["mm_projector.0.bias"] = w["mm_projector.0.bias"] + 1.0
    save_file(w, str(model / "model.safetensors"), metadata={"format": "pt"})
    capsys.readouterr()
    assert run_eval(model, data_file, out, "--ttft-samples", "0") == 1
    err = capsys.readouterr().err
    assert "other settings (weights_files: " in err, err
    # a folder from before the weight files were recorded: resumed, and they are recorded from then on
    run = json.loads((out / "run.json").read_text())
    del run["settings"]["weights_files"]
    (out / "run.json").write_text(json.dumps(run))
    assert run_eval(model, data_file, out, "--ttft-samples", "0", "--limit", "3") == 0
    assert "(1 predicted this run, 2 resumed)" in capsys.readouterr().out
    assert "weights_files" in json.loads((out / "run.json").read_text())["settings"]
    # the weights as they were (the file's times too, as a copy that keeps them): resumed
    w["mm_projector.0.bias"] = w["mm_projector.0.bias"] - 1.0
    assert torch.equal(w["mm_projector.0.bias"], load_file(str(tiny_dir / "model.safetensors"))["mm_projector.0.bias"])
    shutil.copy2(tiny_dir / "model.safetensors", model / "model.safetensors")
    out2 = tmp_path / "run2"
    assert run_eval(model, data_file, out2, "--limit", "2", "--ttft-samples", "0") == 0
    shutil.copy2(tiny_dir / "model.safetensors", model / "model.safetensors")  # rewritten, times kept
    assert run_eval(model, data_file, out2, "--ttft-samples", "0") == 0
    assert "(5 predicted this run, 2 resumed)" in capsys.readouterr().out


def test_out_that_is_a_file_and_duplicate_keys_are_one_line_errors(tiny_dir, data_file, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, words in ((afile, "exists and is not a directory"), (afile / "sub", "is a file, so the folder")):
        assert run_eval(tiny_dir, data_file, out) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert words in err[-1] and "Traceback" not in "\n".join(err), err
    gqa = tmp_path / "gqa.json"
    (tmp_path / "0.png").write_bytes((data_file.parent / "images" / "0.png").read_bytes())
    gqa.write_text('{"g1": {"imageId": "0", "question": "a?", "answer": "x"}, '
                   '"g1": {"imageId": "0", "question": "b?", "answer": "y"}}')
    from fastvlm.errors import FastVLMError

    with pytest.raises(FastVLMError, match="the key 'g1' appears twice"):
        TASKS["gqa"].load(gqa, tmp_path)


def test_resume_after_interruption(tiny_dir, data_file, tmp_path, monkeypatch):
    from fastvlm.model import FastVLM

    out = tmp_path / "run"
    original = FastVLM.chat_batch
    calls = []

    def interrupted(self, requests, **kw):
        calls.append(len(requests))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, requests, **kw)

    monkeypatch.setattr(FastVLM, "chat_batch", interrupted)
    assert run_eval(tiny_dir, data_file, out, "--batch-size", "3", "--ttft-samples", "0") == 130
    assert len(read_lines(out / "predictions.jsonl")) == 3  # the first batch was kept
    assert not (out / "summary.json").exists()

    calls.clear()
    monkeypatch.setattr(FastVLM, "chat_batch", lambda self, requests, **kw: (calls.append(len(requests)),
                                                                              original(self, requests, **kw))[1])
    assert run_eval(tiny_dir, data_file, out, "--batch-size", "3", "--ttft-samples", "0") == 0
    assert calls == [3, 1]
    s = json.loads((out / "summary.json").read_text())
    assert s["n"] == N_SAMPLES and s["n_resumed"] == 3 and s["ttft_batch1"] is None
    assert len(read_lines(out / "predictions.jsonl")) == N_SAMPLES


def test_missing_image_fails_before_loading(data_file, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": "a", "image": "nope.png", "question": "q?", "answer": "x"}]))
    rc = main(["eval", "--model", str(tmp_path / "no-model"), "--task", "llava", "--data", str(bad),
               "--out", str(tmp_path / "o")])
    assert rc == 1
    assert "not found" in capsys.readouterr().err


def test_unreadable_image_names_its_record_and_keeps_the_predictions(tiny_dir, data_file, tmp_path, capsys):
    records = [json.loads(line) for line in data_file.read_text(encoding="utf-8").splitlines()]
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    for r in records:
        r["image"] = str(data_file.parent / r["image"])
    records[4]["image"] = str(tmp_path / "broken.png")
    bad = tmp_path / "test.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    out = tmp_path / "run"
    assert run_eval(tiny_dir, bad, out, "--batch-size", "3", "--ttft-samples", "0") == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("fastvlm eval: error: record 'q4': ") and "broken.png" in err, err
    assert "or pass --skip-bad" in err and "predictions written so far are kept" in err
    assert len(read_lines(out / "predictions.jsonl")) == 3  # the batch before the bad record's
    # --skip-bad: the record is named and left out, the rest resumes and is scored
    assert run_eval(tiny_dir, bad, out, "--batch-size", "3", "--ttft-samples", "1", "--skip-bad") == 0
    assert "skipping record 'q4': " in capsys.readouterr().err
    s = json.loads((out / "summary.json").read_text())
    assert s["n"] == N_SAMPLES - 1 and s["n_resumed"] == 3 and s["n_predicted_this_run"] == N_SAMPLES - 4
    assert s["skipped_bad_records"]["count"] == 1 and s["skipped_bad_records"]["examples"][0]["id"] == "q4"
    assert "q4" not in {r["id"] for r in read_lines(out / "scores.jsonl")}


def synth_folder(data_file, tmp_path):
    """A `fastvlm data synth`-style folder whose test.json holds data_file's records (absolute image paths)."""
    split = tmp_path / "synth"
    split.mkdir()
    records = [json.loads(line) for line in data_file.read_text(encoding="utf-8").splitlines()]
    for r in records:
        r["image"] = str(data_file.parent / r["image"])
    (split / "test.json").write_text(json.dumps(records), encoding="utf-8")
    return split


def test_data_folders(data_file, tmp_path):
    from fastvlm.errors import FastVLMError

    split = synth_folder(data_file, tmp_path)
    # a `fastvlm data synth` folder means its test split
    assert [x.id for x in TASKS["synth"].load(split)] == [x.id for x in TASKS["synth"].load(split / "test.json")]
    with pytest.raises(FastVLMError, match="is a folder; this task reads one file"):
        TASKS["llava"].load(split)
    (split / "test.json").rename(split / "val.json")
    with pytest.raises(FastVLMError, match="no test.json in this folder.*one of: val.json"):
        TASKS["synth"].load(split)


def test_help_lists_tasks_and_formats(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for name in TASKS:
        assert name in text
    for words in ("predictions.jsonl", "summary.json", "conversations", "TextVQA_0.5.1_val.json", "--image-root"):
        assert words in text


def test_timing_helpers():
    s = stats([0.3, 0.1, 0.2, 0.4])
    assert s["n"] == 4 and s["median"] == pytest.approx(0.25) and s["mean"] == pytest.approx(0.25)
    assert s["min"] == 0.1 and s["max"] == 0.4 and s["p90"] == 0.4
    assert stats([]) is None

    class T:
        ttft_s, encode_s, prefill_s, decode_s, new_tokens, prompt_tokens, decode_tokens_per_s = 0.5, 0.2, 0.3, 1, 8, 9, 7.0

    log = TimingLog()
    log.add(T(), 4)
    T.ttft_s = 0.1
    log.add(T(), 1)
    summary = log.summary(4)
    assert summary["n_requests"] == 5 and summary["n_batches"] == 2
    assert summary["ttft_s"]["median"] == pytest.approx(0.5)  # four requests waited 0.5 s, one 0.1 s
    assert summary["ttft_s_per_batch"]["mean"] == pytest.approx(0.3)
    assert TimingLog().summary(8) is None


def test_printed_summary_shows_counts_as_counts(capsys):
    from fastvlm.eval.cli import print_summary

    print_summary({"task": "pope", "primary_metric": "f1", "n": 3, "n_predicted_this_run": 3, "n_resumed": 0,
                   "scores": {"f1": 0.8, "tp": 2, "fp": 1, "n": 3, "yes_ratio": 1.0}}, "out")
    lines = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()[1:-1]}
    assert lines == {"f1": "80.00", "tp": "2", "fp": "1", "n": "3", "yes_ratio": "100.00"}  # scores x100, counts not


def test_a_synth_folder_and_its_test_json_are_the_same_run(tiny_dir, data_file, tmp_path, capsys):
    split = synth_folder(data_file, tmp_path)
    out = tmp_path / "out"
    assert run_eval(tiny_dir, split, out, "--limit", "2") == 0
    capsys.readouterr()
    assert run_eval(tiny_dir, split / "test.json", out) == 0, capsys.readouterr().err  # resumed, not refused
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_resumed"] == 2 and summary["data"] == str(split / "test.json")
    # a run recorded by an older version under the folder's name resumes too
    run = json.loads((out / "run.json").read_text())
    run["settings"]["data"] = str(split)
    (out / "run.json").write_text(json.dumps(run))
    capsys.readouterr()
    assert run_eval(tiny_dir, split, out) == 0, capsys.readouterr().err
