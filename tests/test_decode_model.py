"""The native whole-model decode step (fastvlm.kernels.decode_model): as accurate as transformers' bf16
modules against an fp32 reference, the same greedy tokens, the same cache, used by `generate` exactly
where it applies, and clear errors at its limits."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

from fastvlm import kernels
from fastvlm.generation import native_decoder, native_decoding
from fastvlm.kernels.decode_model import NativeQwen2Decoder
from test_decode_layer import KW, Wrapped, decode, lm

# the fp32 step needs AVX-512 (every CPU with the kernels); the bf16 step AVX512-BF16 as well
pytestmark = pytest.mark.skipif(not kernels.available(torch.float32), reason=kernels.status())
BF16 = pytest.mark.skipif(not kernels.available(torch.bfloat16), reason="no AVX512-BF16: " + kernels.status())


@torch.inference_mode()
def native_decode(model, ids, steps, scaling=None, swap_rotary=False):
    """Greedy decode with the native step after a prefill through the model on the decode kernels; per step
    the logits."""
    kernels.use_decode_kernels(model, True)
    assert native_decoder(model, 8) is not None
    cache = DynamicCache()
    out = model(input_ids=ids, use_cache=True, **{KW: cache}, logits_to_keep=1)
    dec = NativeQwen2Decoder.for_model(model, ids.shape[1] + steps)
    assert dec is not None
    if scaling is not None:
        dec.scaling = scaling
    if swap_rotary:
        dec.cos, dec.sin = dec.sin, dec.cos
    dec.load_cache(cache, ids.shape[1])
    tok = int(out.logits[0, -1].argmax())
    logits, toks = [], []
    for i in range(steps):
        toks.append(tok)
        step_logits = dec.step(tok, ids.shape[1] + i)
        assert step_logits.shape == (1, model.config.vocab_size) and step_logits.dtype == torch.float32
        logits.append(step_logits[0])
        tok = int(step_logits[0].argmax())
    return torch.stack(logits), toks, dec


@torch.inference_mode()
def fp32_logits(model, ids, toks):
    """The fp32 model's logits after each of `toks`, teacher-forced (one forward, no cache)."""
    m32 = copy.deepcopy(model).float()
    kernels.use_decode_kernels(m32, False)  # PyTorch's fp32 matmuls
    full = torch.cat([ids, torch.tensor([toks])], 1)
    return m32(input_ids=full).logits[0, ids.shape[1]:].float()


@BF16
@pytest.mark.parametrize("head_dim,context", [(32, 23), (64, 23), (128, 23), (64, 700)])
def test_native_steps_are_as_accurate_as_the_modules(head_dim, context):
    """head_dim 64: Qwen2-0.5B's; 128: the 1.5B's and 7B's; a context of 700 is past the 512 keys of
    PyTorch's attention blocks."""
    model = lm(head_dim, max_positions=1024)
    ids = torch.randint(0, 300, (1, context), generator=torch.Generator().manual_seed(1))
    steps = 16
    mod_logits, mod_toks, mod_cache = decode(model, ids, steps, lean=False)  # transformers' bf16 modules
    got_logits, got_toks, dec = native_decode(model, ids, steps)
    assert got_toks == mod_toks
    ref = fp32_logits(model, ids, got_toks)
    scale = ref.abs().max()
    err_native = ((got_logits - ref).abs().max() / scale).item()
    err_modules = ((mod_logits - ref).abs().max() / scale).item()
    err_between = ((got_logits - mod_logits).abs().max() / scale).item()
    print(f"\nhead_dim {head_dim}, context {context}: max logit error against fp32 {err_native:.2e} (native) and "
          f"{err_modules:.2e} (transformers' bf16 modules); {err_between:.2e} between them")
    assert err_native <= 1.5 * err_modules + 2e-3, (err_native, err_modules)
    assert err_between < 4e-2
    # the cache: the prefill's positions copied, each step's rotated key and value appended
    assert dec.length == ids.shape[1] + steps
    for layer in range(3):
        keys, values = mod_cache.layers[layer].keys[0], mod_cache.layers[layer].values[0]
        n = keys.shape[1]
        assert n == ids.shape[1] + steps
        for a, b in ((dec.keys[layer, :, :n], keys), (dec.values[layer, :, :n], values)):
            assert torch.equal(a[:, :ids.shape[1]], b[:, :ids.shape[1]])
            tol = 2e-2 if layer else 1e-2  # layer 0's step inputs are the token embeddings themselves
            assert (a.float() - b.float()).abs().max() <= tol * b.float().abs().max()


@pytest.mark.parametrize("head_dim,context,biases", [(32, 23, True), (64, 23, True), (128, 23, True),
                                                     (64, 23, False), (64, 700, True)])
def test_fp32_native_steps_match_the_modules(head_dim, context, biases):
    """In fp32 nothing is rounded: the native steps follow transformers' fp32 modules (PyTorch's matmuls and
    SDPA) to fp32 summation order, with the same greedy tokens and cache; also without q/k/v biases and
    past 512 keys of context."""
    model = lm(head_dim, max_positions=1024).float()
    if not biases:
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias = None
    ids = torch.randint(0, 300, (1, context), generator=torch.Generator().manual_seed(1))
    kernels.use_decode_kernels(model, False)
    ref_logits, ref_toks, ref_cache = decode(model, ids, 16, lean=False)
    got_logits, got_toks, dec = native_decode(model, ids, 16)
    assert dec.dtype == torch.float32 and dec.keys.dtype == torch.float32
    assert got_toks == ref_toks
    err = ((got_logits - ref_logits).abs().max() / ref_logits.abs().max()).item()
    print(f"\nhead_dim {head_dim}, context {context}, biases {biases}, fp32: max logit difference {err:.1e} of "
          "the logits' scale")
    assert err < 1e-4, err
    n = ids.shape[1] + 16
    for layer in range(3):
        for a, b in ((dec.keys[layer, :, :n], ref_cache.layers[layer].keys[0]),
                     (dec.values[layer, :, :n], ref_cache.layers[layer].values[0])):
            assert (a - b).abs().max() <= 1e-4 * b.abs().max()


@BF16
@pytest.mark.parametrize("mistake", ["softmax scale", "rotary"])
def test_a_wrong_step_would_be_caught(mistake):
    """The bf16 accuracy bound above is sharp enough to see a mistake in the native step: the same steps with
    the softmax scale off by a factor of 2, or with cos and sin swapped, fail it."""
    model = lm(32)
    ids = torch.randint(0, 300, (1, 23), generator=torch.Generator().manual_seed(1))
    mod_logits, mod_toks, _ = decode(model, ids, 6, lean=False)
    right, toks, dec = native_decode(model, ids, 6)
    if mistake == "rotary":
        wrong, wrong_toks, _ = native_decode(model, ids, 6, swap_rotary=True)
    else:
        wrong, wrong_toks, _ = native_decode(model, ids, 6, scaling=2 * dec.scaling)
    ref = fp32_logits(model, ids, toks)
    ref_wrong = fp32_logits(model, ids, wrong_toks)
    scale = ref.abs().max()
    err_modules = (mod_logits - ref).abs().max() / scale
    assert (right - ref).abs().max() / scale <= 1.5 * err_modules + 2e-3
    assert (wrong - ref_wrong).abs().max() / ref_wrong.abs().max() > 1.5 * err_modules + 2e-3


def test_which_models_get_a_native_decoder():
    model = lm(32).float()
    kernels.use_decode_kernels(model, False)
    assert native_decoder(model, 64) is None  # PyTorch's linears (the exact mode): nothing native
    assert not native_decoding(model)
    kernels.use_decode_kernels(model, True)
    assert native_decoder(model, 64).dtype == torch.float32
    assert native_decoding(model)
    if kernels.available(torch.bfloat16):
        assert native_decoder(copy.deepcopy(model).to(torch.bfloat16), 64).dtype == torch.bfloat16
    m16 = copy.deepcopy(model).half()  # no fp16 kernels
    assert native_decoder(m16, 64) is None
    biased = copy.deepcopy(model)
    biased.lm_head.bias = torch.nn.Parameter(torch.zeros(300))
    assert native_decoder(biased, 64) is None and not native_decoding(biased)
    scaled = copy.deepcopy(model)
    scaled.model.rotary_emb.rope_type = "dynamic"
    assert native_decoder(scaled, 64) is None
    wrapped = copy.deepcopy(model)  # a wrapped projection (as LoRA wraps them): not the structure implemented
    wrapped.model.layers[1].mlp.down_proj = Wrapped(wrapped.model.layers[1].mlp.down_proj)
    assert native_decoder(wrapped, 64) is None
    mixed = copy.deepcopy(model)  # one layer with a bias on o_proj
    mixed.model.layers[2].self_attn.o_proj.bias = torch.nn.Parameter(torch.zeros(128))
    assert native_decoder(mixed, 64) is None
    training = copy.deepcopy(model).train()  # dropout is the modules'
    assert native_decoder(training, 64) is None
    hooked = copy.deepcopy(model)  # a forward hook expects the modules' forwards to run
    hooked.model.layers[0].mlp.register_forward_hook(lambda *args: None)
    assert native_decoder(hooked, 64) is None
    assert native_decoder(model, 64) is not None  # and none of that touched the original


def test_other_architectures_get_no_native_decoder():
    """A Qwen3 layer has every attribute a Qwen2 layer has, but normalises q and k per head before the
    rotary embedding, which the native step does not: it must not take it for a Qwen2 layer."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Qwen3ForCausalLM"):
        pytest.skip("this transformers has no Qwen3")
    cfg = transformers.Qwen3Config(vocab_size=300, hidden_size=128, intermediate_size=200, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                   tie_word_embeddings=False)
    model = transformers.Qwen3ForCausalLM(cfg).eval()
    kernels.use_decode_kernels(model, True)
    assert type(model.model.layers[0].self_attn.q_proj) is kernels.DecodeLinear  # it passes native_decoder's gate
    assert native_decoder(model, 64) is None


def test_limits_are_clear_errors():
    model = lm(32).float()
    ids = torch.randint(0, 300, (1, 5), generator=torch.Generator().manual_seed(1))
    kernels.use_decode_kernels(model, True)
    with torch.inference_mode():
        cache = DynamicCache()
        model(input_ids=ids, use_cache=True, **{KW: cache})
        dec = NativeQwen2Decoder.for_model(model, 6)
        with pytest.raises(ValueError, match="holds 5 tokens, more than this decoder.s capacity of 4"):
            NativeQwen2Decoder.for_model(model, 4).load_cache(cache, 5)
        dec.load_cache(cache, 5)
        with pytest.raises(ValueError, match="token id 300 is outside the vocabulary of 300"):
            dec.step(300, 5)
        dec.step(7, 5)
        with pytest.raises(ValueError, match="decoder full: 6 tokens cached, capacity 6"):
            dec.step(7, 6)


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, marks=BF16), torch.float32])
def test_generate_takes_native_steps_where_they_apply(monkeypatch, dtype):
    """A batch-1 `fast` generation (bf16 and fp32) decodes with the native step (one call per token after the
    first) and yields the tokens the transformers loop yields; batches, padding and the exact mode keep that loop."""
    from fastvlm import generation
    from test_fast_paths import build, inputs

    calls = []
    real_step = NativeQwen2Decoder.step

    def spy(self, token, position):
        calls.append(position)
        return real_step(self, token, position)

    monkeypatch.setattr(NativeQwen2Decoder, "step", spy)
    model = build(dtype).optimize_for_inference("fast")
    assert model.inference_settings["decode_loop"].startswith("native whole-model step")
    ids, px = inputs(model)
    with torch.inference_mode():
        native = model.generate(ids, pixel_values=px, max_new_tokens=10, eos_token_id=[])
        assert calls == list(range(ids.shape[1], ids.shape[1] + 9))  # 9 steps after the prefill's token
        with monkeypatch.context() as m:
            m.setattr(generation, "native_decoder", lambda lm, capacity: None)
            loop = model.generate(ids, pixel_values=px, max_new_tokens=10, eos_token_id=[])
        assert native.tolist() == loop.tolist()
        calls.clear()
        ids2, px2 = inputs(model, batch=2)
        model.generate(ids2.expand(2, -1), pixel_values=px2, max_new_tokens=4, eos_token_id=[])
        padded = torch.ones(1, ids.shape[1] + 1, dtype=torch.long)
        padded[0, 0] = 0
        model.generate(torch.cat([torch.tensor([[0]]), ids], 1), attention_mask=padded, pixel_values=px,
                       max_new_tokens=4, eos_token_id=[])
        model.optimize_for_inference("exact")
        assert model.inference_settings["decode_loop"] == "transformers"
        model.generate(ids, pixel_values=px, max_new_tokens=4, eos_token_id=[])
    assert calls == []
