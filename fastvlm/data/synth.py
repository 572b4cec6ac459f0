"""Deterministic synthetic, text-rich visual question answering data (LLaVA format).

Each image is a pale background with 0-6 coloured shapes (circle, square, triangle, star,
diamond in seven clearly distinct colours) and a few rendered words and numbers at font sizes
from barely legible to large. Each record asks one question about its image (sometimes a
second, multi-turn one) whose short, canonical answer is correct by construction:

    count        "How many circles are there?"                       -> "3"
    color        "What color is the square?"                         -> "red"
    shape        "What shape is the green object?"                   -> "triangle"
    position     "Is the red circle left or right of the blue star?" -> "left"
    exists       "Is there a yellow star?"                           -> "yes"
    read_word    "What word is written in the image?"                -> "apple"
    read_number  "What is the number written in blue?"               -> "4817"

Reading questions record the target's font size as ``text_size`` so accuracy can be broken
down by how small the text is -- FastVLM's point is that a higher input resolution lets the
model read smaller text.

Everything is derived from ``(seed, split, index)`` through private ``random.Random`` /
``numpy.random.Generator`` instances (never the global RNGs), so a sample does not depend on
how many others are generated, the same arguments give byte-identical JSON and identical
pixels (on the same Pillow/FreeType build), and the splits use different seeds. Text is
rendered with the TrueType font bundled inside Pillow (``ImageFont.load_default(size=...)``),
so no system font is needed.

Public API: :func:`generate_dataset`, :func:`generate_sample`, :func:`load_split`,
:func:`validate_record`, :func:`derive_answer`, :func:`generate_reading_scene`.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import random
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..errors import FastVLMError

GENERATOR_VERSION = "1.0"
IMAGE_TOKEN = "<image>"  # same string as fastvlm.config.IMAGE_TOKEN (kept literal: no heavy import)

SPLITS = ("train", "val", "test")
QUESTION_TYPES = ("count", "color", "shape", "position", "exists", "read_word", "read_number")
SHAPES = ("circle", "square", "triangle", "star", "diamond")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (30, 150, 55),
    "blue": (35, 80, 225),
    "yellow": (245, 200, 0),
    "purple": (135, 55, 185),
    "orange": (250, 125, 10),
    "black": (25, 25, 25),
}
# Colours text may be written in (yellow / orange are too faint on a pale background to read).
TEXT_COLORS = ("black", "red", "green", "blue", "purple")
TEXT_COLOR_WEIGHTS = (4, 1.5, 1.5, 1.5, 1.5)
# Font sizes (pixels, em height as passed to FreeType) at image_size 512; scaled with the image.
TEXT_SIZES_512 = (6, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40)
MIN_FONT_SIZE = 4
# Object "radius" (half the extent) range at image_size 512; scaled with the image.
OBJECT_RADIUS_512 = (18, 44)
MULTI_TURN_PROB = 0.2
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 128, 4096

WORDS = (
    "apple", "bread", "chair", "cloud", "dance", "earth", "field", "ghost", "horse", "house",
    "juice", "knife", "lemon", "light", "money", "music", "night", "ocean", "paper", "party",
    "piano", "plant", "queen", "radio", "river", "robot", "salad", "sheep", "shirt", "smile",
    "snake", "sound", "space", "spoon", "storm", "sugar", "table", "tiger", "toast", "tower",
    "train", "truck", "water", "whale", "world", "zebra", "baby", "ball", "bank", "bath",
    "bear", "bell", "bike", "bird", "boat", "book", "cake", "camp", "card", "city",
    "coat", "cook", "corn", "desk", "door", "duck", "face", "farm", "fire", "fish",
    "flag", "frog", "game", "gift", "goat", "gold", "hand", "hill", "home", "king",
    "kite", "lamp", "leaf", "lion", "map", "milk", "moon", "nest", "note", "park",
    "pear", "pen", "rain", "ring", "road", "rock", "rose", "sand", "ship", "shoe",
    "snow", "sock", "song", "soup", "sun", "tent", "time", "tree", "wind", "wolf",
    "ant", "bag", "bee", "box", "bus", "cat", "cow", "cup", "dog", "egg",
    "fan", "fox", "hat", "ice", "jam", "key", "owl", "pig", "pot", "tea",
    "toy", "van", "web", "art", "beach", "candy", "clock", "dream", "glass", "grape",
    "heart", "honey", "igloo", "jelly", "magic", "mouse", "onion", "pizza", "rabbit", "garden",
    "planet", "pencil", "window", "winter", "summer", "school", "monkey", "banana", "rocket", "silver",
)


class Level:
    """How hard the scenes are. ``standard`` is the full benchmark; ``basic`` is the same task
    family made learnable by a few-million-parameter model trained from scratch in an hour of
    CPU (fewer objects and distractor texts, a 24-word vocabulary, two-digit numbers, and no
    text smaller than 12 px at 512; the small sizes still vanish at low input resolution)."""

    def __init__(self, name: str, *, words: tuple[str, ...], digits: tuple[int, int],
                 text_sizes_512: tuple[int, ...], max_objects: int, max_distractor_texts: int,
                 single_text_prob: float) -> None:
        self.name = name
        self.words = words
        self.digits = digits  # (min, max) digits of a rendered number
        self.text_sizes_512 = text_sizes_512
        self.max_objects = max_objects  # per scene (count answers run 0..max_objects)
        self.max_distractor_texts = max_distractor_texts
        self.single_text_prob = single_text_prob  # reading: the only word/number (else told apart by colour)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "num_words": len(self.words), "digits": list(self.digits),
                "text_sizes_512": list(self.text_sizes_512), "max_objects": self.max_objects,
                "max_distractor_texts": self.max_distractor_texts,
                "single_text_prob": self.single_text_prob}


LEVELS: dict[str, Level] = {
    "standard": Level("standard", words=WORDS, digits=(2, 4), text_sizes_512=TEXT_SIZES_512, max_objects=6,
                      max_distractor_texts=3, single_text_prob=0.6),
    "basic": Level("basic", words=("apple", "bread", "chair", "cloud", "horse", "house", "lemon", "music",
                                   "ocean", "piano", "robot", "tiger", "water", "zebra", "book", "cake",
                                   "fish", "frog", "king", "moon", "cat", "dog", "sun", "tree"),
                   digits=(2, 2), text_sizes_512=(12, 16, 20, 24, 32, 40), max_objects=4,
                   max_distractor_texts=1, single_text_prob=0.8),
}
MAX_TURNS = len(QUESTION_TYPES)  # one question per type and image at most


def _check_turns(name: str, turns: int | None) -> None:
    if turns is not None and not (isinstance(turns, int) and not isinstance(turns, bool) and 1 <= turns <= MAX_TURNS):
        raise SynthDataError(f"{name} must be an integer in [1, {MAX_TURNS}], got {turns!r}")


def get_level(level: "str | Level") -> Level:
    if isinstance(level, Level):
        return level
    if level not in LEVELS:
        raise SynthDataError(f"unknown level {level!r}; choose one of {', '.join(LEVELS)}")
    return LEVELS[level]


_TEMPLATES: dict[str, tuple[str, ...]] = {
    "count_shape": ("How many {plural} are there?", "How many {plural} are in the image?",
                    "Count the {plural} in the image."),
    "count_color": ("How many {color} shapes are there?", "How many shapes are {color}?"),
    "count_all": ("How many shapes are there?", "How many shapes are in the image?"),
    "color": ("What color is the {shape}?", "What is the color of the {shape}?"),
    "shape": ("What shape is the {color} object?", "What is the shape of the {color} object?"),
    "position_x": ("Is the {a} left or right of the {b}?",),
    "position_y": ("Is the {a} above or below the {b}?",),
    "exists": ("Is there a {color} {shape}?", "Is there a {color} {shape} in the image?"),
    "read_word": ("What word is written in the image?", "What word is shown in the image?",
                  "Read the word in the image."),
    "read_word_color": ("What is the word written in {color}?", "Which word is written in {color}?"),
    "read_number": ("What number is written in the image?", "What number is shown in the image?",
                    "Read the number in the image."),
    "read_number_color": ("What is the number written in {color}?", "Which number is written in {color}?"),
}


class SynthDataError(FastVLMError):
    """Bad arguments to the synthetic-data generator, or a malformed synthetic-data file."""


class OutputDirNotEmptyError(SynthDataError):
    """The output directory already holds files and overwriting was not requested."""


class _Retry(Exception):
    """Internal: this random draw did not work out (placement or ambiguity); draw again."""


def _check(cond: bool, msg: str) -> None:
    # Not `assert`: these are the correctness-by-construction checks and must survive `python -O`.
    if not cond:
        raise AssertionError(f"synthetic data invariant violated: {msg}")


# --------------------------------------------------------------------------------------------
# Fonts and geometry
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.FreeTypeFont:
    try:
        font = ImageFont.load_default(size=size)
    except (ImportError, TypeError, OSError) as e:  # Pillow without FreeType, or Pillow < 10.1
        raise SynthDataError(
            "rendering text needs Pillow >= 10.1 built with FreeType "
            f"(ImageFont.load_default(size=...) failed: {e})") from e
    if not isinstance(font, ImageFont.FreeTypeFont):
        raise SynthDataError("Pillow was built without FreeType; cannot render text at chosen sizes")
    return font


def text_sizes(image_size: int, level: "str | Level" = "standard") -> list[int]:
    """The font sizes (pixels) used at ``image_size`` (the level's 512-pixel list, scaled)."""
    out = []
    for s in get_level(level).text_sizes_512:
        v = max(MIN_FONT_SIZE, round(s * image_size / 512))
        if v not in out:
            out.append(v)
    return out


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Polygon vertices of a shape (None for a circle)."""
    if shape == "circle":
        return None
    if shape == "square":
        h = 0.82 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        # Equilateral, pointing up, centred in its bounding box.
        w = r
        h = r * math.sqrt(3)  # height of an equilateral triangle with side 2r
        return [(cx, cy - h / 2), (cx + w, cy + h / 2), (cx - w, cy + h / 2)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.45 * r
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
        return pts
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.68 * r, cy), (cx, cy + r), (cx - 0.68 * r, cy)]
    raise ValueError(f"unknown shape {shape!r}")


def _shape_bbox(shape: str, cx: float, cy: float, r: float) -> list[int]:
    pts = _shape_points(shape, cx, cy, r)
    if pts is None:
        x0, y0, x1, y1 = cx - r, cy - r, cx + r, cy + r
    else:
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        x0, y0, x1, y1 = min(xs), min(ys), max(xs), max(ys)
    return [math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1)]


def _overlaps(a: list[int], b: list[int], gap: int) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


# --------------------------------------------------------------------------------------------
# Scene planning and placement
# --------------------------------------------------------------------------------------------


def _text_color(rng: random.Random, exclude: tuple[str, ...] = ()) -> str:
    choices = [(c, w) for c, w in zip(TEXT_COLORS, TEXT_COLOR_WEIGHTS) if c not in exclude]
    return rng.choices([c for c, _ in choices], weights=[w for _, w in choices])[0]


def _random_number(rng: random.Random, level: Level) -> str:
    digits = rng.randint(*level.digits)
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


class _Plan:
    """What goes into a scene before it is placed: object and text specs, plus the question."""

    def __init__(self) -> None:
        self.objects: list[dict[str, Any]] = []  # {"shape", "color"}
        self.texts: list[dict[str, Any]] = []  # {"kind", "text", "color", "size"}
        self.question: dict[str, Any] | None = None  # {"type", "params", "answer"}; None = decide after placing

    def add_object(self, shape: str, color: str) -> None:
        self.objects.append({"shape": shape, "color": color})

    def add_text(self, kind: str, text: str, color: str, size: int) -> None:
        self.texts.append({"kind": kind, "text": text, "color": color, "size": size})


def _fill_objects(plan: _Plan, rng: random.Random, n: int, *, not_shape: str | None = None,
                  not_color: str | None = None, not_combos: tuple[tuple[str, str], ...] = ()) -> None:
    shapes = [s for s in SHAPES if s != not_shape]
    colors = [c for c in COLORS if c != not_color]
    for _ in range(n):
        while True:
            s, c = rng.choice(shapes), rng.choice(colors)
            if (c, s) not in not_combos:
                break
        plan.add_object(s, c)


def _used_words(plan: _Plan) -> set[str]:
    return {t["text"] for t in plan.texts}


def _add_distractor_texts(plan: _Plan, rng: random.Random, sizes: list[int], n: int, level: Level, *,
                          kinds: tuple[str, ...] = ("word", "number"),
                          exclude_colors: tuple[str, ...] = ()) -> None:
    for _ in range(n):
        kind = rng.choice(kinds)
        if kind == "word":
            text = rng.choice([w for w in level.words if w not in _used_words(plan)])
        else:
            text = _random_number(rng, level)
            while text in _used_words(plan):
                text = _random_number(rng, level)
        plan.add_text(kind, text, _text_color(rng, exclude_colors), rng.choice(sizes))


def _plan_scene(qtype: str, rng: random.Random, sizes: list[int], level: Level) -> _Plan:
    plan = _Plan()
    M, D = level.max_objects, level.max_distractor_texts
    if qtype == "count":
        mode = rng.choices(["shape", "color", "all"], weights=[2, 1.2, 0.8])[0]
        if mode == "all":
            k = rng.randint(1, M)
            _fill_objects(plan, rng, k)
            params: dict[str, Any] = {}
        else:
            k = rng.choices(range(M), weights=[0.6] + [1] * (M - 1))[0]
            m = rng.randint(1 if k == 0 else 0, min(M - k, 3))
            if mode == "shape":
                s = rng.choice(SHAPES)
                for _ in range(k):
                    plan.add_object(s, rng.choice(list(COLORS)))
                _fill_objects(plan, rng, m, not_shape=s)
                params = {"shape": s}
            else:
                c = rng.choice(list(COLORS))
                for _ in range(k):
                    plan.add_object(rng.choice(SHAPES), c)
                _fill_objects(plan, rng, m, not_color=c)
                params = {"color": c}
        rng.shuffle(plan.objects)
        plan.question = {"type": "count", "params": params, "answer": str(k)}
        _add_distractor_texts(plan, rng, sizes, rng.randint(0, D), level)
    elif qtype == "color":
        s, c = rng.choice(SHAPES), rng.choice(list(COLORS))
        plan.add_object(s, c)
        _fill_objects(plan, rng, rng.randint(0, M - 2), not_shape=s)
        rng.shuffle(plan.objects)
        plan.question = {"type": "color", "params": {"shape": s}, "answer": c}
        _add_distractor_texts(plan, rng, sizes, rng.randint(0, D), level)
    elif qtype == "shape":
        s, c = rng.choice(SHAPES), rng.choice(list(COLORS))
        plan.add_object(s, c)
        _fill_objects(plan, rng, rng.randint(0, M - 2), not_color=c)
        rng.shuffle(plan.objects)
        plan.question = {"type": "shape", "params": {"color": c}, "answer": s}
        # No text in the asked colour, so "the green object" cannot mean a green word.
        _add_distractor_texts(plan, rng, sizes, rng.randint(0, D), level, exclude_colors=(c,))
    elif qtype == "position":
        a = (rng.choice(list(COLORS)), rng.choice(SHAPES))
        while True:
            b = (rng.choice(list(COLORS)), rng.choice(SHAPES))
            if b != a:
                break
        plan.add_object(a[1], a[0])
        plan.add_object(b[1], b[0])
        _fill_objects(plan, rng, rng.randint(0, M - 3), not_combos=(a, b))
        # The question (axis, order) is chosen after placement, from what is unambiguous.
        plan.question = {"type": "position", "params": {"a": list(a), "b": list(b)}, "answer": None}
        _add_distractor_texts(plan, rng, sizes, rng.randint(0, min(2, D)), level)
    elif qtype == "exists":
        c, s = rng.choice(list(COLORS)), rng.choice(SHAPES)
        yes = rng.random() < 0.5
        if yes:
            plan.add_object(s, c)
            _fill_objects(plan, rng, rng.randint(0, M - 2))
        else:
            n = rng.randint(1, M - 1)
            # Near misses make "no" informative: same colour or same shape, not both.
            for _ in range(rng.randint(0, min(2, n))):
                if rng.random() < 0.5:
                    plan.add_object(rng.choice([x for x in SHAPES if x != s]), c)
                else:
                    plan.add_object(s, rng.choice([x for x in COLORS if x != c]))
            _fill_objects(plan, rng, n - len(plan.objects), not_combos=((c, s),))
        rng.shuffle(plan.objects)
        plan.question = {"type": "exists", "params": {"color": c, "shape": s}, "answer": "yes" if yes else "no"}
        _add_distractor_texts(plan, rng, sizes, rng.randint(0, D), level)
    elif qtype in ("read_word", "read_number"):
        kind = "word" if qtype == "read_word" else "number"
        other = "number" if kind == "word" else "word"
        size = rng.choice(sizes)  # uniform over sizes: balanced accuracy-by-size breakdown
        if rng.random() < level.single_text_prob:  # the only text of its kind in the image
            target = rng.choice(level.words) if kind == "word" else _random_number(rng, level)
            plan.add_text(kind, target, _text_color(rng), size)
            _add_distractor_texts(plan, rng, sizes, rng.randint(0, min(2, D)), level, kinds=(other,))
            params = {"color": None}
        else:  # several of its kind, told apart by colour
            n = rng.randint(2, 3)
            colors = rng.sample(TEXT_COLORS, n)
            for i, c in enumerate(colors):
                if kind == "word":
                    t = rng.choice([w for w in level.words if w not in _used_words(plan)])
                else:
                    t = _random_number(rng, level)
                    while t in _used_words(plan):
                        t = _random_number(rng, level)
                plan.add_text(kind, t, c, size if i == 0 else rng.choice(sizes))
            target, params = plan.texts[0]["text"], {"color": colors[0]}
            _add_distractor_texts(plan, rng, sizes, rng.randint(0, min(1, D)), level, kinds=(other,))
        rng.shuffle(plan.texts)
        _fill_objects(plan, rng, rng.randint(0, M - 2))
        plan.question = {"type": qtype, "params": params, "answer": target, "text_size": size}
    else:
        raise ValueError(f"unknown question type {qtype!r}")
    return plan


def _place(plan: _Plan, rng: random.Random, image_size: int) -> dict[str, Any]:
    """Give every object and text a non-overlapping position. Raises _Retry if it cannot."""
    S = image_size
    scale = S / 512
    margin = max(2, round(6 * scale))  # from the image border
    gap = max(3, round(10 * scale))  # between items
    items: list[tuple[int, str, int, dict[str, Any]]] = []  # (extent, kind, index, spec)
    r_lo, r_hi = OBJECT_RADIUS_512
    for i, o in enumerate(plan.objects):
        r = rng.randint(round(r_lo * scale), round(r_hi * scale))
        items.append((2 * r, "object", i, dict(o, size=r)))
    for i, t in enumerate(plan.texts):
        font = _font(t["size"])
        l, tp, rr, b = font.getbbox(t["text"])
        items.append((rr - l, "text", i, dict(t, _ink=(l, tp, rr, b))))
    # Largest first: placement by rejection sampling succeeds far more often.
    order = sorted(range(len(items)), key=lambda j: (-items[j][0], j))
    placed: list[list[int]] = []
    objects: list[dict[str, Any] | None] = [None] * len(plan.objects)
    texts: list[dict[str, Any] | None] = [None] * len(plan.texts)
    for j in order:
        _, what, i, spec = items[j]
        for _ in range(200):
            if what == "object":
                r = spec["size"]
                pts = _shape_points(spec["shape"], 0, 0, r)
                half_w = r if pts is None else max(abs(p[0]) for p in pts)
                half_h = r if pts is None else max(abs(p[1]) for p in pts)
                lo_x, hi_x = margin + half_w, S - margin - half_w
                lo_y, hi_y = margin + half_h, S - margin - half_h
                cx = round(rng.uniform(lo_x, hi_x))
                cy = round(rng.uniform(lo_y, hi_y))
                bbox = _shape_bbox(spec["shape"], cx, cy, r)
            else:
                l, tp, rr, b = spec["_ink"]
                w, h = rr - l, b - tp
                if w + 2 * margin >= S or h + 2 * margin >= S:
                    raise _Retry()
                x = rng.randint(margin, S - margin - w)
                y = rng.randint(margin, S - margin - h)
                bbox = [x, y, x + w, y + h]
            if any(_overlaps(bbox, p, gap) for p in placed):
                continue
            if not (0 <= bbox[0] and 0 <= bbox[1] and bbox[2] <= S and bbox[3] <= S):
                continue
            placed.append(bbox)
            if what == "object":
                objects[i] = {"shape": spec["shape"], "color": spec["color"], "center": [cx, cy],
                              "size": spec["size"], "bbox": bbox}
            else:
                texts[i] = {"kind": spec["kind"], "text": spec["text"], "color": spec["color"],
                            "size": spec["size"], "bbox": bbox}
            break
        else:
            raise _Retry()
    return {"image_size": S, "objects": objects, "texts": texts}


def _render(scene: dict[str, Any], rng: random.Random) -> Image.Image:
    S = scene["image_size"]
    nrng = np.random.default_rng(rng.getrandbits(64))
    base = np.array([rng.randint(222, 252) for _ in range(3)], dtype=np.float32)
    style = rng.choices(["plain", "gradient", "blotchy"], weights=[2, 1, 1])[0]
    scene["background"] = {"style": style, "color": [int(v) for v in base]}
    if style == "plain":
        img = Image.new("RGB", (S, S), tuple(int(v) for v in base))
    else:
        if style == "gradient":
            other = np.array([rng.randint(222, 252) for _ in range(3)], dtype=np.float32)
            t = np.linspace(0.0, 1.0, S, dtype=np.float32)
            t = t[None, :, None] if rng.random() < 0.5 else t[:, None, None]
            arr = base * (1 - t) + other * t
            arr = np.broadcast_to(arr, (S, S, 3))
        else:  # smooth low-frequency blotches of +-~10 levels
            small = nrng.normal(0.0, 5.0, size=(5, 5, 3)).astype(np.float32)
            chans = [np.asarray(Image.fromarray(small[..., k]).resize((S, S), Image.Resampling.BICUBIC))
                     for k in range(3)]
            arr = base + np.stack(chans, axis=-1)
        img = Image.fromarray(np.ascontiguousarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8)))
    draw = ImageDraw.Draw(img)
    for o in scene["objects"]:
        fill = COLORS[o["color"]]
        cx, cy = o["center"]
        pts = _shape_points(o["shape"], cx, cy, o["size"])
        if pts is None:
            r = o["size"]
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(pts, fill=fill)
    for t in scene["texts"]:
        font = _font(t["size"])
        l, tp, _, _ = font.getbbox(t["text"])
        x, y = t["bbox"][0], t["bbox"][1]
        draw.text((x - l, y - tp), t["text"], fill=COLORS[t["color"]], font=font)
    return img


# --------------------------------------------------------------------------------------------
# Questions: wording and an independent re-derivation of every answer from the scene
# --------------------------------------------------------------------------------------------


OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}  # a position answer, roles swapped


def _position_margin(image_size: int) -> int:
    return max(4, round(0.04 * image_size))


def _unique(items: list[dict[str, Any]], **attrs: Any) -> dict[str, Any] | None:
    hits = [o for o in items if all(o[k] == v for k, v in attrs.items())]
    return hits[0] if len(hits) == 1 else None


def derive_answer(scene: dict[str, Any], question_type: str, params: dict[str, Any]) -> str:
    """Answer a question from the stored scene metadata alone (independent of how it was planned).

    Raises ``SynthDataError`` if the question is ambiguous or unanswerable for this scene.
    """
    objs, texts = scene["objects"], scene["texts"]
    if question_type == "count":
        return str(sum(all(o[k] == v for k, v in params.items()) for o in objs))
    if question_type == "color":
        o = _unique(objs, shape=params["shape"])
        if o is None:
            raise SynthDataError(f"not exactly one {params['shape']}")
        return o["color"]
    if question_type == "shape":
        o = _unique(objs, color=params["color"])
        if o is None or any(t["color"] == params["color"] for t in texts):
            raise SynthDataError(f"'the {params['color']} object' is ambiguous")
        return o["shape"]
    if question_type == "position":
        (ca, sa), (cb, sb) = params["a"], params["b"]
        a, b = _unique(objs, color=ca, shape=sa), _unique(objs, color=cb, shape=sb)
        if a is None or b is None:
            raise SynthDataError("position question refers to an object that is not unique")
        m = _position_margin(scene["image_size"])
        lo, hi = (0, 2) if params["axis"] == "x" else (1, 3)
        words = ("left", "right") if params["axis"] == "x" else ("above", "below")
        if a["bbox"][hi] + m <= b["bbox"][lo]:
            return words[0]
        if b["bbox"][hi] + m <= a["bbox"][lo]:
            return words[1]
        raise SynthDataError("the two objects are not separated by a clear margin")
    if question_type == "half":  # training-only (scripts/add_relation_turns.py): one object's half of the image
        color, shape = params["a"]
        o = _unique(objs, color=color, shape=shape)
        if o is None:
            raise SynthDataError(f"not exactly one {color} {shape}")
        mid, m = scene["image_size"] / 2, _position_margin(scene["image_size"])
        lo, hi = (0, 2) if params["axis"] == "x" else (1, 3)
        words = ("left", "right") if params["axis"] == "x" else ("above", "below")  # one token each
        if o["bbox"][hi] + m <= mid:
            return words[0]
        if o["bbox"][lo] >= mid + m:
            return words[1]
        raise SynthDataError("the object is not clearly inside one half")
    if question_type == "exists":
        return "yes" if any(o["color"] == params["color"] and o["shape"] == params["shape"] for o in objs) else "no"
    if question_type in ("read_word", "read_number"):
        kind = "word" if question_type == "read_word" else "number"
        cands = [t for t in texts if t["kind"] == kind and (params["color"] is None or t["color"] == params["color"])]
        if len(cands) != 1:
            raise SynthDataError(f"{len(cands)} {kind}s match the question")
        return cands[0]["text"]
    raise SynthDataError(f"unknown question type {question_type!r}")


def _wording(question_type: str, params: dict[str, Any], rng: random.Random) -> str:
    if question_type == "count":
        key = "count_shape" if "shape" in params else "count_color" if "color" in params else "count_all"
        fmt = {"plural": params.get("shape", "") + "s", "color": params.get("color", "")}
    elif question_type == "position":
        key = "position_" + params["axis"]
        fmt = {"a": " ".join(params["a"]), "b": " ".join(params["b"])}
    elif question_type in ("read_word", "read_number"):
        key = question_type + ("_color" if params["color"] else "")
        fmt = {"color": params["color"]}
    else:
        key, fmt = question_type, params
    return rng.choice(_TEMPLATES[key]).format(**fmt)


def _finish_position(question: dict[str, Any], scene: dict[str, Any], rng: random.Random) -> None:
    """Pick the axis (and which object is 'a') of a planned position question after placement."""
    params = question["params"]
    axes = ["x", "y"]
    rng.shuffle(axes)
    for axis in axes:
        try:
            ans = derive_answer(scene, "position", dict(params, axis=axis))
        except SynthDataError:
            continue
        if rng.random() < 0.5:  # swap the pair so neither object is always the subject
            params["a"], params["b"] = params["b"], params["a"]
            ans = OPPOSITE[ans]
        params["axis"] = axis
        question["answer"] = ans
        return
    raise _Retry()


def _any_question(qtype: str, scene: dict[str, Any], rng: random.Random) -> dict[str, Any] | None:
    """Some answerable question of `qtype` about an already-built scene (for second turns)."""
    objs, texts = scene["objects"], scene["texts"]
    cands: list[dict[str, Any]] = []
    if qtype == "count":
        present = {o["shape"] for o in objs}
        cands = [{"shape": s} for s in SHAPES if s in present]
        cands += [{"color": c} for c in COLORS if any(o["color"] == c for o in objs)]
        if objs:
            cands.append({})
        if not cands or rng.random() < 0.15:  # now and then, a shape that is absent: "0"
            cands += [{"shape": s} for s in SHAPES if s not in present]
    elif qtype == "color":
        cands = [{"shape": s} for s in SHAPES if _unique(objs, shape=s)]
    elif qtype == "shape":
        text_colors = {t["color"] for t in texts}
        cands = [{"color": c} for c in COLORS if _unique(objs, color=c) and c not in text_colors]
    elif qtype == "position":
        uniq = [o for o in objs if _unique(objs, color=o["color"], shape=o["shape"])]
        for i, a in enumerate(uniq):
            for b in uniq[i + 1:]:
                for axis in ("x", "y"):
                    p = {"a": [a["color"], a["shape"]], "b": [b["color"], b["shape"]], "axis": axis}
                    try:
                        derive_answer(scene, "position", p)
                    except SynthDataError:
                        continue
                    cands.append(p)
                    cands.append(dict(p, a=p["b"], b=p["a"]))
    elif qtype == "exists":
        present = sorted({(o["color"], o["shape"]) for o in objs})
        if present and rng.random() < 0.5:
            c, s = rng.choice(present)
        else:
            absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
            c, s = rng.choice(absent)
        cands = [{"color": c, "shape": s}]
    elif qtype in ("read_word", "read_number"):
        kind = "word" if qtype == "read_word" else "number"
        mine = [t for t in texts if t["kind"] == kind]
        if len(mine) == 1:
            cands.append({"color": None})
        for t in mine:
            if _unique(mine, color=t["color"]) and len(mine) > 1:
                cands.append({"color": t["color"]})
    if not cands:
        return None
    params = rng.choice(cands)
    q = {"type": qtype, "params": params, "answer": derive_answer(scene, qtype, params)}
    if qtype in ("read_word", "read_number"):
        kind = "word" if qtype == "read_word" else "number"
        q["text_size"] = next(t["size"] for t in texts if t["kind"] == kind and t["text"] == q["answer"])
    return q


# --------------------------------------------------------------------------------------------
# Samples and datasets
# --------------------------------------------------------------------------------------------


def _rng_for(seed: int, split: str, tag: str) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`, independent of PYTHONHASHSEED.
    return random.Random(f"fastvlm-synth/{GENERATOR_VERSION}/{seed}/{split}/{tag}")


def question_type_for(seed: int, split: str, index: int) -> str:
    """The primary question type of sample `index`: each block of 7 consecutive samples has one
    of each type in a seeded random order, so the mix is balanced and prefix-stable."""
    block, pos = divmod(index, len(QUESTION_TYPES))
    order = list(QUESTION_TYPES)
    _rng_for(seed, split, f"types/{block}").shuffle(order)
    return order[pos]


def generate_sample(seed: int, split: str, index: int, image_size: int = 512,
                    *, attempt: int = 0, level: "str | Level" = "standard",
                    turns: int | None = None) -> tuple[Image.Image, dict[str, Any]]:
    """One image and its record (without the ``image`` path), a pure function of the arguments.

    ``turns=None`` asks one question and, with probability ``MULTI_TURN_PROB``, a second;
    ``turns=k`` asks up to ``k`` (the first of the sample's balanced type, then one of each
    other type that is answerable for the scene, in random order): denser supervision per
    image for training.
    """
    lvl = get_level(level)
    _check_turns("turns", turns)
    qtype = question_type_for(seed, split, index)
    rng = _rng_for(seed, split, f"sample/{index}" + (f"/{attempt}" if attempt else ""))
    sizes = text_sizes(image_size, lvl)
    for _ in range(100):
        plan = _plan_scene(qtype, rng, sizes, lvl)
        try:
            scene = _place(plan, rng, image_size)
            question = plan.question
            if qtype == "position":
                _finish_position(question, scene, rng)
        except _Retry:
            continue
        break
    else:  # pragma: no cover - would need an absurdly unlucky stream
        raise SynthDataError(f"could not lay out sample {split}/{index}")
    _check(derive_answer(scene, qtype, question["params"]) == question["answer"],
           f"{split}/{index}: planned answer {question['answer']!r} != derived")
    questions = [question]
    extra = (1 if rng.random() < MULTI_TURN_PROB else 0) if turns is None else turns - 1
    if extra:
        others = [t for t in QUESTION_TYPES if t != qtype]
        rng.shuffle(others)
        for t in others:
            if len(questions) > extra:
                break
            q2 = _any_question(t, scene, rng)
            if q2 is not None:
                questions.append(q2)
    img = _render(scene, rng)

    qa, conversations = [], []
    for k, q in enumerate(questions):
        text = _wording(q["type"], q["params"], rng)
        _check(derive_answer(scene, q["type"], q["params"]) == q["answer"], f"{split}/{index}: turn {k}")
        _check(bool(q["answer"]) and q["answer"] == q["answer"].strip().lower(), "answer not canonical")
        conversations.append({"from": "human", "value": (IMAGE_TOKEN + "\n" if k == 0 else "") + text})
        conversations.append({"from": "gpt", "value": q["answer"]})
        qa.append({"question_type": q["type"], "question": text, "answer": q["answer"],
                   "text_size": q.get("text_size"), "params": q["params"]})
    record = {
        "id": f"{split}-{index:06d}",
        "conversations": conversations,
        "question_type": qa[0]["question_type"],
        "answer": qa[0]["answer"],
        "text_size": qa[0]["text_size"],
        "qa": qa,
        "scene": scene,
    }
    return img, record


def generate_reading_scene(seed: int, index: int, image_size: int = 512, *, level: "str | Level" = "standard",
                           num_texts: tuple[int, int] = (3, 6), max_objects: int = 2) -> tuple[Image.Image, dict[str, Any]]:
    """A text-rich scene without questions, for teaching an encoder to read (the bundled
    model's encoder pretraining): ``num_texts`` words and numbers from the level's vocabulary
    at its font sizes, plus up to ``max_objects`` shapes, on the same backgrounds as the QA
    samples. Returns the image and its scene (as in a record's ``scene``); a pure function of
    the arguments, drawn from its own random stream (split ``"reading"``)."""
    lvl = get_level(level)
    lo, hi = num_texts
    if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
        raise SynthDataError(f"num_texts must be (min, max) with 1 <= min <= max, got {num_texts!r}")
    rng = _rng_for(seed, "reading", f"scene/{index}")
    sizes = text_sizes(image_size, lvl)
    for _ in range(100):
        plan = _Plan()
        _fill_objects(plan, rng, rng.randint(0, max_objects))
        _add_distractor_texts(plan, rng, sizes, min(rng.randint(lo, hi), len(lvl.words)), lvl)
        try:
            scene = _place(plan, rng, image_size)
        except _Retry:
            continue
        break
    else:  # pragma: no cover - would need an absurdly unlucky stream
        raise SynthDataError(f"could not lay out reading scene {index}")
    return _render(scene, rng), scene


def _check_args(num: dict[str, int], image_size: int, seed: int) -> None:
    for split, n in num.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise SynthDataError(f"num_{split} must be a non-negative integer, got {n!r}")
    if sum(num.values()) == 0:
        raise SynthDataError("nothing to generate: num_train, num_val and num_test are all 0")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not (
            MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE):
        raise SynthDataError(f"image_size must be an integer in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], got {image_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise SynthDataError(f"seed must be a non-negative integer, got {seed!r}")


_OUR_FILES = ("train.json", "val.json", "test.json", "meta.json", "corpus.txt")
_PNG_NAME = re.compile(r"^\d{6}\.png$")


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise SynthDataError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputDirNotEmptyError(
                f"output directory {out} is not empty; choose another directory or pass --overwrite "
                "(overwrite=True in Python) to replace a dataset generated there before")
        # Remove only what this generator writes, never anything else in the directory.
        for name in _OUR_FILES:
            p = out / name
            if p.is_file():
                p.unlink()
        for split in SPLITS:
            d = out / "images" / split
            if d.is_dir():
                for p in d.iterdir():
                    if p.is_file() and _PNG_NAME.match(p.name):
                        p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _dump_records(records: list[dict[str, Any]]) -> str:
    # One record per line: valid JSON, readable, diffable, and deterministic.
    if not records:
        return "[]\n"
    return "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n"


def _render_sample(job: tuple) -> tuple[bytes, bytes, dict[str, Any]]:
    """(image digest, PNG bytes, record) of one sample; a top-level function so that worker
    processes can run it."""
    seed, split, index, image_size, attempt, level, turns = job
    img, rec = generate_sample(seed, split, index, image_size, attempt=attempt, level=level, turns=turns)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return hashlib.blake2b(img.tobytes(), digest_size=16).digest(), buf.getvalue(), rec


def generate_dataset(out_dir: str | Path, *, num_train: int, num_val: int, num_test: int,
                     image_size: int = 512, seed: int = 0, progress: bool = True,
                     overwrite: bool = False, level: "str | Level" = "standard",
                     train_turns: int | None = None, workers: int = 1) -> dict[str, Any]:
    """Write a dataset to ``out_dir`` and return its summary (``meta.json`` plus ``out_dir``
    and ``seconds``).

    Layout: ``images/{split}/NNNNNN.png``, ``{train,val,test}.json`` (LLaVA format, image paths
    relative to ``out_dir``), ``meta.json`` and ``corpus.txt`` (every question and answer, one
    per line, plus the built-in vocabulary, for tokenizer training). ``level`` picks the scene
    difficulty (:data:`LEVELS`); ``train_turns`` asks up to that many questions per training
    image (validation and test records keep the default one or two). ``workers`` > 1 renders
    and PNG-encodes the images in that many processes; the output is byte-identical to
    ``workers=1`` (every sample is a pure function of its index, and duplicates are resolved
    in index order in this process).
    """
    num = {"train": num_train, "val": num_val, "test": num_test}
    _check_args(num, image_size, seed)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise SynthDataError(f"workers must be a positive integer, got {workers!r}")
    lvl = get_level(level)
    _check_turns("train_turns", train_turns)
    _font(12)  # fail early, before touching the output directory, if text cannot be rendered
    out = Path(out_dir)
    _prepare_out_dir(out, overwrite)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(num.values()), desc="synth", unit="img", dynamic_ncols=True)
    t0 = time.perf_counter()
    seen: set[bytes] = set()
    corpus: list[str] = []
    counts: dict[str, Any] = {}
    pool = None
    if workers > 1:
        import multiprocessing

        pool = multiprocessing.Pool(workers)
    try:
        for split in SPLITS:
            img_dir = out / "images" / split
            img_dir.mkdir(parents=True, exist_ok=True)
            records = []
            jobs = [(seed, split, i, image_size, 0, lvl, train_turns if split == "train" else None)
                    for i in range(num[split])]
            rendered = (pool.imap(_render_sample, jobs, chunksize=32) if pool is not None
                        else map(_render_sample, jobs))
            for job, (digest, png, rec) in zip(jobs, rendered):
                while digest in seen:  # splits (and samples) never share an image: draw again
                    job = job[:4] + (job[4] + 1,) + job[5:]
                    digest, png, rec = _render_sample(job)
                seen.add(digest)
                rel = f"images/{split}/{job[2]:06d}.png"
                (out / rel).write_bytes(png)
                records.append({"id": rec["id"], "image": rel, **{k: v for k, v in rec.items() if k != "id"}})
                for q in rec["qa"]:
                    corpus.append(q["question"])
                    corpus.append(q["answer"])
                if bar is not None:
                    bar.update(1)
            (out / f"{split}.json").write_text(_dump_records(records), encoding="utf-8")
            by_type = {t: sum(r["question_type"] == t for r in records) for t in QUESTION_TYPES}
            turns = {t: sum(q["question_type"] == t for r in records for q in r["qa"]) for t in QUESTION_TYPES}
            counts[split] = {"records": len(records), "question_types": by_type, "turn_types": turns,
                             "multi_turn": sum(len(r["qa"]) > 1 for r in records)}
    finally:
        if pool is not None:
            pool.terminate()
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0

    vocab = list(lvl.words) + list(SHAPES) + [s + "s" for s in SHAPES] + list(COLORS) + [
        "yes", "no", "left", "right", "above", "below"]
    (out / "corpus.txt").write_text("\n".join(corpus + vocab) + "\n", encoding="utf-8")
    import PIL

    meta = {
        "generator": "fastvlm.data.synth",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "image_size": image_size,
        "num": num,
        "counts": counts,
        "question_types": list(QUESTION_TYPES),
        "shapes": list(SHAPES),
        "colors": list(COLORS),
        "text_colors": list(TEXT_COLORS),
        "level": lvl.as_dict(),
        "text_sizes": text_sizes(image_size, lvl),
        "multi_turn_prob": MULTI_TURN_PROB,
        "train_turns": train_turns,
        "font": "Pillow built-in (Aileron Regular, ImageFont.load_default)",
        "pillow_version": PIL.__version__,
        "text_size_note": "text_size = font size in pixels (em height) in the stored image; null for non-reading questions",
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return dict(meta, out_dir=str(out), seconds=round(seconds, 3))


# --------------------------------------------------------------------------------------------
# Reading and validating
# --------------------------------------------------------------------------------------------


def load_split(path: str | Path) -> list[dict[str, Any]]:
    """Read a LLaVA-format JSON file (a list of records)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SynthDataError(f"no such dataset file: {p}") from None
    except json.JSONDecodeError as e:
        raise SynthDataError(f"{p} is not valid JSON: {e}") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise SynthDataError(f"{p} must hold a JSON list of records")
    return data


def validate_record(record: dict[str, Any], image_root: str | Path, *, check_image: bool = True) -> None:
    """Raise ``SynthDataError`` naming the first problem with a record, else return None.

    Checks the LLaVA structure (alternating human/gpt turns, exactly one ``<image>`` at the start
    of the first human turn and none later, non-empty answers), that the image exists (and has
    the scene's size), and -- for records carrying ``scene``/``qa`` -- that every answer
    re-derives from the scene.
    """
    rid = record.get("id", "?")

    def bad(msg: str) -> SynthDataError:
        return SynthDataError(f"record {rid}: {msg}")

    for key in ("id", "image", "conversations"):
        if key not in record:
            raise bad(f"missing key {key!r}")
    conv = record["conversations"]
    if not isinstance(conv, list) or not conv or len(conv) % 2:
        raise bad("conversations must be a non-empty list of human/gpt pairs")
    for k, turn in enumerate(conv):
        want = "human" if k % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or turn.get("from") != want or not isinstance(turn.get("value"), str):
            raise bad(f"turn {k} must be {{'from': {want!r}, 'value': str}}")
        if not turn["value"].strip():
            raise bad(f"turn {k} is empty")
    if conv[0]["value"].count(IMAGE_TOKEN) != 1 or not conv[0]["value"].startswith(IMAGE_TOKEN + "\n"):
        raise bad(f"the first human turn must start with exactly one {IMAGE_TOKEN}")
    if any(IMAGE_TOKEN in t["value"] for t in conv[1:]):
        raise bad(f"{IMAGE_TOKEN} may appear only in the first human turn")
    if "answer" in record and record["answer"] != conv[1]["value"]:
        raise bad("'answer' differs from the first gpt turn")
    if "question_type" in record and record["question_type"] not in QUESTION_TYPES:
        raise bad(f"unknown question_type {record['question_type']!r}")
    image_path = Path(image_root) / record["image"]
    if check_image:
        if not image_path.is_file():
            raise bad(f"image {image_path} does not exist")
        if "scene" in record:
            with Image.open(image_path) as im:
                s = record["scene"]["image_size"]
                if im.size != (s, s):
                    raise bad(f"image is {im.size}, scene says {s}x{s}")
    if "qa" in record and "scene" in record:
        qa = record["qa"]
        if len(qa) * 2 != len(conv):
            raise bad("'qa' and 'conversations' have different numbers of turns")
        for k, q in enumerate(qa):
            if conv[2 * k + 1]["value"] != q["answer"] or not conv[2 * k]["value"].endswith(q["question"]):
                raise bad(f"qa turn {k} disagrees with the conversation")
            try:
                derived = derive_answer(record["scene"], q["question_type"], q["params"])
            except SynthDataError as e:
                raise bad(f"qa turn {k} is ambiguous: {e}") from None
            if derived != q["answer"]:
                raise bad(f"qa turn {k}: answer {q['answer']!r} but the scene gives {derived!r}")
        if record.get("text_size") != qa[0]["text_size"]:
            raise bad("'text_size' differs from the first qa turn")
