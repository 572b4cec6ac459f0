"""The lmms-eval model `fastvlm` (fastvlm.eval.lmms) on the tiny random model.

Requests are lmms-eval ``Instance`` objects when lmms-eval is installed, else a minimal
stand-in with the same ``args`` tuple; the tests at the end that need the real
lmms-eval (registry, entry point, its command line) are skipped without it.
"""

import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

from fastvlm.errors import ConfigError
from fastvlm.generation import build_chat_inputs
from fastvlm.eval.lmms import lmms_eval_available
from fastvlm.eval.lmms.model import FastVLMLmms, parse_arg_string

HAVE_LMMS_EVAL = lmms_eval_available()
needs_lmms_eval = pytest.mark.skipif(not HAVE_LMMS_EVAL, reason="lmms-eval is not installed")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TASK, SPLIT = "toy", "test"


def instance(request_type, arguments, doc_id=0):
    if HAVE_LMMS_EVAL:
        from lmms_eval.api.instance import Instance

        return Instance(request_type=request_type, arguments=arguments, idx=0,
                        metadata={"task": TASK, "doc_id": doc_id, "repeats": 1})
    return SimpleNamespace(request_type=request_type, arguments=arguments, args=arguments)


def doc_to_visual(doc):
    return [doc["image"]]


@pytest.fixture(scope="module")
def docs():
    from PIL import Image, ImageDraw

    out = []
    for k, color in enumerate(("red", "blue", "green")):
        img = Image.new("RGB", (80, 60), "white")
        ImageDraw.Draw(img).rectangle([5 + 8 * k, 5, 40 + 8 * k, 40], fill=color)
        out.append({"image": img, "question": f"What color is shape {k}?", "answer": color})
    return out


@pytest.fixture
def lm(tiny_model, docs):
    m = FastVLMLmms(model=tiny_model, batch_size=2, progress=False)
    m.task_dict = {TASK: {SPLIT: docs}}
    return m


def gen_request(doc_id, context, **gen_kwargs):
    return instance("generate_until", (context, gen_kwargs, doc_to_visual, doc_id, TASK, SPLIT), doc_id)


def ll_request(doc_id, context, continuation):
    return instance("loglikelihood", (context, continuation, doc_to_visual, doc_id, TASK, SPLIT), doc_id)


# ---------------------------------------------------------------------------
# generate_until
# ---------------------------------------------------------------------------


def test_generate_until_matches_chat_and_keeps_order(lm, tiny_model, docs):
    contexts = ["What is in the image?", "Describe it.", "How many shapes are there in this picture?"]
    reqs = [gen_request(k, c, max_new_tokens=6, temperature=0, do_sample=False) for k, c in enumerate(contexts)]
    got = lm.generate_until(reqs)  # batch_size 2: one batch of 2 and one of 1, longest first
    want = [tiny_model.chat([docs[k]["image"]], c, max_new_tokens=6) for k, c in enumerate(contexts)]
    assert got == want
    # an explicit <image> in the context places the image there instead of first
    placed = lm.generate_until([gen_request(0, "<image>\nWhat is in the image?", max_new_tokens=6)])
    assert placed == [want[0]]


def test_generate_until_honours_max_new_tokens_and_until(lm, tiny_model, docs):
    tok = tiny_model.processor.tokenizer
    context = "What is in the image?"
    lm.generate_until([gen_request(0, context, max_new_tokens=3)])
    assert tiny_model.last_timings.new_tokens <= 3

    full = lm.generate_batch([([docs[0]["image"]], context)], {"max_new_tokens": 24, "do_sample": False})[0]
    assert tiny_model.last_timings.new_tokens > 6, "the tiny model should not stop at once"
    inputs = build_chat_inputs(tiny_model.processor, [docs[0]["image"]], context)
    raw = tok.decode(tiny_model.generate(**inputs, max_new_tokens=24)[0].tolist(), skip_special_tokens=True)
    assert raw.strip() == full
    # a stop string from the middle of the free answer: the answer is cut before it, and decoding stops early
    stop = next(raw[k:k + 2] for k in range(len(raw) // 3, len(raw) - 2)
                if "\ufffd" not in raw[k:k + 2] and raw[k:k + 2].strip() and raw.find(raw[k:k + 2]) > 0)
    got = lm.generate_until([gen_request(0, context, max_new_tokens=24, until=[stop, "NEVER-SEEN"])])
    assert got == [raw.split(stop)[0].strip()]
    assert tiny_model.last_timings.new_tokens < 24
    # a single string works as well
    assert lm.generate_until([gen_request(0, context, max_new_tokens=24, until=stop)]) == got


def test_sampling_arguments(lm, docs):
    greedy, until = lm._sampling({"max_new_tokens": 5, "temperature": 0, "until": ["\n\n", ""]})
    assert greedy["do_sample"] is False and greedy["max_new_tokens"] == 5 and until == ["\n\n"]
    s, _ = lm._sampling({"temperature": 0.7})
    assert s["do_sample"] is True and s["temperature"] == 0.7 and s["max_new_tokens"] == lm.max_new_tokens
    s, _ = lm._sampling({"temperature": 0.7, "do_sample": False})  # do_sample, when given, decides
    assert s["do_sample"] is False
    s, _ = lm._sampling({"do_sample": True, "temperature": 0, "top_p": None, "num_beams": 1})
    assert s["do_sample"] is True and s["temperature"] == 1.0 and s["top_p"] == 1.0  # transformers' meaning
    # sampling is honoured: seeded sampling is reproducible and differs from greedy somewhere
    reqs = [gen_request(k, "Describe it.", max_new_tokens=8, do_sample=True, temperature=1.5, seed=3) for k in range(3)]
    a, b = lm.generate_until(reqs), lm.generate_until(reqs)
    assert a == b
    g = lm.generate_until([gen_request(k, "Describe it.", max_new_tokens=8) for k in range(3)])
    assert a != g


def test_generate_until_multi_round(lm, tiny_model, docs):
    seen = []

    def doc_to_text(doc, previous_output=None, round_idx=None, previous_round_info=None):
        seen.append((round_idx, list(previous_output), previous_round_info))
        if round_idx == 3:
            return None, None, True, previous_output, None
        return [doc["image"]], f"Round {round_idx}: and then?", False, previous_output, {"round": round_idx}

    req = instance("generate_until_multi_round",
                   ("First question?", {"max_new_tokens": 4}, doc_to_visual, doc_to_text, 1, TASK, SPLIT), 1)
    [rounds] = lm.generate_until_multi_round([req])
    assert len(rounds) == 3
    assert rounds[0] == tiny_model.chat([docs[1]["image"]], "First question?", max_new_tokens=4)
    assert rounds[1] == tiny_model.chat([docs[1]["image"]], "Round 1: and then?", max_new_tokens=4)
    assert [r for r, _, _ in seen] == [1, 2, 3]
    assert seen[1][1] == rounds[:2] and seen[1][2] == {"round": 1}


# ---------------------------------------------------------------------------
# loglikelihood
# ---------------------------------------------------------------------------


def direct_loglikelihood(model, image, context, continuation):
    """Sum of log-softmax over the continuation's tokens, from one unpadded forward pass."""
    proc = model.processor
    content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": context}]
    prompt = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    ctx = proc.tokenize(prompt)
    whole = proc.tokenize(prompt + continuation)
    assert whole[: len(ctx)] == ctx
    cont = whole[len(ctx):]
    pixels = proc.process_images([image]) if image is not None else None
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([whole]), pixel_values=pixels).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    picked = [lp[len(ctx) - 1 + k] for k in range(len(cont))]
    total = sum(float(p[t]) for p, t in zip(picked, cont))
    greedy = all(int(p.argmax()) == t for p, t in zip(picked, cont))
    return total, greedy, ctx, cont, lp[len(ctx) - 1]


def test_loglikelihood_equals_direct_computation(lm, tiny_model, docs):
    cases = [(0, "What color is the shape?", " red"),
             (0, "What color is the shape?", " blue square"),
             (1, "Which option is right?\nA. left\nB. right", " B"),
             (2, "Name the color in one long word or a few words please.", " green, or maybe yellow")]
    reqs = [ll_request(d, c, t) for d, c, t in cases]
    reqs.append(instance("loglikelihood", ("", " red")))  # acc_mutual_info: no context, no image
    # doc_to_target as a callable
    reqs.append(ll_request(2, "What color is the shape?", lambda doc: " " + doc["answer"]))
    got = lm.loglikelihood(reqs)  # batch_size 2: rows of different lengths share left-padded batches
    want = [direct_loglikelihood(tiny_model, docs[d]["image"], c, t)[:2] for d, c, t in cases]
    want.append(direct_loglikelihood(tiny_model, None, "", " red")[:2])
    want.append(direct_loglikelihood(tiny_model, docs[2]["image"], "What color is the shape?", " green")[:2])
    assert len(got) == len(want)
    for (lp, greedy), (lp_want, greedy_want) in zip(got, want):
        assert isinstance(lp, float) and isinstance(greedy, bool)
        assert lp == pytest.approx(lp_want, abs=1e-4) and lp < 0
        assert greedy == greedy_want


def test_loglikelihood_is_greedy(lm, tiny_model, docs):
    """True exactly when every continuation token is the argmax given what precedes it."""
    tok = tiny_model.processor.tokenizer
    context = "What color is the shape?"
    _, _, ctx, _, first = direct_loglikelihood(tiny_model, docs[0]["image"], context, " red")
    order = first.argsort(descending=True).tolist()
    # the greedy first token and a runner-up, as text that tokenizes back to that one token
    texts = {}
    for rank, t in enumerate(order):
        text = tok.decode([t])
        proc = tiny_model.processor
        prompt = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                        {"type": "text", "text": context}]}])
        if "\ufffd" not in text and proc.tokenize(prompt + text)[len(ctx):] == [t]:
            texts.setdefault("best" if rank == 0 else "other", text)
        if rank == 0 and "best" not in texts:
            pytest.skip("the greedy token does not survive decode/encode on this tokenizer")
        if "other" in texts:
            break
    (lp_best, greedy_best), (lp_other, greedy_other) = lm.loglikelihood(
        [ll_request(0, context, texts["best"]), ll_request(0, context, texts["other"])])
    assert greedy_best is True and greedy_other is False and lp_best > lp_other
    # token level: the greedy continuation of 3 tokens is greedy; changing its last token is not
    feats = tiny_model.get_image_features(tiny_model.processor.process_images([docs[0]["image"]]))
    seq = list(ctx)
    for _ in range(3):
        with torch.no_grad():
            logits = tiny_model(input_ids=torch.tensor([seq]), image_features=feats).logits[0, -1]
        seq.append(int(logits.argmax()))
    greedy3 = seq[len(ctx):]
    wrong = greedy3[:2] + [(greedy3[2] + 1) % 250]
    [(lp_g, g), (lp_w, w)] = lm._score_rows([(ctx, greedy3, feats), (ctx, wrong, feats)])
    assert g is True and w is False and lp_g > lp_w


# ---------------------------------------------------------------------------
# construction, registration, lmms-eval itself
# ---------------------------------------------------------------------------


def test_model_args_and_pretrained_path(tiny_model, tmp_path):
    assert parse_arg_string("pretrained=/a/b,device=cpu,dtype=fp32,image_size=1024,batch_size=8,progress=False") == {
        "pretrained": "/a/b", "device": "cpu", "dtype": "fp32", "image_size": 1024, "batch_size": 8,
        "progress": False}
    path = tmp_path / "m"
    tiny_model.save_pretrained(str(path))
    # lmms-eval passes --batch_size (default 1) and --device too; model_args win
    lm = FastVLMLmms.create_from_arg_string(f"pretrained={path},device=cpu,dtype=fp32,batch_size=3",
                                            {"batch_size": 1, "max_batch_size": None, "device": None})
    assert lm.batch_size == 3 and lm.device.type == "cpu" and lm.model.dtype == torch.float32
    assert lm.model.config.image_size == tiny_model.config.image_size
    lm2 = FastVLMLmms.create_from_arg_string(f"pretrained={path},dtype=fp32,image_size=192",
                                             {"batch_size": "4", "device": "cpu"})
    assert lm2.batch_size == 4 and lm2.model.config.image_size == 192
    with pytest.raises(ConfigError, match="unknown fastvlm model_args"):
        FastVLMLmms.create_from_arg_string(f"pretrained={path},devcie=cpu")


def test_imports_without_lmms_eval():
    code = textwrap.dedent("""
        import sys
        sys.modules["lmms_eval"] = None  # as if it were not installed
        import fastvlm.eval.lmms as plugin
        from fastvlm.eval.lmms.model import FastVLMLmms, LMMS_EVAL_IMPORT_ERROR
        assert not plugin.lmms_eval_available() and LMMS_EVAL_IMPORT_ERROR is not None
        assert plugin.FastVLMLmms is FastVLMLmms
        for fn in (plugin.register, plugin.manifest):
            try:
                fn()
            except ImportError as e:
                assert "pip install 'fastvlm[lmms]'" in str(e) and "filelock<4" in str(e), e
            else:
                raise AssertionError("no error")
        from fastvlm.eval.lmms.__main__ import main
        assert main(["--model", "fastvlm"]) == 1
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


@needs_lmms_eval
def test_register_with_lmms_eval():
    from lmms_eval import models
    from lmms_eval.api.model import lmms

    from fastvlm.eval.lmms import register

    assert issubclass(FastVLMLmms, lmms)
    register()
    assert models.get_model("fastvlm") is FastVLMLmms
    assert "fastvlm" in models.list_available_models()


@needs_lmms_eval
def test_entry_point_registration(tmp_path):
    """The pyproject entry point, installed as a distribution on sys.path, is all lmms-eval needs."""
    dist = tmp_path / "fastvlm_lmms_probe-0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fastvlm-lmms-probe\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text('[lmms_eval.models]\nfastvlm = fastvlm.eval.lmms:manifest\n')
    code = ("import lmms_eval.models as m; c = m.get_model('fastvlm'); "
            "print(c.__module__ + '.' + c.__name__)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "fastvlm.eval.lmms.model.FastVLMLmms"


@needs_lmms_eval
def test_lmms_eval_command_line(tiny_model, docs, tmp_path):
    """`python -m fastvlm.eval.lmms` runs lmms-eval's own CLI offline on local toy tasks:
    one generate_until task and one multiple_choice (loglikelihood) task."""
    model_dir = tmp_path / "model"
    tiny_model.save_pretrained(str(model_dir))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    rows = []
    for k, d in enumerate(docs):
        d["image"].save(tasks / f"{k}.png")
        rows.append({"image_path": str(tasks / f"{k}.png"), "question": d["question"], "answer": d["answer"],
                     "choices": ["red", "blue", "green"], "label": k})
    (tasks / "toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "utils.py").write_text(textwrap.dedent("""
        from PIL import Image

        def doc_to_visual(doc):
            return [Image.open(doc["image_path"]).convert("RGB")]

        def doc_to_text(doc, lmms_eval_specific_kwargs=None):
            return doc["question"] + "\\nAnswer the question using a single word or phrase."
    """))
    common = textwrap.dedent(f"""
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {tasks / 'toy.jsonl'}
        test_split: test
        doc_to_visual: !function utils.doc_to_visual
        doc_to_text: !function utils.doc_to_text
    """)
    (tasks / "fastvlm_toy_gen.yaml").write_text("task: fastvlm_toy_gen\noutput_type: generate_until\n" + common + (
        "doc_to_target: answer\ngeneration_kwargs:\n  max_new_tokens: 4\n  until: ['\\n\\n']\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"))
    (tasks / "fastvlm_toy_mc.yaml").write_text("task: fastvlm_toy_mc\noutput_type: multiple_choice\n" + common + (
        "doc_to_target: label\ndoc_to_choice: choices\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"))
    out = tmp_path / "out"
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "fastvlm.eval.lmms", "--model", "fastvlm",
           "--model_args", f"pretrained={model_dir},device=cpu,dtype=fp32,batch_size=2,progress=False",
           "--tasks", "fastvlm_toy_gen,fastvlm_toy_mc", "--include_path", str(tasks),
           "--output_path", str(out), "--log_samples", "--verbosity", "WARNING"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-5000:])
    results = [p for p in out.rglob("*results*.json")]
    assert results, list(out.rglob("*"))
    res = json.loads(results[0].read_text())["results"]
    assert "exact_match,none" in res["fastvlm_toy_gen"] and "acc,none" in res["fastvlm_toy_mc"]
    samples = [p for p in out.rglob("*samples*fastvlm_toy_mc*.jsonl")]
    assert samples
    first = json.loads(samples[0].read_text().splitlines()[0])
    lls = [float(x[0][0]) if isinstance(x[0], list) else float(x[0]) for x in first["filtered_resps"]]
    assert len(lls) == 3 and all(v < 0 for v in lls)
