"""The model against transformers' FastVlmForConditionalGeneration, and generation behaviour."""

import dataclasses
import warnings

import pytest
import torch

from fastvlm import ConfigError, FastVLM, FastVLMConfig, PromptError, VisionConfig, get_preset
from fastvlm.config import IMAGE_TOKEN_INDEX
from fastvlm.generation import SamplingParams, apply_repetition_penalty, sample_next
from helpers import perturb_


@pytest.fixture(scope="module")
def parity_pair(tmp_path_factory):
    """Our model (full-size FastViTHD at 256 px, tiny Qwen2, non-trivial weights) and transformers' port of it."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "FastVlmForConditionalGeneration"):
        pytest.skip("this transformers has no FastVLM port")
    import timm.layers

    timm.layers.set_fused_attn(False)  # the reference's unfused attention arithmetic
    cfg = FastVLMConfig(vision=VisionConfig(image_size=256, inference_mode=False), text=get_preset("fastvlm-tiny").text)
    ours = FastVLM.from_config(cfg, device="cpu", dtype=torch.float32, seed=0)
    perturb_(ours, seed=1)
    ours.reparameterize()
    ours.set_attention_implementation("eager")
    d = tmp_path_factory.mktemp("hf")
    ours.save_pretrained(str(d), layout="hf")
    theirs, info = transformers.FastVlmForConditionalGeneration.from_pretrained(
        str(d), dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    return ours, theirs.eval(), int(theirs.config.image_token_id)


def _ids_with_images(n_images, tokens_per_image, seed=0, vocab=400):
    g = torch.Generator().manual_seed(seed)
    parts = []
    for _ in range(n_images):
        parts += [torch.randint(3, vocab, (5,), generator=g), torch.full((tokens_per_image,), IMAGE_TOKEN_INDEX)]
    parts.append(torch.randint(3, vocab, (7,), generator=g))
    return torch.cat(parts).unsqueeze(0)


def test_logits_match_transformers_port(parity_pair):
    ours, theirs, image_token_id = parity_pair
    ids = _ids_with_images(2, ours.num_image_tokens)
    pixels = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = ours(input_ids=ids, pixel_values=pixels).logits
        b = theirs(input_ids=ids.masked_fill(ids == IMAGE_TOKEN_INDEX, image_token_id), pixel_values=pixels).logits
    # the port's vocabulary is padded to a multiple of 64 (+1 for <image>); compare the real rows
    assert b.shape[-1] % 64 == 0 and b.shape[-1] > a.shape[-1]
    b = b[..., : a.shape[-1]]
    diff = (a - b).abs().max().item()
    assert diff <= 1e-4, f"max |logit difference| {diff}"
    # the images must actually influence the logits, or the comparison proves little
    with torch.no_grad():
        c = ours(input_ids=ids, pixel_values=torch.rand(2, 3, 256, 256)).logits
    assert (a - c).abs().max().item() > 1e-2


def test_image_features_match_transformers_port(parity_pair):
    ours, theirs, _ = parity_pair
    pixels = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        feats = ours.encode_images(pixels)
        assert feats.shape == (1, 16, 3072)
        a = ours.get_image_features(pixels)
        out = theirs.get_image_features(pixel_values=pixels)
        b = out if torch.is_tensor(out) else out.pooler_output
    b = b.reshape(a.shape)
    assert (a - b).abs().max().item() <= 1e-4 * max(1.0, b.abs().max().item())


def test_greedy_tokens_match_transformers_generate(parity_pair):
    ours, theirs, image_token_id = parity_pair
    ids = _ids_with_images(1, ours.num_image_tokens, seed=5)
    pixels = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(6))
    mine = ours.generate(ids, pixel_values=pixels, max_new_tokens=8, eos_token_id=[])
    hf_ids = ids.masked_fill(ids == IMAGE_TOKEN_INDEX, image_token_id)
    with torch.no_grad():
        ref = theirs.generate(input_ids=hf_ids, pixel_values=pixels, max_new_tokens=8, min_new_tokens=8,
                              do_sample=False)
    assert mine.tolist() == ref[:, ids.shape[1]:].tolist()


# ----------------------------------------------------------------------------- generation


def test_chat_streamed_equals_non_streamed(tiny_model):
    from PIL import Image

    img = Image.new("RGB", (160, 90), (200, 30, 30))
    text = tiny_model.chat(img, "What is this?", max_new_tokens=12, eos_token_id=[])
    pieces = list(tiny_model.chat(img, "What is this?", max_new_tokens=12, stream=True, eos_token_id=[]))
    assert len(pieces) >= 1
    assert "".join(pieces) == text
    t = tiny_model.last_timings
    assert t.ttft_s > 0 and t.prompt_tokens > tiny_model.num_image_tokens
    # a stream advanced from a thread pool (as web frameworks consume sync generators), one piece at a time,
    # with a slow consumer: same text, and no thread left in inference mode
    import time
    from concurrent.futures import ThreadPoolExecutor

    stream = tiny_model.chat(img, "What is this?", max_new_tokens=12, stream=True, eos_token_id=[])
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()

    def step():
        try:
            piece = next(stream)
        except StopIteration:
            piece = None
        time.sleep(0.05)
        return piece, torch.is_inference_mode_enabled()

    got = []
    with ThreadPoolExecutor(4) as pool:
        while True:
            piece, left_on = pool.submit(step).result()
            assert not left_on
            if piece is None:
                break
            got.append(piece)
    assert "".join(got) == text and len(got) >= 2


def test_batched_greedy_equals_unbatched(tiny_model):
    from PIL import Image

    imgs = [Image.new("RGB", (64, 64), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    requests = [
        (imgs[0], "What colour?"),
        ([imgs[1], imgs[2]], "Compare these two pictures carefully, please."),
        (None, "Hello"),
    ]
    batched = tiny_model.chat_batch(requests, max_new_tokens=10, eos_token_id=[])
    alone = [tiny_model.chat(im, p, max_new_tokens=10, eos_token_id=[]) for im, p in requests]
    assert batched == alone


def test_right_padded_batch_generates_as_left_padded(tiny_model):
    """Generation continues from each row's last position: a right-padded batch (the processor's training side)
    is moved to the left, not decoded from its padding."""
    from PIL import Image

    proc = tiny_model.processor
    texts = [proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]}])
             for t in ("What colour is it?", "Hi", "Describe everything you see in this picture, please.")]
    imgs = [Image.new("RGB", (64, 64), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    left = tiny_model.generate(**proc(images=imgs, text=texts), max_new_tokens=8, eos_token_id=[])
    right_inputs = proc(images=imgs, text=texts, padding_side="right")
    assert int((right_inputs["attention_mask"][:, -1] == 0).sum()) == 2
    right = tiny_model.generate(**right_inputs, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(left, right)
    one = proc(images=imgs[:1], text=texts[:1])  # 1-D ids and mask, as one row
    assert torch.equal(tiny_model.generate(one["input_ids"][0], attention_mask=one["attention_mask"][0],
                                           pixel_values=one["pixel_values"], max_new_tokens=8, eos_token_id=[]),
                       left[:1])
    with pytest.raises(PromptError, match=r"attention_mask has shape \(3, 5\)"):
        tiny_model.generate(right_inputs["input_ids"], attention_mask=right_inputs["attention_mask"][:, :5])


def test_generate_feeds_transformers_streamers(tiny_model):
    from transformers import TextIteratorStreamer

    proc = tiny_model.processor
    inputs = proc(text=proc.apply_chat_template([{"role": "user", "content": "Hello"}]))
    out = tiny_model.generate(**inputs, max_new_tokens=8, eos_token_id=[])
    streamer = TextIteratorStreamer(proc.tokenizer, skip_prompt=True)
    tiny_model.generate(**inputs, max_new_tokens=8, eos_token_id=[], streamer=streamer)
    assert "".join(streamer) == proc.tokenizer.decode(out[0])
    with pytest.raises(ConfigError, match="streamer must be a callable .* got int"):
        tiny_model.generate(**inputs, max_new_tokens=1, streamer=3)
    streamer = TextIteratorStreamer(proc.tokenizer, skip_prompt=True, timeout=5)
    with pytest.raises(PromptError):  # a refused request still ends the stream: its reader does not wait for ever
        tiny_model.generate(**dict(inputs, attention_mask=torch.zeros_like(inputs["attention_mask"])),
                            streamer=streamer)
    assert "".join(streamer) == ""


def test_generate_refuses_inputs_that_would_answer_garbage(tiny_model):
    from PIL import Image

    from fastvlm import ImageError

    proc = tiny_model.processor
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}])
    inputs = proc(images=[Image.new("RGB", (64, 64), (250, 20, 20))], text=text)
    with pytest.raises(ImageError, match="pixel_values range from 20 to 250; FastVLM takes floats in \\[0, 1\\]"):
        tiny_model.generate(**dict(inputs, pixel_values=inputs["pixel_values"] * 255), max_new_tokens=2)
    with pytest.raises(ImageError, match="pixel_values are torch.uint8"):
        tiny_model.generate(**dict(inputs, pixel_values=(inputs["pixel_values"] * 255).to(torch.uint8)))
    with pytest.raises(ImageError, match="is 20000x8: padding it to a square makes a 20000x20000 canvas"):
        proc(images=[Image.new("RGB", (20000, 8))], text=text)  # 160,000 pixels, but 400 M after the pad
    from types import SimpleNamespace

    from fastvlm.processing import check_padded_size

    check_padded_size(SimpleNamespace(size=(8064, 6048)), "pad", 50_000_000)  # a 48 MP photo: 65 M canvas, fine
    with pytest.raises(ImageError, match="resizing its short side to 1024 px makes it 5120000x1024"):
        check_padded_size(SimpleNamespace(size=(500_000, 100)), "crop", 50_000_000)
    with pytest.raises(PromptError, match="a row of attention_mask is all zeros"):
        tiny_model.generate(**dict(inputs, attention_mask=torch.zeros_like(inputs["attention_mask"])))
    text_only = proc(text=proc.apply_chat_template([{"role": "user", "content": "Hi"}]))
    tiny_model.train()  # text only: the shared model's BatchNorm statistics stay as they are
    try:
        with pytest.warns(UserWarning, match="generating with the model in train mode") as record:
            tiny_model.generate(**text_only, max_new_tokens=1)
    finally:
        tiny_model.eval()
    assert record[0].filename == __file__  # the warning points at the caller
    with pytest.raises(PromptError, match="pixel_values must be a tensor"):
        tiny_model.generate(**dict(inputs, pixel_values=inputs["pixel_values"].numpy()))


def test_generate_returns_only_new_tokens_and_stops_at_eos(tiny_model):
    inputs = tiny_model.processor(text=tiny_model.processor.apply_chat_template(
        [{"role": "user", "content": "Hello"}]))
    free = tiny_model.generate(**inputs, max_new_tokens=6, eos_token_id=[])
    assert free.shape == (1, 6)
    stop_at = int(free[0, 2])
    out = tiny_model.generate(**inputs, max_new_tokens=6, eos_token_id=stop_at, return_dict=True)
    first = free[0].tolist().index(stop_at)
    assert out.sequences.shape[1] == first + 1 and out.finish_reasons == ["stop"]


def test_sampling_is_seeded_and_respects_top_k_1(tiny_model):
    inputs = tiny_model.processor(text=tiny_model.processor.apply_chat_template([{"role": "user", "content": "Hi"}]))
    a = tiny_model.generate(**inputs, max_new_tokens=8, do_sample=True, temperature=1.5, seed=7, eos_token_id=[])
    b = tiny_model.generate(**inputs, max_new_tokens=8, do_sample=True, temperature=1.5, seed=7, eos_token_id=[])
    assert torch.equal(a, b)
    greedy = tiny_model.generate(**inputs, max_new_tokens=8, eos_token_id=[])
    k1 = tiny_model.generate(**inputs, max_new_tokens=8, do_sample=True, top_k=1, seed=3, eos_token_id=[])
    assert torch.equal(greedy, k1)


def test_sample_next_top_p_and_penalty():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    p = SamplingParams(do_sample=True, top_p=0.5)
    g = torch.Generator().manual_seed(0)
    # softmax mass of token 0 is 0.61 >= 0.5, so nucleus sampling can only return token 0
    assert all(int(sample_next(logits, p, g)) == 0 for _ in range(20))
    # top_p 0 (OpenAI's API allows it) keeps only the most likely token instead of dropping every one
    zero = SamplingParams(do_sample=True, top_p=0.0, temperature=5.0)
    assert all(int(sample_next(logits[:, [3, 1, 0, 2]], zero, g)) == 2 for _ in range(20))
    pen = apply_repetition_penalty(logits.clone(), torch.tensor([[0, 3]]), 2.0)
    assert pen.tolist() == [[1.0, 1.0, 0.5, -2.0]]  # positive divided, negative multiplied
    # image slots and padding (-1 in the history) are no token: id 0 is not penalised for them
    assert apply_repetition_penalty(logits.clone(), torch.tensor([[-1, 3, -1]]), 2.0).tolist() == \
        [[2.0, 1.0, 0.5, -2.0]]
    assert apply_repetition_penalty(logits.clone(), torch.tensor([[0, -1, 0]]), 2.0).tolist() == \
        [[1.0, 1.0, 0.5, -1.0]]  # seen twice, penalised once
    extreme = apply_repetition_penalty(logits.clone(), torch.tensor([[0, 3]]), 1e-4)
    assert torch.isfinite(extreme).all()
    hot = SamplingParams(do_sample=True, temperature=0.1)
    big = apply_repetition_penalty(torch.tensor([[3e38, 1.0, 0.0, -1.0]]), torch.tensor([[0]]), 1e-4)
    assert torch.isfinite(big).all() and int(sample_next(big, hot, g)) == 0  # no inf / NaN at a low temperature
    # a row with no tokens in its history keeps its logits; -1 entries ride on a seen id
    rows = apply_repetition_penalty(logits.repeat(2, 1), torch.tensor([[-1, -1], [3, -1]]), 2.0)
    assert rows.tolist() == [[2.0, 1.0, 0.5, -1.0], [2.0, 1.0, 0.5, -2.0]]


def test_sampling_arguments_as_people_pass_them():
    """None means the default (as transformers reads it); wrong types are one ConfigError, not a TypeError."""
    p = SamplingParams(max_new_tokens=None, temperature=None, top_k=None, top_p=None, do_sample=None)
    assert (p.max_new_tokens, p.temperature, p.top_k, p.top_p, p.do_sample) == (256, 1.0, 0, 1.0, False)
    import numpy as np

    p = SamplingParams(max_new_tokens=np.int64(5), temperature=np.float32(0.5), top_k=torch.tensor(3),
                       do_sample=np.bool_(True))
    assert (p.max_new_tokens, p.top_k, p.do_sample) == (5, 3, True) and type(p.max_new_tokens) is int
    with pytest.raises(ConfigError, match=r"repetition_penalty must be in \[1e-4, 1e4\]"):
        SamplingParams(repetition_penalty=1e-300)
    for bad, what in (({"max_new_tokens": 3.0}, "max_new_tokens must be a whole number, got 3.0"),
                      ({"max_new_tokens": "8"}, "max_new_tokens must be a whole number, got '8'"),
                      ({"temperature": "hot"}, "temperature must be a number"),
                      ({"do_sample": "yes"}, "do_sample must be true or false")):
        with pytest.raises(ConfigError, match=what):
            SamplingParams(**bad)
    with pytest.warns(UserWarning, match="seed take effect only with do_sample=True"):
        SamplingParams(seed=3)


def test_bad_sampling_params():
    with pytest.raises(ValueError, match=r"top_p must be in \[0, 1\]"):
        SamplingParams(top_p=-0.1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)


def test_prompt_past_trained_length_warns(tiny_model, monkeypatch):
    inputs = tiny_model.processor(text=tiny_model.processor.apply_chat_template(
        [{"role": "user", "content": "Hello"}]))
    n = inputs["input_ids"].shape[1]
    monkeypatch.setattr(tiny_model.config, "max_length", n)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_model.generate(**inputs, max_new_tokens=2)  # exactly max_length: no warning
    monkeypatch.setattr(tiny_model.config, "max_length", n - 1)
    with pytest.warns(UserWarning, match=f"prompt is {n} tokens long .* longer than the {n - 1} the model was trained"):
        out = tiny_model.generate(**inputs, max_new_tokens=2)
    assert out.shape == (1, 2)  # answered from the whole prompt, not cut


def test_placeholder_and_image_mismatch_errors(tiny_model):
    from PIL import Image

    img = Image.new("RGB", (32, 32))
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(PromptError, match="no image positions"):
        tiny_model(input_ids=ids, pixel_values=torch.rand(1, 3, 128, 128))
    slots = torch.tensor([[5] + [IMAGE_TOKEN_INDEX] * tiny_model.num_image_tokens])
    with pytest.raises(PromptError, match="no images were given"):
        tiny_model(input_ids=slots)
    with pytest.raises(PromptError):
        tiny_model.chat([img, img], "Only one <image> here")
    with pytest.raises(PromptError):
        tiny_model.chat(None, "An <image> without a picture")
    # an image at another resolution gives another token count: named in the error
    with pytest.raises(PromptError, match="image positions"):
        tiny_model(input_ids=slots, pixel_values=torch.rand(1, 3, 192, 192))


def test_encode_images_any_multiple_of_64(tiny_model):
    from fastvlm.errors import ImageError

    assert tiny_model.encode_images(torch.rand(2, 3, 128, 192)).shape == (2, 6, 256)
    with pytest.raises(ImageError, match="64"):
        tiny_model.encode_images(torch.rand(1, 3, 100, 128))


def test_chat_names_bad_image_sources_and_empty_batches(tiny_model):
    from fastvlm.errors import ImageError, PromptError

    for images in (5, [5], [[5]]):
        with pytest.raises(ImageError, match="unsupported image source of type int"):
            tiny_model.chat(images, "hi", max_new_tokens=1)
    with pytest.raises(PromptError, match="at least one"):
        tiny_model.chat_batch([])


@pytest.mark.parametrize("name, hidden, layers, heads, kv_heads, head_dim, intermediate, vocab", [
    ("fastvlm-0.5b", 896, 24, 14, 2, 64, 4864, 151936),
    ("fastvlm-1.5b", 1536, 28, 12, 2, 128, 8960, 151936),
    ("fastvlm-7b", 3584, 28, 28, 4, 128, 18944, 152064),
])
def test_presets_match_the_released_architectures(name, hidden, layers, heads, kv_heads, head_dim, intermediate, vocab):
    """The reference's table of the three LLMs (§6), and what every released checkpoint shares."""
    config = get_preset(name)
    t = config.text
    assert (t["hidden_size"], t["num_hidden_layers"], t["num_attention_heads"], t["num_key_value_heads"],
            t["intermediate_size"], t["vocab_size"]) == (hidden, layers, heads, kv_heads, intermediate, vocab)
    assert t["hidden_size"] // t["num_attention_heads"] == head_dim
    assert (t["rms_norm_eps"], t["rope_theta"], t["max_position_embeddings"]) == (1e-6, 1e6, 32768)
    assert (t["bos_token_id"], t["eos_token_id"], t["pad_token_id"]) == (151643, 151645, 151643)
    assert t["tie_word_embeddings"] is False and t["use_sliding_window"] is False and t["hidden_act"] == "silu"
    assert config.vision.image_size == 1024 and config.num_image_tokens == 256 and config.vision.out_channels == 3072
    assert (config.projector_type, config.image_aspect_ratio, config.max_length) == ("mlp2x_gelu", "pad", 8192)


def test_projector_types_as_the_reference_builds_them():
    from fastvlm.model import build_projector

    base = get_preset("fastvlm-tiny")
    width, hidden = base.vision.out_channels, base.hidden_size
    three = build_projector(dataclasses.replace(base, projector_type="mlp3x_gelu"))
    assert [type(m).__name__ for m in three] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    assert (three[0].in_features, three[4].out_features) == (width, hidden)
    assert list(dict(three.named_parameters())) == [f"{i}.{w}" for i in (0, 2, 4) for w in ("weight", "bias")]
    linear = build_projector(dataclasses.replace(base, projector_type="linear"))
    assert isinstance(linear, torch.nn.Linear) and (linear.in_features, linear.out_features) == (width, hidden)
    for bad in ("mlp0x_gelu", "mlpx_gelu", "mlp2x_relu"):
        with pytest.raises(ConfigError, match=f"unknown projector_type '{bad}'.*mlp<N>x_gelu"):
            dataclasses.replace(base, projector_type=bad)


def test_chat_takes_images_inside_message_parts(tiny_model):
    from PIL import Image

    a, b = Image.new("RGB", (40, 30), (200, 30, 30)), Image.new("RGB", (30, 40), (30, 30, 200))
    parts = [{"type": "image", "image": a}, {"type": "text", "text": "Which colour?"}]
    inline = tiny_model.chat(None, [{"role": "user", "content": parts}], max_new_tokens=4)
    assert inline == tiny_model.chat([a], [{"role": "user", "content": [{"type": "image"}, parts[1]]}],
                                     max_new_tokens=4)
    with pytest.raises(PromptError, match="both inside the messages' image parts and as `images`"):
        tiny_model.chat([b], [{"role": "user", "content": parts}], max_new_tokens=4)
    mixed = [{"type": "image", "image": a}, {"type": "image"}, {"type": "text", "text": "?"}]
    with pytest.raises(PromptError, match="1 of the messages' 2 image parts carry no image"):
        tiny_model.chat(None, [{"role": "user", "content": mixed}], max_new_tokens=4)
    with pytest.raises(ConfigError, match="unknown generation argument.*max_tokens.*max_new_tokens"):
        tiny_model.chat([a], "Which colour?", max_tokens=4)


def test_int8_model_cannot_be_saved_and_says_why(tmp_path):
    from fastvlm import CheckpointError

    model = FastVLM.from_preset("fastvlm-tiny", device="cpu", dtype=torch.float32)
    model.optimize_for_inference("fast", quantize="int8")
    with pytest.raises(CheckpointError, match="int8-quantized for inference, which cannot be saved; reload"):
        model.save_pretrained(str(tmp_path / "q"))
    assert not (tmp_path / "q").exists()
    import fastvlm

    assert fastvlm.load_image is fastvlm.processing.load_image


def test_rotary_tables_stay_fp32_in_a_bf16_model():
    """transformers' loading and the reference keep `inv_freq` in fp32; a bf16 copy is off by up to 0.4%,
    which turns the rotary angle at position 1000 by up to a radian (the bf16 rounding of cos itself is ~0.004)."""
    m32 = FastVLM.from_preset("fastvlm-tiny", dtype=torch.float32)
    m16 = FastVLM.from_preset("fastvlm-tiny", dtype=torch.bfloat16)
    m16.to(torch.float16).to(torch.bfloat16)  # casting again keeps them too
    for name, buf in m16.named_buffers():
        if "inv_freq" in name:
            assert buf.dtype == torch.float32, name
    pos = torch.arange(0, 2000, 7)[None]
    cos32, _ = m32.language_model.model.rotary_emb(torch.zeros(1, dtype=torch.float32), pos)
    cos16, _ = m16.language_model.model.rotary_emb(torch.zeros(1, dtype=torch.bfloat16), pos)
    assert (cos16.float() - cos32).abs().max() < 0.01


@pytest.mark.parametrize("capability, hip, expected", [((7, 5), None, torch.float16), ((7, 0), None, torch.float16),
                                                        ((8, 0), None, torch.bfloat16), ((9, 0), None, torch.bfloat16),
                                                        ((9, 4), "6.2", torch.bfloat16)])
def test_auto_dtype_on_cuda_is_bf16_only_where_the_gpu_computes_in_it(monkeypatch, capability, hip, expected):
    from fastvlm.model import resolve_dtype
    from fastvlm.train.trainer import resolve_mixed_precision

    # torch's is_bf16_supported() says yes on a T4 or V100 too (emulated bf16, slower than fp16 there)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.version, "hip", hip, raising=False)
    assert resolve_dtype("auto", torch.device("cuda")) == expected
    assert resolve_mixed_precision("auto", cpu=False) == ("bf16" if expected == torch.bfloat16 else "no")
