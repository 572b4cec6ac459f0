"""Run scripts/pretrain_synth_encoder.py with FastViTHD's initialisation as it was before session 21.

Session 21 made `FastViTHD.init_weights` follow the reference (std-0.02 truncated normal on linear layers only;
convolutions keep PyTorch's default). The bundled model's encoder was pretrained from the old rule (the same normal
on every convolution too). This runs the pretraining with the old rule, so the two can be compared with the same
arguments, seed and data:

  python scripts/pretrain_synth_encoder.py ARGS --out new.safetensors      # the current (reference) init
  python scripts/encoder_init_ab.py        ARGS --out old.safetensors      # the pre-session-21 init

(Kept as run in session 22, from scripts/; commands.sh in this folder. Today's pretraining script has
--conv-init small for the old rule, so this wrapper is no longer needed.)

Every argument is passed to pretrain_synth_encoder.py unchanged; its log (OUT.log.json) records "init": "legacy".
"""

from __future__ import annotations

import os
import runpy
import sys

import torch
from torch import nn

from fastvlm.vision.fastvithd import FastViTHD
from fastvlm.vision.blocks import LayerNormChannel


@torch.no_grad()
def legacy_init_weights(self: FastViTHD) -> None:
    """FastViTHD.init_weights as of commit 1159b5b^: the 0.02 truncated normal on every conv and linear layer."""
    if any(p.is_meta for p in self.parameters()):
        return
    for m in self.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            m.reset_parameters()
        elif isinstance(m, LayerNormChannel):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in self.modules():
        if m is not self and hasattr(m, "init_weights"):
            m.init_weights(self.config.layer_scale_init_value)


def main() -> None:
    FastViTHD.init_weights = legacy_init_weights
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrain_synth_encoder.py")
    sys.argv = [script, *sys.argv[1:]]
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        out = next((sys.argv[i + 1] for i, a in enumerate(sys.argv[:-1]) if a == "--out"), None)
        log = out and os.path.splitext(out)[0] + ".log.json"
        if log and os.path.exists(log):
            import json

            with open(log) as f:
                rec = json.load(f)
            rec["init"] = "legacy"
            with open(log, "w") as f:
                json.dump(rec, f, indent=1)


if __name__ == "__main__":
    main()
