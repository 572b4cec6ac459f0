"""Random weights with trained-model scales, so speed and accuracy numbers mean something without a download.

`FastVLM.from_preset` initialises the encoder for training from scratch: layer scales of
1e-5 and identity BatchNorms, so every block is nearly the identity and any two
arithmetic paths agree trivially. `realistic_encoder_` moves the encoder to the scales a
trained FastViTHD has (layer scales O(0.1), non-trivial BN statistics and affine terms,
variance-preserving conv/linear weights), which is what the accuracy comparisons of the
fast modes need. Speed does not depend on it.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def realistic_encoder_(encoder: nn.Module, seed: int = 0) -> nn.Module:
    from ..vision import LayerNormChannel

    g = torch.Generator().manual_seed(seed)

    def fill(t: torch.Tensor, fn) -> None:
        tmp = torch.empty(t.shape, dtype=torch.float32)
        fn(tmp)
        t.copy_(tmp.to(t.dtype))

    for m in encoder.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            fill(m.weight, lambda t: t.normal_(0.0, fan_in ** -0.5, generator=g))
            if m.bias is not None:
                fill(m.bias, lambda t: t.normal_(0.0, 0.05, generator=g))
        elif isinstance(m, nn.BatchNorm2d):
            fill(m.weight, lambda t: t.uniform_(0.5, 1.5, generator=g))
            fill(m.bias, lambda t: t.normal_(0.0, 0.2, generator=g))
            fill(m.running_mean, lambda t: t.normal_(0.0, 0.2, generator=g))
            fill(m.running_var, lambda t: t.uniform_(0.5, 2.0, generator=g))
        elif isinstance(m, LayerNormChannel):
            fill(m.weight, lambda t: t.uniform_(0.5, 1.5, generator=g))
            fill(m.bias, lambda t: t.normal_(0.0, 0.1, generator=g))
    for name, p in encoder.named_parameters():
        if name.split(".")[-1].startswith("layer_scale"):
            fill(p, lambda t: t.uniform_(0.03, 0.12, generator=g))
    return encoder
