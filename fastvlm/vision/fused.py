"""A fused, inference-only program for FastViTHD (the "fast" path).

`FastViTHD.optimize_for_inference()` builds a `FusedFastViTHD` from the encoder's own
parameters and runs it instead of the module tree while the encoder is in eval mode.
The checkpoint layout is untouched: the fused program is a cache derived from the
parameters (it is not a sub-module, never appears in `state_dict()`, and is rebuilt
whenever a parameter or buffer changes, moves or changes dtype).

What it fuses, each an algebraic identity (the results differ from the reference only
by floating-point rounding):

- the ConvFFN's BatchNorm into the bias-free depthwise 7x7 conv before it
  (W' = W * g / sqrt(v + eps), b' = beta - mean * g / sqrt(v + eps));
- every layer scale into the conv or linear in front of it (ls * (W h + b) = (ls W) h + ls b);
- on CPUs with oneDNN, each 1x1 conv with the GELU after it and each block's last 1x1
  conv with its residual add, as single oneDNN primitives with post-ops (one pass over
  memory instead of two or three; depthwise and grouped convs stay plain convolutions,
  which oneDNN runs several times faster without post-ops);
- LayerNormChannel as F.layer_norm over the channel dim of the channels-last map (the
  same maths in one kernel), and attention as torch's SDPA.

Weights that need no change (fc1, qkv, the token-mixer and positional convs) are shared
with the module tree, not copied. Folds are computed in float64 and rounded once.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import (
    MHSA,
    AttentionBlock,
    ConvFFN,
    MobileOneBlock,
    PatchEmbed,
    RepCPE,
    RepMixerBlock,
    ReparamLargeKernelConv,
    SEBlock,
)


def _wide(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32 if t.device.type == "mps" else torch.float64)


def onednn_fusion_available() -> bool:
    """True when this PyTorch exposes oneDNN's fused conv+post-op kernels (CPU builds with mkldnn)."""
    return bool(torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise"))


def _use_onednn(x: torch.Tensor, enabled: bool) -> bool:
    return (enabled and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and not torch.is_grad_enabled())


def _repeat_channels(x: torch.Tensor, m: int) -> torch.Tensor:
    """[N, C, H, W] channels-last -> [N, C*m, H, W] channels-last, channel c at c*m ... c*m+m-1.

    oneDNN has fast kernels for depthwise convs (one input and one output per group) but not for
    groups with several outputs each: at 1024 px FastViTHD's five such convs took 45 ms as grouped
    convs and 14 ms as depthwise convs on repeated inputs, copies included (bf16, 2-core AMX Xeon;
    benchmarks/results/grouped-conv-ab-cpu-intel.json). One copy of the NHWC view, stacked along a new last dim.
    """
    n, c, h, w = x.shape
    v = x.permute(0, 2, 3, 1)
    return torch.stack([v] * m, dim=-1).reshape(n, h, w, c * m).permute(0, 3, 1, 2)


class FusedConv(nn.Module):
    """conv (+bias) -> optional SE gate -> optional GELU, with the GELU fused into the conv on oneDNN."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: int, padding: int, groups: int,
                 gelu: bool, se: Optional[SEBlock] = None) -> None:
        super().__init__()
        self.weight = weight.detach()
        self.bias = None if bias is None else bias.detach()
        self.stride, self.padding, self.groups = stride, padding, groups
        self.gelu = gelu
        self.se = se
        self.onednn = True
        self.pointwise = self.weight.shape[-2:] == (1, 1) and groups == 1
        # a grouped conv with one input and m > 1 outputs per group (the 7x7 stride-2 downsamplers,
        # the 3x3 expansion before the head): on CPUs it runs as a depthwise conv over the input with
        # each channel repeated m times, the same products and sums (see `_repeat_channels`)
        out_ch = self.weight.shape[0]
        self.multiplier = out_ch // groups if groups > 1 and self.weight.shape[1] == 1 and out_ch % groups == 0 else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fuse_act = self.gelu and self.se is None
        onednn = _use_onednn(x, self.onednn)
        if self.multiplier > 1 and onednn and x.is_contiguous(memory_format=torch.channels_last):
            y = F.conv2d(_repeat_channels(x, self.multiplier), self.weight, self.bias, self.stride, self.padding, 1,
                         self.groups * self.multiplier)
        # oneDNN's post-op kernels are fast for dense 1x1 convs; for depthwise and grouped
        # k x k convs they are several times slower than the plain conv (profiled at 1024 px)
        elif self.pointwise and onednn:
            y = torch.ops.mkldnn._convolution_pointwise(
                x, self.weight, self.bias, [self.padding] * 2, [self.stride] * 2, [1, 1], self.groups,
                "gelu" if fuse_act else "none", [None] if fuse_act else [], "none" if fuse_act else "")
            if fuse_act:
                return y
        else:
            y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, 1, self.groups)
        if self.se is not None:
            y = self.se(y)
        return F.gelu(y) if self.gelu else y


class FusedFFN(nn.Module):
    """x + ls * ConvFFN(x) as: depthwise conv with BN folded -> 1x1 conv + GELU -> 1x1 conv (ls folded) + x."""

    def __init__(self, ffn: ConvFFN, layer_scale: torch.Tensor) -> None:
        super().__init__()
        conv, bn = ffn.conv.conv, ffn.conv.bn
        dtype = conv.weight.dtype
        t = _wide(bn.weight) / (_wide(bn.running_var) + bn.eps).sqrt()
        self.dw_weight = (_wide(conv.weight) * t.reshape(-1, 1, 1, 1)).to(dtype)
        self.dw_bias = (_wide(bn.bias) - _wide(bn.running_mean) * t).to(dtype)
        if conv.bias is not None:
            self.dw_bias = (_wide(self.dw_bias) + _wide(conv.bias) * t).to(dtype)
        self.dw_padding, self.dw_groups = conv.padding[0], conv.groups
        self.fc1_weight, self.fc1_bias = ffn.fc1.weight.detach(), ffn.fc1.bias.detach()
        ls = _wide(layer_scale).reshape(-1)
        self.fc2_weight = (_wide(ffn.fc2.weight) * ls.reshape(-1, 1, 1, 1)).to(dtype)
        self.fc2_bias = (_wide(ffn.fc2.bias) * ls).to(dtype)
        self.onednn = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.conv2d(x, self.dw_weight, self.dw_bias, 1, self.dw_padding, 1, self.dw_groups)
        if _use_onednn(x, self.onednn):
            pw = ([0, 0], [1, 1], [1, 1], 1)
            h = torch.ops.mkldnn._convolution_pointwise(h, self.fc1_weight, self.fc1_bias, *pw, "gelu", [None], "none")
            return torch.ops.mkldnn._convolution_pointwise.binary(
                h, x, self.fc2_weight, self.fc2_bias, *pw, "add", None, None, [], None)
        h = F.gelu(F.conv2d(h, self.fc1_weight, self.fc1_bias))
        return x + F.conv2d(h, self.fc2_weight, self.fc2_bias)


class FusedRepMixerBlock(nn.Module):
    def __init__(self, block: RepMixerBlock) -> None:
        super().__init__()
        tm = block.token_mixer.reparam_conv
        self.mixer = FusedConv(tm.weight, tm.bias, 1, tm.padding[0], tm.groups, gelu=False)
        self.ffn = FusedFFN(block.convffn, block.layer_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn(self.mixer(x))


class FusedAttentionBlock(nn.Module):
    """x + ls1 * MHSA(LN(x)) with LN as F.layer_norm on the NHWC view, SDPA, ls1 folded into proj; then the FFN."""

    def __init__(self, block: AttentionBlock) -> None:
        super().__init__()
        attn: MHSA = block.token_mixer
        self.norm_weight, self.norm_bias = block.norm.weight.detach(), block.norm.bias.detach()
        self.eps = block.norm.eps
        self.num_heads, self.head_dim = attn.num_heads, attn.head_dim
        self.qkv_weight = attn.qkv.weight.detach()
        self.qkv_bias = None if attn.qkv.bias is None else attn.qkv.bias.detach()
        dtype = attn.proj.weight.dtype
        ls = _wide(block.layer_scale_1).reshape(-1)
        self.proj_weight = (_wide(attn.proj.weight) * ls.reshape(-1, 1)).to(dtype)
        self.proj_bias = (_wide(attn.proj.bias) * ls).to(dtype)
        self.ffn = FusedFFN(block.convffn, block.layer_scale_2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        N = H * W
        nhwc = x.permute(0, 2, 3, 1)  # a free view when x is channels-last
        t = F.layer_norm(nhwc, (C,), self.norm_weight, self.norm_bias, self.eps).reshape(B, N, C)
        qkv = F.linear(t, self.qkv_weight, self.qkv_bias).reshape(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
        o = F.linear(o, self.proj_weight, self.proj_bias).reshape(B, H, W, C).permute(0, 3, 1, 2)
        return self.ffn(x + o)


def _conv_of(block: nn.Module) -> nn.Conv2d:
    return block.lkb_reparam if isinstance(block, ReparamLargeKernelConv) else block.reparam_conv


def _fused_conv_block(block: nn.Module) -> FusedConv:
    conv = _conv_of(block)
    gelu = isinstance(block.activation, nn.GELU)
    se = block.se if isinstance(block, MobileOneBlock) and isinstance(block.se, SEBlock) else None
    return FusedConv(conv.weight, conv.bias, conv.stride[0], conv.padding[0], conv.groups, gelu=gelu, se=se)


class FusedFastViTHD(nn.Module):
    """[B, 3, H, W] -> conv_exp output [B, C_out, H/64, W/64]; built from an eval-form FastViTHD."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        if not encoder.config.inference_mode:
            # train-form encoder: fuse a throwaway copy, so the caller's layout is untouched
            encoder = copy.deepcopy(encoder).reparameterize()
        self.stem = nn.Sequential(*[_fused_conv_block(b) for b in encoder.patch_embed])
        layers: list[nn.Module] = []
        for module in encoder.network:
            if isinstance(module, PatchEmbed):
                layers += [_fused_conv_block(b) for b in module.proj]
            elif isinstance(module, RepCPE):
                c = module.reparam_conv
                layers.append(FusedConv(c.weight, c.bias, 1, c.padding[0], c.groups, gelu=False))
            else:
                for block in module:
                    if isinstance(block, RepMixerBlock):
                        layers.append(FusedRepMixerBlock(block))
                    elif isinstance(block, AttentionBlock):
                        layers.append(FusedAttentionBlock(block))
                    else:  # pragma: no cover - every FastViTHD stage is one of the two
                        raise TypeError(f"cannot fuse {type(block).__name__}")
        self.layers = nn.Sequential(*layers)
        self.conv_exp = _fused_conv_block(encoder.conv_exp)

    def set_onednn(self, enabled: bool) -> None:
        """Use oneDNN's fused conv kernels on CPU (True) or plain torch ops (False, e.g. for torch.compile)."""
        for m in self.modules():
            if hasattr(m, "onednn"):
                m.onednn = enabled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_exp(self.layers(self.stem(x)))
