"""The native bf16 decode step of Qwen2 decoder layers (fastvlm.kernels.decode_layer) against
transformers' own modules: the same numbers up to fp32 summation order, the same greedy tokens,
the same cache, and a fallback to the module for everything it does not cover."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

from fastvlm import kernels
from fastvlm.generation import cache_argument
from fastvlm.kernels.decode_layer import use_lean_decode_layers

pytestmark = pytest.mark.skipif(not kernels.available(torch.bfloat16), reason=kernels.status())
KW = cache_argument(Qwen2ForCausalLM(Qwen2Config(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                                  num_attention_heads=1, num_key_value_heads=1)))


def lm(head_dim: int = 32, seed: int = 0, max_positions: int = 512) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=300, hidden_size=4 * head_dim, intermediate_size=200, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                      tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, and logits that are not all alike
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (2.0 / p.shape[-1] ** 0.5))
    return model.to(torch.bfloat16)


class Wrapped(torch.nn.Module):
    """A projection wrapped as LoRA wraps them: the same weight and bias attributes, another module type."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.weight, self.bias = inner, inner.weight, inner.bias

    def forward(self, x):
        return self.inner(x)


def layers_of(model):
    return [type(m).__name__ for m in model.model.layers]


@torch.inference_mode()
def decode(model, ids, steps, lean: bool):
    """Greedy decode; per step the last logits (fp32) and, at the end, the cache."""
    assert use_lean_decode_layers(model, lean) == (len(model.model.layers) if lean else 0)
    cache = DynamicCache()
    out = model(input_ids=ids, use_cache=True, **{KW: cache}, logits_to_keep=1)
    logits, toks = [], []
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    for i in range(steps):
        toks.append(int(tok))
        out = model(input_ids=tok, use_cache=True, **{KW: cache},
                    position_ids=torch.tensor([[ids.shape[1] + i]]))
        logits.append(out.logits[0, -1].float())
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
    return torch.stack(logits), toks, cache


@pytest.mark.parametrize("head_dim", [32, 64])
def test_lean_steps_match_the_modules(head_dim):
    model = lm(head_dim)
    ids = torch.randint(0, 300, (1, 23), generator=torch.Generator().manual_seed(1))
    torch_logits, torch_toks, _ = decode(model, ids, 16, lean=False)
    # the modules with the same matrix-vector kernel (DecodeLinear): the lean step's reference,
    # which it should reproduce up to fp32 sum order in its norms (bit for bit on this CPU)
    for m in model.modules():
        if type(m) is torch.nn.Linear:
            m.__class__ = kernels.DecodeLinear
    ref_logits, ref_toks, ref_cache = decode(model, ids, 16, lean=False)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    got_logits, got_toks, got_cache = decode(model, ids, 16, lean=True)
    assert layers_of(model) == ["LeanQwen2DecoderLayer"] * 3
    assert got_toks == ref_toks == torch_toks
    scale = ref_logits.abs().max()
    err = (got_logits - ref_logits).abs().max() / scale
    err_torch = (got_logits - torch_logits).abs().max() / scale
    print(f"\nhead_dim {head_dim}: max logit diff {err:.2e} vs the same kernels in the modules, "
          f"{err_torch:.2e} vs torch's matmuls")
    assert err < 1e-3, err
    assert err_torch < 2e-2, err_torch  # the matrix-vector kernel's own fp32 sum order (test_fast_paths)
    for layer in range(3):  # the cache holds the same (rotated) keys and values
        for a, b in ((got_cache.layers[layer].keys, ref_cache.layers[layer].keys),
                     (got_cache.layers[layer].values, ref_cache.layers[layer].values)):
            assert a.shape == b.shape == (1, 2, 23 + 16, head_dim)
            assert (a.float() - b.float()).abs().max() <= 1e-3 * b.float().abs().max()
    # the swap leaves the parameters alone and is reversible
    assert all(torch.equal(model.state_dict()[k], sd[k]) for k in sd)
    use_lean_decode_layers(model, False)
    assert layers_of(model) == ["Qwen2DecoderLayer"] * 3


def test_a_wrong_step_would_be_caught(monkeypatch):
    """The tolerance above is sharp enough to see a mistake in the native step: the same steps
    with cos and sin swapped on their way in fail it."""
    from fastvlm.kernels import decode_layer

    model = lm(32)
    kernels.use_decode_kernels(model)  # DecodeLinear everywhere (and lean layers, which decode() turns off)
    ids = torch.randint(0, 300, (1, 23), generator=torch.Generator().manual_seed(1))
    ref_logits, _, _ = decode(model, ids, 4, lean=False)
    assert (decode(model, ids, 4, lean=True)[0] - ref_logits).abs().max() / ref_logits.abs().max() < 1e-3
    real = decode_layer._lean_step
    monkeypatch.setattr(decode_layer, "_lean_step", lambda layer, x, cos, sin, cache: real(layer, x, sin, cos, cache))
    got_logits, _, _ = decode(model, ids, 4, lean=True)
    assert (got_logits - ref_logits).abs().max() / ref_logits.abs().max() > 1e-3


@pytest.fixture
def lean_step_calls(monkeypatch):
    """A list that gets one entry per native (lean) decode step a layer takes."""
    from fastvlm.kernels import decode_layer

    calls = []
    real = decode_layer._lean_step

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(decode_layer, "_lean_step", spy)
    return calls


def test_everything_else_takes_the_module(lean_step_calls):
    model = lm(32)
    use_lean_decode_layers(model, True)
    calls = lean_step_calls
    with torch.inference_mode():
        # a batch of two with padding: masks and batches are the module's
        ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(2))
        mask = torch.ones_like(ids)
        mask[0, :3] = 0
        cache = DynamicCache()
        model(input_ids=ids, attention_mask=mask, use_cache=True, **{KW: cache})
        model(input_ids=ids[:, :1], attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1),
              use_cache=True, **{KW: cache})
        assert not calls
        # fp32 weights: the module (a bf16 model cast after the swap falls back at run time; an
        # fp32 model is not swapped at all)
        model32 = copy.deepcopy(model).float()
        assert use_lean_decode_layers(copy.deepcopy(model32)) == 0
        cache = DynamicCache()
        model32(input_ids=ids[:1], use_cache=True, **{KW: cache})
        model32(input_ids=ids[:1, :1], use_cache=True, **{KW: cache})
        assert not calls
        # a wrapped projection (as LoRA wraps them): the module
        wrapped = copy.deepcopy(model)
        for layer in wrapped.model.layers:
            layer.self_attn.q_proj = Wrapped(layer.self_attn.q_proj)
        cache = DynamicCache()
        wrapped(input_ids=ids[:1], use_cache=True, **{KW: cache})
        wrapped(input_ids=ids[:1, :1], use_cache=True, **{KW: cache})
        assert not calls
        # a forward hook inside a layer (feature capture, steering): that layer runs its modules, and the hook
        hooked = copy.deepcopy(model)
        seen = []
        hooked.model.layers[1].mlp.register_forward_hook(lambda *a: seen.append(1))
        cache = DynamicCache()
        hooked(input_ids=ids[:1], use_cache=True, **{KW: cache})
        hooked(input_ids=ids[:1, :1], use_cache=True, **{KW: cache})
        assert len(seen) == 2 and len(calls) == len(hooked.model.layers) - 1
        calls.clear()
        # and the plain bf16 model's decode step does take the native path
        cache = DynamicCache()
        model(input_ids=ids[:1], use_cache=True, **{KW: cache})
        model(input_ids=ids[:1, :1], use_cache=True, **{KW: cache})
        assert len(calls) == 3


def test_training_is_untouched(lean_step_calls):
    """With grads on, a one-token step with a cache (the shape the native step takes) runs the module, so that
    backward works; the same step without grads takes the native path (the control)."""
    model = lm(32)
    use_lean_decode_layers(model, True)
    model.train()
    ids = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(3))
    calls = lean_step_calls
    cache = DynamicCache()
    model(input_ids=ids, use_cache=True, **{KW: cache})  # prefill: the layers learn their return type
    model(input_ids=ids[:, :1], use_cache=True, **{KW: cache}).logits.float().sum().backward()
    assert not calls
    assert all(layer.self_attn.q_proj.weight.grad is not None for layer in model.model.layers)
    with torch.no_grad():
        cache = DynamicCache()
        model(input_ids=ids, use_cache=True, **{KW: cache})
        model(input_ids=ids[:, :1], use_cache=True, **{KW: cache})
    assert len(calls) == len(model.model.layers)


def test_weights_changed_between_steps_are_the_ones_read():
    """A lean layer looks its weights up once (its plan) and after that only checks that the same tensors
    are still in place: weights loaded in place, and weights replaced by new tensors, after steps have run
    are what the next steps read."""
    model = lm(32)
    kernels.use_decode_kernels(model)  # DecodeLinear everywhere: the lean step's exact reference
    ids = torch.randint(0, 300, (1, 23), generator=torch.Generator().manual_seed(1))
    first, _, _ = decode(model, ids, 3, lean=True)  # the plans are made here
    assert all(layer.__dict__.get("_lean_plan") is not None for layer in model.model.layers)

    def lean_matches_modules():
        ref, ref_toks, _ = decode(model, ids, 4, lean=False)
        got, got_toks, _ = decode(model, ids, 4, lean=True)
        assert got_toks == ref_toks
        assert (got - ref).abs().max() / ref.abs().max() < 1e-3
        return got

    model.load_state_dict(lm(32, seed=1).state_dict())  # in place: the same tensors, new values
    loaded = lean_matches_modules()
    assert (loaded[:3] - first).abs().max() > 0.1 * first.abs().max()
    # new tensors at new addresses; the old ones are kept alive, so a plan still pointing at them
    # would read the old values rather than crash
    old = []
    with torch.no_grad():
        for layer in model.model.layers:
            for lin in (layer.self_attn.o_proj, layer.mlp.down_proj):
                old.append(lin.weight.data)
                lin.weight.data = (-lin.weight.data).clone()
    replaced = lean_matches_modules()
    assert (replaced - loaded).abs().max() > 0.1 * loaded.abs().max()
    assert len(old) == 6
