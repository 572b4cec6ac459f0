import os
import sys

import pytest

# The reference implementation uses unfused attention; timm must match it in parity tests.
os.environ.setdefault("TIMM_FUSED_ATTN", "0")
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from helpers import small_tokenizer

    return small_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer):
    import torch

    from fastvlm import FastVLM

    return FastVLM.from_preset("fastvlm-tiny", tokenizer=tiny_tokenizer, device="cpu", dtype=torch.float32)
