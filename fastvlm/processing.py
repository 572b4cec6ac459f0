"""Image loading and preprocessing, the chat prompt, tokenization around ``<image>``,
and the processor that turns (images, text) into model inputs.

Everything here reproduces the reference (apple/ml-fastvlm ``predict.py`` with
``mm_utils.process_images`` / ``tokenizer_image_token`` and ``conv_qwen_2``) bit for bit,
with one deliberate difference: images are rotated according to their EXIF orientation
tag (see :func:`load_image`).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import warnings
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import IMAGE_TOKEN, IMAGE_TOKEN_INDEX, FastVLMConfig
from .errors import ConfigError, ImageError, ImageTooLargeError, PromptError

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
# 8192 x 8192. Far above any real photo or scan a VLM is asked about, far below what
# would exhaust memory (a decoded RGB image of this size is 192 MiB). PIL's own limits
# (a warning above ~89.5 MP, an error above ~179 MP) still apply on top of this.
DEFAULT_MAX_PIXELS = 8192 * 8192
PROCESSOR_CONFIG_NAME = "fastvlm_processor.json"

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

ImageSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, Image.Image, np.ndarray, Any]

# ---------------------------------------------------------------------------------------
# Image loading
# ---------------------------------------------------------------------------------------


def _short(name: str, limit: int = 200) -> str:
    # A mistaken "path" may be a whole base64 payload; keep error messages readable.
    return name if len(name) <= limit else name[: limit - 3] + "..."


def load_image(
    source: ImageSource,
    *,
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
    apply_exif_orientation: bool = True,
    scale_16bit: bool = True,
) -> Image.Image:
    """Load an image as an RGB ``PIL.Image.Image``.

    ``source`` may be a path (str or PathLike), a base64 ``data:`` URI, encoded bytes, a binary
    file object, a PIL image, or a uint8 numpy array (H×W, or H×W×C with C in 1, 3, 4).

    Steps: open with PIL, decode the pixels, apply the EXIF orientation tag
    (``ImageOps.exif_transpose``), then ``.convert("RGB")``. The conversion is exactly the
    reference's ``Image.open(path).convert("RGB")`` for every mode: alpha is dropped (not
    composited), palettes are expanded, CMYK images go through PIL's own conversion.
    Animated images give their first frame.

    **Deliberate difference from the reference:** the reference ignores EXIF orientation,
    so a phone photo stored sideways with an orientation tag reaches its model sideways.
    Here it is turned upright first; images without the tag are unaffected.
    ``apply_exif_orientation=False`` reproduces the reference exactly on such photos.
    (Passing ``Image.open(path).convert("RGB")`` does not: the converted image keeps the
    EXIF block, so it is still rotated here.)

    **Second deliberate difference:** 16-bit greyscale images (PIL modes ``I;16*``, and
    ``I`` holding values above 255) are scaled to 8 bits (value / 257, rounded; ``I``
    images with values above 65535 by their maximum). PIL's ``convert("RGB")``, which the
    reference calls, clips every value above 255, so a typical 16-bit PNG reaches its model
    almost entirely white. ``scale_16bit=False`` reproduces the reference.

    Every failure raises :class:`ImageError` with a message naming the problem (missing
    file, directory, empty, not an image, corrupt or truncated, too many pixels). The
    pixel count is checked from the header, before any pixel data is decoded, against
    ``max_pixels`` (``None`` disables this check; PIL's own decompression-bomb limit
    still applies and is reported as an ImageError too).
    """
    fixes = (apply_exif_orientation, scale_16bit)  # the two deliberate differences from the reference
    if isinstance(source, Image.Image):
        return _finish(source, "image", max_pixels, fixes, close=False)
    if isinstance(source, np.ndarray):
        return _finish(_from_array(source), "array image", max_pixels, fixes, close=False)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not isinstance(path, str):
            path = os.fsdecode(path)
        name = _short(path)
        if path[:5].lower() == "data:":  # an inline image, as OpenAI-style image_url parts carry them
            head, comma, payload = path.partition(",")
            if not comma or not head.lower().endswith(";base64"):
                raise ImageError(f"{_short(path, 60)}: a data: URI image must be base64 (data:image/png;base64,...)")
            try:
                data = base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                raise ImageError(f"{_short(path, 60)}: the data: URI's base64 payload does not decode") from None
            if not data:
                raise ImageError("the data: URI holds no image data")
            return _open_bytes(data, "data: URI image", max_pixels, fixes,
                               what=f"the data: URI's {len(data)} bytes are not an image format PIL can read")
        if not os.path.exists(path):
            if path.split("://", 1)[0].lower() in ("http", "https", "ftp", "s3", "gs", "file"):
                raise ImageError(f"{name} is a URL; images are read from local files here: download it first")
            raise ImageError(f"image file not found: {name}")
        if os.path.isdir(path):
            raise ImageError(f"{name} is a directory, not an image file")
        try:
            size = os.path.getsize(path)
            if size == 0:
                raise ImageError(f"{name} is empty (0 bytes)")
            with open(path, "rb") as f:
                data = f.read()
        except ImageError:
            raise
        except OSError as e:
            raise ImageError(f"cannot read {name}: {e.strerror or e}") from None
        return _open_bytes(data, name, max_pixels, fixes, what=f"{name} is not an image file PIL can read")
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise ImageError("image data is empty (0 bytes)")
        what = f"image data ({len(data)} bytes) is not an image format PIL can read"
        return _open_bytes(data, "image data", max_pixels, fixes, what=what)
    if hasattr(source, "read"):
        name = _short(str(getattr(source, "name", "image file object")))
        try:
            data = source.read()
        except OSError as e:
            raise ImageError(f"cannot read {name}: {e}") from None
        if isinstance(data, str):
            raise ImageError(f"{name} is opened in text mode; open image files in binary mode ('rb')")
        if not data:
            raise ImageError(f"{name} is empty (0 bytes)")
        return _open_bytes(bytes(data), name, max_pixels, fixes, what=f"{name} is not an image file PIL can read")
    raise ImageError(
        f"unsupported image source of type {type(source).__name__}: expected a path, bytes, "
        "a binary file object, a PIL image or a uint8 numpy array"
    )


def _from_array(arr: np.ndarray) -> Image.Image:
    if arr.dtype != np.uint8:
        raise ImageError(f"numpy image must have dtype uint8, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise ImageError(f"numpy image must be HxW or HxWxC with C in (1, 3, 4), got shape {tuple(arr.shape)}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageError(f"numpy image has no pixels (shape {tuple(arr.shape)})")
    # uint8 HxW / HxWx3 / HxWx4 map to L / RGB / RGBA by themselves.
    return Image.fromarray(np.ascontiguousarray(arr))


def _open_bytes(data: bytes, name: str, max_pixels: Optional[int], fixes: tuple, what: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            if max_pixels is not None:
                # our own limit decides (checked from the header next); PIL's warning would only
                # print a second, differently worded, notice for the same image
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError(what) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Raised by Image.open from the header alone (the warning only where the caller's
        # warning filters turn warnings into errors). PIL refuses before our own check can
        # run; where our limit is the lower one, name it rather than only PIL's.
        pil_limit = Image.MAX_IMAGE_PIXELS
        if max_pixels is not None and pil_limit is not None and max_pixels <= pil_limit:
            raise ImageTooLargeError(f"{name} has more than {max_pixels} pixels, the limit (refused as a possible "
                             f"decompression bomb; PIL: {e})") from None
        raise ImageTooLargeError(f"{name} refused as a possible decompression bomb: {e}") from None
    except Exception as e:  # noqa: BLE001 - PIL plugins raise many types on malformed headers
        raise ImageError(f"{name} is corrupt or truncated ({type(e).__name__}: {e})") from None
    return _finish(img, name, max_pixels, fixes, close=True)


def _to_8bit(img: Image.Image) -> Image.Image:
    """A 16-bit (or wider) greyscale image as 8-bit "L", scaled rather than clipped."""
    arr = np.asarray(img).astype(np.float64)
    top = float(arr.max()) if arr.size else 0.0
    if img.mode == "I" and top <= 255:
        scale = 1.0  # 8-bit values held in a 32-bit image: nothing to scale
    elif img.mode == "I" and top > 65535:
        scale = 255.0 / top
    else:
        scale = 1 / 257
    return Image.fromarray(np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8), mode="L")


def check_image_size(img: Image.Image, name: str, max_pixels: Optional[int]) -> None:
    """Refuse an image with no pixels or more than `max_pixels`, from its header (before any pixel is decoded)."""
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageError(f"{name} has no pixels ({w}x{h})")
    if max_pixels is not None and w * h > max_pixels:
        raise ImageTooLargeError(
            f"{name} is {w}x{h} = {w * h} pixels, more than the limit of {max_pixels} "
            "(refused as a possible decompression bomb)"
        )


def _finish(img: Image.Image, name: str, max_pixels: Optional[int], fixes: tuple, close: bool) -> Image.Image:
    exif, scale16 = fixes
    try:
        check_image_size(img, name, max_pixels)
        try:
            # Decode now, inside the try, so truncated data fails here and not later.
            img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageTooLargeError(f"{name} refused as a possible decompression bomb: {e}") from None
        except Exception as e:  # noqa: BLE001 - decoder errors come as OSError, SyntaxError, ValueError, ...
            raise ImageError(f"{name} is corrupt or truncated ({type(e).__name__}: {e})") from None
        upright = img
        if exif:
            try:
                upright = ImageOps.exif_transpose(img)
            except Exception:  # noqa: BLE001
                # A malformed EXIF block does not make the pixels unusable: keep the image as
                # stored, which is what the reference does for every image.
                upright = img
        if scale16 and (upright.mode.startswith("I;16") or upright.mode == "I"):
            upright = _to_8bit(upright)
        try:
            # .convert returns a new image even for RGB input, so the result never shares
            # pixels or an open file with the source.
            return upright.convert("RGB")
        except Exception as e:  # noqa: BLE001
            raise ImageError(f"{name}: cannot convert mode {img.mode!r} to RGB ({type(e).__name__}: {e})") from None
    finally:
        if close:
            img.close()


# ---------------------------------------------------------------------------------------
# Preprocessing (reference: mm_utils.expand2square + CLIPImageProcessor, mean 0 / std 1)
# ---------------------------------------------------------------------------------------

# CLIPImageProcessor's rescale: the uint8 array is cast to float64, multiplied by its
# rescale_factor 1/255 (a float64 constant), then cast to float32. Doing the multiply in
# float32 instead would change 126 of the 256 values by one ulp. With only 256 possible
# inputs the whole computation is a lookup table with bit-identical results.
_RESCALE_LUT = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)


def expand2square(img: Image.Image, fill: tuple[int, ...] = (0, 0, 0)) -> Image.Image:
    """Centre ``img`` on a square canvas of side max(W, H) filled with ``fill`` (reference semantics).

    The offset is ``(0, (W-H)//2)`` for landscape and ``((H-W)//2, 0)`` for portrait;
    a square image is returned unchanged (the same object, as in the reference).
    """
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), fill)
    canvas.paste(img, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    return canvas


def shortest_edge_size(width: int, height: int, size: int) -> tuple[int, int]:
    """Output (width, height) of CLIPImageProcessor's shortest-edge resize.

    The short side becomes ``size`` and the long side ``int(size * long / short)``: float
    division then truncation, as transformers computes it (not rounding).
    """
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (size, new_long) if width <= height else (new_long, size)


def preprocess_image(img: Any, image_size: int, aspect: str = "pad") -> torch.Tensor:
    """One image to the model's input: a float32 tensor ``[3, S, S]`` with values in [0, 1].

    ``aspect="pad"`` (reference ``process_images`` with ``image_aspect_ratio="pad"``, what
    the released checkpoints use): pad to a square with black, then bicubic resize to S×S.
    ``aspect="crop"``: bicubic resize of the short side to S, then a centre crop to S×S
    (the HF model card, the iOS app and the transformers port).

    Both follow HF ``CLIPImageProcessor`` (PIL backend) with ``image_mean=0, image_std=1``
    exactly: PIL BICUBIC resize of the uint8 RGB image, numpy centre crop, rescale by
    1/255 through float64, no normalisation. ``img`` is a PIL image (converted to RGB if it
    is not) or anything :func:`load_image` accepts.
    """
    if aspect not in ("pad", "crop"):
        raise ConfigError(f"aspect must be 'pad' or 'crop', got {aspect!r}")
    if not isinstance(image_size, int) or image_size <= 0:
        raise ConfigError(f"image_size must be a positive int, got {image_size!r}")
    if not isinstance(img, Image.Image):
        img = load_image(img)
    elif img.mode != "RGB":
        img = img.convert("RGB")
    if aspect == "pad":
        img = expand2square(img, (0, 0, 0))
    w, h = shortest_edge_size(img.width, img.height, image_size)
    if (w, h) != img.size:
        img = img.resize((w, h), Image.Resampling.BICUBIC)
    arr = np.asarray(img)  # H, W, 3 uint8
    # Centre crop as transformers' center_crop computes it (always in bounds here: the
    # short side is exactly S and the long side at least S).
    top = (h - image_size) // 2
    left = (w - image_size) // 2
    arr = arr[top : top + image_size, left : left + image_size]
    chw = np.ascontiguousarray(_RESCALE_LUT[arr].transpose(2, 0, 1))
    return torch.from_numpy(chw)


def preprocess_images(images: Sequence[Any], image_size: int, aspect: str = "pad") -> torch.Tensor:
    """Several images to ``[N, 3, S, S]`` float32 (N may be 0)."""
    if len(images) == 0:
        return torch.empty(0, 3, image_size, image_size, dtype=torch.float32)
    return torch.stack([preprocess_image(im, image_size, aspect) for im in images])


# ---------------------------------------------------------------------------------------
# Chat template (reference conv_qwen_2)
# ---------------------------------------------------------------------------------------

_ROLES = ("system", "user", "assistant")
IMAGE_PART_TYPES = ("image", "image_url", "input_image")
TEXT_PART_TYPES = ("text", "input_text")


def _render_content(content: Any, index: int, role: str) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        raise PromptError(f"message {index} ({role}) has no content")
    if not isinstance(content, (list, tuple)):
        raise PromptError(
            f"message {index} ({role}): content must be a string or a list of parts, got {type(content).__name__}"
        )
    out = []
    for j, part in enumerate(content):
        if not isinstance(part, Mapping):
            raise PromptError(
                f"message {index} ({role}), part {j}: expected a dict with a 'type', got {type(part).__name__}"
            )
        kind = part.get("type")
        if kind in IMAGE_PART_TYPES:
            if role != "user":
                raise PromptError(f"message {index} ({role}), part {j}: images are only allowed in user messages")
            # The reference query is "<image>\n" + text; each image part renders the same way.
            out.append(IMAGE_TOKEN + "\n")
        elif kind in TEXT_PART_TYPES:
            text = part.get("text")
            if not isinstance(text, str):
                raise PromptError(
                    f"message {index} ({role}), part {j}: text part needs a string 'text', got {type(text).__name__}"
                )
            out.append(text)
        else:
            raise PromptError(
                f"message {index} ({role}), part {j}: unknown part type {kind!r} "
                f"(expected one of {', '.join(TEXT_PART_TYPES + IMAGE_PART_TYPES)})"
            )
    return "".join(out)


def _check_messages(messages: Any) -> list[tuple[str, Any]]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise PromptError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    if len(messages) == 0:
        raise PromptError("messages is empty: need at least one message")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise PromptError(f"message {i} must be a dict with 'role' and 'content', got {type(m).__name__}")
        role = m.get("role")
        if role not in _ROLES:
            raise PromptError(f"message {i} has unknown role {role!r} (expected 'system', 'user' or 'assistant')")
        if "content" not in m:
            raise PromptError(f"message {i} ({role}) has no 'content'")
        out.append((role, m["content"]))
    return out


CANVAS_FACTOR = 4  # the working canvas may be this many times the image pixel limit


def check_padded_size(image, image_aspect_ratio: str, max_pixels: Optional[int], name: str = "image",
                      image_size: int = 1024) -> None:
    """Refuse an image whose working canvas would be over ``CANVAS_FACTOR * max_pixels``: the reference's pad
    makes a full-size square before the resize (a 65000x750 strip is under a pixel limit, its 65000x65000
    canvas is not), and the crop's shortest-edge resize scales a thin strip's long side up with its short one.
    An ordinary photo (8064x6048 makes an 8064x8064 canvas) stays far under it."""
    if not max_pixels:
        return
    w, h = image.size
    if image_aspect_ratio == "pad":
        side = max(w, h)
        canvas, what = side * side, f"padding it to a square makes a {side}x{side} canvas"
    else:
        cw, ch = shortest_edge_size(w, h, image_size)
        canvas, what = cw * ch, f"resizing its short side to {image_size} px makes it {cw}x{ch}"
    if canvas > CANVAS_FACTOR * max_pixels:
        raise ImageTooLargeError(f"{name} is {w}x{h}: {what}, more than {CANVAS_FACTOR} times the limit of "
                                 f"{max_pixels} pixels")


def build_prompt(
    messages: Sequence[Mapping[str, Any]],
    *,
    system_prompt: Optional[str] = DEFAULT_SYSTEM_PROMPT,
    add_generation_prompt: bool = True,
) -> str:
    """Render HF-style chat messages in the reference's ``conv_qwen_2`` format.

    For one user message ``[image, text]`` the result is exactly the reference string::

        <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n<image>\\n{text}<|im_end|>\\n<|im_start|>assistant\\n

    ``content`` is a string (a literal ``<image>`` in it is a placeholder too) or a list
    of parts: ``{"type": "text", "text": ...}`` renders its text, an image part
    (``"image"``, ``"image_url"``, ``"input_image"``, with or without a payload) renders
    ``<image>\\n``, in the order given. A leading system message replaces
    ``system_prompt``; ``system_prompt=None`` with no system message omits the system
    turn. A system message further on is a system turn in its place (as Qwen2's own chat
    template renders it). Each turn is ``<|im_start|>{role}\\n{text}<|im_end|>\\n``, or, as the
    reference renders an empty message, just ``<|im_start|>{role}\\n``; with
    ``add_generation_prompt`` an open ``<|im_start|>assistant\\n`` follows.
    """
    checked = _check_messages(messages)
    system = system_prompt
    if checked[0][0] == "system":
        system = _render_content(checked[0][1], 0, "system")
        start = 1
    else:
        start = 0
    pieces = []
    if system is not None:
        if not isinstance(system, str):
            raise PromptError(f"system_prompt must be a string, got {type(system).__name__}")
        pieces.append(f"{IM_START}system\n{system}{IM_END}\n")
    for i in range(start, len(checked)):
        role, content = checked[i]
        text = _render_content(content, i, role)
        # the reference renders an empty message as its bare role, with no <|im_end|> (its generation-slot rule)
        pieces.append(f"{IM_START}{role}\n{text}{IM_END}\n" if text else f"{IM_START}{role}\n")
    if add_generation_prompt:
        pieces.append(f"{IM_START}assistant\n")
    return "".join(pieces)


def message_images(messages: Sequence[Mapping[str, Any]]) -> list[Any]:
    """The image payloads of the image parts in ``messages``, in prompt order.

    Pairs with :func:`build_prompt`: the k-th ``<image>`` it renders from a part belongs to
    the k-th entry here. The payload is the part's ``"image"``, ``"image_url"`` (a string
    or ``{"url": ...}``), ``"url"`` or ``"path"`` value, or None for a bare ``{"type": "image"}``.
    Literal ``<image>`` text in string content has no payload and is not listed.
    """
    out = []
    for i, (role, content) in enumerate(_check_messages(messages)):
        if not isinstance(content, (list, tuple)):
            continue
        for part in content:
            if isinstance(part, Mapping) and part.get("type") in IMAGE_PART_TYPES:
                payload = None
                for key in ("image", "image_url", "url", "path"):
                    if part.get(key) is not None:
                        payload = part[key]
                        break
                if isinstance(payload, Mapping) and "url" in payload:
                    payload = payload["url"]
                out.append(payload)
    return out


# ---------------------------------------------------------------------------------------
# Tokenization around <image>
# ---------------------------------------------------------------------------------------


def tokenize_prompt(prompt: str, tokenizer: Any, num_image_tokens: int) -> list[int]:
    """Token ids of ``prompt`` with each ``<image>`` expanded to ``num_image_tokens`` × -200.

    Like the reference's ``tokenizer_image_token``, the text between placeholders is
    tokenized chunk by chunk, so no token spans an image boundary, and the tokenizer adds
    no special tokens (Qwen2 has no BOS). Unlike the reference, which leaves one -200
    per image for the model to widen, the run here already has the image's length.
    """
    if not isinstance(prompt, str):
        raise PromptError(f"prompt must be a string, got {type(prompt).__name__}")
    if num_image_tokens <= 0:
        raise ConfigError(f"num_image_tokens must be positive, got {num_image_tokens}")
    chunks = prompt.split(IMAGE_TOKEN)
    nonempty = [c for c in chunks if c]
    # One batched call: fast tokenizers encode a batch in parallel.
    encoded = iter(tokenizer(nonempty, add_special_tokens=False)["input_ids"]) if nonempty else iter(())
    ids: list[int] = []
    for k, chunk in enumerate(chunks):
        if k:
            ids.extend([IMAGE_TOKEN_INDEX] * num_image_tokens)
        if chunk:
            ids.extend(next(encoded))
    return ids


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def count_placeholders(texts: Iterable[str]) -> int:
    return sum(t.count(IMAGE_TOKEN) for t in texts)


# ---------------------------------------------------------------------------------------
# Processor
# ---------------------------------------------------------------------------------------


class ProcessorOutput(dict):
    """The processor's result: a dict with attribute access and ``.to()``, like HF's BatchEncoding."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: Any = None, dtype: Optional[torch.dtype] = None) -> "ProcessorOutput":
        """Move every tensor to ``device``; ``dtype`` applies to floating tensors only
        (pixel_values), so ids and masks stay integer. Modifies in place and returns self."""
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        for k, v in self.items():
            if isinstance(v, torch.Tensor):
                if dtype is not None and v.is_floating_point():
                    self[k] = v.to(device=device, dtype=dtype)
                elif device is not None:
                    self[k] = v.to(device)
        return self


def _is_single_image(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray)) or hasattr(
        x, "read"
    )


def _flatten_images(images: Any) -> list[Any]:
    if images is None:
        return []
    if _is_single_image(images):
        return [images]
    if isinstance(images, torch.Tensor):
        raise ImageError("pass images as PIL images, paths, bytes or uint8 numpy arrays, not tensors")
    out = []
    for item in images:
        # One level of nesting (a list of images per sample) is flattened: images are
        # consumed in order across the whole batch anyway.
        if _is_single_image(item) or item is None:
            out.append(item)
        elif isinstance(item, (list, tuple)):
            out.extend(item)
        else:
            out.append(item)  # not an image: load_image names its type
    for k, item in enumerate(out):
        if item is None:
            raise ImageError(f"image {k} is None")
    return out


class FastVLMProcessor:
    """Images + text to ``input_ids`` / ``attention_mask`` / ``pixel_values``.

    Each ``<image>`` in a prompt becomes ``num_image_tokens`` copies of -200
    (``IMAGE_TOKEN_INDEX``), which the model replaces by that image's projected features;
    the placeholders take the images in order across the whole batch.
    """

    def __init__(
        self,
        tokenizer: Any,
        image_size: int,
        num_image_tokens: int,
        image_aspect_ratio: str = "pad",
        system_prompt: Optional[str] = DEFAULT_SYSTEM_PROMPT,
        *,
        max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
    ) -> None:
        if image_aspect_ratio not in ("pad", "crop"):
            raise ConfigError(f"image_aspect_ratio must be 'pad' or 'crop', got {image_aspect_ratio!r}")
        if not isinstance(image_size, int) or image_size <= 0:
            raise ConfigError(f"image_size must be a positive int, got {image_size!r}")
        if not isinstance(num_image_tokens, int) or num_image_tokens <= 0:
            raise ConfigError(f"num_image_tokens must be a positive int, got {num_image_tokens!r}")
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.num_image_tokens = num_image_tokens
        self.image_aspect_ratio = image_aspect_ratio
        self.system_prompt = system_prompt
        # Decompression-bomb limit for load_image (not saved: it is a policy of the caller).
        self.max_pixels = max_pixels

    @classmethod
    def from_config(cls, config: FastVLMConfig, tokenizer: Any) -> "FastVLMProcessor":
        return cls(
            tokenizer,
            image_size=config.image_size,
            num_image_tokens=config.num_image_tokens,
            image_aspect_ratio=config.image_aspect_ratio,
            system_prompt=config.system_prompt,
        )

    # -- settings round trip --------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "processor_class": "FastVLMProcessor",
            "image_size": self.image_size,
            "num_image_tokens": self.num_image_tokens,
            "image_aspect_ratio": self.image_aspect_ratio,
            "system_prompt": self.system_prompt,
        }

    def save_pretrained(self, directory: Union[str, os.PathLike]) -> None:
        """Write the tokenizer files and ``fastvlm_processor.json`` (the other settings)."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        with open(os.path.join(directory, PROCESSOR_CONFIG_NAME), "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike], tokenizer: Any = None) -> "FastVLMProcessor":
        """Rebuild a processor saved by :meth:`save_pretrained` (offline, local directory)."""
        directory = os.fspath(directory)
        path = os.path.join(directory, PROCESSOR_CONFIG_NAME)
        if not os.path.isfile(path):
            raise ConfigError(f"no {PROCESSOR_CONFIG_NAME} in {directory}")
        try:
            with open(path) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(directory)
        try:
            return cls(
                tokenizer,
                image_size=d["image_size"],
                num_image_tokens=d["num_image_tokens"],
                image_aspect_ratio=d.get("image_aspect_ratio", "pad"),
                system_prompt=d.get("system_prompt", DEFAULT_SYSTEM_PROMPT),
            )
        except KeyError as e:
            raise ConfigError(f"{path} lacks {e.args[0]!r}") from None

    # -- special ids ------------------------------------------------------------------------

    def _token_id(self, token: str) -> Optional[int]:
        i = self.tokenizer.convert_tokens_to_ids(token)
        # Unknown tokens map to the unk id (or None): accept only an id that maps back.
        if i is None or self.tokenizer.convert_ids_to_tokens(i) != token:
            return None
        return int(i)

    @property
    def eos_token_ids(self) -> list[int]:
        """Ids that end generation: ``<|im_end|>`` (ends the assistant turn) and the
        tokenizer's eos, deduplicated."""
        ids = []
        for i in (self._token_id(IM_END), self.tokenizer.eos_token_id):
            if i is not None and i not in ids:
                ids.append(int(i))
        return ids

    @property
    def pad_token_id(self) -> int:
        """The tokenizer's pad id, else its eos id (padding is masked out, so any real id works)."""
        for i in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id, self._token_id(IM_END)):
            if i is not None:
                return int(i)
        raise ConfigError("the tokenizer has neither a pad token nor an eos token to pad with")

    # -- text -------------------------------------------------------------------------------

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, tokenize: bool = False
    ) -> Union[str, list[int]]:
        prompt = build_prompt(messages, system_prompt=self.system_prompt, add_generation_prompt=add_generation_prompt)
        if tokenize:
            return tokenize_prompt(prompt, self.tokenizer, self.num_image_tokens)
        return prompt

    def tokenize(self, prompt: str) -> list[int]:
        return tokenize_prompt(prompt, self.tokenizer, self.num_image_tokens)

    def process_images(self, images: Any) -> torch.Tensor:
        """Load and preprocess images (one or a list) to ``[N, 3, S, S]`` float32."""
        return preprocess_images(self._load(_flatten_images(images)), self.image_size, self.image_aspect_ratio)

    def _load(self, items: list) -> list:
        """Decode images under the pixel limit, and refuse those whose working canvas would be too large."""
        loaded = []
        for x in items:
            image = load_image(x, max_pixels=self.max_pixels)
            check_padded_size(image, self.image_aspect_ratio, self.max_pixels, image_size=self.image_size)
            loaded.append(image)
        return loaded

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        # -200 image slots (and any other negative id) are not tokens.
        ids = [int(i) for i in ids if int(i) >= 0]
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens).strip()

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = True) -> list[str]:
        if isinstance(sequences, torch.Tensor):
            sequences = sequences.tolist()
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

    # -- everything together ---------------------------------------------------------------

    def __call__(
        self,
        images: Any = None,
        text: Union[str, Sequence[str], None] = None,
        *,
        padding_side: str = "left",
        return_tensors: Optional[str] = "pt",
        max_length: Optional[int] = None,
    ) -> ProcessorOutput:
        """Tokenize ``text`` (one prompt or a batch) and preprocess ``images``.

        Returns ``input_ids`` and ``attention_mask`` (``[B, L]`` long, padded with
        :attr:`pad_token_id` on ``padding_side``: "left" for generation, "right" for
        training) and, when there are images, ``pixel_values`` ``[N, 3, S, S]`` float32 in
        placeholder order. The number of ``<image>`` placeholders must equal the number of
        images. ``max_length``: a prompt longer than this raises PromptError (cutting it
        could split an image's token run or drop the generation prompt).
        ``return_tensors=None`` gives lists (and a list of ``[3, S, S]`` tensors).
        """
        if text is None:
            raise PromptError("text is required (a prompt string or a list of them)")
        texts = [text] if isinstance(text, str) else list(text)
        for k, t in enumerate(texts):
            if not isinstance(t, str):
                raise PromptError(f"text {k} must be a string, got {type(t).__name__}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")

        items = _flatten_images(images)
        n_ph = count_placeholders(texts)
        if n_ph != len(items):
            who = "prompt has" if len(texts) == 1 else "prompts have"
            given = "1 image was given" if len(items) == 1 else f"{len(items)} images were given"
            hint = " (put <image> in the text where each image goes)" if n_ph == 0 else ""
            raise PromptError(f"{who} {_plural(n_ph, '<image> placeholder')} but {given}{hint}")

        seqs = [tokenize_prompt(t, self.tokenizer, self.num_image_tokens) for t in texts]
        if max_length is not None:
            for k, s in enumerate(seqs):
                if len(s) > max_length:
                    raise PromptError(
                        f"prompt {k} is {len(s)} tokens long (image tokens included), more than max_length={max_length}"
                    )
        width = max((len(s) for s in seqs), default=0)
        pad = self.pad_token_id
        ids, mask = [], []
        for s in seqs:
            n = width - len(s)
            if padding_side == "left":
                ids.append([pad] * n + s)
                mask.append([0] * n + [1] * len(s))
            else:
                ids.append(s + [pad] * n)
                mask.append([1] * len(s) + [0] * n)

        out = ProcessorOutput()
        pixels = [preprocess_image(image, self.image_size, self.image_aspect_ratio) for image in self._load(items)]
        if return_tensors == "pt":
            out["input_ids"] = torch.tensor(ids, dtype=torch.long).reshape(len(ids), width)
            out["attention_mask"] = torch.tensor(mask, dtype=torch.long).reshape(len(ids), width)
            if pixels:
                out["pixel_values"] = torch.stack(pixels)
        else:
            out["input_ids"] = ids
            out["attention_mask"] = mask
            if pixels:
                out["pixel_values"] = pixels
        return out

    def __repr__(self) -> str:
        return (
            f"FastVLMProcessor(image_size={self.image_size}, num_image_tokens={self.num_image_tokens}, "
            f"image_aspect_ratio={self.image_aspect_ratio!r}, tokenizer={type(self.tokenizer).__name__})"
        )


__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_SYSTEM_PROMPT",
    "FastVLMProcessor",
    "ProcessorOutput",
    "build_prompt",
    "check_padded_size",
    "count_placeholders",
    "expand2square",
    "load_image",
    "message_images",
    "preprocess_image",
    "preprocess_images",
    "shortest_edge_size",
    "tokenize_prompt",
]
