"""A Qwen2 decoder layer whose batch-1 bf16 decode steps run as three native calls.

A 0.5B decode step on the 2-core Zen 4 took 44.0 ms with transformers' layers around the native
matrix-vector kernel, of which streaming the weights through the kernel alone takes 32.8 ms
(benchmarks/results/decode-step-cpu-bf16-2.json); much of the rest is the ~100 small PyTorch
ops per layer (RMSNorms, rotary, residual adds, SiLU, views, dispatch). `LeanQwen2DecoderLayer` keeps
transformers' module, parameters and state dict, and runs a one-token step as:

1. `fastvlm_qwen2_attn_in_bf16`: input RMSNorm, q/k/v projections (one pass over the three
   matrices), rotary embedding;
2. the KV cache update and attention stay PyTorch's (the cache object is transformers');
3. `fastvlm_qwen2_attn_out_bf16`: o_proj, residual add, post-attention RMSNorm;
4. `fastvlm_qwen2_mlp_bf16`: gate and up projections (one pass), SiLU times up, down
   projection, residual add.

Every intermediate is rounded to bf16 where the PyTorch module rounds it, so a step can differ
from the module's (with the same matrix-vector kernel) only through the order of the RMSNorm's
fp32 sum and SiLU's exp; on the Zen 4 used here the logits are bit-identical
(tests/test_decode_layer.py checks logits, cache and greedy tokens). Anything else (prefill, batches, fp32, grads, masks, LoRA-wrapped or
quantized projections, an unknown transformers calling convention) takes the module's own
forward.

Each layer checks its structure and looks up its weights once (`_Plan`); a step then only checks
that the same tensors are still in place at the same addresses. On the Intel Xeon with AMX that
took a step of the 0.5B's 24 layers with tiny weights (nearly all per-step overhead) from 3.86 to
2.50 ms, and a 0.5B step from 49.3 to 47.9 ms, interleaved in one run
(benchmarks/results/decode-ab-plan-cpu-intel.json, `benchmarks/decode_ab.py`).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

from . import (  # this module is imported from the package's functions only
    DecodeLinear,
    available,
    load,
)

_LINEARS = (nn.Linear, DecodeLinear)


def _bf16_linear(m: nn.Module) -> bool:
    w, b = m.weight, m.bias
    return (type(m) in _LINEARS and w.dtype == torch.bfloat16 and w.device.type == "cpu" and w.is_contiguous()
            and (b is None or (b.dtype == torch.bfloat16 and b.is_contiguous())))


def _layer_ok(layer) -> bool:
    """The layer has the exact structure the native step implements (checked every step: cheap)."""
    a, m = layer.self_attn, layer.mlp
    return (_bf16_linear(a.q_proj) and _bf16_linear(a.k_proj) and _bf16_linear(a.v_proj)
            and _bf16_linear(a.o_proj) and a.o_proj.bias is None
            and _bf16_linear(m.gate_proj) and _bf16_linear(m.up_proj) and _bf16_linear(m.down_proj)
            and m.gate_proj.bias is None and m.up_proj.bias is None and m.down_proj.bias is None
            and getattr(a, "sliding_window", None) is None
            and getattr(layer, "_lean_act", None) == "silu"
            and layer.input_layernorm.weight.dtype == torch.bfloat16
            and layer.post_attention_layernorm.weight.dtype == torch.bfloat16)


class _Plan:
    """What a layer's lean steps need that does not change from step to step: its modules and
    weight pointers, looked up and checked (`_layer_ok`) once instead of at every step.

    A step re-checks only that the same modules and tensors are still in place, contiguous, in bf16
    and at the same addresses (`still_valid`), a few microseconds; anything else (a dtype change, a
    load into new tensors, a LoRA-wrapped projection, a deep copy) makes a new plan, or takes the
    module's forward.
    """

    __slots__ = ("D", "H", "attn_in", "attn_out", "eps1", "eps2", "inter", "layer_idx", "mlp", "modules", "nkv", "nq",
                 "params", "scaling", "submodules")

    def __init__(self, layer) -> None:
        a, m = layer.self_attn, layer.mlp
        ln1, ln2 = layer.input_layernorm, layer.post_attention_layernorm
        q, k, v, o = a.q_proj, a.k_proj, a.v_proj, a.o_proj
        g, u, d = m.gate_proj, m.up_proj, m.down_proj
        # the modules inside the layer, whose forward hooks a lean step would skip (the layer's own hooks run
        # around either path): checked every step, a short list of dict lookups
        self.submodules = tuple(x for x in layer.modules() if x is not layer)
        self.modules = [(layer._modules, "self_attn", a), (layer._modules, "mlp", m),
                        (layer._modules, "input_layernorm", ln1), (layer._modules, "post_attention_layernorm", ln2)]
        self.modules += [(a._modules, n, x) for n, x in (("q_proj", q), ("k_proj", k), ("v_proj", v), ("o_proj", o))]
        self.modules += [(m._modules, n, x) for n, x in (("gate_proj", g), ("up_proj", u), ("down_proj", d))]
        self.params = []
        for mod in (ln1, ln2, q, k, v, o, g, u, d):
            for name in ("weight", "bias"):
                if name in mod._parameters:
                    t = mod._parameters[name]
                    self.params.append((mod._parameters, name, t, None if t is None else t.data_ptr()))
        self.D = D = a.head_dim
        self.nq, self.nkv = q.out_features // D, k.out_features // D
        self.H, self.inter = q.in_features, g.out_features
        self.scaling, self.layer_idx = a.scaling, a.layer_idx
        self.eps1, self.eps2 = float(ln1.variance_epsilon), float(ln2.variance_epsilon)
        # the native calls' fixed arguments, in their order (see cpu_gemv.c)
        self.attn_in = (ln1.weight.data_ptr(), self.eps1, q.weight.data_ptr(), _ptr(q.bias), k.weight.data_ptr(),
                        _ptr(k.bias), v.weight.data_ptr(), _ptr(v.bias))
        self.attn_out = (o.weight.data_ptr(), self.nq * D, ln2.weight.data_ptr(), self.eps2, self.H)
        self.mlp = (g.weight.data_ptr(), u.weight.data_ptr(), d.weight.data_ptr(), self.H, self.inter)

    def still_valid(self) -> bool:
        for owner, name, obj in self.modules:
            if owner.get(name) is not obj:
                return False
        for owner, name, t, ptr in self.params:
            if owner.get(name) is not t or (t is not None and (t.data_ptr() != ptr or t.dtype != torch.bfloat16
                                                                or not t.is_contiguous())):
                return False
        return True


def _plan_for(layer):
    """The layer's valid plan, made anew where needed; None where the layer cannot take lean steps."""
    plan = layer.__dict__.get("_lean_plan")
    if plan is None or not plan.still_valid():
        plan = _Plan(layer) if _layer_ok(layer) else None
        layer.__dict__["_lean_plan"] = plan
    return plan


def _lean_step(plan: _Plan, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache) -> torch.Tensor:
    lib = load()
    D, nq, nkv, H = plan.D, plan.nq, plan.nkv, plan.H
    threads = torch.get_num_threads()
    x = x.contiguous()
    h = torch.empty(H, dtype=torch.bfloat16)
    qkv = torch.empty((nq + 2 * nkv) * D, dtype=torch.bfloat16)
    lib.fastvlm_qwen2_attn_in_bf16(x.data_ptr(), *plan.attn_in, cos.data_ptr(), sin.data_ptr(),
                                   nq, nkv, D, H, h.data_ptr(), qkv.data_ptr(), threads)
    q = qkv[: nq * D].view(1, nkv, nq // nkv, D)  # query heads sharing a KV head, as one block
    k = qkv[nq * D: (nq + nkv) * D].view(1, nkv, 1, D)
    v = qkv[(nq + nkv) * D:].view(1, nkv, 1, D)
    k, v = cache.update(k, v, plan.layer_idx)
    attn = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=plan.scaling).contiguous()
    x1 = torch.empty_like(x)
    lib.fastvlm_qwen2_attn_out_bf16(x.data_ptr(), attn.data_ptr(), *plan.attn_out, x1.data_ptr(), h.data_ptr(),
                                    threads)
    gu = torch.empty(2 * plan.inter, dtype=torch.bfloat16)
    out = torch.empty_like(x)
    lib.fastvlm_qwen2_mlp_bf16(x1.data_ptr(), h.data_ptr(), *plan.mlp, gu.data_ptr(), out.data_ptr(), threads)
    return out


def _ptr(t) -> int | None:
    return None if t is None else t.data_ptr()


class LeanQwen2DecoderLayer(Qwen2DecoderLayer):
    """Qwen2DecoderLayer with native batch-1 bf16 decode steps (see the module's docstring)."""

    def forward(self, hidden_states, *args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values", kwargs.get("past_key_value")))
        pe = kwargs.get("position_embeddings")
        returns_tuple = getattr(self, "_lean_returns_tuple", None)
        if (not args and returns_tuple is not None and cache is not None and pe is not None
                and kwargs.get("attention_mask") is None and not kwargs.get("output_attentions")
                and hidden_states.dim() == 3 and hidden_states.shape[:2] == (1, 1)
                and hidden_states.dtype == torch.bfloat16 and hidden_states.device.type == "cpu"
                and not (torch.is_grad_enabled() and hidden_states.requires_grad)):
            plan = _plan_for(self)
            if (plan is not None and pe[0].numel() == plan.D and pe[0].dtype == torch.bfloat16
                    and not any(m._forward_hooks or m._forward_pre_hooks for m in plan.submodules)):
                cos, sin = (t.contiguous() for t in pe)
                out = _lean_step(plan, hidden_states, cos, sin, cache)
                return (out,) if returns_tuple else out
        out = super().forward(hidden_states, *args, **kwargs)
        # transformers 4.x layers return a tuple, 5.x a tensor: learnt from the first (prefill) call
        self._lean_returns_tuple = isinstance(out, tuple)
        return out


def use_lean_decode_layers(language_model: nn.Module, enabled: bool = True) -> int:
    """Swap the Qwen2 decoder layers of `language_model` to LeanQwen2DecoderLayer (or back).

    Only layers whose weights are bf16 now are swapped (call again after changing the dtype):
    an fp32 layer would only ever fall back, and the check costs it time (0-3 ms per 0.5B step
    in 11 of 15 rounds, benchmarks/results/decode-step-cpu-fp32.json). Returns how many lean
    layers remain. Needs the bf16 native kernels (`fastvlm.kernels`); without them, or for a
    model that is not Qwen2, nothing is swapped.
    """
    can = enabled and available(torch.bfloat16)
    n = 0
    for mod in language_model.modules():
        if type(mod) not in (Qwen2DecoderLayer, LeanQwen2DecoderLayer):
            continue
        head_dim = getattr(mod.self_attn, "head_dim", 0)
        w = getattr(mod.self_attn.q_proj, "weight", None)  # a method on quantized linears
        lean = (can and isinstance(w, torch.Tensor) and w.dtype == torch.bfloat16
                and head_dim % 2 == 0 and 0 < head_dim <= 512)  # the native rotary's scratch holds 512
        mod.__class__ = LeanQwen2DecoderLayer if lean else Qwen2DecoderLayer
        if lean:
            mod._lean_act = getattr(getattr(mod.mlp, "config", None), "hidden_act", None)
        n += lean
    return n
