"""The lean batch-1 decode step that CUDA replays as a graph (fastvlm.kernels.graph_decode): its arithmetic
against transformers' Qwen2 steps (eagerly, on the CPU), its use by generate, where it steps aside, and on a
CUDA GPU the graph against the eager step."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from fastvlm import FastVLM, generation
from fastvlm.generation import GRAPH_DECODE_FLAG, cache_argument
from fastvlm.kernels.graph_decode import EAGER_STEPS, GraphQwen2Decoder

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _model(dtype=torch.float32, device="cpu"):
    return FastVLM.from_preset("fastvlm-tiny", dtype=dtype, device=device)


def _prefill(lm, n=30, seed=0):
    ids = torch.randint(3, 500, (1, n), generator=torch.Generator().manual_seed(seed)).to(lm.device)
    cache = DynamicCache()
    out = lm(input_ids=ids, use_cache=True, **{cache_argument(lm): cache})
    return cache, int(out.logits[0, -1].argmax())


def _steps_against_transformers(lm, decoder, steps=12, n=30):
    """(largest |logit difference| over the logits' scale, steps whose greedy token differs) over `steps` steps,
    each fed transformers' token."""
    kw = cache_argument(lm)
    cache, tok = _prefill(lm, n)
    decoder.load_cache(cache, n)
    worst, differ = 0.0, 0
    for i in range(steps):
        ref = lm(input_ids=torch.tensor([[tok]], device=lm.device), position_ids=torch.tensor([[n + i]], device=lm.device),
                 use_cache=True, **{kw: cache}).logits[:, -1].float()
        got = decoder.step(tok, n + i)
        assert got.shape == ref.shape and got.dtype == torch.float32
        worst = max(worst, ((got - ref).abs().max() / ref.abs().max()).item())
        differ += int(got.argmax()) != int(ref.argmax())
        tok = int(ref.argmax())
    return worst, differ


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_lean_step_follows_transformers_steps(dtype, tol):
    lm = _model(dtype).language_model
    with torch.inference_mode():
        decoder = GraphQwen2Decoder.for_model(lm, 64)
        assert decoder is not None and not decoder.graphs  # on the CPU it runs eagerly
        worst, differ = _steps_against_transformers(lm, decoder)
    assert worst < tol and differ == 0, (worst, differ)


def test_generate_uses_it_where_the_flag_is_set_and_answers_the_same(monkeypatch):
    model = _model()
    lm = model.language_model
    ids = torch.randint(3, 500, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        plain = model.generate(input_ids=ids, max_new_tokens=12, eos_token_id=[])
    built = []
    real = GraphQwen2Decoder.for_model

    def spy(lm_, capacity, graphs=True):
        built.append(capacity)
        return real(lm_, capacity, graphs)

    monkeypatch.setattr(GraphQwen2Decoder, "for_model", staticmethod(spy))
    setattr(lm, GRAPH_DECODE_FLAG, True)  # what the fast mode sets on a CUDA GPU; eager here
    try:
        assert generation.native_decoding(lm)
        with torch.inference_mode():
            lean = model.generate(input_ids=ids, max_new_tokens=12, eos_token_id=[])
    finally:
        setattr(lm, GRAPH_DECODE_FLAG, False)
    assert built == [20 + 12]  # one decoder, for the prompt and every new token
    assert torch.equal(lean, plain)


def test_graph_decode_is_opt_in_and_cuda_only():
    model = _model()
    with pytest.raises(Exception, match="graph_decode=True needs mode 'fast'"):
        model.optimize_for_inference("exact", graph_decode=True)
    assert not model.optimize_for_inference("fast").inference_settings["graph_decode"]
    model.optimize_for_inference("fast", graph_decode=True)  # on the CPU: transformers' steps, as before
    assert not model.inference_settings["graph_decode"]
    assert not getattr(model.language_model, GRAPH_DECODE_FLAG)


def test_sampling_and_repetition_penalty_go_through_it_unchanged():
    model = _model()
    lm = model.language_model
    ids = torch.randint(3, 500, (1, 20), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=16, eos_token_id=[], do_sample=True, temperature=0.8, top_k=40, top_p=0.95,
              repetition_penalty=1.2, seed=5)
    with torch.inference_mode():
        plain = model.generate(input_ids=ids, **kw)
        setattr(lm, GRAPH_DECODE_FLAG, True)
        try:
            lean = model.generate(input_ids=ids, **kw)
        finally:
            setattr(lm, GRAPH_DECODE_FLAG, False)
    assert torch.equal(lean, plain)


def test_it_steps_aside_where_the_step_does_not_apply():
    lm = _model().language_model
    assert GraphQwen2Decoder.plan(lm) is not None
    lm.train()
    assert GraphQwen2Decoder.plan(lm) is None  # dropout
    lm.eval()
    handle = lm.model.layers[0].mlp.register_forward_hook(lambda *a: None)
    assert GraphQwen2Decoder.plan(lm) is None  # hooks expect the modules to run
    handle.remove()
    assert GraphQwen2Decoder.plan(_model(torch.float64).language_model) is None
    lm.lm_head.bias = torch.nn.Parameter(torch.zeros(lm.lm_head.out_features))
    assert GraphQwen2Decoder.plan(lm) is None


def test_a_failed_capture_decodes_eagerly(monkeypatch):
    lm = _model().language_model
    with torch.inference_mode():
        cache, tok = _prefill(lm, 10)
        dec, eager = GraphQwen2Decoder.for_model(lm, 40), GraphQwen2Decoder.for_model(lm, 40)
        dec.load_cache(cache, 10)
        eager.load_cache(cache, 10)
        dec.graphs = True  # as on a GPU whose capture then fails
        setattr(lm, GRAPH_DECODE_FLAG, True)

        def fail():
            raise RuntimeError("operation not permitted when stream is capturing")

        monkeypatch.setattr(dec, "_capture", fail)
        for i in range(EAGER_STEPS):
            assert torch.equal(dec.step(tok, 10 + i), eager.step(tok, 10 + i))
        with pytest.warns(RuntimeWarning, match="capture failed .*this generation decodes eagerly and later ones "
                                                "through transformers' steps"):
            got = dec.step(tok, 10 + EAGER_STEPS)
        assert torch.equal(got, eager.step(tok, 10 + EAGER_STEPS)) and not dec.graphs
        assert not getattr(lm, GRAPH_DECODE_FLAG)  # the model's later generations do not try again


def test_full_decoder_and_bad_tokens_are_refused():
    lm = _model().language_model
    with torch.inference_mode():
        cache, tok = _prefill(lm, 8)
        decoder = GraphQwen2Decoder.for_model(lm, 9)
        with pytest.raises(ValueError, match="more than this decoder's capacity of 7"):
            GraphQwen2Decoder.for_model(lm, 7).load_cache(cache, 8)
        decoder.load_cache(cache, 8)
        with pytest.raises(ValueError, match="outside the vocabulary"):
            decoder.step(10**6, 8)
        decoder.step(tok, 8)
        with pytest.raises(ValueError, match="decoder full"):
            decoder.step(tok, 9)


@cuda
@pytest.mark.filterwarnings("error::RuntimeWarning")  # a failed capture warns and decodes eagerly: fail instead
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-3), (torch.bfloat16, 2e-2), (torch.float16, 1e-2)],
                         ids=["fp32", "bf16", "fp16"])
def test_cuda_graph_steps_replay_the_eager_step(dtype, tol):
    lm = _model(dtype, "cuda").language_model
    with torch.inference_mode():
        graphed = GraphQwen2Decoder.for_model(lm, 64)
        eager = GraphQwen2Decoder.for_model(lm, 64, graphs=False)
        assert graphed.graphs and not eager.graphs
        cache, tok = _prefill(lm, 30)
        graphed.load_cache(cache, 30)
        eager.load_cache(cache, 30)
        for i in range(EAGER_STEPS + 10):  # past the capture: replays, each with its own token and position
            a, b = graphed.step(tok, 30 + i), eager.step(tok, 30 + i)
            assert torch.equal(a, b) or (a - b).abs().max() <= 1e-3 * b.abs().max(), i
            tok = int(b.argmax())
        assert graphed._graph is not None
        # and the graph against transformers' steps (TF32 may be on for fp32 matmuls; in bf16 and fp16 the two
        # attention kernels differ, so a near-tie may flip one greedy token)
        decoder = GraphQwen2Decoder.for_model(lm, 64)
        worst, differ = _steps_against_transformers(lm, decoder)
        assert decoder._graph is not None
    assert worst < tol and differ <= (0 if dtype == torch.float32 else 1), (worst, differ)


@cuda
@pytest.mark.filterwarnings("error::RuntimeWarning")  # a failed capture warns and decodes eagerly: fail instead
def test_cuda_fast_mode_generates_as_transformers_loop():
    model = _model(torch.bfloat16, "cuda")
    ids = torch.randint(3, 500, (1, 25), generator=torch.Generator().manual_seed(2)).cuda()
    model.optimize_for_inference("fast", cuda_graphs=False)
    assert model.inference_settings["decode_loop"] == "transformers"
    with torch.inference_mode():
        plain = model.generate(input_ids=ids, max_new_tokens=20, eos_token_id=[])
    model.optimize_for_inference("fast", graph_decode=True)
    assert model.inference_settings["decode_loop"].startswith("CUDA graph of a lean step")
    with torch.inference_mode():
        graphed = model.generate(input_ids=ids, max_new_tokens=20, eos_token_id=[])
        batched = model.generate(input_ids=ids.repeat(2, 1), max_new_tokens=20, eos_token_id=[])  # transformers' loop
    assert (graphed == plain).float().mean() >= 0.9, (graphed, plain)  # bf16: a near-tie may flip late tokens
    assert torch.equal(batched[0], batched[1])
