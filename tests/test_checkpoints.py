"""Checkpoint layouts: Apple's (synthesized independently, every key and config field), transformers', ours."""

import json
import warnings
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastvlm import CheckpointError, FastVLM, FastVLMConfig, VisionConfig, get_preset
from fastvlm.cli import main as cli
from fastvlm.config import IMAGE_TOKEN_INDEX
from helpers import perturb_, small_tokenizer

TINY_TEXT = get_preset("fastvlm-tiny").text
P = "model.vision_tower.vision_tower.model."

# config.json fields of the released checkpoints (reference doc §6), LLaVA part
APPLE_LLAVA_FIELDS = {
    "model_type": "llava_qwen2",
    "architectures": ["LlavaQwen2ForCausalLM"],
    "mm_vision_tower": "mobileclip_l_1024",
    "mm_hidden_size": 3072,
    "mm_projector_type": "mlp2x_gelu",
    "use_mm_proj": True,
    "mm_vision_select_layer": -2,
    "mm_vision_select_feature": "patch",
    "mm_patch_merge_type": "flat",
    "mm_use_im_start_end": False,
    "mm_use_im_patch_token": False,
    "image_aspect_ratio": "pad",
    "image_grid_pinpoints": None,
    "tokenizer_model_max_length": 8192,
    "tokenizer_padding_side": "right",
    "tune_mm_mlp_adapter": False,
    "freeze_mm_mlp_adapter": False,
    "unfreeze_mm_vision_tower": True,
    "mm_projector_lr": None,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.39.3",
}


def write_apple_checkpoint(directory, *, seed=0, dtype=torch.bfloat16, drop=(), reshape=None):
    """Build an Apple-layout checkpoint without the package's save code: the vision tower's own
    state dict under Apple's prefix, a plain transformers Qwen2ForCausalLM, random projector,
    two safetensors shards and an index, Qwen2 config fields plus every LLaVA field."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from fastvlm.vision import FastViTHD

    torch.manual_seed(seed)
    tower = FastViTHD(VisionConfig(inference_mode=False))
    perturb_(tower, seed)
    tower.reparameterize()
    text = {k: v for k, v in TINY_TEXT.items() if k != "model_type"}
    lm = Qwen2ForCausalLM(Qwen2Config(**text))
    state = {P + k: v for k, v in tower.state_dict().items()}
    hidden = text["hidden_size"]
    g = torch.Generator().manual_seed(seed)
    state["model.mm_projector.0.weight"] = torch.randn(hidden, 3072, generator=g) / 3072**0.5
    state["model.mm_projector.0.bias"] = torch.randn(hidden, generator=g) * 0.05
    state["model.mm_projector.2.weight"] = torch.randn(hidden, hidden, generator=g) / hidden**0.5
    state["model.mm_projector.2.bias"] = torch.randn(hidden, generator=g) * 0.05
    for k, v in lm.state_dict().items():
        state[k] = v  # Qwen2ForCausalLM names already are Apple's: model.* and lm_head.weight
    for k in drop:
        state.pop(k)
    if reshape:
        state[reshape] = state[reshape][..., :-1]
    state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    os.makedirs(directory, exist_ok=True)
    keys = sorted(state)
    half = len(keys) // 2
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    weight_map = {}
    for name, part in zip(names, (keys[:half], keys[half:])):
        save_file({k: state[k] for k in part}, os.path.join(directory, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    tokenizer = small_tokenizer()
    vocab = tokenizer.get_vocab()  # a real checkpoint's special ids are its tokenizer's, as Qwen2's 151643/151645
    specials = {"eos_token_id": vocab["<|im_end|>"], "bos_token_id": vocab["<|endoftext|>"],
                "pad_token_id": vocab["<|endoftext|>"]}
    cfg = {**text, **specials, "rope_theta": 1000000.0, **APPLE_LLAVA_FIELDS}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg, f)
    with open(os.path.join(directory, "generation_config.json"), "w") as f:
        json.dump({"do_sample": True, "temperature": None, "top_p": None}, f)
    tokenizer.save_pretrained(directory)
    return state


@pytest.fixture(scope="module")
def apple_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts") / "my-checkpoint"  # no "llava" in the name, on purpose
    state = write_apple_checkpoint(str(d))
    return str(d), state


def _inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.randint(3, 200, (4,), generator=g), torch.full((model.num_image_tokens,), IMAGE_TOKEN_INDEX),
                     torch.randint(3, 200, (6,), generator=g)]).unsqueeze(0)
    return ids, torch.rand(1, 3, model.config.image_size, model.config.image_size, generator=g)


def test_apple_layout_loads_strictly_every_key(apple_dir):
    d, state = apple_dir
    vision_keys = [k for k in state if k.startswith(P)]
    assert len(vision_keys) == 629  # reference doc §8.3, head.proj and BN counters included
    model = FastVLM.from_pretrained(d, device="cpu", dtype=torch.float32, image_size=256)
    assert model.checkpoint_layout == "apple"
    assert model.config.image_aspect_ratio == "pad" and model.config.max_length == 8192
    ours = model.state_dict()
    for k, v in state.items():
        name = ("vision_tower." + k[len(P):] if k.startswith(P) else
                "mm_projector." + k[len("model.mm_projector."):] if k.startswith("model.mm_projector.") else
                "language_model." + k)
        assert torch.equal(ours[name].to(v.dtype), v), name
    assert not getattr(model.language_model.config, "tie_word_embeddings")
    assert model.language_model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()


@pytest.mark.parametrize("value, expected", [("pad", "pad"), ("square", "crop"), (None, "crop"), ("missing", "crop")])
def test_apple_image_aspect_ratio_as_process_images(value, expected):
    """The reference pads only for "pad"; "square", null and a missing key take the processor's centre crop."""
    from fastvlm.checkpoints.apple import to_config

    cfg = {"mm_vision_tower": "mobileclip_l_1024", "mm_hidden_size": 3072, "hidden_size": 896,
           "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14, "vocab_size": 151936}
    if value != "missing":
        cfg["image_aspect_ratio"] = value
    assert to_config(cfg).image_aspect_ratio == expected


def test_apple_and_transformers_layouts_give_the_same_logits(apple_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    import timm.layers

    timm.layers.set_fused_attn(False)
    d, _ = apple_dir
    assert cli(["convert", d, str(tmp_path / "hf"), "--to", "hf", "--dtype", "fp32"]) == 0
    apple = FastVLM.from_pretrained(d, device="cpu", dtype=torch.float32, image_size=256)
    apple.set_attention_implementation("eager")
    ours_hf = FastVLM.from_pretrained(str(tmp_path / "hf"), device="cpu", dtype=torch.float32, image_size=256)
    ours_hf.set_attention_implementation("eager")
    port = transformers.FastVlmForConditionalGeneration.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    ids, pixels = _inputs(apple)
    image_token = port.config.image_token_id
    with torch.no_grad():
        a = apple(input_ids=ids, pixel_values=pixels).logits
        b = ours_hf(input_ids=ids, pixel_values=pixels).logits[..., : a.shape[-1]]
        c = port(input_ids=ids.masked_fill(ids == IMAGE_TOKEN_INDEX, image_token), pixel_values=pixels).logits
    # same weights; only the padded vocabulary changes the lm_head matmul's blocking
    assert (a - b).abs().max().item() <= 1e-5
    assert (a - c[..., : a.shape[-1]]).abs().max().item() <= 1e-4
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert tok.convert_tokens_to_ids("<image>") == image_token and port.config.text_config.vocab_size % 64 == 0


def _tensors(d):
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(d, f)))
    return out


def test_convert_round_trips_bit_exactly(apple_dir, tmp_path):
    d, _ = apple_dir
    assert cli(["convert", d, str(tmp_path / "own"), "--to", "fastvlm"]) == 0
    assert cli(["convert", str(tmp_path / "own"), str(tmp_path / "apple"), "--to", "apple", "--max-shard-size", "100MB"]) == 0
    src, back = _tensors(d), _tensors(tmp_path / "apple")
    assert src.keys() == back.keys()
    for k in src:
        assert src[k].dtype == back[k].dtype and torch.equal(src[k], back[k]), k
    cfg_src, cfg_back = json.load(open(os.path.join(d, "config.json"))), json.load(open(tmp_path / "apple" / "config.json"))
    for k, v in APPLE_LLAVA_FIELDS.items():
        if k != "transformers_version":
            assert cfg_back[k] == v, k
    for k in ("hidden_size", "num_hidden_layers", "vocab_size", "num_key_value_heads", "rope_theta"):
        assert cfg_back[k] == cfg_src[k]
    assert os.path.isfile(tmp_path / "apple" / "model.safetensors.index.json")
    # transformers layout round trip
    assert cli(["convert", str(tmp_path / "own"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert cli(["convert", str(tmp_path / "hf"), str(tmp_path / "own2"), "--to", "fastvlm"]) == 0
    assert cli(["convert", str(tmp_path / "own2"), str(tmp_path / "hf2"), "--to", "hf"]) == 0
    h1, h2 = _tensors(tmp_path / "hf"), _tensors(tmp_path / "hf2")
    assert h1.keys() == h2.keys() and all(torch.equal(h1[k], h2[k]) for k in h1)



def test_convert_to_apple_says_when_it_adds_the_mobileclip_head(tmp_path, capsys):
    assert cli(["init", "--preset", "fastvlm-tiny", "--out", str(tmp_path / "own"), "--dtype", "fp32"]) == 0
    cfg = json.loads((tmp_path / "own" / "config.json").read_text())
    cfg["vision"]["projection_dim"] = None
    (tmp_path / "own" / "config.json").write_text(json.dumps(cfg))
    from safetensors.torch import load_file, save_file

    w = {k: v for k, v in load_file(str(tmp_path / "own" / "model.safetensors")).items() if "head.proj" not in k}
    save_file(w, str(tmp_path / "own" / "model.safetensors"), metadata={"format": "pt"})
    capsys.readouterr()
    assert cli(["convert", str(tmp_path / "own"), str(tmp_path / "apple"), "--to", "apple"]) == 0
    out = capsys.readouterr()
    assert "an all-zero one was written" in out.out + out.err


def test_own_layout_round_trip_keeps_train_form(tmp_path, tiny_tokenizer):
    cfg = get_preset("fastvlm-tiny")
    cfg.vision.inference_mode = False
    model = FastVLM.from_config(cfg, tokenizer=tiny_tokenizer, device="cpu", dtype=torch.float32)
    perturb_(model)
    model.save_pretrained(str(tmp_path / "own"))
    again = FastVLM.from_pretrained(str(tmp_path / "own"), device="cpu", dtype=torch.float32)
    assert not again.config.vision.inference_mode
    # the weights get the same file mode as config.json beside them (safetensors alone makes them 0600)
    mode = {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "own").iterdir()}
    assert mode["model.safetensors"] == mode["config.json"], mode
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Apple's layout stores the fused encoder: same outputs, fewer tensors
    model.save_pretrained(str(tmp_path / "apple"), layout="apple")
    fused = FastVLM.from_pretrained(str(tmp_path / "apple"), device="cpu", dtype=torch.float32)
    assert fused.config.vision.inference_mode
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        ref, out = model.encode_images(x), fused.encode_images(x)
    assert (ref - out).abs().max().item() <= 1e-4 * ref.abs().max().item()


def test_missing_and_misshaped_tensors_are_named(tmp_path):
    missing = P + "network.4.3.convffn.fc1.weight"
    write_apple_checkpoint(str(tmp_path / "a"), drop=[missing, "model.layers.1.mlp.up_proj.weight"])
    with pytest.raises(CheckpointError) as e:
        FastVLM.from_pretrained(str(tmp_path / "a"), device="cpu")
    assert "vision_tower.network.4.3.convffn.fc1.weight" in str(e.value)
    assert "missing tensors (2)" in str(e.value)
    write_apple_checkpoint(str(tmp_path / "b"), reshape="model.mm_projector.2.bias")
    with pytest.raises(CheckpointError, match=r"mm_projector.2.bias: checkpoint \(63,\) vs model \(64,\)"):
        FastVLM.from_pretrained(str(tmp_path / "b"), device="cpu")


def test_integer_weights_and_odd_weight_files_are_named(tmp_path, tiny_model):
    import os

    d = tmp_path / "ints"
    tiny_model.save_pretrained(str(d), layout="fastvlm")
    state = load_file(str(d / "model.safetensors"))
    state["mm_projector.0.weight"] = state["mm_projector.0.weight"].to(torch.int64)
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"not floating-point \(weights must be\) \(1\): "
                                              r"mm_projector.0.weight: int64"):
        FastVLM.from_pretrained(str(d))
    # a named pipe would block the read for ever; a directory, a link loop: not weights either
    for kind in ("fifo", "dir", "loop"):
        w = tmp_path / kind
        w.mkdir()
        (w / "config.json").write_text((d / "config.json").read_text())
        path = w / "model.safetensors"
        if kind == "fifo":
            if not hasattr(os, "mkfifo"):
                continue
            os.mkfifo(path)
        elif kind == "dir":
            path.mkdir()
        else:
            os.symlink(path, path)
        with pytest.raises(CheckpointError, match="model.safetensors is not a regular file"):
            FastVLM.from_pretrained(str(w))
    # a training step folder whose weights file is gone: not "pickles only" (its .pt files are the trainer's)
    step = tmp_path / "step_4"
    step.mkdir()
    (step / "trainer_state.json").write_text("{}")
    (step / "optimizer.pt").write_bytes(b"x")
    from fastvlm.checkpoints.io import safetensors_files

    with pytest.raises(CheckpointError, match="training checkpoint without its weights"):
        safetensors_files(str(step))
    # a model path that is a dangling or looping link is not a Hub id
    os.symlink(tmp_path / "link", tmp_path / "link")
    with pytest.raises(CheckpointError, match="symbolic link that leads nowhere"):
        FastVLM.from_pretrained(str(tmp_path / "link"))


def test_tied_embeddings_when_lm_head_is_absent(tmp_path):
    write_apple_checkpoint(str(tmp_path / "t"), drop=["lm_head.weight"])
    model = FastVLM.from_pretrained(str(tmp_path / "t"), device="cpu", dtype=torch.float32)
    assert model.language_model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_bad_checkpoints_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="no model directory"):
        FastVLM.from_pretrained(str(tmp_path / "nope"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        FastVLM.from_pretrained(str(tmp_path / "file.txt"))
    d = tmp_path / "pickle"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**TINY_TEXT, **APPLE_LLAVA_FIELDS}))
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match="never unpickles"):
        FastVLM.from_pretrained(str(d))
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        FastVLM.from_pretrained(str(d))
    (d / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="'bert' is not a FastVLM checkpoint"):
        FastVLM.from_pretrained(str(d))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="offline"):
        FastVLM.from_pretrained("apple/FastVLM-0.5B")


def test_malformed_configs_are_checkpoint_errors_naming_the_file(tmp_path, tiny_model):
    from fastvlm.checkpoints import read_config

    d = tmp_path / "own"
    tiny_model.save_pretrained(str(d), layout="fastvlm")
    good = json.loads((d / "config.json").read_text())
    no_text = {k: v for k, v in good.items() if k != "text"}
    vis, text = good["vision"], good["text"]
    cases = [
        ([1, 2], "a config must be a JSON object, got list"),
        ({**good, "vision": {**good["vision"], "image_size": "256"}}, "vision.image_size must be int, got '256'"),
        ({**good, "vision": None}, "vision must be a mapping"),
        (no_text, "text (the language model's config) lacks hidden_size"),
        # sizes of the wrong type, sign or scale: named before anything is allocated (262144 px once reached a
        # MemoryError in PIL's resize; a negative width a torch traceback; a 3*2^30 hidden size a storage overflow)
        ({**good, "text": {**text, "hidden_size": "big"}}, "text.hidden_size (the language model's hidden_size) "
                                                            "must be a positive int, got 'big'"),
        ({**good, "text": {**text, "vocab_size": -5}}, "text.vocab_size (the language model's vocab_size) must be"),
        ({**good, "text": {**text, "hidden_size": 3 * 2**30}}, "B parameters"),
        ({**good, "vision": {**vis, "image_size": 262144}}, "vision.image_size must be from 64 to 16384 pixels, "
                                                             "got 262144"),
        ({**good, "vision": {**vis, "image_size": 0}}, "vision.image_size must be from 64 to 16384 pixels, got 0"),
        ({**good, "vision": {**vis, "embed_dims": [16, -32, 64, 64, 128]}}, "vision.embed_dims[1] must be a "
                                                                           "positive int, got -32"),
    ]
    for cfg, message in cases:
        (d / "config.json").write_text(json.dumps(cfg))
        for load in (read_config, FastVLM.from_pretrained):
            with pytest.raises(CheckpointError) as e:
                load(str(d))
            assert message in str(e.value) and str(d / "config.json") in str(e.value), str(e.value)
            assert "\n" not in str(e.value)
    (d / "config.json").write_bytes(b'{"model_type": "fastvlm", "text": "\xff\xfe"}')
    with pytest.raises(CheckpointError, match="is not UTF-8 text"):
        read_config(str(d))


def test_code_shipped_with_a_checkpoint_is_never_run(tmp_path, tiny_model):
    d = tmp_path / "remote"
    tiny_model.save_pretrained(str(d), layout="apple")
    marker = tmp_path / "ran"
    (d / "llava_qwen.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    cfg = json.load(open(d / "config.json"))
    cfg["auto_map"] = {"AutoConfig": "llava_qwen.LlavaConfig", "AutoModelForCausalLM": "llava_qwen.LlavaQwen2ForCausalLM"}
    json.dump(cfg, open(d / "config.json", "w"))
    tok_cfg = json.load(open(d / "tokenizer_config.json"))
    tok_cfg["auto_map"] = {"AutoTokenizer": ["llava_qwen.Tok", None]}
    json.dump(tok_cfg, open(d / "tokenizer_config.json", "w"))
    FastVLM.from_pretrained(str(d), device="cpu", dtype=torch.float32)
    assert not marker.exists()


def test_cli_init_generate_info(tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "tiny"
    assert cli(["init", "--preset", "fastvlm-tiny", "--out", str(out), "--dtype", "fp32"]) == 0
    Image.new("RGB", (100, 60), (0, 128, 255)).save(tmp_path / "img.png")
    capsys.readouterr()
    rc = cli(["generate", "--model", str(out), "--image", str(tmp_path / "img.png"), "--prompt", "What?",
              "--max-new-tokens", "4", "--dtype", "fp32", "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["timings"]["ttft_s"] > 0 and result["timings"]["prompt_tokens"] > 16
    assert cli(["info", "--model", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["image_tokens"] == 4 and info["parameters"]["total"] > 0
    assert cli(["info", "--preset", "fastvlm-0.5b", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    # reference doc §3.3: 125.11 M with the unused head and the 35,712 ConvFFN BN running statistics
    # (2 x 17,856 channels), i.e. 125.07 M parameters; 256 tokens at 1024, 16 at 256
    assert abs((info["parameters"]["vision_tower"] + 35712) / 1e6 - 125.11) < 0.005
    assert info["visual_tokens_by_resolution"]["1024"] == 256
    assert info["visual_tokens_by_resolution"]["256"] == 16
    # the text form shows the unused head as part of the encoder's count, not as a part of its own
    assert cli(["info", "--preset", "fastvlm-0.5b"]) == 0
    rows = {line.strip().rsplit(None, 2)[0]: float(line.split()[-2])
            for line in capsys.readouterr().out.splitlines() if line.rstrip().endswith(" M")}
    assert "of which unused head" in rows and "vision_tower_head_unused" not in rows
    assert abs(rows["vision_tower"] + rows["mm_projector"] + rows["language_model"] - rows["total"]) < 0.02
    # a bad image fails before the model loads, with a one-line error
    (tmp_path / "bad.png").write_bytes(b"garbage")
    assert cli(["generate", "--model", str(out), "--image", str(tmp_path / "bad.png")]) == 1
    assert "error" in capsys.readouterr().err


def test_tokenizer_files_that_cannot_be_the_models_are_refused(tmp_path, tiny_model):
    d = tmp_path / "tok"
    tiny_model.save_pretrained(str(d), layout="apple")
    FastVLM.from_pretrained(str(d), device="cpu", dtype=torch.float32)  # as saved: fine
    cfg = json.loads((d / "config.json").read_text())
    # the config's eos is not the tokenizer's <|im_end|>: said, and the tokenizer's is the one generation uses
    (d / "config.json").write_text(json.dumps({**cfg, "eos_token_id": 7}))
    with pytest.warns(UserWarning, match=r"<\|im_end\|> is id (\d+) but the model's config says eos_token_id 7"):
        m = FastVLM.from_pretrained(str(d), device="cpu", dtype=torch.float32)
    assert m.processor.tokenizer.convert_tokens_to_ids("<|im_end|>") in m.processor.eos_token_ids
    # more tokens than the model's vocabulary (an IndexError in the embedding before), found before the weights
    (d / "config.json").write_text(json.dumps({**cfg, "vocab_size": 16}))
    with pytest.raises(CheckpointError, match=r"the tokenizer has \d+ tokens but the model's vocabulary is 16"):
        FastVLM.from_pretrained(str(d), device="cpu", dtype=torch.float32)
    # without a tokenizer, a vocabulary too small for the config's own special ids: one line naming config.json,
    # not an AssertionError
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in os.listdir(d):
        if not f.startswith(("tokenizer", "vocab", "merges", "added_tokens", "special_tokens")):
            (bare / f).write_bytes((d / f).read_bytes())
    with pytest.raises(CheckpointError, match="config.json: cannot build a model from this config"):
        FastVLM.from_pretrained(str(bare), device="cpu", dtype=torch.float32)
    # only tokenizer_config.json left (transformers then loads a tokenizer of its few added tokens)
    (d / "config.json").write_text(json.dumps(cfg))
    for f in os.listdir(d):
        if f in ("tokenizer.json", "vocab.json", "merges.txt"):
            os.remove(d / f)
    with pytest.raises(CheckpointError, match="has tokenizer_config.json but no vocabulary"):
        FastVLM.from_pretrained(str(d), device="cpu", dtype=torch.float32)
    (d / "tokenizer_config.json").unlink()  # none at all: loads, and says chat needs one
    with pytest.warns(UserWarning, match="no tokenizer files"):
        assert FastVLM.from_pretrained(str(d), device="cpu", dtype=torch.float32).processor is None


@pytest.mark.parametrize("weight_map, message", [
    ({}, "weight_map must be a non-empty mapping"),
    ([], "weight_map must be a non-empty mapping"),
    ({"a": 1}, "shard names must be file names in its folder"),
    ({"a": "/etc/hostname"}, "shard names must be file names in its folder, got /etc/hostname"),
    ({"a": "../x.safetensors"}, "shard names must be file names"),
])
def test_malformed_shard_index_is_named(tmp_path, weight_map, message):
    d = tmp_path / "idx"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**TINY_TEXT, **APPLE_LLAVA_FIELDS}))
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=message):
        FastVLM.from_pretrained(str(d))


def test_mlx_and_coreml_exports_are_named(tmp_path, tiny_model):
    d = tmp_path / "llava-fastvithd_0.5b_stage3_llm.fp16"
    d.mkdir()
    cfg = {**TINY_TEXT, **APPLE_LLAVA_FIELDS, "quantization": {"group_size": 64, "bits": 4}}
    (d / "config.json").write_text(json.dumps(cfg))
    save_file({"language_model.model.embed_tokens.weight": torch.zeros(4, 4)}, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="MLX/CoreML export of FastVLM for Apple's app"):
        FastVLM.from_pretrained(str(d))
    del cfg["quantization"]
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "fastvithd.mlpackage").mkdir()
    with pytest.raises(CheckpointError, match=r"export of FastVLM for Apple's app \(fastvithd.mlpackage\)"):
        FastVLM.from_pretrained(str(d))


@pytest.mark.parametrize("change, message", [
    ({"mm_vision_tower": "mobileclip_l_0"}, "names a 0 px encoder; FastViTHD needs a positive multiple of 64"),
    ({"mm_hidden_size": 1024}, "mm_hidden_size=1024 but the FastViTHD encoder gives 3072 channels"),
    ({"mm_use_im_start_end": True}, "mm_use_im_start_end=true is not supported"),
])
def test_apple_config_errors_name_the_file(tmp_path, change, message):
    from fastvlm.checkpoints import read_config

    d = tmp_path / "cfg"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**TINY_TEXT, **APPLE_LLAVA_FIELDS, **change}))
    with pytest.raises(CheckpointError) as e:
        read_config(str(d))
    assert message in str(e.value) and str(d / "config.json") in str(e.value), str(e.value)


def test_apple_layout_writes_the_reference_tokenizer_files(tmp_path, tiny_model):
    """Apple's folders hold Qwen2's vocab.json/merges.txt and a Qwen2Tokenizer config (the reference reads them
    with transformers 4.x, use_fast=False); from those files alone the tokenizer gives the same ids."""
    from transformers import AutoTokenizer

    from helpers import CORPUS

    d = tmp_path / "apple"
    tiny_model.save_pretrained(str(d), layout="apple")
    for name in ("vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json", "tokenizer_config.json"):
        assert (d / name).is_file(), name
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "Qwen2Tokenizer" and "extra_special_tokens" not in cfg
    assert {v["content"] for v in cfg["added_tokens_decoder"].values()} >= {"<|im_start|>", "<|im_end|>"}
    assert (d / "merges.txt").read_text().startswith("#version: 0.2\n")
    (d / "tokenizer.json").unlink()  # only the files Apple's folders have
    ours = tiny_model.processor.tokenizer
    theirs = AutoTokenizer.from_pretrained(str(d))
    texts = [*CORPUS, "Ünïcödé café, naïve 12 345 - ok?\n\n  two  spaces",
             tiny_model.processor.apply_chat_template([{"role": "user", "content": "How many circles?"}])]
    for text in texts:
        assert theirs(text)["input_ids"] == ours(text)["input_ids"], text
    assert theirs.convert_tokens_to_ids("<|im_end|>") == ours.convert_tokens_to_ids("<|im_end|>")
    model = FastVLM.from_pretrained(str(d), device="cpu", dtype=torch.float32)  # and our loader takes them
    assert model.processor.tokenizer("What is in the image?")["input_ids"] == ours("What is in the image?")["input_ids"]


def test_reference_tokenizer_files_only_for_qwen2s_pipeline(tmp_path, tiny_model):
    """The files name Qwen2Tokenizer, which applies Qwen2's normalizer and split regex: another byte-level BPE
    (GPT-2's regex, no NFC) would tokenize differently from them, so none are written for it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from fastvlm.checkpoints.apple import write_reference_tokenizer_files

    gpt2 = Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    gpt2.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    assert not write_reference_tokenizer_files(PreTrainedTokenizerFast(tokenizer_object=gpt2), str(tmp_path), 8192)
    assert not list(tmp_path.iterdir())
    assert write_reference_tokenizer_files(tiny_model.processor.tokenizer, str(tmp_path), 8192)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["model_max_length"] == 8192


def test_apple_layout_says_when_it_cannot_write_the_reference_tokenizer_files(tmp_path, tiny_model, monkeypatch):
    """A tokenizer outside Qwen2's pipeline gets only tokenizer.json in the apple layout, and the save says so."""
    import copy

    tok = copy.deepcopy(tiny_model.processor.tokenizer)
    tok.backend_tokenizer.normalizer = None  # no NFC: not Qwen2's pipeline
    monkeypatch.setattr(tiny_model.processor, "tokenizer", tok)
    with pytest.warns(UserWarning, match="not Qwen2's pipeline.*transformers 4.x"):
        tiny_model.save_pretrained(str(tmp_path / "apple"), layout="apple")
    assert (tmp_path / "apple" / "tokenizer.json").is_file() and not (tmp_path / "apple" / "vocab.json").exists()


def test_transformers_layout_resolution_follows_its_image_processor(tmp_path):
    """transformers' FastVlmConfig defaults image_seq_length to LLaVA's 576 (1536 px), while its processor crops to
    preprocessor_config.json's size, which is what the port runs at: that decides, with a warning."""
    from fastvlm.checkpoints import _read_config

    cfg = {"model_type": "fast_vlm", "image_seq_length": 576,
           "text_config": {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128,
                           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                           "vocab_size": 1000}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert _read_config(str(tmp_path / "config.json"))[0].image_size == 1536  # no processor config: the token count
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"crop_size": {"height": 1024, "width": 1024}, "do_center_crop": True, "size": {"shortest_edge": 1024}}))
    with pytest.warns(UserWarning, match="crops images to 1024 px, but config.json's image_seq_length 576 means "
                                         "1536 px; using 1024 px"):
        assert _read_config(str(tmp_path / "config.json"))[0].image_size == 1024
    with warnings.catch_warnings():  # from_pretrained(image_size=...) decides, and nothing is said
        warnings.simplefilter("error")
        _read_config(str(tmp_path / "config.json"), resolution_given=True)
    cfg["image_seq_length"] = 256  # as transformers' conversion script writes it: no warning
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _read_config(str(tmp_path / "config.json"))[0].image_size == 1024
