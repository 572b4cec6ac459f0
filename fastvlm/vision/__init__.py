"""FastViTHD image encoder: building blocks and the encoder."""

from .blocks import (
    ATTENTION_IMPLEMENTATIONS,
    MHSA,
    AttentionBlock,
    ConvFFN,
    GlobalPoolHead,
    LayerNormChannel,
    MobileOneBlock,
    PatchEmbed,
    RepCPE,
    RepMixer,
    RepMixerBlock,
    ReparamLargeKernelConv,
    SEBlock,
)
from .fastvithd import FastViTHD, build_encoder, network_layout

__all__ = [
    "FastViTHD",
    "build_encoder",
    "network_layout",
    "ATTENTION_IMPLEMENTATIONS",
    "MobileOneBlock",
    "ReparamLargeKernelConv",
    "RepMixer",
    "RepCPE",
    "ConvFFN",
    "LayerNormChannel",
    "MHSA",
    "RepMixerBlock",
    "AttentionBlock",
    "PatchEmbed",
    "SEBlock",
    "GlobalPoolHead",
]
