"""The encoders FastVLM's paper compares with, at their real sizes with random weights, each feeding our LLM's prefill.

Every baseline is built from a well-kept library (transformers for the ViTs, timm for
ConvNeXt), run in the same dtype on the same device, and followed by a 2-layer GELU MLP
projector (negligible) and the same language model's prefill as FastVLM, so that TTFT
ratios compare only the encoders and the number of visual tokens they produce.

ConvLLaVA's encoder is ConvNeXt-L (LAION's convnext_large_d_320, whose trunk is timm's
convnext_large: depths 3-3-27-3, widths 192-1536) plus a fifth stage that ConvLLaVA
appends and trains: a ConvNeXt stage with a stride-2 downsample to width 3072 and 6
blocks (its training scripts pass `--vision_add_five_stage 6 --vision_five_stage_width
3072`). We build exactly that with timm's `ConvNeXtStage`, so the output stride is 64 and
768 px gives 144 tokens, 1024 px 256. The fifth stage alone holds ~460M parameters; the
paper's table lists 200M for "ConvNeXt-L", the four-stage count.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

# The paper's numbers (M1 Max; targets.md) that each baseline is compared with.
PAPER = {
    "fastvithd_encoder_ms": {256: 6.8, 512: 33.5, 768: 54.8, 1024: 116.3},
    "fastvlm_0.5b_ttft_ms": 166.0,
}


@dataclass
class EncoderBaseline:
    name: str
    description: str
    library: str
    resolution: int  # side of the input the encoder sees (per tile)
    passes: int  # images through the encoder per request (tiles + base image)
    tokens: int  # visual tokens handed to the LLM
    width: int  # feature width before the projector
    build: Callable[[], nn.Module]
    features: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    channels_last: bool = False
    # (what, paper's ratio, paper's own numbers) for the ratios printed next to ours
    paper: list[tuple[str, float, str]] = field(default_factory=list)
    compare_resolution: int = 1024  # FastVLM resolution the paper compares it with


def _clip_vit_l14_336() -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    return CLIPVisionModel(cfg)


def _siglip_so400m_384() -> nn.Module:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    cfg = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                             image_size=384, patch_size=14, vision_use_head=False)
    return SiglipVisionModel(cfg)


class ConvNeXtL5Stage(nn.Module):
    """timm convnext_large trunk + ConvLLaVA's fifth stage (stride 2 to width 3072, 6 ConvNeXt blocks)."""

    def __init__(self) -> None:
        super().__init__()
        import timm
        from timm.layers import LayerNorm, LayerNorm2d
        from timm.models.convnext import ConvNeXtStage

        self.trunk = timm.create_model("convnext_large", pretrained=False, num_classes=0)
        self.stage5 = ConvNeXtStage(1536, 3072, kernel_size=7, stride=2, depth=6, ls_init_value=1e-6,
                                    norm_layer=LayerNorm2d, norm_layer_cl=LayerNorm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage5(self.trunk.forward_features(x))


def _vit_tokens(model: nn.Module, x: torch.Tensor, drop_cls: bool) -> torch.Tensor:
    h = model(pixel_values=x).last_hidden_state
    return h[:, 1:] if drop_cls else h


def _convnext_tokens(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).flatten(2).transpose(1, 2)


def paper_baselines() -> list[EncoderBaseline]:
    clip = EncoderBaseline(
        "clip-vit-l14-336", "CLIP ViT-L/14 @336 (LLaVA-1.5's encoder)", "transformers CLIPVisionModel",
        336, 1, 576, 1024, _clip_vit_l14_336, lambda m, x: _vit_tokens(m, x, True),
        paper=[("encoder time / FastViTHD@1024", 127.4 / 116.3, "127.4 vs 116.3 ms")])
    siglip = EncoderBaseline(
        "siglip-so400m-384", "SigLIP-SO400M @384 (nanoLLaVA's encoder)", "transformers SiglipVisionModel",
        384, 1, 729, 1152, _siglip_so400m_384, lambda m, x: _vit_tokens(m, x, False),
        paper=[("TTFT / FastVLM-0.5B@1024", 535.0 / 166.0, "nanoLLaVA 535 vs 166 ms (3.2x)"),
               ("encoder time / FastViTHD@1024", 272.1 / 116.3, "272.1 vs 116.3 ms")])
    onevision = EncoderBaseline(
        "llava-ov-siglip-1152", "LLaVA-OneVision tiling at 1152: SigLIP-SO400M on 3x3 tiles of 384 + the base image",
        "transformers SiglipVisionModel", 384, 10, 7290, 1152, _siglip_so400m_384,
        lambda m, x: _vit_tokens(m, x, False).reshape(1, -1, 1152),
        paper=[("TTFT / FastVLM-0.5B@1024", 14124.0 / 166.0, "14124 vs 166 ms (85x)"),
               ("encoder time / FastViTHD@1024", 2721.4 / 116.3, "2721.4 vs 116.3 ms")])
    convnext = []
    for res, enc_ms, cl_ttft, fv_ttft in ((768, 164.3, 496.0, 387.0), (1024, 696.1, 1157.0, 577.0)):
        convnext.append(EncoderBaseline(
            f"convnext-l-5stage-{res}", f"ConvNeXt-L + ConvLLaVA's 5th stage @{res}",
            "timm convnext_large + ConvNeXtStage", res, 1, (res // 64) ** 2, 3072, ConvNeXtL5Stage,
            _convnext_tokens, channels_last=True, compare_resolution=res,
            paper=[(f"encoder time / FastViTHD@{res}", enc_ms / PAPER["fastvithd_encoder_ms"][res],
                    f"{enc_ms} vs {PAPER['fastvithd_encoder_ms'][res]} ms"),
                   (f"TTFT / FastVLM@{res} (paper: Vicuna-7B LLM)", cl_ttft / fv_ttft,
                    f"ConvLLaVA {cl_ttft} vs FastVLM {fv_ttft} ms")]))
    return [clip, siglip, onevision, *convnext]


def projector(width: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden))


def count_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@torch.no_grad()
def init_random_(m: nn.Module, seed: int = 0) -> nn.Module:
    """Fast random init (built on the meta device, then filled): N(0, 1/fan_in) weights, zero biases, unit norms."""
    g = torch.Generator().manual_seed(seed)
    for mod in m.modules():
        for name, p in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            if not p.is_floating_point():
                continue
            tmp = torch.empty(p.shape, dtype=torch.float32)
            if p.dim() >= 2:
                tmp.normal_(0.0, p[0].numel() ** -0.5, generator=g)
            elif "bias" in name:
                tmp.zero_()
            elif "norm" in type(mod).__name__.lower():
                tmp.fill_(1.0)
            elif name == "gamma":  # ConvNeXt layer scale
                tmp.fill_(1e-2)
            else:
                tmp.normal_(0.0, 0.02, generator=g)
            p.copy_(tmp.to(p.dtype))
    return m


def build(baseline: EncoderBaseline, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    with torch.device("meta"):
        model = baseline.build()
    model = model.to_empty(device="cpu")
    init_random_(model, seed)
    # position-id buffers (ViTs) are non-persistent aranges: rebuild them after to_empty
    for mod in model.modules():
        if hasattr(mod, "position_ids") and isinstance(mod.position_ids, torch.Tensor):
            n = mod.position_ids.shape[-1]
            mod.position_ids.copy_(torch.arange(n).expand(mod.position_ids.shape))
    model = model.to(device=device, dtype=dtype).eval()
    if baseline.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def pixels(baseline: EncoderBaseline, device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(baseline.passes, 3, baseline.resolution, baseline.resolution, generator=g)
    x = x.to(device=device, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if baseline.channels_last else x


def attention_impl(model: nn.Module) -> Optional[str]:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "_attn_implementation", None) if cfg is not None else None
