"""FastViTHD building blocks, one class per block.

Blocks with train-time branches take `inference_mode`: True builds the fused form that
the released checkpoints store; False builds the multi-branch form (sub-module names as
in Apple's `mci.py`, so train-form checkpoints load too), and `reparameterize()` turns it
into the fused form in place.

Every fusion rests on conv+BN folding: a conv W followed by eval-mode BN equals a conv
with W' = W * gamma / sqrt(var + eps) and bias b' = beta - mean * gamma / sqrt(var + eps).
Fusions are computed in float64 (float32 on MPS, which has no float64) and cast back, so
the fused model matches the branchy one to fp32 rounding even when BN statistics are far
from the identity.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")


def _conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int, groups: int) -> nn.Sequential:
    """Bias-free conv then BN: the unit every train-time branch is made of."""
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2,
                           groups=groups, bias=False),
            bn=nn.BatchNorm2d(out_channels),
        )
    )


def _wide(t: torch.Tensor) -> torch.Tensor:
    """t in the precision fusions are computed in."""
    return t.to(torch.float32 if t.device.type == "mps" else torch.float64)


def _fold_bn(kernel: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel, bias) of `bn(conv(x, kernel))`, widened."""
    std = (_wide(bn.running_var) + bn.eps).sqrt()
    t = _wide(bn.weight) / std
    return _wide(kernel) * t.reshape(-1, 1, 1, 1), _wide(bn.bias) - _wide(bn.running_mean) * t


def _identity_kernel(channels: int, groups: int, kernel_size: int, like: torch.Tensor) -> torch.Tensor:
    """Kernel of a grouped conv that returns its input unchanged (1 at the centre tap), widened."""
    per_group = channels // groups
    kernel = _wide(torch.zeros(channels, per_group, kernel_size, kernel_size, dtype=like.dtype, device=like.device))
    idx = torch.arange(channels, device=like.device)
    kernel[idx, idx % per_group, kernel_size // 2, kernel_size // 2] = 1.0
    return kernel


def _pad_to(kernel: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Zero-pad a smaller centred kernel; exact because both convs use 'same' padding k//2."""
    pad = (kernel_size - kernel.shape[-1]) // 2
    return F.pad(kernel, [pad] * 4)


def _fused_conv(
    in_channels: int, out_channels: int, kernel_size: int, stride: int, groups: int,
    kernel: torch.Tensor, bias: torch.Tensor, like: torch.Tensor,
) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2,
                     groups=groups, bias=True, device=like.device, dtype=like.dtype)
    with torch.no_grad():
        conv.weight.copy_(kernel.to(like.dtype))
        conv.bias.copy_(bias.to(like.dtype))
    return conv


class SEBlock(nn.Module):
    """Squeeze-and-excite gate of `conv_exp`: mean over H x W, reduce, ReLU, expand, sigmoid."""

    def __init__(self, channels: int, rd_ratio: float = 0.0625) -> None:
        super().__init__()
        hidden = int(channels * rd_ratio)
        self.reduce = nn.Conv2d(channels, hidden, kernel_size=1, bias=True)
        self.expand = nn.Conv2d(hidden, channels, kernel_size=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # avg_pool2d over the whole map is mci.py's arithmetic (timm's x.mean rounds slightly
        # differently). The Hub's llava_qwen.py hard-codes a 16x16 window instead: identical
        # at 1024 px, wrong or failing at other sizes, so that variant is not followed.
        s = F.avg_pool2d(x, kernel_size=x.shape[-2:])
        s = torch.sigmoid(self.expand(F.relu(self.reduce(s))))
        return x * s


class MobileOneBlock(nn.Module):
    """conv -> (SE) -> activation; train form sums a BN skip, k x k conv-BN branches and a 1x1 conv-BN."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        *,
        inference_mode: bool = True,
        use_se: bool = False,
        use_act: bool = True,
        use_scale_branch: bool = True,
        num_conv_branches: int = 1,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.groups = groups
        self.inference_mode = inference_mode
        # Registered before the convs so the state-dict order is Apple's (se.* then reparam_conv.*).
        self.se = SEBlock(out_channels) if use_se else nn.Identity()
        if inference_mode:
            self.reparam_conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                                          padding=kernel_size // 2, groups=groups, bias=True)
        else:
            self.rbr_skip = nn.BatchNorm2d(in_channels) if in_channels == out_channels and stride == 1 else None
            self.rbr_conv = (
                nn.ModuleList(_conv_bn(in_channels, out_channels, kernel_size, stride, groups)
                              for _ in range(num_conv_branches))
                if num_conv_branches > 0 else None
            )
            self.rbr_scale = (
                _conv_bn(in_channels, out_channels, 1, stride, groups)
                if kernel_size > 1 and use_scale_branch else None
            )
        self.activation = nn.GELU() if use_act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inference_mode:
            return self.activation(self.se(self.reparam_conv(x)))
        out = 0
        if self.rbr_scale is not None:
            out = out + self.rbr_scale(x)
        if self.rbr_skip is not None:
            out = out + self.rbr_skip(x)
        if self.rbr_conv is not None:
            for branch in self.rbr_conv:
                out = out + branch(x)
        return self.activation(self.se(out))

    def fused_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Widened (kernel, bias) of the single conv equal to this block's linear part."""
        if self.inference_mode:
            return _wide(self.reparam_conv.weight), _wide(self.reparam_conv.bias)
        like = self._branch_weight()
        k = self.kernel_size
        kernel = _wide(like.new_zeros(self.out_channels, self.in_channels // self.groups, k, k))
        bias = _wide(like.new_zeros(self.out_channels))
        if self.rbr_conv is not None:
            for branch in self.rbr_conv:
                kb, bb = _fold_bn(branch.conv.weight, branch.bn)
                kernel, bias = kernel + kb, bias + bb
        if self.rbr_scale is not None:
            kb, bb = _fold_bn(self.rbr_scale.conv.weight, self.rbr_scale.bn)
            kernel, bias = kernel + _pad_to(kb, k), bias + bb
        if self.rbr_skip is not None:
            kb, bb = _fold_bn(_identity_kernel(self.in_channels, self.groups, k, like), self.rbr_skip)
            kernel, bias = kernel + kb, bias + bb
        return kernel, bias

    def _branch_weight(self) -> torch.Tensor:
        if self.rbr_conv is not None:
            return self.rbr_conv[0].conv.weight
        if self.rbr_scale is not None:
            return self.rbr_scale.conv.weight
        return self.rbr_skip.weight

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.inference_mode:
            return
        like = self._branch_weight()
        kernel, bias = self.fused_kernel_bias()
        conv = _fused_conv(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.groups,
                           kernel, bias, like)
        del self.rbr_skip, self.rbr_conv, self.rbr_scale
        self.reparam_conv = conv
        self.inference_mode = True


class ReparamLargeKernelConv(nn.Module):
    """Large k x k grouped conv then GELU; train form adds a parallel small-kernel conv-BN."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        groups: int,
        small_kernel: Optional[int] = 3,
        *,
        inference_mode: bool = True,
        use_act: bool = True,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.groups = groups
        self.small_kernel = small_kernel
        self.inference_mode = inference_mode
        if inference_mode:
            self.lkb_reparam = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                                         padding=kernel_size // 2, groups=groups, bias=True)
        else:
            self.lkb_origin = _conv_bn(in_channels, out_channels, kernel_size, stride, groups)
            self.small_conv = (
                _conv_bn(in_channels, out_channels, small_kernel, stride, groups) if small_kernel else None
            )
        # The GELU after the stride-2 conv is part of FastViTHD (timm's lkc_use_act=True).
        self.activation = nn.GELU() if use_act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inference_mode:
            out = self.lkb_reparam(x)
        else:
            out = self.lkb_origin(x)
            if self.small_conv is not None:
                out = out + self.small_conv(x)
        return self.activation(out)

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.inference_mode:
            return
        like = self.lkb_origin.conv.weight
        kernel, bias = _fold_bn(like, self.lkb_origin.bn)
        if self.small_conv is not None:
            ks, bs = _fold_bn(self.small_conv.conv.weight, self.small_conv.bn)
            kernel, bias = kernel + _pad_to(ks, self.kernel_size), bias + bs
        conv = _fused_conv(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.groups,
                           kernel, bias, like)
        del self.lkb_origin, self.small_conv
        self.lkb_reparam = conv
        self.inference_mode = True


class RepMixer(nn.Module):
    """Depthwise token mixer. Train form: x + layer_scale * (mixer(x) - norm(x)); fused: one conv.

    The residual lives inside the fused kernel, so the caller adds none.
    """

    def __init__(
        self, dim: int, kernel_size: int = 3, layer_scale_init_value: float = 1e-5, *, inference_mode: bool = True
    ) -> None:
        super().__init__()
        self.dim = dim
        self.kernel_size = kernel_size
        self.inference_mode = inference_mode
        if inference_mode:
            self.reparam_conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, bias=True)
        else:
            self.norm = MobileOneBlock(dim, dim, kernel_size, groups=dim, inference_mode=False, use_act=False,
                                       use_scale_branch=False, num_conv_branches=0)
            self.mixer = MobileOneBlock(dim, dim, kernel_size, groups=dim, inference_mode=False, use_act=False)
            self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), float(layer_scale_init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inference_mode:
            return self.reparam_conv(x)
        return x + self.layer_scale * (self.mixer(x) - self.norm(x))

    @torch.no_grad()
    def init_weights(self, layer_scale_init_value: float) -> None:
        if self.inference_mode:
            # A fresh train-form mixer is the identity up to layer_scale (~1e-5): start there.
            w = self.reparam_conv.weight
            w.copy_(_identity_kernel(self.dim, self.dim, self.kernel_size, w).to(w.dtype))
            self.reparam_conv.bias.zero_()
        else:
            self.layer_scale.fill_(layer_scale_init_value)

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.inference_mode:
            return
        like = self.layer_scale
        km, bm = self.mixer.fused_kernel_bias()
        kn, bn = self.norm.fused_kernel_bias()
        ls = _wide(self.layer_scale)
        kernel = _identity_kernel(self.dim, self.dim, self.kernel_size, like) + ls.unsqueeze(-1) * (km - kn)
        bias = ls.reshape(-1) * (bm - bn)
        conv = _fused_conv(self.dim, self.dim, self.kernel_size, 1, self.dim, kernel, bias, like)
        del self.norm, self.mixer, self.layer_scale
        self.reparam_conv = conv
        self.inference_mode = True


class RepCPE(nn.Module):
    """Conditional positional encoding: x + depthwise conv(x); fused, the identity sits in the kernel."""

    def __init__(self, dim: int, kernel_size: int = 7, *, inference_mode: bool = True) -> None:
        super().__init__()
        self.dim = dim
        self.kernel_size = kernel_size
        self.inference_mode = inference_mode
        conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, bias=True)
        if inference_mode:
            self.reparam_conv = conv
        else:
            self.pe = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inference_mode:
            return self.reparam_conv(x)
        return self.pe(x) + x

    @torch.no_grad()
    def init_weights(self, layer_scale_init_value: float) -> None:
        conv = self.reparam_conv if self.inference_mode else self.pe
        conv.reset_parameters()  # PyTorch's default, as the reference leaves its convolutions
        if self.inference_mode:
            # Same function as a freshly initialised train form: pe(x) + x.
            conv.weight.add_(_identity_kernel(self.dim, self.dim, self.kernel_size, conv.weight).to(conv.weight.dtype))

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.inference_mode:
            return
        like = self.pe.weight
        kernel = _identity_kernel(self.dim, self.dim, self.kernel_size, like) + _wide(like)
        conv = _fused_conv(self.dim, self.dim, self.kernel_size, 1, self.dim, kernel, _wide(self.pe.bias), like)
        del self.pe
        self.reparam_conv = conv
        self.inference_mode = True


class ConvFFN(nn.Module):
    """Depthwise 7x7 conv + BN (never fused, even in checkpoints), then a 1x1 GELU MLP."""

    def __init__(self, dim: int, hidden_dim: int, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, bias=False),
                bn=nn.BatchNorm2d(dim),
            )
        )
        self.fc1 = nn.Conv2d(dim, hidden_dim, kernel_size=1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden_dim, dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.conv(x))))

    @torch.no_grad()
    def init_weights(self, layer_scale_init_value: float) -> None:
        # The reference's ConvFFN initialises its own convolutions (depthwise and both 1x1): truncated normal of
        # std 0.02, zero bias. Every other convolution of the encoder keeps PyTorch's default.
        for conv in (self.conv.conv, self.fc1, self.fc2):
            nn.init.trunc_normal_(conv.weight, std=0.02)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)


class LayerNormChannel(nn.Module):
    """LayerNorm over the channel dim of [B, C, H, W].

    Written out step by step (not F.layer_norm) because that is the reference's arithmetic;
    the two agree in fp32 but round differently in bf16/fp16.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight.unsqueeze(-1).unsqueeze(-1) * x + self.bias.unsqueeze(-1).unsqueeze(-1)


class MHSA(nn.Module):
    """Multi-head self-attention over the H*W positions of a [B, C, H, W] map.

    attn_impl "eager" is the reference arithmetic (q scaled before q @ k^T, softmax in the
    activation dtype); "sdpa" calls torch's fused kernel: faster and leaner on memory, but
    not bit-identical, which shows up in bf16/fp16 logits.
    """

    def __init__(self, dim: int, head_dim: int = 32, attn_impl: str = "eager") -> None:
        super().__init__()
        if dim % head_dim:
            raise ValueError(f"dim {dim} is not a multiple of head_dim {head_dim}")
        self.head_dim = head_dim
        self.num_heads = dim // head_dim
        self.scale = head_dim ** -0.5
        self.attn_impl = attn_impl
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        N = H * W
        x = x.flatten(2).transpose(-2, -1)
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.attn_impl == "sdpa":
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            x = attn.softmax(dim=-1) @ v
        x = self.proj(x.transpose(1, 2).reshape(B, N, C))
        return x.transpose(-2, -1).reshape(B, C, H, W)


class RepMixerBlock(nn.Module):
    """token_mixer (residual inside it) then x + layer_scale * convffn(x)."""

    def __init__(
        self,
        dim: int,
        kernel_size: int = 3,
        mlp_ratio: float = 4.0,
        layer_scale_init_value: float = 1e-5,
        *,
        inference_mode: bool = True,
    ) -> None:
        super().__init__()
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), float(layer_scale_init_value)))
        self.token_mixer = RepMixer(dim, kernel_size, layer_scale_init_value, inference_mode=inference_mode)
        self.convffn = ConvFFN(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.token_mixer(x)
        return x + self.layer_scale * self.convffn(x)

    @torch.no_grad()
    def init_weights(self, layer_scale_init_value: float) -> None:
        self.layer_scale.fill_(layer_scale_init_value)


class AttentionBlock(nn.Module):
    """Pre-norm attention block: x + ls1 * MHSA(norm(x)), then x + ls2 * convffn(x)."""

    def __init__(
        self,
        dim: int,
        head_dim: int = 32,
        mlp_ratio: float = 4.0,
        layer_scale_init_value: float = 1e-5,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.layer_scale_1 = nn.Parameter(torch.full((dim, 1, 1), float(layer_scale_init_value)))
        self.layer_scale_2 = nn.Parameter(torch.full((dim, 1, 1), float(layer_scale_init_value)))
        self.norm = LayerNormChannel(dim, eps=norm_eps)
        self.token_mixer = MHSA(dim, head_dim=head_dim)
        self.convffn = ConvFFN(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.layer_scale_1 * self.token_mixer(self.norm(x))
        return x + self.layer_scale_2 * self.convffn(x)

    @torch.no_grad()
    def init_weights(self, layer_scale_init_value: float) -> None:
        self.layer_scale_1.fill_(layer_scale_init_value)
        self.layer_scale_2.fill_(layer_scale_init_value)


class PatchEmbed(nn.Module):
    """Downsample between stages: depthwise-grouped 7x7 stride-2 conv + GELU, then 1x1 MobileOne + GELU."""

    def __init__(
        self, in_channels: int, out_channels: int, patch_size: int = 7, stride: int = 2, *, inference_mode: bool = True
    ) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            ReparamLargeKernelConv(in_channels, out_channels, patch_size, stride, groups=in_channels,
                                   small_kernel=3, inference_mode=inference_mode),
            MobileOneBlock(out_channels, out_channels, 1, inference_mode=inference_mode),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class GlobalPoolHead(nn.Module):
    """MobileCLIP's image-projection head (`head.proj`): spatial mean, then x @ proj.

    FastVLM never runs it (it reads the map before the head); it exists so Apple
    checkpoints load strictly and save back unchanged.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Parameter(torch.empty(in_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1)) @ self.proj

    @torch.no_grad()
    def init_weights(self, layer_scale_init_value: float) -> None:
        nn.init.normal_(self.proj, std=self.proj.shape[0] ** -0.5)


REPARAMETERIZABLE = (MobileOneBlock, ReparamLargeKernelConv, RepMixer, RepCPE)
