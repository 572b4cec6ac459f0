"""Batch-1 decode steps of a whole Qwen2 model in one native call, with a preallocated KV cache (bf16 and fp32).

`LeanQwen2DecoderLayer` (decode_layer.py) runs each bf16 layer's step as three native calls but
leaves the rest to PyTorch and transformers: per layer the KV cache update (`DynamicCache`
concatenates a new key and value onto the old tensors every step), single-query attention, a
dozen tensor allocations and transformers' model loop; per step the embedding, rotary tables, final
norm and LM head (in fp32 every layer is transformers' module around the matrix-vector kernel).
`NativeQwen2Decoder` runs all of it as `fastvlm_qwen2_step` (cpu_gemv.c, one body for both
dtypes): one OpenMP region per token, the KV cache in buffers allocated once for the whole generation ([layers, kv
heads, capacity, head dim] for keys and for values), the rotary tables computed once by the
model's own rotary module, and the logits written as fp32.

In bf16 the arithmetic is the lean layers' (every bf16 rounding where transformers' modules round)
plus attention rounded as PyTorch's CPU flash kernel rounds for bf16 (exponentials rounded to bf16 for
the product with V), though in one block with an exact exp where that kernel takes blocks of 512 keys
with online rescaling and a faster exp, so its logits follow the module path's within bf16 rounding; in fp32 nothing
is rounded and they follow to fp32 summation order (tests/test_decode_model.py asserts logits
against an fp32 reference, the cache and greedy tokens).

`generation.generate_steps` uses it after a prefill through transformers for batch-1 requests
without padding when the language model runs on the native decode kernels (the `fast` mode on
AVX-512 CPUs), copying the prefill's `DynamicCache` into its buffers once.
"""

from __future__ import annotations

import ctypes
from typing import Optional

import torch
from torch import nn

from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

from . import DecodeLinear, available, load
from .decode_layer import LeanQwen2DecoderLayer


def _kv_of(cache, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer i's keys and values [batch, kv heads, tokens, head dim] from a transformers cache (4.x or 5.x)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return layers[i].keys, layers[i].values
    return cache.key_cache[i], cache.value_cache[i]


def copy_cache(keys: torch.Tensor, values: torch.Tensor, cache, length: int) -> None:
    """Copy the first `length` positions of a transformers cache (batch 1) into buffers [layers, kv heads,
    capacity, head dim]."""
    if length > keys.shape[2]:
        raise ValueError(f"the cache holds {length} tokens, more than this decoder's capacity of {keys.shape[2]}")
    for i in range(keys.shape[0]):
        k, v = _kv_of(cache, i)
        keys[i, :, :length].copy_(k[0, :, :length])
        values[i, :, :length].copy_(v[0, :, :length])


def _ok(t, dtype: torch.dtype, device_type: str = "cpu") -> bool:
    return isinstance(t, torch.Tensor) and t.dtype == dtype and t.device.type == device_type and t.is_contiguous()


def _layer_shape(layer, dtype: torch.dtype, device_type: str = "cpu") -> Optional[tuple]:
    """(H, I, nq, nkv, D, scaling, eps1, eps2) where `layer` has exactly the structure the native step
    implements (a Qwen2 decoder layer with plain or DecodeLinear projections and SiLU, no sliding window),
    every tensor in `dtype` on a device of `device_type`; None otherwise (another architecture, a wrapped or
    quantized projection, say). `graph_decode` uses it for CUDA too."""
    if type(layer) not in (Qwen2DecoderLayer, LeanQwen2DecoderLayer):
        return None  # look-alikes differ (Qwen3 normalises q and k per head before rotary, say)
    a, m = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    try:
        lins = [a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj]
        norms = [layer.input_layernorm, layer.post_attention_layernorm]
        D, scaling = int(a.head_dim), float(a.scaling)
        eps = (float(norms[0].variance_epsilon), float(norms[1].variance_epsilon))
    except (AttributeError, TypeError, ValueError):
        return None
    if (not all(type(x) in (nn.Linear, DecodeLinear) and _ok(x.weight, dtype, device_type)
                and (x.bias is None or _ok(x.bias, dtype, device_type)) for x in lins)
            or any(x.bias is not None for x in lins[3:])
            or not all(_ok(getattr(x, "weight", None), dtype, device_type) for x in norms)
            or getattr(a, "sliding_window", None) is not None
            or getattr(getattr(m, "config", None), "hidden_act", None) != "silu"
            or D % 2 or not 0 < D <= 512):  # the native rotary and attention keep a head in 512 floats
        return None
    q, k, g = a.q_proj, a.k_proj, m.gate_proj
    H, inter = q.in_features, g.out_features
    if (q.out_features % D or k.out_features % D or k.out_features != a.v_proj.out_features
            or a.o_proj.weight.shape != (H, q.out_features) or m.up_proj.weight.shape != g.weight.shape
            or m.down_proj.weight.shape != (H, inter) or k.in_features != H or g.in_features != H):
        return None
    nq, nkv = q.out_features // D, k.out_features // D
    if nq % nkv:
        return None
    return (H, inter, nq, nkv, D, scaling) + eps


def qwen2_plan(lm, dtypes: tuple, device_type: Optional[str] = None) -> Optional[list]:
    """Every layer's shape (`_layer_shape`) where a whole-model step applies to `lm` (the native one here and
    `graph_decode`'s), else None: weights in a dtype not in `dtypes` or on a device other than `device_type`
    (default: the embedding's), a layer the step does not implement, layers of different shapes, a rotary
    scaling other than the default, a bias on the LM head, training mode (dropout) or forward hooks."""
    base = getattr(lm, "model", None)
    layers = getattr(base, "layers", None)
    embed = getattr(getattr(base, "embed_tokens", None), "weight", None)
    if not layers or getattr(lm, "lm_head", None) is None or not isinstance(embed, torch.Tensor):
        return None
    dtype, device_type = embed.dtype, device_type or embed.device.type
    if dtype not in dtypes:
        return None
    if lm.training or any(mod._forward_hooks or mod._forward_pre_hooks for mod in lm.modules()):
        return None  # dropout, or hooks that expect the modules' forwards to run
    shapes = [_layer_shape(layer, dtype, device_type) for layer in layers]
    if any(x is None for x in shapes) or len({x[:6] for x in shapes}) != 1:
        return None  # every layer must qualify, all of one shape (the steps loop over them as such)
    rotary = getattr(base, "rotary_emb", None)
    if rotary is None or getattr(rotary, "rope_type", "default") != "default":
        return None
    head, norm = lm.lm_head, getattr(base, "norm", None)
    tensors = [getattr(head, "weight", None), getattr(norm, "weight", None), embed]
    if (getattr(head, "bias", None) is not None or norm is None
            or not all(_ok(t, dtype, device_type) for t in tensors)
            or not tensors[0].shape[1] == tensors[2].shape[1] == tensors[1].shape[0] == shapes[0][0]):
        return None
    return shapes


class NativeQwen2Decoder:
    """One generation's native decode steps for a Qwen2ForCausalLM in bf16 or fp32 on the CPU (see the module
    docstring).

    Build it with `for_model` (None where the model does not qualify), fill its cache from the
    prefill with `load_cache`, then call `step(token, position)` once per token.
    """

    def __init__(self, lm, capacity: int, shapes: list[tuple]) -> None:
        base = lm.model
        self._lib = load()
        self.dtype = dtype = base.embed_tokens.weight.dtype
        self._step = self._lib.fastvlm_qwen2_step
        self._bf16 = int(dtype == torch.bfloat16)
        self.L = len(shapes)
        self.H, self.I, self.nq, self.nkv, self.D, self.scaling = shapes[0][:6]
        self.capacity = int(capacity)
        ptrs, eps = [], []
        for layer, shape in zip(base.layers, shapes):
            a, m = layer.self_attn, layer.mlp
            ptrs += [layer.input_layernorm.weight, a.q_proj.weight, a.q_proj.bias, a.k_proj.weight, a.k_proj.bias,
                     a.v_proj.weight, a.v_proj.bias, a.o_proj.weight, layer.post_attention_layernorm.weight,
                     m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight]
            eps += list(shape[6:])
        self._keep = [t for t in ptrs if t is not None]  # the weights stay alive while the pointers are in use
        self._ptrs = (ctypes.c_void_p * len(ptrs))(*[None if t is None else t.data_ptr() for t in ptrs])
        self._eps = (ctypes.c_float * len(eps))(*eps)
        self.embed = base.embed_tokens.weight
        self.norm_w, self.norm_eps = base.norm.weight, float(base.norm.variance_epsilon)
        self.lm_head = lm.lm_head.weight
        self.V = self.lm_head.shape[0]
        # the model's own rotary module, once for every position this generation can reach
        positions = torch.arange(self.capacity).unsqueeze(0)
        cos, sin = base.rotary_emb(torch.zeros(1, dtype=dtype), positions)
        self.cos, self.sin = cos[0].to(dtype).contiguous(), sin[0].to(dtype).contiguous()
        shape = (self.L, self.nkv, self.capacity, self.D)
        # uninitialised: a step reads positions 0..length only, all written by load_cache or a step
        self.keys = torch.empty(shape, dtype=dtype)
        self.values = torch.empty(shape, dtype=dtype)
        self.length = 0  # tokens in the cache
        self._buf = torch.empty(3 * self.H + (2 * self.nq + 2 * self.nkv) * self.D + 2 * self.I, dtype=dtype)
        self._fbuf = torch.empty(self.nq * self.capacity, dtype=torch.float32)

    @classmethod
    def for_model(cls, lm, capacity: int) -> Optional["NativeQwen2Decoder"]:
        """A decoder for `lm` with room for `capacity` tokens, or None where the native step does not apply
        (`plan`)."""
        shapes = cls.plan(lm)
        return None if shapes is None else cls(lm, capacity, shapes)

    @staticmethod
    def plan(lm) -> Optional[list]:
        """Every layer's shape (`_layer_shape`) where the native step applies to `lm`, else None:
        no native kernels for its dtype (bf16 needs AVX512-BF16; fp32 AVX-512), weights in another dtype or
        not on the CPU, a layer the step does not implement (`_layer_shape`), layers of different shapes,
        a rotary scaling other than the default, or a bias on the LM head."""
        shapes = qwen2_plan(lm, (torch.bfloat16, torch.float32), "cpu")
        return shapes if shapes is not None and available(lm.model.embed_tokens.weight.dtype) else None

    def load_cache(self, cache, length: int) -> None:
        """Copy the first `length` positions of a transformers cache (batch 1) into the buffers."""
        copy_cache(self.keys, self.values, cache, length)
        self.length = length

    def step(self, token: int, position: int) -> torch.Tensor:
        """Append `token` at rotary `position`; returns the next token's logits [1, vocab] (fp32)."""
        if self.length >= self.capacity or not 0 <= position < self.capacity:
            raise ValueError(f"decoder full: {self.length} tokens cached, capacity {self.capacity}, position {position}")
        if not 0 <= token < self.embed.shape[0]:
            raise ValueError(f"token id {token} is outside the vocabulary of {self.embed.shape[0]}")
        logits = torch.empty(1, self.V, dtype=torch.float32)
        emb = self.embed.data_ptr() + token * self.H * self.embed.element_size()
        pos = position * self.D * self.cos.element_size()
        status = self._step(
            self._bf16, emb, self._ptrs, self._eps, self.L, self.H, self.I, self.nq, self.nkv, self.D,
            self.cos.data_ptr() + pos, self.sin.data_ptr() + pos, self.scaling,
            self.keys.data_ptr(), self.values.data_ptr(), self.capacity, self.length,
            self.norm_w.data_ptr(), self.norm_eps, self.lm_head.data_ptr(), self.V,
            self._buf.data_ptr(), self._fbuf.data_ptr(), logits.data_ptr(), torch.get_num_threads())
        if status:
            raise RuntimeError("the native kernels were built without AVX512-BF16: no bf16 decode step")
        self.length += 1
        return logits
