"""Every fast inference path against the exact fp32 path, with asserted tolerances.

Weights are variance-preserving and far from their initial values (helpers.perturb_ for
the encoder, N(0, 1/fan_in) for the LLM), so activations and logits are O(1), logit
margins are real, and a wrong fold or a dropped term shows as an O(1) error.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from fastvlm import FastVLM, FastVLMConfig, VisionConfig, get_preset, kernels
from fastvlm.config import IMAGE_TOKEN_INDEX
from fastvlm.errors import ConfigError
from fastvlm.vision import FastViTHD
from fastvlm.vision.fused import FusedFastViTHD
from helpers import perturb_


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(1), b.double().flatten(1)
    return float(((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).min())


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@torch.no_grad()
def sharpen_llm_(model: FastVLM, seed: int = 5) -> FastVLM:
    """LLM weights N(0, 1/fan_in): O(1) logits with clear margins, so greedy tokens are a meaningful check."""
    g = torch.Generator().manual_seed(seed)
    for m in model.language_model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            fan_in = m.weight.shape[1] if isinstance(m, nn.Linear) else 1
            w = torch.empty(m.weight.shape).normal_(0, fan_in ** -0.5, generator=g)
            m.weight.copy_(w.to(m.weight.dtype))
    return model


def tiny_config() -> FastVLMConfig:
    return get_preset("fastvlm-tiny")


def build(dtype=torch.float32, config=None, train_form=False) -> FastVLM:
    config = copy.deepcopy(config or tiny_config())
    if train_form:
        config.vision = dataclasses.replace(config.vision, inference_mode=False)
    model = FastVLM.from_config(config, device="cpu", dtype=torch.float32, seed=0)
    perturb_(model, seed=1)
    sharpen_llm_(model)
    return model.to(dtype)


def inputs(model: FastVLM, batch: int = 1, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    n = model.num_image_tokens
    ids = torch.cat([torch.randint(3, 300, (5,), generator=g), torch.full((n,), IMAGE_TOKEN_INDEX),
                     torch.randint(3, 300, (6,), generator=g)]).unsqueeze(0)
    px = torch.rand(batch, 3, model.config.image_size, model.config.image_size, generator=g)
    return ids, px


@pytest.fixture(scope="module")
def exact_fp32():
    model = build().optimize_for_inference("exact")
    ids, px = inputs(model)
    with torch.inference_mode():
        feats = model.encode_images(px)
        logits = model(ids, pixel_values=px).logits[:, -1]
        tokens = model.generate(ids, pixel_values=px, max_new_tokens=12, eos_token_id=[])
    return model, ids, px, feats, logits, tokens


def probe(model, ids, px, new_tokens=12):
    with torch.inference_mode():
        return (model.encode_images(px), model(ids, pixel_values=px).logits[:, -1],
                model.generate(ids, pixel_values=px, max_new_tokens=new_tokens, eos_token_id=[]))


# ------------------------------------------------------------------------------------ the fused encoder


def test_exact_mode_is_the_reference_module_tree(exact_fp32):
    model = exact_fp32[0]
    assert model.inference_settings["mode"] == "exact"
    assert not model.vision_tower.fused and model.vision_tower.attn_impl == "eager" and not model.channels_last
    assert not any(isinstance(m, kernels.DecodeLinear) for m in model.modules())


def test_fast_fp32_matches_exact(exact_fp32):
    ref, ids, px, feats, logits, tokens = exact_fp32
    fast = build().optimize_for_inference("fast")
    assert fast.vision_tower.fused and fast.channels_last and fast.inference_settings["encoder"] == "fused"
    f, lg, tk = probe(fast, ids, px)
    assert rel_diff(f, feats) < 1e-5
    assert rel_diff(lg, logits) < 1e-5
    assert tk.tolist() == tokens.tolist()


def test_fast_bf16_default_keeps_cosine_and_greedy_tokens(exact_fp32):
    ref, ids, px, feats, logits, tokens = exact_fp32
    fast = build(torch.bfloat16).optimize_for_inference("fast")
    exact = build(torch.bfloat16).optimize_for_inference("exact")
    f, lg, tk = probe(fast, ids, px)
    fe, lge, tke = probe(exact, ids, px)
    print(f"\nbf16 fast vs fp32 exact: feature cosine {cosine(f, feats):.6f}, logits rel diff {rel_diff(lg, logits):.3g}")
    assert cosine(f, feats) >= 0.999
    assert cosine(lg, logits) >= 0.999
    assert tk.tolist() == tokens.tolist()  # same greedy tokens as the fp32 exact path
    assert tk.tolist() == tke.tolist()  # and as the bf16 exact path
    assert cosine(f, fe) >= 0.9995


def test_fused_program_keeps_state_dict_and_follows_weight_changes():
    enc = perturb_(FastViTHD(tiny_config().vision).eval(), seed=2)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    x = torch.rand(2, 3, 128, 192, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = enc(x)
        enc.optimize_for_inference()
        out = enc(x)
    assert rel_diff(out, ref) < 1e-5
    after = enc.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert not any(isinstance(m, FusedFastViTHD) for m in enc.modules())  # not a sub-module
    # the fused program is rebuilt when weights change in place or are loaded
    other = perturb_(FastViTHD(tiny_config().vision).eval(), seed=9)
    enc.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert rel_diff(enc(x), other(x)) < 1e-5
        enc.network[2][0].layer_scale.mul_(3.0)
        enc.optimize_for_inference(False)
        ref2 = enc(x)
        enc.optimize_for_inference()
        assert rel_diff(enc(x), ref2) < 1e-5
    # training always runs the module tree: gradients reach the parameters
    enc.train()
    enc(x).square().mean().backward()
    assert enc.network[0][0].convffn.conv.bn.weight.grad is not None
    # copies carry no stale program
    enc.eval()
    clone = copy.deepcopy(enc)
    with torch.no_grad():
        assert rel_diff(clone(x), enc(x)) < 1e-6
    # in eval mode too, what only the module tree gives runs it: gradients for parameters that require them,
    # forward hooks, modules another library swapped in
    enc.zero_grad()
    enc(x).square().mean().backward()
    assert all(p.grad is not None for n, p in enc.named_parameters() if p.requires_grad and n != "head.proj")
    calls = []
    handle = enc.network[2].register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        hooked = enc(x)
    handle.remove()
    assert calls == [1]
    with torch.no_grad():
        assert rel_diff(enc(x), hooked) < 1e-5
        assert calls == [1] and enc._fused_key() is not None  # what forward_features asks
        foreign = type("LoraConv", (torch.nn.Module,), {"__module__": "peft.tuners.lora.layer",
                                                        "forward": lambda s, t: t})
        layer = foreign()
        layer.lora_A = torch.nn.Parameter(torch.zeros(1))  # as peft's layers bring their adapters
        enc.network[2].append(layer)
        assert enc._fused_key() is None


def test_fused_train_form_encoder_leaves_its_layout():
    cfg = dataclasses.replace(tiny_config().vision, inference_mode=False)
    enc = perturb_(FastViTHD(cfg).eval(), seed=4)
    keys = list(enc.state_dict())
    x = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = enc(x)
        out = enc.optimize_for_inference()(x)
    assert rel_diff(out, ref) < 1e-5
    assert list(enc.state_dict()) == keys and any("rbr_" in k for k in keys)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "torch-ops"])
def test_fused_encoder_layouts_and_backends(dtype, layout, onednn):
    enc = perturb_(FastViTHD(tiny_config().vision).eval(), seed=6)
    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = enc(x)
    fast = copy.deepcopy(enc).to(dtype).optimize_for_inference(onednn=onednn)
    if layout == "channels_last":
        fast = fast.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = fast(x.to(dtype))
    assert out.dtype == dtype
    if dtype == torch.float32:
        assert rel_diff(out, ref) < 1e-5
    else:
        assert cosine(out, ref) >= 0.999


def test_full_size_blocks_fuse_exactly():
    """Full FastViTHD widths (a few blocks per stage would be slow; 256 px runs every block once)."""
    cfg = VisionConfig(image_size=256, depths=(1, 1, 1, 1, 1))
    enc = perturb_(FastViTHD(cfg).eval(), seed=8)
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = enc(x)
        enc.optimize_for_inference().to(memory_format=torch.channels_last)
        out = enc(x.contiguous(memory_format=torch.channels_last))
    assert out.shape == (1, 16, 3072) and rel_diff(out, ref) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("multiplier,kernel,stride", [(2, 7, 2), (3, 3, 1)])
def test_grouped_conv_runs_as_depthwise_on_repeated_channels(dtype, multiplier, kernel, stride, monkeypatch):
    from fastvlm.vision import fused
    from fastvlm.vision.fused import FusedConv

    calls = []
    real = fused._repeat_channels
    monkeypatch.setattr(fused, "_repeat_channels", lambda x, m: calls.append(m) or real(x, m))

    g = torch.Generator().manual_seed(4)
    groups = 12
    w = torch.randn(groups * multiplier, 1, kernel, kernel, generator=g).to(dtype)
    b = torch.randn(groups * multiplier, generator=g).to(dtype)
    x = torch.randn(2, groups, 19, 23, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    conv = FusedConv(w, b, stride, kernel // 2, groups, gelu=True)
    assert conv.multiplier == multiplier
    with torch.no_grad():
        got = conv(x)
        ref = torch.nn.functional.gelu(torch.nn.functional.conv2d(x, w, b, stride, kernel // 2, 1, groups))
        exact = torch.nn.functional.gelu(torch.nn.functional.conv2d(x.double(), w.double(), b.double(), stride,
                                                                    kernel // 2, 1, groups))
    assert calls == [multiplier]  # the rewrite ran
    assert got.shape == ref.shape and got.dtype == dtype
    assert got.is_contiguous(memory_format=torch.channels_last)
    if dtype == torch.float32:
        assert rel_diff(got, ref) < 1e-6
    else:  # bf16 rounding, no worse than the grouped conv's own
        assert rel_diff(got, exact) <= max(1e-2, 1.5 * rel_diff(ref, exact))
    # NCHW inputs and autograd keep the grouped conv
    with torch.no_grad():
        assert rel_diff(conv(x.contiguous()), ref) < (1e-6 if dtype == torch.float32 else 1e-2)
    xg = x.detach().clone().requires_grad_(True)
    conv(xg).float().sum().backward()
    assert calls == [multiplier] and xg.grad is not None


# ------------------------------------------------------------------------------------ decode kernels


@pytest.mark.skipif(not kernels.available(torch.bfloat16), reason=kernels.status())
def test_decode_kernel_prefetch_changes_no_bits(monkeypatch):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(300, 4864, generator=g).bfloat16()
    x = torch.randn(1, 1, 4864, generator=g).bfloat16()
    before = kernels.prefetch_bytes()
    try:
        outs = []
        for nbytes in (0, 512, 1024, 4096):
            kernels.set_prefetch(nbytes)
            assert kernels.prefetch_bytes() == nbytes
            outs.append(kernels.gemv(x, w))
    finally:
        kernels.set_prefetch(before)
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
    monkeypatch.setenv("FASTVLM_GEMV_PREFETCH", "2048")
    assert kernels.default_prefetch_bytes() == 2048
    monkeypatch.setenv("FASTVLM_GEMV_PREFETCH", "1k")
    with pytest.raises(ValueError, match="FASTVLM_GEMV_PREFETCH"):
        kernels.default_prefetch_bytes()



@pytest.mark.skipif(not kernels.available(torch.float32), reason=kernels.status())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(17, 45), (128, 96), (64, 4864), (1000, 33)])
def test_decode_kernel_matches_linear(dtype, shape):
    if not kernels.available(dtype):
        pytest.skip(kernels.status())
    out_f, in_f = shape
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_f, in_f, generator=g).to(dtype)
    b = torch.randn(out_f, generator=g).to(dtype)
    x = torch.randn(1, 1, in_f, generator=g).to(dtype)
    exact = torch.nn.functional.linear(x.double(), w.double(), b.double())
    got = kernels.gemv(x, w, b)
    ref = torch.nn.functional.linear(x, w, b)
    assert got.shape == ref.shape == (1, 1, out_f) and got.dtype == dtype
    # accumulates in fp32 and rounds once: at least as accurate as torch's own path
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_diff(got, exact) <= max(tol, 1.5 * rel_diff(ref, exact))
    assert rel_diff(kernels.gemv(x, w), torch.nn.functional.linear(x.double(), w.double())) < tol


def test_cpuinfo_field_and_prefetch_default_per_vendor(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx512f avx512_bf16\n\n"
                    "processor\t: 1\nvendor_id\t: GenuineIntel\n")
    assert kernels.cpuinfo_field("vendor_id", str(info)) == "AuthenticAMD"  # the first CPU's line
    assert kernels.cpuinfo_field("flags", str(info)).split() == ["fpu", "avx512f", "avx512_bf16"]
    assert kernels.cpuinfo_field("model name", str(info)) == ""
    assert kernels.cpuinfo_field("flags", str(tmp_path / "missing")) == ""
    # bf16 is the CPU default exactly where the flags show native bf16 dot products
    from fastvlm.model import cpu_has_fast_bf16

    for flags, want in (({"avx512f", "avx512_bf16"}, True), ({"amx_bf16"}, True), ({"avx512f", "avx2"}, False),
                        (set(), False)):
        monkeypatch.setattr(kernels, "cpu_flags", lambda f=flags: f)
        assert cpu_has_fast_bf16() is want
    monkeypatch.delenv("FASTVLM_GEMV_PREFETCH", raising=False)
    for vendor, want in (("GenuineIntel", 1024), ("AuthenticAMD", 0), ("", 0)):
        monkeypatch.setattr(kernels, "cpuinfo_field", lambda name, v=vendor: v if name == "vendor_id" else "")
        assert kernels.default_prefetch_bytes() == want


def test_decode_linear_swap_keeps_state_and_falls_back():
    lin = nn.Linear(40, 24)
    sd = {k: v.clone() for k, v in lin.state_dict().items()}
    assert kernels.use_decode_kernels(lin) == 1 and isinstance(lin, kernels.DecodeLinear)
    assert all(torch.equal(lin.state_dict()[k], sd[k]) for k in sd)
    x = torch.randn(3, 40, requires_grad=True)
    lin(x).sum().backward()  # several rows and autograd: torch's path
    assert x.grad is not None
    with torch.no_grad():
        one = torch.randn(1, 40)
        assert torch.allclose(lin(one), torch.nn.functional.linear(one, lin.weight, lin.bias), atol=1e-5)
    assert kernels.use_decode_kernels(lin, False) == 0 and type(lin) is nn.Linear


# ------------------------------------------------------------------------------------ int8, compile, modes


def test_int8_llm_close_to_exact(exact_fp32):
    ref, ids, px, feats, logits, tokens = exact_fp32
    q = build().optimize_for_inference("fast", quantize="int8")
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

    n_q = sum(isinstance(m, DynamicQuantizedLinear) for m in q.language_model.modules())
    assert n_q == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer + lm_head
    f, lg, tk = probe(q, ids, px)
    print(f"\nint8 vs fp32 exact: logits cosine {cosine(lg, logits):.5f}, rel diff {rel_diff(lg, logits):.3g}, "
          f"tokens {tk.tolist()} vs {tokens.tolist()}")
    assert rel_diff(f, feats) < 1e-5  # the encoder is untouched
    assert cosine(lg, logits) >= 0.99
    # int8 activations of a 64-wide toy LLM are coarse: greedy decoding agrees for the first
    # tokens, then drifts (the bench reports agreement on the full-size architectures)
    assert tk[0, :2].tolist() == tokens[0, :2].tolist()
    with pytest.raises(ConfigError):
        q.optimize_for_inference("fast", quantize="int4")


def test_optimize_for_inference_switches_back_and_validates():
    model = build()
    model.optimize_for_inference("fast")
    model.optimize_for_inference("exact")
    assert not model.vision_tower.fused and not model.channels_last
    assert not any(isinstance(m, kernels.DecodeLinear) for m in model.modules())
    with pytest.raises(ConfigError, match="exact"):
        model.optimize_for_inference("turbo")
    with pytest.raises(ConfigError, match="compile"):
        model.optimize_for_inference("exact", compile=True)


def test_save_and_reload_after_optimizing(tmp_path):
    model = build().optimize_for_inference("fast")
    ids, px = inputs(model)
    with torch.inference_mode():
        out = model(ids, pixel_values=px).logits
    model.save_pretrained(str(tmp_path / "m"))
    back = FastVLM.from_pretrained(str(tmp_path / "m"), device="cpu", dtype=torch.float32, progress=False)
    sd, sd2 = model.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    with torch.inference_mode():
        assert rel_diff(back(ids, pixel_values=px).logits, out) < 1e-5


def test_batched_images_in_fast_mode(exact_fp32):
    ref = exact_fp32[0]
    fast = build(torch.bfloat16).optimize_for_inference("fast")
    _, px = inputs(ref, batch=3, seed=11)
    with torch.inference_mode():
        one_by_one = torch.cat([fast.encode_images(px[i:i + 1]) for i in range(3)])
        batched = fast.encode_images(px)
        exact = ref.encode_images(px)
    assert batched.shape == (3, ref.num_image_tokens, ref.config.vision.out_channels)
    assert cosine(batched, one_by_one) >= 0.9999 and cosine(batched, exact) >= 0.999


@pytest.mark.slow
def test_compiled_encoder_matches_exact(exact_fp32):
    ref, ids, px, feats, logits, tokens = exact_fp32
    comp = build().optimize_for_inference("fast", compile=True)
    assert comp.inference_settings["compile"]
    f, lg, tk = probe(comp, ids, px)
    assert rel_diff(f, feats) < 1e-4 and tk.tolist() == tokens.tolist()


# ------------------------------------------------------------------------------------ CUDA (skipped without a GPU)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_cuda_fast_mode_matches_cpu_exact(exact_fp32, dtype):
    ref, ids, px, feats, logits, tokens = exact_fp32
    model = build(dtype).to("cuda").optimize_for_inference("fast")
    assert model.vision_tower.fused and not model.inference_settings["decode_kernels"]
    f, lg, tk = probe(model, ids, px)
    print(f"\ncuda {dtype}: feature cosine {cosine(f.cpu(), feats):.6f}, logits cosine {cosine(lg.cpu(), logits):.6f}")
    assert cosine(f.cpu(), feats) >= 0.999 and cosine(lg.cpu(), logits) >= 0.999
    assert tk.cpu().tolist() == tokens.tolist()
    if dtype == torch.float32:
        assert rel_diff(f.cpu(), feats) < 1e-3  # TF32 may be on for convolutions


@cuda
def test_cuda_compiled_encoder(exact_fp32):
    ref, ids, px, feats, logits, tokens = exact_fp32
    model = build(torch.bfloat16).to("cuda").optimize_for_inference("fast", compile=True)
    f, lg, tk = probe(model, ids, px)
    assert cosine(f.cpu(), feats) >= 0.999 and tk.cpu().tolist() == tokens.tolist()


@cuda
def test_cuda_graph_encoder_replays_the_fused_program(exact_fp32):
    ref, ids, px, feats, logits, tokens = exact_fp32
    model = build(torch.bfloat16).to("cuda").optimize_for_inference("fast")  # on by default on CUDA
    assert model.inference_settings["cuda_graphs"]
    compiled = build(torch.bfloat16).to("cuda").optimize_for_inference("fast", compile=True)
    assert not compiled.vision_tower._fused_cuda_graphs and not compiled.inference_settings["cuda_graphs"]
    tower = model.vision_tower
    plain = copy.deepcopy(tower).optimize_for_inference(True)  # the same fused program, run eagerly
    gen = torch.Generator().manual_seed(3)
    xs = [torch.rand(b, 3, s, s, generator=gen).to("cuda", torch.bfloat16) for b, s in ((1, 64), (1, 64), (2, 64), (1, 128))]
    with torch.inference_mode():
        outs = [tower(x) for x in xs]
        for x, out in zip(xs, outs):  # each call's own input, not the last one captured, and an output kept
            assert torch.allclose(out.float(), plain(x).float(), atol=1e-2, rtol=1e-2)
        assert len(tower._fused_cache["cuda_graphs"]) == 2  # one per image shape, reused; the batch of 2 ran eagerly
        assert not torch.equal(outs[0], outs[1])
        for i in range(tower.MAX_CUDA_GRAPHS + 2):  # more shapes than kept: the least recent are dropped
            tower(torch.rand(1, 3, 64 * (i + 3), 64, generator=gen).to("cuda", torch.bfloat16))
        assert len(tower._fused_cache["cuda_graphs"]) == tower.MAX_CUDA_GRAPHS
        tower.CUDA_GRAPH_MAX_PIXELS = 64 * 64  # larger inputs run eagerly, without a graph
        big = torch.rand(1, 3, 128, 128, generator=gen).to("cuda", torch.bfloat16)
        before = set(tower._fused_cache["cuda_graphs"])
        assert torch.allclose(tower(big).float(), plain(big).float(), atol=1e-2, rtol=1e-2)
        assert set(tower._fused_cache["cuda_graphs"]) == before
        del tower.CUDA_GRAPH_MAX_PIXELS

        # threads on their own streams share one graph's buffers: each gets its own input's answer
        import threading

        inputs = [torch.rand(1, 3, 64, 64, generator=gen).to("cuda", torch.bfloat16) for _ in range(4)]
        expected = [plain(x) for x in inputs]
        results, errors = {}, []

        def worker(i):
            try:
                with torch.inference_mode(), torch.cuda.stream(torch.cuda.Stream()):
                    outs = [tower(inputs[(i + k) % 4]) for k in range(20)]
                    torch.cuda.current_stream().synchronize()
                results[i] = outs
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        for i, outs in results.items():
            for k, out in enumerate(outs):
                assert torch.allclose(out.float(), expected[(i + k) % 4].float(), atol=1e-2, rtol=1e-2), (i, k)
        with torch.no_grad():
            tower.patch_embed[0].reparam_conv.weight.mul_(0.5)  # new weights: program and graphs rebuilt
        plain.patch_embed[0].reparam_conv.weight.data.mul_(0.5)
        plain.optimize_for_inference(True)
        assert torch.allclose(tower(xs[0]).float(), plain(xs[0]).float(), atol=1e-2, rtol=1e-2)
    f, lg, tk = probe(model, ids, px)  # through generate, as the CLI runs it
    assert cosine(f.cpu(), feats) >= 0.999 and tk.cpu().tolist() == tokens.tolist()


def test_cuda_graphs_default_on_cuda_unless_compiled_or_turned_off(monkeypatch):
    """The settings `optimize_for_inference` picks on a CUDA device (the device is only reported as CUDA here:
    nothing runs)."""
    model = build()
    monkeypatch.setattr(FastVLM, "device", property(lambda self: torch.device("cuda")))
    assert model.optimize_for_inference("fast").vision_tower._fused_cuda_graphs
    assert model.inference_settings["cuda_graphs"] and model.inference_settings["encoder"].endswith("CUDA graphs for single images")
    assert not model.inference_settings["graph_decode"]  # opt-in until a GPU has run it
    assert not model.optimize_for_inference("fast", compile=True).vision_tower._fused_cuda_graphs
    assert not model.optimize_for_inference("exact").vision_tower._fused_cuda_graphs
    with pytest.raises(ConfigError, match="without compile"):
        model.optimize_for_inference("fast", compile=True, cuda_graphs=True)
    monkeypatch.setenv("FASTVLM_NO_CUDA_GRAPHS", "1")
    assert not model.optimize_for_inference("fast").inference_settings["cuda_graphs"]
    assert model.optimize_for_inference("fast", cuda_graphs=True).inference_settings["cuda_graphs"]  # asked for
    assert model.optimize_for_inference("fast", graph_decode=True).inference_settings["graph_decode"]


def test_a_failed_graph_capture_falls_back_to_the_eager_program(monkeypatch):
    from fastvlm.vision import fastvithd

    tower = build().vision_tower.optimize_for_inference(True, cuda_graphs=True)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))

    def fail(program, x):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(fastvithd, "_capture_cuda_graph", fail)
    with torch.inference_mode():
        program = tower.fused_program()
        with pytest.warns(RuntimeWarning, match="capture failed .*operation not permitted.*runs eagerly"):
            out = tower._replay_cuda_graph(program, x)
        assert torch.equal(out, program(x)) and not tower._fused_cuda_graphs


def test_cuda_graphs_option_is_checked_and_ignored_off_cuda(exact_fp32):
    ref, ids, px, feats, logits, tokens = exact_fp32
    with pytest.raises(ConfigError, match="cuda_graphs=True needs mode 'fast'"):
        build().optimize_for_inference("exact", cuda_graphs=True)
    assert build().optimize_for_inference("fast").inference_settings["cuda_graphs"] is False  # CUDA only
    model = build().optimize_for_inference("fast", cuda_graphs=True)  # on the CPU: the eager fused program
    assert model.inference_settings["cuda_graphs"] is False
    f, lg, tk = probe(model, ids, px)
    assert rel_diff(f, feats) < 1e-4 and tk.tolist() == tokens.tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_packed_gqa_decode_attention_matches_sdpa(dtype):
    from fastvlm.generation import PACKED_GQA_ATTENTION, use_packed_gqa_attention

    model = build(dtype)
    lm = model.language_model
    assert lm.config.num_attention_heads > lm.config.num_key_value_heads  # grouped KV heads
    ids = torch.randint(3, 300, (1, 40), generator=torch.Generator().manual_seed(0))
    new = torch.tensor([[7]])

    def decode_logits():
        from transformers import DynamicCache

        from fastvlm.generation import cache_argument

        kw = {cache_argument(lm): DynamicCache()}
        with torch.inference_mode():
            lm(input_ids=ids, use_cache=True, **kw)
            return lm(input_ids=new, position_ids=torch.tensor([[40]]), use_cache=True, **kw).logits

    ref = decode_logits()
    assert use_packed_gqa_attention(lm, True) and lm.config._attn_implementation == PACKED_GQA_ATTENTION
    shapes = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, *a, **k):
        shapes.append(tuple(q.shape))
        return sdpa(q, *a, **k)

    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        got = decode_logits()
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
    H, G = lm.config.num_attention_heads, lm.config.num_attention_heads // lm.config.num_key_value_heads
    D = lm.config.hidden_size // H
    # the decode step ran the packed branch: query heads folded into the length dimension, once per layer
    assert shapes.count((1, H // G, G, D)) == lm.config.num_hidden_layers, shapes
    assert use_packed_gqa_attention(lm, False) is False and lm.config._attn_implementation == "sdpa"
    assert (got.float() - ref.float()).abs().max().item() <= (1e-5 if dtype == torch.float32 else 1e-2)
