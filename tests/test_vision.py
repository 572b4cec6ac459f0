"""FastViTHD encoder: Apple key layout, parity with timm's fastvit_mci3, reparameterisation.

timm is only a reference here. Weights are randomised far from their initial values
(layer scales 0.1-0.5, BN statistics and affine terms far from 0/1, norm gains far
from 1) so that a mis-wired branch changes the output by O(1), not by 1e-5.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import pytest
import torch
from torch import nn

from fastvlm.checkpoints.timm_keys import apple_to_timm, timm_to_apple
from fastvlm.config import VisionConfig, get_preset
from fastvlm.errors import ConfigError, FastVLMError, ImageError
from fastvlm.vision import (
    AttentionBlock,
    FastViTHD,
    GlobalPoolHead,
    LayerNormChannel,
    MobileOneBlock,
    PatchEmbed,
    RepCPE,
    RepMixer,
    RepMixerBlock,
    ReparamLargeKernelConv,
    build_encoder,
    network_layout,
)

timm = pytest.importorskip("timm")

APPLE_PREFIX = "model.vision_tower.vision_tower.model."
HF_PREFIX = "model.vision_tower.timm_model."


# ---------------------------------------------------------------------------- helpers


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0, layer_scale=(0.1, 0.5), gain: float = 1.0) -> nn.Module:
    """Every parameter and buffer random and non-trivial; conv/linear weights scaled by
    fan-in so activations stay O(1) through 44 blocks."""
    g = torch.Generator().manual_seed(seed)
    touched: set[int] = set()

    def normal(t, std):
        t.normal_(0.0, std, generator=g)
        touched.add(id(t))

    def uniform(t, lo, hi):
        t.uniform_(lo, hi, generator=g)
        touched.add(id(t))

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            normal(m.weight, gain * m.weight[0].numel() ** -0.5)
            if m.bias is not None:
                normal(m.bias, 0.1)
        elif isinstance(m, nn.BatchNorm2d):
            uniform(m.weight, 0.5, 1.5)
            normal(m.bias, 0.2)
            normal(m.running_mean, 0.3)
            uniform(m.running_var, 0.5, 2.0)
            m.num_batches_tracked.fill_(int(torch.randint(1, 10**6, (1,), generator=g)))
            touched.add(id(m.num_batches_tracked))
        elif isinstance(m, (LayerNormChannel, timm.layers.LayerNorm2d)):
            uniform(m.weight, 0.5, 1.5)
            normal(m.bias, 0.2)
        elif isinstance(m, GlobalPoolHead):
            normal(m.proj, m.proj.shape[0] ** -0.5)
    for name, p in model.named_parameters():
        if name.split(".")[-1].startswith("layer_scale") or name.endswith(".gamma"):
            uniform(p, *layer_scale)
    missed = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if id(t) not in touched]
    assert not missed, missed
    return model


def random_encoder(config: VisionConfig | None = None, seed: int = 0, gain: float = 1.0) -> FastViTHD:
    """A randomised encoder, built on the meta device to skip two useless full initialisations."""
    with torch.device("meta"):
        model = FastViTHD(config)
    return randomize_(model.to_empty(device="cpu").eval(), seed=seed, gain=gain)


def pixels(b: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def unfuse_timm_attention(model: nn.Module) -> nn.Module:
    # The reference (and the transformers port, via TIMM_FUSED_ATTN=0) uses the explicit
    # softmax path; set it per module so other tests' global timm settings do not matter.
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    return model


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def expected_apple_keys() -> dict[str, tuple[int, ...]]:
    """The full model's checkpoint keys and shapes, written out from the reference doc (§8.3)."""
    keys: dict[str, tuple[int, ...]] = {}

    def conv(name, weight_shape):
        keys[name + ".weight"] = weight_shape
        keys[name + ".bias"] = (weight_shape[0],)

    conv("patch_embed.0.reparam_conv", (96, 3, 3, 3))
    conv("patch_embed.1.reparam_conv", (96, 1, 3, 3))
    conv("patch_embed.2.reparam_conv", (96, 96, 1, 1))
    stages = {0: (2, 96, "repmixer"), 2: (12, 192, "repmixer"), 4: (24, 384, "repmixer"),
              7: (4, 768, "attention"), 10: (2, 1536, "attention")}
    for n, (depth, c, mixer) in stages.items():
        for j in range(depth):
            b = f"network.{n}.{j}."
            if mixer == "repmixer":
                conv(b + "token_mixer.reparam_conv", (c, 1, 3, 3))
                keys[b + "layer_scale"] = (c, 1, 1)
            else:
                keys[b + "norm.weight"] = keys[b + "norm.bias"] = (c,)
                keys[b + "token_mixer.qkv.weight"] = (3 * c, c)
                conv(b + "token_mixer.proj", (c, c))
                keys[b + "layer_scale_1"] = keys[b + "layer_scale_2"] = (c, 1, 1)
            keys[b + "convffn.conv.conv.weight"] = (c, 1, 7, 7)
            for s in ("weight", "bias", "running_mean", "running_var"):
                keys[b + "convffn.conv.bn." + s] = (c,)
            keys[b + "convffn.conv.bn.num_batches_tracked"] = ()
            conv(b + "convffn.fc1", (4 * c, c, 1, 1))
            conv(b + "convffn.fc2", (c, 4 * c, 1, 1))
    for n, cin in {1: 96, 3: 192, 5: 384, 8: 768}.items():
        conv(f"network.{n}.proj.0.lkb_reparam", (2 * cin, 1, 7, 7))
        conv(f"network.{n}.proj.1.reparam_conv", (2 * cin, 2 * cin, 1, 1))
    for n, c in {6: 768, 9: 1536}.items():
        conv(f"network.{n}.reparam_conv", (c, 1, 7, 7))
    conv("conv_exp.reparam_conv", (3072, 1, 3, 3))
    conv("conv_exp.se.reduce", (192, 3072, 1, 1))
    conv("conv_exp.se.expand", (3072, 192, 1, 1))
    keys["head.proj"] = (3072, 768)
    return keys


def timm_fastvit(config: VisionConfig, inference_mode: bool) -> nn.Module:
    """timm's FastVit with the same architecture as `config` (timm's attention is head_dim 32)."""
    from timm.layers import LayerNorm2d
    from timm.models.fastvit import FastVit, RepConditionalPosEnc

    assert config.head_dim == 32
    pe = partial(RepConditionalPosEnc, spatial_shape=(config.pos_emb_kernel_size,) * 2)
    model = FastVit(
        layers=config.depths, embed_dims=config.embed_dims, mlp_ratios=config.mlp_ratios,
        token_mixers=config.token_mixers, pos_embs=tuple(pe if p else None for p in config.pos_embs),
        downsamples=(False,) + (True,) * (len(config.depths) - 1), se_downsamples=(False,) * len(config.depths),
        lkc_use_act=True,
        norm_layer=partial(LayerNorm2d, eps=config.norm_eps), stem_use_scale_branch=False,
        num_classes=0, inference_mode=inference_mode,
    )
    return unfuse_timm_attention(model.eval())


# A small architecture with every block type that timm can also build (head_dim 32).
SMALL = VisionConfig(image_size=128, depths=(2, 1, 1, 1, 1), embed_dims=(32, 64, 128, 128, 256),
                     head_dim=32, projection_dim=None)


# ---------------------------------------------------------------------------- full-size fixtures


@pytest.fixture(scope="module")
def full():
    """The full fused encoder with random weights, and timm's fastvit_mci3 loaded from it."""
    ours = random_encoder(seed=0)
    with torch.device("meta"):
        ref = timm.create_model("fastvit_mci3", pretrained=False, inference_mode=True, num_classes=0)
    unfuse_timm_attention(ref.eval())
    # clone: the two models must not share storage (tests move ours to channels_last)
    mapped = {k: v.clone() for k, v in apple_to_timm(ours.state_dict()).items()}
    ref.load_state_dict(mapped, strict=True, assign=True)
    return ours, ref


@pytest.fixture(scope="module")
def ref_features(full):
    """timm's final feature map per input size, computed once per module."""
    cache: dict[tuple[int, int], torch.Tensor] = {}

    def get(h: int, w: int) -> torch.Tensor:
        if (h, w) not in cache:
            with torch.no_grad():
                cache[(h, w)] = full[1].forward_features(pixels(1, h, w))
        return cache[(h, w)]

    return get


# ---------------------------------------------------------------------------- full model: layout


def test_full_state_dict_is_apple_layout(full):
    ours, _ = full
    sd = ours.state_dict()
    expected = expected_apple_keys()
    assert len(sd) == 629 == len(expected)
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


def test_full_parameter_counts(full):
    ours, _ = full
    sd = ours.state_dict()
    # The doc counts the whole state dict (BN buffers and num_batches_tracked included).
    without_head = sum(v.numel() for k, v in sd.items() if not k.startswith("head."))
    with_head = sum(v.numel() for v in sd.values())
    assert without_head == 122_749_964 and round(without_head / 1e6, 2) == 122.75
    assert with_head == 125_109_260 and round(with_head / 1e6, 2) == 125.11
    assert sum(p.numel() for p in ours.parameters()) == with_head - sum(b.numel() for b in ours.buffers())


def test_full_network_layout(full):
    ours, _ = full
    kinds = [type(m).__name__ if not isinstance(m, nn.Sequential) else type(m[0]).__name__ for m in ours.network]
    assert kinds == ["RepMixerBlock", "PatchEmbed", "RepMixerBlock", "PatchEmbed", "RepMixerBlock", "PatchEmbed",
                     "RepCPE", "AttentionBlock", "PatchEmbed", "RepCPE", "AttentionBlock"]
    assert [len(ours.network[i]) for i in (0, 2, 4, 7, 10)] == [2, 12, 24, 4, 2]
    assert ours.patch_size == 64 and ours.out_channels == 3072
    assert [ours.network[i][0].token_mixer.num_heads for i in (7, 10)] == [24, 48]
    assert ours.conv_exp.reparam_conv.groups == 1536


def test_full_key_mapping_to_timm(full):
    ours, ref = full
    sd = ours.state_dict()
    mapped = apple_to_timm(sd)
    assert "head.proj" in sd and len(mapped) == 628
    # same names; the order differs only where a bare Apple layer-scale parameter (listed
    # before sub-modules) is a timm LayerScale2d module (listed in registration order)
    assert sorted(mapped) == sorted(ref.state_dict())
    assert {k: v.shape for k, v in mapped.items()} == {k: v.shape for k, v in ref.state_dict().items()}
    # network index -> timm stage, as in the reference doc
    stage_of = {}
    for k_apple, k_timm in zip([k for k in sd if k != "head.proj"], mapped):
        if k_apple.startswith("network."):
            stage_of[int(k_apple.split(".")[1])] = int(k_timm.split(".")[1])
    assert stage_of == {0: 0, 1: 1, 2: 1, 3: 2, 4: 2, 5: 3, 6: 3, 7: 3, 8: 4, 9: 4, 10: 4}
    assert mapped["stages.3.pos_emb.reparam_conv.weight"] is sd["network.6.reparam_conv.weight"]
    assert mapped["stages.1.downsample.proj.0.reparam_conv.bias"] is sd["network.1.proj.0.lkb_reparam.bias"]
    assert mapped["final_conv.se.fc1.weight"] is sd["conv_exp.se.reduce.weight"]
    assert mapped["stages.4.blocks.1.layer_scale_2.gamma"] is sd["network.10.1.layer_scale_2"]
    assert mapped["stages.2.blocks.23.mlp.conv.bn.num_batches_tracked"] is \
        sd["network.4.23.convffn.conv.bn.num_batches_tracked"]


def test_full_round_trip_is_exact(full):
    ours, _ = full
    sd = ours.state_dict()
    for config in (None, VisionConfig()):
        back = timm_to_apple(apple_to_timm(sd, config), config)
        assert list(back) == [k for k in sd if k != "head.proj"]
        assert all(back[k] is sd[k] for k in back)  # same tensor objects: no copies
    # whole-model dicts: only keys under the prefix are renamed, the rest pass through
    whole = {APPLE_PREFIX + k: v for k, v in sd.items()}
    whole["model.mm_projector.0.weight"] = torch.zeros(1)
    hf = apple_to_timm(whole, src_prefix=APPLE_PREFIX, dst_prefix=HF_PREFIX)
    assert hf["model.mm_projector.0.weight"] is whole["model.mm_projector.0.weight"]
    assert hf[HF_PREFIX + "stem.0.reparam_conv.weight"] is sd["patch_embed.0.reparam_conv.weight"]
    back = timm_to_apple(hf, src_prefix=HF_PREFIX, dst_prefix=APPLE_PREFIX)
    assert set(back) == set(whole) - {APPLE_PREFIX + "head.proj"}


# ---------------------------------------------------------------------------- full model: numerics


@pytest.mark.parametrize("size", [(1024, 1024), (512, 512)], ids=["1024", "512"])
def test_full_matches_timm_fp32(full, ref_features, size):
    ours, _ = full
    h, w = size
    ref = ref_features(h, w)
    with torch.no_grad():
        tokens = ours(pixels(1, h, w))
    assert tokens.shape == (1, (h // 64) * (w // 64), 3072)
    # tokens are the final map flattened row-major (h then w), no CLS token
    feats = tokens.transpose(1, 2).reshape(1, 3072, h // 64, w // 64)
    diff, scale = max_diff(feats, ref), ref.abs().max().item()
    print(f"\nFastViTHD vs timm fastvit_mci3, fp32 {h}x{w}: max|diff|={diff:.3g}, max|ref|={scale:.3g}")
    assert 0.5 < scale < 100  # activations stay O(1), so 1e-4 absolute is a meaningful bound
    assert ref.std().item() > 0.05
    assert diff <= 1e-4


def test_full_non_square(full):
    # Numerics off the square are checked against timm on the small model; here only the
    # token count of the full model, which any multiple of 64 must give.
    ours, _ = full
    with torch.no_grad():
        tokens = ours(pixels(1, 1024, 512))
    assert tokens.shape == (1, 128, 3072) and torch.isfinite(tokens).all()


def test_full_sdpa_close_to_reference(full, ref_features):
    ours, _ = full
    ref = ref_features(512, 512)
    ours.set_attention_implementation("sdpa")
    try:
        with torch.no_grad():
            feats = ours.forward_features(pixels(1, 512, 512))
    finally:
        ours.set_attention_implementation("eager")
    diff = max_diff(feats, ref)
    print(f"\nFastViTHD sdpa vs timm eager, fp32 512: max|diff|={diff:.3g}, max|ref|={ref.abs().max().item():.3g}")
    assert diff <= 1e-3


def test_full_channels_last(full, ref_features):
    ours, _ = full
    ref = ref_features(512, 512)
    x = pixels(1, 512, 512).contiguous(memory_format=torch.channels_last)
    ours.to(memory_format=torch.channels_last)
    try:
        with torch.no_grad():
            feats = ours.forward_features(x)
    finally:
        ours.to(memory_format=torch.contiguous_format)
    assert max_diff(feats, ref) <= 1e-4


def test_full_reparameterize_matches_train_form():
    model = random_encoder(VisionConfig(inference_mode=False), seed=3, gain=0.6)
    assert any("rbr_" in k for k in model.state_dict())
    x = pixels(1, 512, 512, seed=5)
    with torch.no_grad():
        before = model.forward_features(x)
        assert model.reparameterize() is model
        after = model.forward_features(x)
    rel = max_diff(before, after) / before.abs().max().item()
    print(f"\nreparameterize, full size 512: max|diff|/max|out| = {rel:.3g} (max|out|={before.abs().max().item():.3g})")
    assert rel <= 1e-4
    with torch.device("meta"):
        fresh = FastViTHD()
    assert list(model.state_dict()) == list(fresh.state_dict())
    assert all(v.shape == fresh.state_dict()[k].shape for k, v in model.state_dict().items())
    assert model.config.inference_mode


# ---------------------------------------------------------------------------- small models


@pytest.mark.parametrize("inference_mode", [True, False], ids=["fused", "train-form"])
def test_small_matches_timm_both_forms(inference_mode):
    config = dataclasses.replace(SMALL, inference_mode=inference_mode)
    ours = randomize_(FastViTHD(config).eval(), seed=7, gain=1.0 if inference_mode else 0.6)
    ref = timm_fastvit(config, inference_mode)
    ref.load_state_dict(apple_to_timm(ours.state_dict()), strict=True)
    assert timm_to_apple(ref.state_dict()).keys() == ours.state_dict().keys()
    for h, w in ((128, 128), (128, 192)):
        x = pixels(2, h, w)
        with torch.no_grad():
            a, b = ours.forward_features(x), ref.forward_features(x)
        assert a.shape == (2, 512, h // 64, w // 64)
        assert b.abs().max().item() > 0.5
        assert max_diff(a, b) <= 1e-4


@pytest.fixture(scope="module")
def tiny():
    return randomize_(FastViTHD(get_preset("fastvlm-tiny").vision).eval(), seed=11)


def test_tiny_shapes_and_heads(tiny):
    assert tiny.patch_size == 64
    with torch.no_grad():
        assert tiny(pixels(2, 128, 128)).shape == (2, 4, 256)
        assert tiny(pixels(1, 64, 192)).shape == (1, 3, 256)
        assert tiny.head(tiny.forward_features(pixels(1, 128, 128))).shape == (1, 32)
    assert [tiny.network[i][0].token_mixer.num_heads for i in (7, 10)] == [4, 8]
    assert tiny.num_tokens(1024) == 256 and tiny.num_tokens(512, 1024) == 128


def test_tiny_channels_last_same_result(tiny):
    x = pixels(2, 128, 192)
    with torch.no_grad():
        ref = tiny(x)
        out = tiny(x.contiguous(memory_format=torch.channels_last))
        tiny.to(memory_format=torch.channels_last)
        try:
            out2 = tiny(x.contiguous(memory_format=torch.channels_last))
        finally:
            tiny.to(memory_format=torch.contiguous_format)
    assert max_diff(out, ref) <= 1e-5 and max_diff(out2, ref) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_tiny_low_precision(tiny, dtype, attn):
    x = pixels(2, 128, 128)
    with torch.no_grad():
        ref = tiny(x)
        low = FastViTHD(tiny.config, attn_impl=attn)
        low.load_state_dict(tiny.state_dict())
        low = low.eval().to(dtype=dtype, memory_format=torch.channels_last)
        out = low(x.to(dtype).contiguous(memory_format=torch.channels_last))
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert max_diff(out, ref) / ref.abs().max().item() < 0.05


def test_tiny_sdpa_matches_eager(tiny, monkeypatch):
    calls = []
    sdpa_fn = nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or sdpa_fn(*a, **k))
    x = pixels(2, 128, 128)
    with torch.no_grad():
        eager = tiny(x)
        assert not calls
        tiny.set_attention_implementation("sdpa")
        try:
            sdpa = tiny(x)
        finally:
            tiny.set_attention_implementation("eager")
    assert len(calls) == 2  # one per attention block
    assert tiny.attn_impl == "eager" and max_diff(eager, sdpa) <= 1e-5
    with pytest.raises(ConfigError, match="eager"):
        tiny.set_attention_implementation("flash")


def test_tiny_reparameterize_and_state_dict():
    config = dataclasses.replace(get_preset("fastvlm-tiny").vision, inference_mode=False)
    model = randomize_(FastViTHD(config).eval(), seed=13, gain=0.6)
    x = pixels(2, 128, 128)
    with torch.no_grad():
        before = model(x)
        model.reparameterize()
        after = model(x)
        model.reparameterize()  # idempotent
    assert max_diff(before, after) / before.abs().max().item() <= 1e-5
    fused = FastViTHD(get_preset("fastvlm-tiny").vision)
    assert list(model.state_dict()) == list(fused.state_dict())
    fused.load_state_dict(model.state_dict(), strict=True)


def test_tiny_gradients_and_checkpointing(tiny):
    config = dataclasses.replace(get_preset("fastvlm-tiny").vision, inference_mode=False)
    model = randomize_(FastViTHD(config), seed=17, gain=0.6).train()
    x = pixels(2, 128, 128)

    def grads():
        model.zero_grad()
        model(x).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    state = {k: v.clone() for k, v in model.state_dict().items()}
    plain = grads()
    model.load_state_dict(state)  # undo the BN running-stat updates of the first pass
    model.set_grad_checkpointing(True)
    ckpt = grads()
    # every parameter trains except the unused MobileCLIP head
    assert plain.keys() == ckpt.keys() == {n for n, _ in model.named_parameters()} - {"head.proj"}
    assert all(torch.allclose(plain[k], ckpt[k], rtol=1e-4, atol=1e-7) for k in plain)


def test_init_weights():
    config = get_preset("fastvlm-tiny").vision
    model = FastViTHD(config)
    ls = config.layer_scale_init_value
    for name, p in model.named_parameters():
        if name.split(".")[-1].startswith("layer_scale"):
            assert torch.all(p == ls), name
    # a fused RepMixer starts as the identity, as its train form does (up to layer_scale)
    mixer = model.network[0][0].token_mixer
    x = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        assert torch.allclose(mixer(x), x)
    train = FastViTHD(dataclasses.replace(config, inference_mode=False))
    assert torch.all(train.network[0][0].token_mixer.layer_scale == ls)
    with torch.device("meta"):
        meta = FastViTHD()  # no allocation: the path checkpoint loaders take
    assert next(meta.parameters()).is_meta
    assert build_encoder(config, dtype=torch.bfloat16).conv_exp.reparam_conv.weight.dtype == torch.bfloat16
    # std 0.02 on every conv (before session 21) left an untrained encoder's features ~1e-16
    for encoder in (model, train):
        with torch.no_grad():
            features = encoder.eval()(torch.rand(1, 3, config.image_size, config.image_size))
        assert float(features.std()) > 1e-3, float(features.std())


def test_init_matches_timm_per_parameter():
    """A fresh train-form encoder is distributed as timm's FastVit (the reference's init rules), tensor by tensor.

    The reference's rules: a std-0.02 truncated normal with zero bias for linear layers (`cls_init_weights`) and for
    ConvFFN's three convolutions (its own `_init_weights`), PyTorch's default for every other convolution, layer
    scales of 1e-5. Constant tensors must be equal; random ones must have the same std (0.02 against PyTorch's
    default is a factor of 2.5 or more for every conv here) and mean.
    """
    config = dataclasses.replace(SMALL, inference_mode=False)
    torch.manual_seed(0)
    ours = FastViTHD(config).state_dict()
    ref = timm_to_apple(timm_fastvit(config, inference_mode=False).state_dict())
    assert ref.keys() == ours.keys()
    checked = 0
    for key, a in ours.items():
        b = ref[key].to(a.dtype)
        if b.numel() == 1 or torch.all(b == b.flatten()[0]):
            assert torch.equal(a, b), key
            continue
        a, b = a.double(), b.double()
        lo, hi = (0.8, 1.25) if b.numel() >= 512 else (0.5, 2.0)
        assert lo < float(a.std() / b.std()) < hi, (key, float(a.std()), float(b.std()))
        assert abs(float(a.mean() - b.mean())) < 6 * float(b.std()) * (2 / b.numel()) ** 0.5, key  # 6 s.e.
        checked += 1
    convffn = [k for k in ours if ".convffn." in k and k.endswith("weight") and ours[k].dim() == 4]
    assert convffn and all(abs(float(ours[k].std()) - 0.02) < 0.006 for k in convffn)
    assert checked > 50


# ---------------------------------------------------------------------------- input validation


@pytest.mark.parametrize(
    "shape, words",
    [
        ((1, 3, 1000, 1024), ["height 1000", "multiple of 64", "960 or 1024"]),
        ((1, 3, 1024, 1000), ["width 1000", "960 or 1024"]),
        ((1, 3, 32, 64), ["height 32", "resize it to 64"]),
        ((1, 4, 128, 128), ["3 colour channels", "[1, 4, 128, 128]"]),
        ((1, 128, 128, 3), ["3 colour channels", "channels-last"]),
        ((3, 128, 128), ["[batch, 3, height, width]"]),
    ],
)
def test_bad_input_raises_image_error(tiny, shape, words):
    with pytest.raises(ImageError) as info:
        tiny(torch.zeros(shape))
    for w in words:
        assert w in str(info.value)
    assert isinstance(info.value, FastVLMError) and isinstance(info.value, ValueError)


def test_integer_pixels_rejected(tiny):
    with pytest.raises(ImageError, match="floating point"):
        tiny(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


def test_bad_config_rejected():
    with pytest.raises(ConfigError, match="embed_dims"):
        FastViTHD(dataclasses.replace(SMALL, embed_dims=(32, 48, 96, 192, 384)))


# ---------------------------------------------------------------------------- blocks


def _check_fusion(block: nn.Module, x: torch.Tensor, fused_keys: set[str]) -> None:
    randomize_(block, seed=19).eval()
    with torch.no_grad():
        before = block(x)
        block.reparameterize()
        after = block(x)
    assert max_diff(before, after) <= 1e-5 * max(1.0, before.abs().max().item())
    assert set(block.state_dict()) == fused_keys


@pytest.mark.parametrize(
    "kwargs, train_keys",
    [
        (dict(in_channels=8, out_channels=8, kernel_size=3, groups=8),
         {"rbr_skip", "rbr_conv.0.conv", "rbr_conv.0.bn", "rbr_scale.conv", "rbr_scale.bn"}),
        (dict(in_channels=3, out_channels=8, kernel_size=3, stride=2, use_scale_branch=False),
         {"rbr_conv.0.conv", "rbr_conv.0.bn"}),
        (dict(in_channels=8, out_channels=8, kernel_size=1), {"rbr_skip", "rbr_conv.0.conv", "rbr_conv.0.bn"}),
        (dict(in_channels=8, out_channels=16, kernel_size=3, groups=8, use_se=True),
         {"rbr_conv.0.conv", "rbr_conv.0.bn", "rbr_scale.conv", "rbr_scale.bn", "se.reduce", "se.expand"}),
    ],
    ids=["dw-skip-scale", "stem", "1x1", "conv_exp-like"],
)
def test_mobileone_block_fuses(kwargs, train_keys):
    block = MobileOneBlock(**kwargs, inference_mode=False)
    assert {k.rsplit(".", 1)[0] for k in block.state_dict()} == train_keys
    fused = MobileOneBlock(**kwargs)
    x = torch.randn(2, kwargs["in_channels"], 16, 12)
    _check_fusion(block, x, set(fused.state_dict()))
    assert block.reparam_conv.weight.shape == fused.reparam_conv.weight.shape


def test_large_kernel_conv_fuses():
    block = ReparamLargeKernelConv(8, 16, 7, 2, groups=8, inference_mode=False)
    assert {k.rsplit(".", 2)[0] for k in block.state_dict()} == {"lkb_origin", "small_conv"}
    _check_fusion(block, torch.randn(2, 8, 14, 10), {"lkb_reparam.weight", "lkb_reparam.bias"})


def test_repmixer_fuses():
    block = RepMixer(8, 3, inference_mode=False)
    assert "layer_scale" in block.state_dict() and "norm.rbr_skip.weight" in block.state_dict()
    assert not any(k.startswith("norm.rbr_conv") or k.startswith("norm.rbr_scale") for k in block.state_dict())
    _check_fusion(block, torch.randn(2, 8, 9, 11), {"reparam_conv.weight", "reparam_conv.bias"})


def test_repcpe_fuses():
    block = RepCPE(8, 7, inference_mode=False)
    assert set(block.state_dict()) == {"pe.weight", "pe.bias"}
    _check_fusion(block, torch.randn(2, 8, 9, 11), {"reparam_conv.weight", "reparam_conv.bias"})


def test_composite_blocks_keys():
    assert set(RepMixerBlock(8).state_dict()) >= {"layer_scale", "token_mixer.reparam_conv.weight",
                                                  "convffn.conv.conv.weight", "convffn.conv.bn.running_var",
                                                  "convffn.fc1.weight", "convffn.fc2.bias"}
    assert "convffn.conv.conv.bias" not in RepMixerBlock(8).state_dict()
    assert set(AttentionBlock(64).state_dict()) >= {"norm.weight", "norm.bias", "token_mixer.qkv.weight",
                                                    "token_mixer.proj.weight", "token_mixer.proj.bias",
                                                    "layer_scale_1", "layer_scale_2"}
    assert "token_mixer.qkv.bias" not in AttentionBlock(64).state_dict()
    assert set(PatchEmbed(8, 16).state_dict()) == {"proj.0.lkb_reparam.weight", "proj.0.lkb_reparam.bias",
                                                   "proj.1.reparam_conv.weight", "proj.1.reparam_conv.bias"}


def test_layer_norm_channel_matches_layer_norm():
    norm = randomize_(LayerNormChannel(16, eps=1e-5), seed=23)
    x = torch.randn(2, 16, 5, 7) * 3 + 1
    ref = nn.functional.layer_norm(x.permute(0, 2, 3, 1), (16,), norm.weight, norm.bias, 1e-5).permute(0, 3, 1, 2)
    assert max_diff(norm(x), ref) <= 1e-5


def test_network_layout_matches_reference_indices():
    assert network_layout(VisionConfig()) == [
        ("stage", 0), ("downsample", 1), ("stage", 1), ("downsample", 2), ("stage", 2), ("downsample", 3),
        ("pos_emb", 3), ("stage", 3), ("downsample", 4), ("pos_emb", 4), ("stage", 4)]


def test_timm_to_apple_reshapes_flat_gamma():
    sd = {"stages.0.blocks.0.layer_scale.gamma": torch.ones(4),
          "stages.0.blocks.0.token_mixer.reparam_conv.weight": torch.ones(4, 1, 3, 3)}
    out = timm_to_apple(sd)
    assert out["network.0.0.layer_scale"].shape == (4, 1, 1)
    assert out["network.0.0.token_mixer.reparam_conv.weight"] is sd["stages.0.blocks.0.token_mixer.reparam_conv.weight"]


# ---------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_full_reparameterize_1024():
    model = random_encoder(VisionConfig(inference_mode=False), seed=29, gain=0.6)
    x = pixels(1, 1024, 1024, seed=31)
    with torch.no_grad():
        before = model(x)
        after = model.reparameterize()(x)
    assert before.shape == (1, 256, 3072)
    rel = max_diff(before, after) / before.abs().max().item()
    print(f"\nreparameterize, full size 1024: max|diff|/max|out| = {rel:.3g}")
    assert rel <= 1e-4


@pytest.mark.slow
def test_full_bf16_close_to_fp32(full, ref_features):
    ours, _ = full
    ref = ref_features(1024, 1024)
    low = FastViTHD()
    low.load_state_dict(ours.state_dict())
    low = low.eval().to(dtype=torch.bfloat16, memory_format=torch.channels_last)
    with torch.no_grad():
        feats = low.forward_features(pixels(1, 1024, 1024).to(torch.bfloat16))
    assert feats.dtype == torch.bfloat16 and torch.isfinite(feats).all()
    rel = max_diff(feats, ref) / ref.abs().max().item()
    print(f"\nbf16 channels-last vs fp32 timm, 1024: max|diff|/max|ref| = {rel:.3g}")
    assert rel < 0.1


def test_gradient_checkpointing_counts_each_batch_once_in_batchnorm():
    # The checkpointed backward runs each stage again; its BatchNorms must not update their running statistics
    # a second time (that would apply the momentum twice per batch).
    import copy

    from fastvlm.config import get_preset
    from fastvlm.vision.fastvithd import FastViTHD

    cfg = get_preset("fastvlm-tiny").vision
    cfg.inference_mode = False
    torch.manual_seed(0)
    plain = FastViTHD(cfg).train()
    ckpt = copy.deepcopy(plain)
    ckpt.grad_checkpointing = True
    x = torch.rand(2, 3, cfg.image_size, cfg.image_size)
    for model in (plain, ckpt):
        for _ in range(3):
            model(x).sum().backward()
    a, b = plain.state_dict(), ckpt.state_dict()
    stats = [k for k in a if "running_" in k or "num_batches_tracked" in k]
    assert stats and all(torch.equal(a[k], b[k]) for k in stats)
    assert all(int(a[k]) == 3 for k in stats if "num_batches_tracked" in k)
    grads = {n: p.grad for n, p in plain.named_parameters()}
    assert all(torch.allclose(grads[n], p.grad, atol=1e-6) for n, p in ckpt.named_parameters() if p.grad is not None)
