"""Image loading/preprocessing parity, chat prompt, tokenization around <image>, the
processor and the stand-in tokenizer. No network; every image is made here."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from fastvlm.config import IMAGE_TOKEN_INDEX, get_preset
from fastvlm.errors import ImageError, ImageTooLargeError, PromptError
from fastvlm.processing import (
    FastVLMProcessor,
    ProcessorOutput,
    build_prompt,
    expand2square,
    load_image,
    message_images,
    preprocess_image,
    preprocess_images,
    tokenize_prompt,
)
from fastvlm.tokenization import standin_qwen2_tokenizer, train_bpe_tokenizer

S = 32  # small output side keeps the parity tests fast; the arithmetic is the same at 1024
QWEN2_FRAME = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<image>\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
)


# ---------------------------------------------------------------------------------------
# The reference pipeline (predict.py + mm_utils.process_images), written independently
# ---------------------------------------------------------------------------------------


def _reference_expand2square(img, color):
    w, h = img.size
    if w == h:
        return img
    if w > h:
        out = Image.new(img.mode, (w, w), color)
        out.paste(img, (0, (w - h) // 2))
    else:
        out = Image.new(img.mode, (h, h), color)
        out.paste(img, ((h - w) // 2, 0))
    return out


def _clip_processor(size):
    # The reference ran transformers 4.48's slow (PIL/numpy) CLIPImageProcessor. In
    # transformers 5 `CLIPImageProcessor` is the torchvision backend and the PIL/numpy one
    # is `CLIPImageProcessorPil`; before 5 the slow class was `CLIPImageProcessor` itself.
    try:
        from transformers import CLIPImageProcessorPil as cls
    except ImportError:  # transformers < 5
        from transformers import CLIPImageProcessor as cls
    p = cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
            image_mean=[0, 0, 0], image_std=[1, 1, 1])
    assert getattr(p, "backend", "pil") == "pil"
    return p


def reference_pixels(img: Image.Image, size: int = S, pad: bool = True) -> torch.Tensor:
    img = img.convert("RGB")
    if pad:
        p = _clip_processor(size)
        img = _reference_expand2square(img, tuple(int(x * 255) for x in p.image_mean))
    return _clip_processor(size).preprocess(img, return_tensors="pt")["pixel_values"][0]


def _rand_img(w, h, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    if mode == "RGB":
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    if mode == "RGBA":
        return Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), mode="RGBA")
    if mode == "L":
        return Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), mode="L")
    raise AssertionError(mode)


def assert_bit_equal(ours: torch.Tensor, ref: torch.Tensor):
    assert ours.dtype == ref.dtype == torch.float32
    assert ours.shape == ref.shape
    # Bit-for-bit, not allclose: compare the raw float32 bit patterns.
    assert torch.equal(ours.view(torch.int32), ref.view(torch.int32))


# ---------------------------------------------------------------------------------------
# Preprocessing parity
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "w,h",
    [(64, 48), (48, 64), (50, 50), (1, 1), (2, 3), (3, 2), (97, 13), (13, 97), (33, 32)],
    ids=lambda v: str(v),
)
@pytest.mark.parametrize("size", [S, 37])
def test_preprocess_parity_pad_and_crop(w, h, size):
    img = _rand_img(w, h, seed=w * 1000 + h)
    out = preprocess_image(img, size, "pad")
    assert out.shape == (3, size, size)
    assert_bit_equal(out, reference_pixels(img, size, pad=True))
    # crop: the HF model card / transformers port / iOS app path (no padding).
    assert_bit_equal(preprocess_image(img, size, "crop"), reference_pixels(img, size, pad=False))


def test_shortest_edge_uses_truncation():
    # The long side is int(size * long / short): 32 * 13 / 3 = 138.67 -> 138 (rounding gives 139).
    from fastvlm.processing import shortest_edge_size

    assert shortest_edge_size(3, 13, 32) == (32, 138)
    assert shortest_edge_size(13, 3, 32) == (138, 32)
    assert shortest_edge_size(50, 50, 32) == (32, 32)
    img = _rand_img(13, 3, seed=5)
    assert_bit_equal(preprocess_image(img, 32, "crop"), reference_pixels(img, 32, pad=False))


def test_preprocess_values_and_padding_layout():
    # A white 4x2 landscape image padded to 4x4: black rows above and below, white middle.
    img = Image.new("RGB", (4, 2), (255, 255, 255))
    sq = expand2square(img)
    assert sq.size == (4, 4)
    a = np.asarray(sq)
    assert (a[1:3] == 255).all() and (a[0] == 0).all() and (a[3] == 0).all()
    # Portrait: pasted at ((H-W)//2, 0).
    sq = np.asarray(expand2square(Image.new("RGB", (1, 4), (255, 0, 0))))
    assert (sq[:, 1] == (255, 0, 0)).all() and (sq[:, 0] == 0).all() and (sq[:, 2:] == 0).all()
    sq_img = Image.new("RGB", (3, 3))
    assert expand2square(sq_img) is sq_img
    out = preprocess_image(Image.new("RGB", (S, S), (255, 0, 51)), S)
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert out[0].eq(1.0).all() and out[1].eq(0.0).all() and out[2].eq(np.float32(51 * (1 / 255))).all()


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "P_transparent", "I;16", "CMYK", "1"])
def test_mode_parity_through_files(tmp_path, mode):
    base = _rand_img(40, 24, seed=3)
    if mode == "L":
        img = base.convert("L")
    elif mode == "LA":
        img = base.convert("LA")
    elif mode == "RGBA":
        img = _rand_img(40, 24, seed=4, mode="RGBA")  # random alpha: convert drops it, no compositing
    elif mode == "P":
        img = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    elif mode == "P_transparent":
        img = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        img.info["transparency"] = 3
    elif mode == "I;16":
        arr = (np.arange(40 * 24, dtype=np.uint16).reshape(24, 40) * 67).astype(np.uint16)
        img = Image.fromarray(arr)
        assert img.mode == "I;16"
    elif mode == "CMYK":
        img = base.convert("CMYK")
    elif mode == "1":
        img = base.convert("1")
    ext = "jpg" if mode == "CMYK" else "png"
    path = tmp_path / f"img.{ext}"
    img.save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's palette-transparency note, same in the reference
        ours = load_image(path, scale_16bit=False)  # 16-bit: the reference's clipping (see the next test)
        with Image.open(path) as f:
            ref_img = f.convert("RGB")  # predict.py: Image.open(image_file).convert('RGB')
    assert ours.mode == "RGB"
    assert np.array_equal(np.asarray(ours), np.asarray(ref_img))
    assert_bit_equal(preprocess_image(ours, S), reference_pixels(ref_img, S))
    # Also from an in-memory PIL image of that mode.
    assert np.array_equal(np.asarray(load_image(img, scale_16bit=False)), np.asarray(img.convert("RGB")))


def test_16bit_greyscale_is_scaled_not_clipped(tmp_path):
    # The second deliberate difference: PIL's convert("RGB") clips 16-bit values above 255 (a typical 16-bit
    # PNG turns white); load_image scales them to 8 bits instead.
    arr = (np.arange(40 * 24, dtype=np.uint16).reshape(24, 40) * 67).astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / "g16.png")
    want = np.rint(arr / 257).astype(np.uint8)
    for src in (tmp_path / "g16.png", Image.fromarray(arr)):
        got = np.asarray(load_image(src))
        assert np.array_equal(got, np.repeat(want[:, :, None], 3, axis=2))
    with Image.open(tmp_path / "g16.png") as f:
        assert (np.asarray(f.convert("RGB")) == 255).mean() > 0.99  # what the reference sees
    # 32-bit "I" images: 8-bit values are kept, wider ones scaled by their maximum
    small = np.arange(200, dtype=np.int32).reshape(10, 20)
    assert np.array_equal(np.asarray(load_image(Image.fromarray(small, mode="I")))[:, :, 0], small.astype(np.uint8))
    wide = (np.arange(200, dtype=np.int64).reshape(10, 20) * 1_000_000).astype(np.int32)
    got = np.asarray(load_image(Image.fromarray(wide, mode="I")))[:, :, 0]
    assert got.max() == 255 and np.array_equal(got, np.rint(wide * (255 / wide.max())).astype(np.uint8))


@pytest.mark.parametrize("orientation", [6, 8, 3])
def test_exif_orientation_is_applied(tmp_path, orientation):
    # The one deliberate difference from the reference: EXIF orientation is honoured.
    img = Image.new("RGB", (40, 20), (200, 30, 30))
    img.paste((20, 20, 220), (0, 0, 10, 20))  # a blue band on the left marks the stored left edge
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "rot.jpg"
    img.save(path, quality=95, exif=exif.tobytes())
    ours = load_image(path)
    with Image.open(path) as f:
        upright = ImageOps.exif_transpose(f).convert("RGB")
        stored = f.convert("RGB")
    assert ours.size == upright.size == ((20, 40) if orientation in (6, 8) else (40, 20))
    assert np.array_equal(np.asarray(ours), np.asarray(upright))
    assert_bit_equal(preprocess_image(ours, S), reference_pixels(upright, S))
    # The reference (no EXIF handling) sees the stored, sideways pixels: different input.
    assert not torch.equal(preprocess_image(ours, S), reference_pixels(stored, S))
    # Opting out reproduces the reference exactly.
    as_ref = load_image(path, apply_exif_orientation=False)
    assert_bit_equal(preprocess_image(as_ref, S), reference_pixels(stored, S))


def test_malformed_exif_falls_back_to_stored_pixels(tmp_path):
    img = _rand_img(8, 6, seed=1)
    path = tmp_path / "e.png"
    img.save(path, exif=b"Exif\x00\x00garbage-not-tiff")
    assert np.array_equal(np.asarray(load_image(path)), np.asarray(img))


def test_load_image_sources(tmp_path):
    img = _rand_img(10, 7, seed=2)
    path = tmp_path / "a.png"
    img.save(path)
    data = path.read_bytes()
    expected = np.asarray(img)
    import base64

    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    for src in (str(path), path, data, bytearray(data), io.BytesIO(data), img, np.asarray(img), uri):
        out = load_image(src)
        assert out.mode == "RGB" and np.array_equal(np.asarray(out), expected), type(src)
    with open(path, "rb") as f:
        assert np.array_equal(np.asarray(load_image(f)), expected)
    assert load_image(np.zeros((3, 4), np.uint8)).size == (4, 3)
    assert load_image(np.zeros((3, 4, 1), np.uint8)).size == (4, 3)
    assert load_image(np.zeros((3, 4, 4), np.uint8)).mode == "RGB"
    # preprocess_image accepts any source too, and returns the same as for the PIL image.
    assert torch.equal(preprocess_image(str(path), S), preprocess_image(img, S))
    batch = preprocess_images([img, img.transpose(Image.Transpose.ROTATE_90)], S)
    assert batch.shape == (2, 3, S, S) and torch.equal(batch[0], preprocess_image(img, S))


@pytest.mark.parametrize("uri, message", [
    ("data:image/png,notbase64", "must be base64"),
    ("data:image/png;base64,@@@", "base64 payload does not decode"),
    ("data:image/png;base64,", "holds no image data"),
    ("data:image/png;base64,aGVsbG8=", "5 bytes are not an image format"),
])
def test_bad_data_uris_are_named(uri, message):
    with pytest.raises(ImageError, match=message):
        load_image(uri)


def test_animated_gif_uses_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    out = np.asarray(load_image(path))
    assert (out == (255, 0, 0)).all()


# ---------------------------------------------------------------------------------------
# Bad images
# ---------------------------------------------------------------------------------------


def _png_header(w, h):
    """A small PNG whose header claims w x h pixels (the pixel data is a few bytes)."""

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def _raises_image_error(src, *match, kind=ImageError, **kw) -> str:
    with pytest.raises(ImageError) as ei:
        load_image(src, **kw)
    e = ei.value
    # Our own type, and no PIL exception chained behind it (no PIL traceback shown).
    assert type(e) is kind  # ImageTooLargeError for the pixel limit, else ImageError
    assert e.__cause__ is None and (e.__context__ is None or e.__suppress_context__)
    msg = str(e)
    for m in match:
        assert m in msg, msg
    return msg


def test_bad_images(tmp_path):
    _raises_image_error(tmp_path / "missing.png", "not found", "missing.png")
    _raises_image_error(tmp_path, "is a directory")
    (tmp_path / "empty.png").write_bytes(b"")
    _raises_image_error(tmp_path / "empty.png", "empty.png", "empty")
    _raises_image_error(b"", "empty")
    _raises_image_error(io.BytesIO(b""), "empty")

    good = io.BytesIO()
    _rand_img(64, 64, seed=9).save(good, format="PNG")
    (tmp_path / "trunc.png").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    _raises_image_error(tmp_path / "trunc.png", "trunc.png", "corrupt or truncated")
    jpg = io.BytesIO()
    _rand_img(64, 64, seed=9).save(jpg, format="JPEG")
    _raises_image_error(jpg.getvalue()[:200], "corrupt or truncated")

    (tmp_path / "x.txt").write_text("hello, I am not a picture\n")
    _raises_image_error(tmp_path / "x.txt", "x.txt is not an image file PIL can read")
    _raises_image_error(b"plain text bytes", "not an image")

    with open(tmp_path / "x.txt") as f:  # text mode
        _raises_image_error(f, "binary mode")
    _raises_image_error(np.zeros((4, 4, 3), np.float32), "uint8")
    _raises_image_error(np.zeros((4, 4, 2), np.uint8), "shape")
    _raises_image_error(12345, "unsupported image source")


def test_decompression_bomb_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header(9000, 9000))  # 81 MP: over our default limit, under PIL's warning
    assert path.stat().st_size < 200
    # The message is about the size, not truncation: the (bogus) pixel data was never decoded.
    _raises_image_error(path, "9000x9000", "limit", kind=ImageTooLargeError)
    _raises_image_error(_png_header(100, 100), "100x100", "limit", max_pixels=5000, kind=ImageTooLargeError)
    # Under the limit the same kind of file fails only when decoded.
    _raises_image_error(_png_header(100, 100), "corrupt or truncated", max_pixels=10000)


def test_pil_decompression_bomb_paths_map_to_image_error():
    # Over 2x PIL's MAX_IMAGE_PIXELS: Image.open itself raises DecompressionBombError.
    _raises_image_error(_png_header(100_000, 100_000), "decompression bomb", max_pixels=None, kind=ImageTooLargeError)
    # ... and where our limit is the lower one, the error names it, not only PIL's
    _raises_image_error(_png_header(100_000, 100_000), "more than 50000000 pixels, the limit", max_pixels=50_000_000, kind=ImageTooLargeError)
    # Over PIL's warning threshold with warnings escalated to errors: DecompressionBombWarning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _raises_image_error(_png_header(10_000, 10_000), "decompression bomb", max_pixels=None, kind=ImageTooLargeError)


# ---------------------------------------------------------------------------------------
# Chat prompt
# ---------------------------------------------------------------------------------------


def test_prompt_single_image_matches_reference_frame():
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    assert build_prompt(msgs) == QWEN2_FRAME.format(prompt="Describe the image.")
    # A string with a literal <image> is the same prompt (predict.py's "<image>\n" + prompt).
    assert build_prompt([{"role": "user", "content": "<image>\nDescribe the image."}]) == build_prompt(msgs)
    # Parts with payloads, as the server passes them.
    msgs2 = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "text", "text": "Describe the image."},
    ]}]
    assert build_prompt(msgs2) == build_prompt(msgs)
    assert message_images(msgs2) == ["data:image/png;base64,AAAA"]
    assert build_prompt(msgs, add_generation_prompt=False) == QWEN2_FRAME.format(
        prompt="Describe the image.").removesuffix("<|im_start|>assistant\n")


def test_prompt_multi_image_order_and_payloads():
    a, b = object(), object()
    msgs = [{"role": "user", "content": [
        {"type": "text", "text": "Compare "},
        {"type": "image", "image": a},
        {"type": "text", "text": "and "},
        {"type": "image", "image": b},
        {"type": "text", "text": "please."},
    ]}]
    p = build_prompt(msgs)
    assert "<|im_start|>user\nCompare <image>\nand <image>\nplease.<|im_end|>\n" in p
    assert p.count("<image>") == 2
    imgs = message_images(msgs)
    assert imgs[0] is a and imgs[1] is b


def test_prompt_empty_message_is_its_bare_role_as_the_reference_renders_it():
    """conv_qwen_2.get_prompt: `role + message + sep` if message, else the bare role (reference doc 7.1)."""
    assert build_prompt([{"role": "user", "content": ""}]) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|im_start|>assistant\n")
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": []},
            {"role": "user", "content": [{"type": "text", "text": "Again?"}]}]
    assert build_prompt(msgs, system_prompt=None) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<|im_start|>user\nAgain?<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_prompt_multi_turn_and_system_override():
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": [{"type": "text", "text": "What colour?"}]},
    ]
    assert build_prompt(msgs) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n"
        "<|im_start|>user\nWhat colour?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # System given as text parts; system_prompt argument is the default only.
    p = build_prompt([{"role": "system", "content": [{"type": "text", "text": "S"}]},
                      {"role": "user", "content": "hi"}], system_prompt="ignored")
    assert p.startswith("<|im_start|>system\nS<|im_end|>\n") and "ignored" not in p
    assert build_prompt([{"role": "user", "content": "hi"}], system_prompt="Custom.").startswith(
        "<|im_start|>system\nCustom.<|im_end|>\n")
    assert build_prompt([{"role": "user", "content": "hi"}], system_prompt=None) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    # a system message further on is a system turn in its place, as Qwen2's chat template renders it
    assert build_prompt([{"role": "user", "content": "hi"}, {"role": "system", "content": "Now in French."},
                         {"role": "user", "content": "bye"}]) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>system\nNow in French.<|im_end|>\n<|im_start|>user\nbye<|im_end|>\n<|im_start|>assistant\n")


def test_prompt_without_image():
    p = build_prompt([{"role": "user", "content": "Tell me a joke."}])
    assert p == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                 "<|im_start|>user\nTell me a joke.<|im_end|>\n<|im_start|>assistant\n")
    assert "<image>" not in p


@pytest.mark.parametrize(
    "msgs,needle",
    [
        ([], "empty"),
        ("hello", "list"),
        ([{"role": "robot", "content": "x"}], "message 0 has unknown role 'robot'"),
        ([{"role": "user", "content": "x"}, {"role": "user", "content": 3}], "message 1"),
        ([{"role": "user", "content": [{"type": "text", "text": 5}]}], "message 0 (user), part 0"),
        ([{"role": "user", "content": [{"type": "video"}]}], "unknown part type 'video'"),
        ([{"role": "user", "content": ["bare string"]}], "part 0"),
        ([{"role": "user"}], "no 'content'"),
        ([{"role": "user", "content": None}], "no content"),
        (["not a dict"], "message 0 must be a dict"),
        ([{"role": "assistant", "content": [{"type": "image"}]}], "only allowed in user messages"),
    ],
)
def test_bad_messages(msgs, needle):
    with pytest.raises(PromptError) as ei:
        build_prompt(msgs)
    assert needle in str(ei.value)


# ---------------------------------------------------------------------------------------
# Tokenization and the processor
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return standin_qwen2_tokenizer()


@pytest.fixture(scope="module")
def proc(tok):
    return FastVLMProcessor(tok, image_size=S, num_image_tokens=5)


def _ids(tok, s):
    return tok(s, add_special_tokens=False)["input_ids"]


def test_tokenize_chunks_separately(tok):
    prompt = "Describe the <image>image please"
    ids = tokenize_prompt(prompt, tok, 4)
    assert ids == _ids(tok, "Describe the ") + [IMAGE_TOKEN_INDEX] * 4 + _ids(tok, "image please")
    # The boundary matters: joined, " image" is one token; split, " " and "image" are two.
    joined = _ids(tok, "Describe the image please")
    assert [i for i in ids if i != IMAGE_TOKEN_INDEX] != joined
    # Edge placement: prompt starting/ending with <image>, adjacent placeholders.
    assert tokenize_prompt("<image>", tok, 3) == [IMAGE_TOKEN_INDEX] * 3
    assert tokenize_prompt("<image><image>x", tok, 2) == [IMAGE_TOKEN_INDEX] * 4 + _ids(tok, "x")
    assert tokenize_prompt("", tok, 2) == []
    # Special tokens in the frame are single ids, and no BOS is added.
    full = tokenize_prompt(QWEN2_FRAME.format(prompt="Hi"), tok, 6)
    assert full[0] == 151644 and full.count(151645) == 2 and full.count(IMAGE_TOKEN_INDEX) == 6
    # The -200 run is contiguous and sits right after "user\n".
    k = full.index(IMAGE_TOKEN_INDEX)
    assert full[k:k + 6] == [IMAGE_TOKEN_INDEX] * 6 and full[k + 6] != IMAGE_TOKEN_INDEX


def _solid(color):
    return Image.new("RGB", (12, 9), color)


def test_processor_single(proc, tok):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    prompt = proc.apply_chat_template(msgs)
    assert prompt == QWEN2_FRAME.format(prompt="What is this?")
    assert proc.apply_chat_template(msgs, tokenize=True) == tokenize_prompt(prompt, tok, 5)
    img = _rand_img(20, 11, seed=7)
    out = proc(images=img, text=prompt)
    assert isinstance(out, ProcessorOutput)
    assert out.input_ids.dtype == torch.long and out.attention_mask.dtype == torch.long
    assert out.input_ids.shape == out.attention_mask.shape == (1, len(tokenize_prompt(prompt, tok, 5)))
    assert out.input_ids[0].tolist() == tokenize_prompt(prompt, tok, 5)
    assert out.attention_mask.eq(1).all()
    assert out.pixel_values.shape == (1, 3, S, S) and out.pixel_values.dtype == torch.float32
    assert_bit_equal(out.pixel_values[0], reference_pixels(img, S))
    assert out["pixel_values"] is out.pixel_values
    # .to(dtype) casts pixel_values only.
    out.to(torch.float16)
    assert out.pixel_values.dtype == torch.float16 and out.input_ids.dtype == torch.long
    assert out.to("cpu") is out
    # Text-only: no pixel_values.
    out = proc(text="no image here")
    assert "pixel_values" not in out and out.input_ids.shape[0] == 1


def test_processor_batch_padding_and_image_order(proc, tok):
    red, green, blue = _solid((255, 0, 0)), _solid((0, 255, 0)), _solid((0, 0, 255))
    texts = ["<image>\nA", "B <image> and <image> C is a longer prompt"]
    left = proc(images=[red, green, blue], text=texts)
    seqs = [tokenize_prompt(t, tok, 5) for t in texts]
    L = max(map(len, seqs))
    pad = proc.pad_token_id
    assert pad == 151643
    assert left.input_ids.shape == (2, L)
    n0 = L - len(seqs[0])
    assert n0 > 0
    assert left.input_ids[0].tolist() == [pad] * n0 + seqs[0]
    assert left.attention_mask[0].tolist() == [0] * n0 + [1] * len(seqs[0])
    assert left.input_ids[1].tolist() == seqs[1] and left.attention_mask[1].eq(1).all()
    right = proc(images=[red, green, blue], text=texts, padding_side="right")
    assert right.input_ids[0].tolist() == seqs[0] + [pad] * n0
    assert right.attention_mask[0].tolist() == [1] * len(seqs[0]) + [0] * n0
    # Images are consumed in placeholder order across the batch.
    pv = left.pixel_values
    assert pv.shape == (3, 3, S, S)
    # Pad mode: black bars top/bottom; the centre pixel has the image's colour.
    centre = pv[:, :, S // 2, S // 2]
    assert torch.equal(centre, torch.eye(3))
    # Per-sample nested lists give the same result.
    nested = proc(images=[[red], [green, blue]], text=texts)
    assert torch.equal(nested.pixel_values, pv) and torch.equal(nested.input_ids, left.input_ids)
    # Lists instead of tensors.
    raw = proc(images=[red, green, blue], text=texts, return_tensors=None)
    assert raw["input_ids"] == left.input_ids.tolist() and len(raw["pixel_values"]) == 3
    with pytest.raises(PromptError, match="max_length=10"):
        proc(images=[red, green, blue], text=texts, max_length=10)


def test_processor_placeholder_image_mismatch(proc):
    img = _solid((1, 2, 3))
    with pytest.raises(PromptError) as ei:
        proc(images=[img], text="<image>\n<image>\ntwo?")
    assert "prompt has 2 <image> placeholders but 1 image was given" in str(ei.value)
    with pytest.raises(PromptError) as ei:
        proc(images=[img, img], text="<image> one")
    assert "prompt has 1 <image> placeholder but 2 images were given" in str(ei.value)
    with pytest.raises(PromptError) as ei:
        proc(images=img, text="no placeholder")  # not silently added
    assert "0 <image> placeholders but 1 image was given" in str(ei.value)
    with pytest.raises(PromptError, match="but 0 images were given"):
        proc(text=["<image> a", "b"])
    with pytest.raises(PromptError, match="text is required"):
        proc(images=img)
    # A bad image inside a valid call is an ImageError.
    with pytest.raises(ImageError):
        proc(images=b"nope", text="<image>")


def test_processor_special_ids_decode_and_save(tok, tmp_path):
    cfg = get_preset("fastvlm-tiny")
    p = FastVLMProcessor.from_config(cfg, tok)
    assert (p.image_size, p.num_image_tokens, p.image_aspect_ratio) == (128, 4, "pad")
    assert p.eos_token_ids == [151645]
    ids = p.apply_chat_template([{"role": "user", "content": "<image>\nHello there"}], tokenize=True)
    assert p.decode(ids) == "system\nYou are a helpful assistant.\nuser\n\nHello there\nassistant"
    text_ids = _ids(tok, " The cat sat.") + [151645]
    assert p.decode(torch.tensor(text_ids)) == "The cat sat."
    assert p.batch_decode(torch.tensor([text_ids, text_ids])) == ["The cat sat."] * 2

    p.save_pretrained(tmp_path / "proc")
    q = FastVLMProcessor.from_pretrained(tmp_path / "proc")
    assert q.to_dict() == p.to_dict()
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi 😀 123"}]}]
    assert q.apply_chat_template(msgs, tokenize=True) == p.apply_chat_template(msgs, tokenize=True)

    # A tokenizer whose eos is not <|im_end|>: both ids stop generation, deduplicated.
    t2 = train_bpe_tokenizer(["hello world"] * 3, 300)
    t2.eos_token = "<|endoftext|>"
    p2 = FastVLMProcessor(t2, image_size=S, num_image_tokens=1, image_aspect_ratio="crop")
    im_end = t2.convert_tokens_to_ids("<|im_end|>")
    assert p2.eos_token_ids == [im_end, t2.convert_tokens_to_ids("<|endoftext|>")]
    # No pad token: pad with eos.
    t2.pad_token = None
    assert p2.pad_token_id == t2.eos_token_id


# ---------------------------------------------------------------------------------------
# Tokenizer training
# ---------------------------------------------------------------------------------------


ROUND_TRIP = [
    "Hello, world! 123 + 4.5 = 127.5",
    "  leading and   multiple   spaces\tand tabs\n\nand newlines\r\n",
    "Ünïcödé — naïve café, 日本語のテキスト, Ελληνικά, עברית",
    "emoji 😀👍🏽🇫🇷 and a ZWJ family 👨‍👩‍👧",
    "<|im_start|>user\nhi<|im_end|>\n",
    "",
]


def test_train_save_reload_round_trip(tmp_path):
    from transformers import AutoTokenizer

    corpus = ["the cat sat on the mat", "the dog ate the bone", "numbers 12345 and more 678"] * 5
    t = train_bpe_tokenizer(corpus, 320)
    assert t.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [
        len(t) - 3, len(t) - 2, len(t) - 1]
    assert t.pad_token == "<|endoftext|>" and t.eos_token == "<|im_end|>" and t.bos_token is None
    # Specials are never split and are added by nobody.
    assert _ids(t, "<|im_start|>") == [t.convert_tokens_to_ids("<|im_start|>")]
    assert t("the cat")["input_ids"] == _ids(t, "the cat")
    # Digits are split one by one (Qwen2's pre-tokenizer).
    assert t.tokenize("2024") == ["2", "0", "2", "4"]
    t.save_pretrained(tmp_path / "tok")
    r = AutoTokenizer.from_pretrained(tmp_path / "tok")
    for s in ROUND_TRIP:
        ids = r(s, add_special_tokens=False)["input_ids"]
        assert ids == _ids(t, s)
        assert r.decode(ids) == s
        assert t.decode(ids) == s
    assert r.pad_token_id == t.pad_token_id and r.eos_token_id == t.eos_token_id
    assert r.decode(_ids(r, "<|im_start|>hi<|im_end|>"), skip_special_tokens=True) == "hi"


def test_pad_vocab_to_places_specials(tmp_path):
    t = train_bpe_tokenizer(["abc abd abe"] * 3, 300, pad_vocab_to=1000)
    assert t.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [1000, 1001, 1002]
    assert len(t) == 1003
    # Fillers are never produced by BPE, even from their own spelling.
    ids = _ids(t, "<|reserved_0|> abc")
    assert t.convert_tokens_to_ids("<|reserved_0|>") not in ids
    with pytest.raises(Exception, match="smaller than the learnt vocabulary"):
        train_bpe_tokenizer(["abc abd"], 300, pad_vocab_to=10)


def test_standin_qwen2_tokenizer(tok):
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [151643, 151644, 151645]
    assert len(tok) == 151646
    assert tok.pad_token_id == 151643 and tok.eos_token_id == 151645
    # Learnt English pieces: common words are single tokens.
    assert len(tok.tokenize(" the image shows a")) == 4
    for s in ROUND_TRIP:
        assert tok.decode(_ids(tok, s)) == s
    # Deterministic.
    assert standin_qwen2_tokenizer().backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
