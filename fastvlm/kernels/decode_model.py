"""Batch-1 bf16 decode steps of a whole Qwen2 model in one native call, with a preallocated KV cache.

`LeanQwen2DecoderLayer` (decode_layer.py) runs each layer's step as three native calls but leaves
the rest to PyTorch and transformers: per layer the KV cache update (`DynamicCache` concatenates
a new key and value onto the old tensors every step), single-query attention, a dozen tensor
allocations and transformers' model loop; per step the embedding, rotary tables, final norm and
LM head. `NativeQwen2Decoder` runs all of it as `fastvlm_qwen2_step_bf16` (cpu_gemv.c):
one OpenMP region per token, the KV cache in buffers allocated once for the whole generation
([layers, kv heads, capacity, head dim] for keys and for values), the rotary tables computed
once by the model's own rotary module, and the logits written as fp32.

The arithmetic is the lean layers' (every bf16 rounding where transformers' modules round) plus
attention as PyTorch's CPU flash kernel computes it for bf16, so its logits follow the module
path's within bf16 rounding (tests/test_decode_model.py asserts logits, cache and greedy tokens).

`generation.generate_steps` uses it after a prefill through transformers for batch-1 requests
without padding when the language model's layers are lean (the `fast` mode on AVX512-BF16 CPUs),
copying the prefill's `DynamicCache` into its buffers once.
"""

from __future__ import annotations

import ctypes
from typing import Optional

import torch

from . import load
from .decode_layer import LeanQwen2DecoderLayer, _plan_for


def _kv_of(cache, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer i's keys and values [batch, kv heads, tokens, head dim] from a transformers cache (4.x or 5.x)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return layers[i].keys, layers[i].values
    return cache.key_cache[i], cache.value_cache[i]


class NativeQwen2Decoder:
    """One generation's native decode steps for a Qwen2ForCausalLM in bf16 on the CPU (see the module docstring).

    Build it with `for_model` (None where the model does not qualify), fill its cache from the
    prefill with `load_cache`, then call `step(token, position)` once per token.
    """

    def __init__(self, lm, capacity: int) -> None:
        base = lm.model
        self._lib = load()
        plans = [_plan_for(layer) for layer in base.layers]
        p0 = plans[0]
        self.L, self.H, self.I, self.nq, self.nkv, self.D = len(plans), p0.H, p0.inter, p0.nq, p0.nkv, p0.D
        self.capacity = int(capacity)
        self.scaling = float(p0.scaling)
        ptrs, eps = [], []
        for layer, plan in zip(base.layers, plans):
            a, m = layer.self_attn, layer.mlp
            ptrs += [layer.input_layernorm.weight, a.q_proj.weight, a.q_proj.bias, a.k_proj.weight, a.k_proj.bias,
                     a.v_proj.weight, a.v_proj.bias, a.o_proj.weight, layer.post_attention_layernorm.weight,
                     m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight]
            eps += [plan.eps1, plan.eps2]
        self._keep = [t for t in ptrs if t is not None]  # the weights stay alive while the pointers are in use
        self._ptrs = (ctypes.c_void_p * len(ptrs))(*[None if t is None else t.data_ptr() for t in ptrs])
        self._eps = (ctypes.c_float * len(eps))(*eps)
        self.embed = base.embed_tokens.weight
        self.norm_w, self.norm_eps = base.norm.weight, float(base.norm.variance_epsilon)
        self.lm_head = lm.lm_head.weight
        self.V = self.lm_head.shape[0]
        # the model's own rotary module, once for every position this generation can reach
        positions = torch.arange(self.capacity).unsqueeze(0)
        cos, sin = base.rotary_emb(torch.zeros(1, dtype=torch.bfloat16), positions)
        self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()
        shape = (self.L, self.nkv, self.capacity, self.D)
        # uninitialised: a step reads positions 0..length only, all written by load_cache or a step
        self.keys = torch.empty(shape, dtype=torch.bfloat16)
        self.values = torch.empty(shape, dtype=torch.bfloat16)
        self.length = 0  # tokens in the cache
        self._buf = torch.empty(3 * self.H + (2 * self.nq + 2 * self.nkv) * self.D + 2 * self.I, dtype=torch.bfloat16)
        self._fbuf = torch.empty(self.nq * self.capacity, dtype=torch.float32)

    @classmethod
    def for_model(cls, lm, capacity: int) -> Optional["NativeQwen2Decoder"]:
        """A decoder for `lm` with room for `capacity` tokens, or None where the native step does not apply:
        no bf16 kernels, layers not lean (not the fast mode, LoRA or quantized projections), a rotary
        scaling other than the default, a sliding window, a bias on the LM head, weights not bf16."""
        base = getattr(lm, "model", None)
        layers = getattr(base, "layers", None)
        if load() is None or not layers or getattr(lm, "lm_head", None) is None:
            return None
        if not all(type(layer) is LeanQwen2DecoderLayer for layer in layers):
            return None
        plans = [_plan_for(layer) for layer in layers]
        if any(p is None for p in plans) or len({(p.H, p.inter, p.nq, p.nkv, p.D, p.scaling) for p in plans}) != 1:
            return None  # every layer must qualify, all of one shape (the native step loops over them as such)
        rotary = getattr(base, "rotary_emb", None)
        if rotary is None or getattr(rotary, "rope_type", "default") != "default":
            return None
        head, norm, embed = lm.lm_head, getattr(base, "norm", None), getattr(base, "embed_tokens", None)
        tensors = [getattr(head, "weight", None), getattr(norm, "weight", None), getattr(embed, "weight", None)]
        if (getattr(head, "bias", None) is not None or norm is None
                or not all(isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16 and t.device.type == "cpu"
                           and t.is_contiguous() for t in tensors)
                or not tensors[0].shape[1] == tensors[2].shape[1] == tensors[1].shape[0] == plans[0].H):
            return None
        return cls(lm, capacity)

    def load_cache(self, cache, length: int) -> None:
        """Copy the first `length` positions of a transformers cache (batch 1) into the buffers."""
        if length > self.capacity:
            raise ValueError(f"the cache holds {length} tokens, more than this decoder's capacity of {self.capacity}")
        for i in range(self.L):
            k, v = _kv_of(cache, i)
            self.keys[i, :, :length].copy_(k[0, :, :length])
            self.values[i, :, :length].copy_(v[0, :, :length])
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
        self._lib.fastvlm_qwen2_step_bf16(
            emb, self._ptrs, self._eps, self.L, self.H, self.I, self.nq, self.nkv, self.D,
            self.cos.data_ptr() + pos, self.sin.data_ptr() + pos, self.scaling,
            self.keys.data_ptr(), self.values.data_ptr(), self.capacity, self.length,
            self.norm_w.data_ptr(), self.norm_eps, self.lm_head.data_ptr(), self.V,
            self._buf.data_ptr(), self._fbuf.data_ptr(), logits.data_ptr(), torch.get_num_threads())
        self.length += 1
        return logits
