"""FastViTHD key names: Apple / fastvlm layout <-> timm `fastvit_mci3` layout.

The transformers `fast_vlm` port stores the encoder as timm's model under
`model.vision_tower.timm_model.`; Apple checkpoints (and our FastViTHD) use Apple's flat
names under `model.vision_tower.vision_tower.model.`. Both functions here work on keys
relative to the encoder; pass `src_prefix` / `dst_prefix` to convert whole-model dicts.

Differences, all structural renames (tensors pass through as the same objects):
- `patch_embed` -> `stem`, `conv_exp` -> `final_conv`, `se.reduce/expand` -> `se.fc1/fc2`,
  `convffn` -> `mlp`, `lkb_reparam` -> `reparam_conv` (and train-form `lkb_origin` ->
  `large_conv`, `rbr_conv/rbr_scale/rbr_skip` -> `conv_kxk/conv_scale/identity`,
  RepCPE `pe` -> `pos_enc`).
- Layer scales are bare parameters in Apple's code and `LayerScale2d` modules in timm:
  `...layer_scale[_1|_2]` -> `...layer_scale[_1|_2].gamma`. Both are [C, 1, 1] in timm
  1.0.x; a 1-D [C] gamma (older timm) is viewed as [C, 1, 1] on the way back.
- Apple's flat `network.N` list becomes `stages.S.{downsample,pos_emb,blocks}`: the
  PatchEmbed and RepCPE in front of a stage belong to that stage in timm. For the full
  model: 0->0, {1,2}->1, {3,4}->2, {5,6,7}->3, {8,9,10}->4.
- `head.proj` (MobileCLIP's unused projection) has no counterpart: dropped by
  apple_to_timm; timm's `head.*` is dropped by timm_to_apple, so a strict load of an
  encoder with `projection_dim` set needs head.proj from elsewhere.

The network layout is taken from `config` when given, else inferred from the keys (a
`network.N.proj.*` key marks a PatchEmbed, `network.N.reparam_conv|pe.*` a RepCPE).
"""

from __future__ import annotations

import bisect
import re
from typing import Any, Optional

from ..errors import CheckpointError

_LAYER_SCALES = ("layer_scale", "layer_scale_1", "layer_scale_2")
# Names that differ only by component, apart from the positional cases handled in the code.
_A2T = {
    "convffn": "mlp",
    "lkb_reparam": "reparam_conv",
    "lkb_origin": "large_conv",
    "rbr_conv": "conv_kxk",
    "rbr_scale": "conv_scale",
    "rbr_skip": "identity",
}
_T2A = {v: k for k, v in _A2T.items() if k != "lkb_reparam"}
_SE_A2T = {"reduce": "fc1", "expand": "fc2"}
_SE_T2A = {v: k for k, v in _SE_A2T.items()}

_NET_RE = re.compile(r"^network\.(\d+)\.(.+)$")
_STAGE_RE = re.compile(r"^stages\.(\d+)\.(downsample|pos_emb|blocks)\.(.+)$")


def _split_prefix(key: str, prefix: str) -> Optional[str]:
    return key[len(prefix):] if key.startswith(prefix) else None


# ---------------------------------------------------------------- Apple -> timm


def _a2t_tail(parts: list[str]) -> list[str]:
    out = []
    for i, p in enumerate(parts):
        if i > 0 and parts[i - 1] == "se" and p in _SE_A2T:
            out.append(_SE_A2T[p])
        else:
            out.append(_A2T.get(p, p))
    if parts and parts[-1] in _LAYER_SCALES:
        out.append("gamma")
    return out


def _apple_network_roles(keys: list[str], config: Any) -> dict[int, tuple[str, int]]:
    """network index -> (role, timm stage)."""
    if config is not None:
        from ..vision.fastvithd import network_layout

        return dict(enumerate(network_layout(config)))
    downsamples, pos_embs, indices = set(), set(), set()
    for k in keys:
        m = _NET_RE.match(k)
        if not m:
            continue
        n, rest = int(m.group(1)), m.group(2)
        indices.add(n)
        if rest.startswith("proj."):
            downsamples.add(n)
        elif rest.split(".", 1)[0] in ("reparam_conv", "pe"):
            pos_embs.add(n)
    ends = sorted(downsamples)
    roles = {}
    for n in indices:
        role = "downsample" if n in downsamples else "pos_emb" if n in pos_embs else "stage"
        roles[n] = (role, bisect.bisect_right(ends, n))
    return roles


def _apple_key_to_timm(key: str, roles: dict[int, tuple[str, int]]) -> Optional[str]:
    parts = key.split(".")
    head = parts[0]
    if head == "head":
        return None
    if head == "patch_embed":
        return ".".join(["stem"] + _a2t_tail(parts[1:]))
    if head == "conv_exp":
        return ".".join(["final_conv"] + _a2t_tail(parts[1:]))
    m = _NET_RE.match(key)
    if m is None or int(m.group(1)) not in roles:
        raise CheckpointError(f"unexpected FastViTHD key {key!r}")
    role, stage = roles[int(m.group(1))]
    rest = parts[2:]
    if role == "downsample":
        return ".".join([f"stages.{stage}.downsample"] + _a2t_tail(rest))
    if role == "pos_emb":
        name = {"reparam_conv": "reparam_conv", "pe": "pos_enc"}.get(rest[0])
        if name is None:
            raise CheckpointError(f"unexpected RepCPE key {key!r}")
        return ".".join([f"stages.{stage}.pos_emb", name] + rest[1:])
    return ".".join([f"stages.{stage}.blocks"] + _a2t_tail(rest))


def apple_to_timm(sd: dict, config: Any = None, *, src_prefix: str = "", dst_prefix: str = "") -> dict:
    """Apple/fastvlm FastViTHD keys -> timm `fastvit_mci3` keys (head.proj dropped).

    Keys outside `src_prefix` pass through unchanged, so a whole checkpoint can be
    converted in one call while other code renames the rest.
    """
    inner = [k[len(src_prefix):] for k in sd if k.startswith(src_prefix)]
    roles = _apple_network_roles(inner, config)
    out = {}
    for key, value in sd.items():
        rel = _split_prefix(key, src_prefix)
        if rel is None:
            out[key] = value
            continue
        new = _apple_key_to_timm(rel, roles)
        if new is not None:
            out[dst_prefix + new] = value
    return out


# ---------------------------------------------------------------- timm -> Apple


def _t2a_tail(parts: list[str], in_downsample_conv: bool = False) -> list[str]:
    if parts and parts[-1] == "gamma" and len(parts) > 1 and parts[-2] in _LAYER_SCALES:
        parts = parts[:-1]
    out = []
    for i, p in enumerate(parts):
        if i > 0 and parts[i - 1] == "se" and p in _SE_T2A:
            out.append(_SE_T2A[p])
        elif in_downsample_conv and i == 2 and p == "reparam_conv":
            # timm calls the fused large-kernel conv reparam_conv like every other fused conv;
            # Apple names it lkb_reparam. Only proj.0 of a downsample is that conv.
            out.append("lkb_reparam")
        else:
            out.append(_T2A.get(p, p))
    return out


def _timm_network_index(keys: list[str], config: Any) -> dict[tuple[str, int], int]:
    """(role, timm stage) -> Apple network index."""
    if config is not None:
        from ..vision.fastvithd import network_layout

        layout = network_layout(config)
    else:
        present = set()
        for k in keys:
            m = _STAGE_RE.match(k)
            if m:
                role = {"blocks": "stage"}.get(m.group(2), m.group(2))
                present.add((role, int(m.group(1))))
        order = {"downsample": 0, "pos_emb": 1, "stage": 2}
        layout = sorted(present, key=lambda rs: (rs[1], order[rs[0]]))
    return {rs: n for n, rs in enumerate(layout)}


def _timm_key_to_apple(key: str, index: dict[tuple[str, int], int]) -> Optional[str]:
    parts = key.split(".")
    head = parts[0]
    if head == "head":
        return None
    if head == "stem":
        return ".".join(["patch_embed"] + _t2a_tail(parts[1:]))
    if head == "final_conv":
        return ".".join(["conv_exp"] + _t2a_tail(parts[1:]))
    m = _STAGE_RE.match(key)
    if m is None:
        raise CheckpointError(f"unexpected timm FastViT key {key!r}")
    stage, kind, rest = int(m.group(1)), m.group(2), m.group(3).split(".")
    role = "stage" if kind == "blocks" else kind
    n = index.get((role, stage))
    if n is None:
        raise CheckpointError(f"timm key {key!r} has no place in the FastViTHD network layout")
    if kind == "downsample":
        return ".".join([f"network.{n}"] + _t2a_tail(rest, in_downsample_conv=rest[:2] == ["proj", "0"]))
    if kind == "pos_emb":
        name = {"reparam_conv": "reparam_conv", "pos_enc": "pe"}.get(rest[0])
        if name is None:
            raise CheckpointError(f"unexpected timm pos_emb key {key!r}")
        return ".".join([f"network.{n}", name] + rest[1:])
    return ".".join([f"network.{n}"] + _t2a_tail(rest))


def timm_to_apple(sd: dict, config: Any = None, *, src_prefix: str = "", dst_prefix: str = "") -> dict:
    """timm `fastvit_mci3` keys -> Apple/fastvlm FastViTHD keys (timm's head.* dropped).

    1-D layer-scale gammas are viewed as [C, 1, 1]; every other tensor is passed through as
    the same object. Keys outside `src_prefix` pass through unchanged.
    """
    inner = [k[len(src_prefix):] for k in sd if k.startswith(src_prefix)]
    index = _timm_network_index(inner, config)
    out = {}
    for key, value in sd.items():
        rel = _split_prefix(key, src_prefix)
        if rel is None:
            out[key] = value
            continue
        new = _timm_key_to_apple(rel, index)
        if new is None:
            continue
        if rel.endswith(".gamma") and getattr(value, "ndim", 0) == 1:
            value = value.view(-1, 1, 1)
        out[dst_prefix + new] = value
    return out
