"""Training on a CUDA GPU: bf16 mixed precision, fused AdamW, gradient checkpointing, LoRA, resume.

Slow and GPU-only: ``pytest -m slow tests/test_train_gpu.py`` on a machine with CUDA.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from fastvlm.train.recipe import recipe_from_dict

sys.path.insert(0, os.path.dirname(__file__))
from test_train import make_dataset, make_tokenizer, tiny_recipe  # noqa: E402

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    make_tokenizer(root / "tok")
    return root, make_dataset(root / "data", 32, text_only=4)


def _losses(out):
    return [json.loads(line)["loss"] for line in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in line]


def test_bf16_stage2_with_checkpointing(setup):
    from fastvlm.model import FastVLM
    from fastvlm.train.trainer import train

    root, data = setup
    recipe = tiny_recipe(data, root / "tok", root / "s2",
                         init={"preset": "fastvlm-tiny", "seed": 0, "vision": {"inference_mode": False}},
                         train={"epochs": 8, "global_batch_size": 8, "per_device_batch_size": 4,
                                "gradient_checkpointing": True, "vision_gradient_checkpointing": True},
                         optim={"lr": 3e-3, "warmup_ratio": 0.05})
    recipe["data"]["val"] = data["val"]
    recipe["output"].update(save_every=10, eval_every=10)
    summary = train(recipe_from_dict(recipe), progress=False)
    assert summary["mixed_precision"] == "bf16" and summary["device"].startswith("cuda")
    losses = _losses(root / "s2")
    assert sum(losses[-3:]) < 0.6 * sum(losses[:3]), losses
    model = FastVLM.from_pretrained(str(root / "s2" / "final"), device="cuda", dtype="bf16")
    assert model.config.vision.inference_mode

    # resume from the step-30 checkpoint with more steps: continues, does not restart
    recipe["train"]["max_steps"] = 40
    summary2 = train(recipe_from_dict(recipe), progress=False)
    assert summary2["resumed_from"].endswith("step_32") and summary2["steps"] == 40


def test_lora_on_gpu(setup):
    from fastvlm.model import FastVLM
    from fastvlm.train.trainer import train

    root, data = setup
    base = tiny_recipe(data, root / "tok", root / "base", train={"epochs": 2, "global_batch_size": 8,
                                                                 "per_device_batch_size": 8})
    train(recipe_from_dict(base), progress=False)
    recipe = tiny_recipe(data, root / "tok", root / "lora", stage="lora", init=None,
                         model=str(root / "base" / "final"),
                         lora={"r": 8, "alpha": 16, "dropout": 0.05},
                         train={"epochs": 4, "global_batch_size": 8, "per_device_batch_size": 4,
                                "gradient_checkpointing": True},
                         optim={"lr": 2e-3, "lr_projector": 1e-3})
    recipe["output"].update(save_every=4, checkpoint_weights="trainable", export_apple=True)
    summary = train(recipe_from_dict(recipe), progress=False)
    assert summary["steps"] == 16
    tp = summary["trainable_parameters"]
    assert tp["vision_tower"] == 0 and 0 < tp["language_model"] < tp["total"] // 4
    for name in ("final", "final_apple"):
        model = FastVLM.from_pretrained(str(root / "lora" / name), device="cuda", dtype="bf16")
        assert type(model.language_model).__name__ == "Qwen2ForCausalLM"
    # resume from a checkpoint that holds only the adapters, the projector and buffers
    recipe["train"]["max_steps"] = 20
    summary2 = train(recipe_from_dict(recipe), progress=False)
    assert summary2["resumed_from"].endswith("step_16") and summary2["steps"] == 20
