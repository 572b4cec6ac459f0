"""The model bundled in the package: it loads by default, answers the README's question about
examples/, and an end-to-end `fastvlm eval` on the start of the synthetic test split (the
same samples as the full split's first records: generation is prefix-stable) scores as its
measured accuracy says it should."""

import json
import os

import pytest

from fastvlm.cli import main
from fastvlm.commands.common import bundled_model_path
from fastvlm.data.synth import generate_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_TEST = 140  # 20 of each first-turn question type


@pytest.fixture(scope="module")
def test_split(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "basic"
    # the split scripts/train_bundled_model.sh evaluates on (its first N_TEST records)
    generate_dataset(out, num_train=0, num_val=0, num_test=N_TEST, image_size=256, level="basic", progress=False)
    return out


def test_bundled_model_eval_end_to_end(test_split, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", "--task", "synth", "--data", str(test_split / "test.json"), "--out", str(out),
                 "--device", "cpu", "--dtype", "fp32", "--no-progress", "--ttft-samples", "1",
                 "--batch-size", "35"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == N_TEST and summary["resolution"] == 256
    by_type = summary["breakdown"]["question_type"]
    assert set(by_type) == {"count", "color", "shape", "position", "exists", "read_word", "read_number"}
    # The full 1,000-question split scores 83.2% (README): colour 100%, shape 99%, count 79%, position 79%, words
    # 77%; these 140 questions 85.0%, with words 17 of 21 and counts 18 of 22 (types of the turn asked). The model
    # shipped before it: 80.9% and 78.6% (counts 21 of 22, positions at chance). A model answering from the
    # question alone (the model shipped first) scores 24.6%, colour 13% and shape 28% (7 colours, 5
    # shapes); the model shipped before the current encoder, which could not read, 63.1% with words 21%
    # (24 candidates); the one shipped before the 80.9% one (stage 1 half as long) 76.4% here, counts 64% on the
    # full split. These bounds fail for a model that ignores the image, does not read, does not count or answers
    # two-object positions at chance.
    assert summary["scores"]["accuracy"] >= 0.72, by_type
    for qtype in ("color", "shape"):
        assert by_type[qtype]["accuracy"] >= 0.8, (qtype, by_type[qtype])
    assert by_type["count"]["accuracy"] >= 0.75, by_type["count"]
    assert by_type["read_word"]["accuracy"] >= 0.5, by_type["read_word"]
    assert by_type["position"]["accuracy"] >= 0.65, by_type["position"]  # 16 of 18 here; chance is about half


@pytest.mark.parametrize("image,question,answer", [
    ("shapes.png", "How many diamonds are in the image?", "3"),  # the README's first command
    ("colors.png", "What is the color of the circle?", "blue"),
])
def test_readme_quick_start_answers(image, question, answer, capsys):
    # examples/ come from a seed the model never trained on (scripts/make_examples.py)
    # the README's first command, with its defaults (the bundled model, the fast path, auto dtype)
    assert main(["generate", "--image", os.path.join(ROOT, "examples", image), "--prompt", question,
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["answer"].strip().lower() == answer, result


def test_bundled_model_fits_the_package_budget():
    path = bundled_model_path()
    assert os.path.isfile(os.path.join(path, "config.json"))
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    assert size <= 25 * 2**20  # the budget for weights inside the package


def test_native_decode_loop_answers_as_transformers_loop(test_split, tmp_path, monkeypatch):
    """The trained model at batch 1 in bf16 (the CLI's defaults on this kind of CPU): the native decode loop
    (fastvlm.kernels.decode_model) gives the answers transformers' loop gives on the same weights."""
    import torch

    from fastvlm import generation, kernels

    if not kernels.available(torch.bfloat16):
        pytest.skip(kernels.status())
    used = []
    real = generation.native_decoder

    def spy(lm, capacity):
        decoder = real(lm, capacity)
        used.append(decoder is not None)
        return decoder

    monkeypatch.setattr(generation, "native_decoder", spy)
    args = ["eval", "--task", "synth", "--data", str(test_split / "test.json"), "--device", "cpu", "--dtype", "bf16",
            "--no-progress", "--ttft-samples", "1", "--batch-size", "1"]
    assert main(args + ["--out", str(tmp_path / "native")]) == 0
    assert len(used) >= 1 and all(used)  # every request that decoded past its first token did so natively
    monkeypatch.setattr(generation, "native_decoder", lambda lm, capacity: None)
    assert main(args + ["--out", str(tmp_path / "loop")]) == 0

    def answers(name):
        rows = [json.loads(line) for line in (tmp_path / name / "predictions.jsonl").read_text().splitlines()]
        return {r["id"]: r["prediction"] for r in rows}

    native, loop = answers("native"), answers("loop")
    assert len(native) == N_TEST and native.keys() == loop.keys()
    same = sum(native[k] == loop[k] for k in native)
    # 300 of 300 on another seed's split in a dev run; a near-tie may flip one here or there on another CPU
    assert same >= N_TEST - 2, [(k, native[k], loop[k]) for k in native if native[k] != loop[k]]
    # the answers are one to three tokens, so also longer greedy runs with the end token ignored, on examples/
    from fastvlm import FastVLM
    from fastvlm.processing import load_image

    model = FastVLM.from_pretrained(bundled_model_path(), device="cpu", dtype=torch.bfloat16)
    model.optimize_for_inference("fast")
    for image in ("shapes.png", "word.png", "number.png"):
        inputs = model.processor(images=[load_image(os.path.join(ROOT, "examples", image))],
                                 text=model.processor.apply_chat_template(
                                     [{"role": "user", "content": [{"type": "image"},
                                                                   {"type": "text", "text": "Describe the image."}]}],
                                     add_generation_prompt=True))
        monkeypatch.setattr(generation, "native_decoder", spy)
        used.clear()
        got = model.generate(**dict(inputs), max_new_tokens=24, eos_token_id=[])
        assert used == [True]
        monkeypatch.setattr(generation, "native_decoder", lambda lm, capacity: None)
        assert got.tolist() == model.generate(**dict(inputs), max_new_tokens=24, eos_token_id=[]).tolist()


@pytest.fixture(scope="module")
def cpu_fp32_answers(test_split, tmp_path_factory):
    out = tmp_path_factory.mktemp("cpu-fp32")
    assert main(["eval", "--task", "synth", "--data", str(test_split / "test.json"), "--out", str(out), "--device",
                 "cpu", "--dtype", "fp32", "--exact", "--no-progress", "--ttft-samples", "1", "--batch-size", "35"]) == 0
    return _predictions(out)


def _predictions(folder):
    with open(os.path.join(folder, "predictions.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["id"]: r["prediction"] for r in rows}


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,exact,batch", [("fp32", True, 35), ("bf16", False, 35), ("fp16", False, 35),
                                               ("bf16", False, 1)])
def test_cuda_answers_as_the_cpu(test_split, cpu_fp32_answers, tmp_path, dtype, exact, batch):
    """The trained model on a CUDA GPU, batched (padded prompts) and at batch 1, in each dtype: the answers the
    CPU's fp32 reference arithmetic gives. fp32 on the GPU differs from the CPU's only in summation order; bf16
    and fp16 round, so a near-tie may flip an answer or two of the 140."""
    args = ["eval", "--task", "synth", "--data", str(test_split / "test.json"), "--out", str(tmp_path / "gpu"),
            "--device", "cuda", "--dtype", dtype, "--no-progress", "--ttft-samples", "1", "--batch-size", str(batch)]
    assert main(args + (["--exact"] if exact else [])) == 0
    got = _predictions(tmp_path / "gpu")
    assert got.keys() == cpu_fp32_answers.keys()
    differ = [(k, cpu_fp32_answers[k], got[k]) for k in got if got[k] != cpu_fp32_answers[k]]
    assert len(differ) <= (1 if dtype == "fp32" else 4), differ
