"""Batch-1 decode steps of a Qwen2 model on a CUDA GPU, replayed as one CUDA graph per step.

At batch 1 a GPU decode step through transformers' modules issues some 15 kernels per layer and
waits on the host for every one of them (60 tokens/s for the 0.5B architecture on an H200,
benchmarks/results/bench-0.5b-h200.json, where reading its weights once takes under a millisecond).
`GraphQwen2Decoder` writes the step as a fixed sequence of tensor operations on buffers allocated once
for the whole generation, so that it can be captured as a CUDA graph and replayed with one launch per step
(the loop around it still copies the token in, the logits out, and samples):

- the KV cache is [layers, kv heads, capacity, head dim] for keys and for values, zero-filled, and a
  step writes its key and value at the slot held in a device tensor (`index_copy_`);
- attention runs over the whole capacity with a mask of the slots filled so far, so every shape is fixed
  (the single query's heads of one KV group are that group's queries, as grouped-query attention reads the
  same keys for them);
- the rotary tables come from the model's own rotary module, once for every position the generation can reach,
  and are indexed by the position tensor.

The step calls the model's own modules (embedding, norms, projections, MLP, LM head) and transformers'
`apply_rotary_pos_emb`; only the attention and its cache are its own (SDPA over the masked capacity, not over the
filled slots), so the logits follow the module path's within the dtype's rounding (tests/test_graph_decode.py). The first steps of a generation run eagerly (short answers never pay for
a capture); the graph is captured at the third.

`generation.generate_steps` uses it after a prefill through transformers for batch-1 requests without padding on
CUDA when the model was set up with `FastVLM.optimize_for_inference("fast", graph_decode=True)`, copying the
prefill's `DynamicCache` into its buffers once. Experimental: no GPU has run it yet (the CUDA tests in
tests/test_graph_decode.py are written for the next one). On other devices it runs eagerly, which is how the
tests check its arithmetic on the CPU.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

from ..graphs import GRAPH_DECODE_FLAG, capture
from .decode_model import copy_cache, qwen2_plan

EAGER_STEPS = 2  # steps before the capture: answers of a few tokens never pay for one


class GraphQwen2Decoder:
    """One batch-1 generation's decode steps for a Qwen2ForCausalLM (see the module docstring).

    Build it with `for_model` (None where the model does not qualify), fill its cache from the prefill with
    `load_cache`, then call `step(token, position)` once per token.
    """

    def __init__(self, lm, capacity: int, shapes: list[tuple], graphs: bool = True) -> None:
        self.lm = lm
        base = lm.model
        self.vocab = base.embed_tokens.num_embeddings
        self.dtype, self.device = base.embed_tokens.weight.dtype, base.embed_tokens.weight.device
        self.L = len(shapes)
        _, _, self.nq, self.nkv, self.D, self.scaling = shapes[0][:6]
        self.capacity = int(capacity)
        with torch.no_grad():
            positions = torch.arange(self.capacity, device=self.device).unsqueeze(0)
            cos, sin = base.rotary_emb(torch.zeros(1, dtype=self.dtype, device=self.device), positions)
        self.cos, self.sin = cos[0].to(self.dtype).contiguous(), sin[0].to(self.dtype).contiguous()
        shape = (self.L, self.nkv, self.capacity, self.D)
        # zeros, not garbage: masked slots get no weight, but 0 x NaN would still be NaN
        self.keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.values = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.slots = torch.arange(self.capacity, device=self.device)
        self.token = torch.zeros(1, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self.slot = torch.zeros(1, dtype=torch.long, device=self.device)
        self.length = 0  # tokens in the cache
        self.steps = 0
        self.graphs = bool(graphs) and self.device.type == "cuda"
        self._graph = None
        self._logits: Optional[torch.Tensor] = None

    @classmethod
    def for_model(cls, lm, capacity: int, graphs: bool = True) -> Optional["GraphQwen2Decoder"]:
        """A decoder for `lm` with room for `capacity` tokens, or None where the step does not apply (`plan`)."""
        shapes = cls.plan(lm)
        return None if shapes is None else cls(lm, capacity, shapes, graphs=graphs)

    @staticmethod
    def plan(lm) -> Optional[list]:
        """Every layer's shape where the step applies to `lm`, else None (`decode_model.qwen2_plan`: weights in
        fp32, bf16 or fp16, Qwen2 layers of plain linears and SiLU, no sliding window, no hooks, eval mode), and
        None for a model split across devices."""
        shapes = qwen2_plan(lm, (torch.float32, torch.bfloat16, torch.float16))
        if shapes is None:
            return None
        device = lm.model.embed_tokens.weight.device
        return shapes if all(p.device == device for p in lm.parameters()) else None

    def load_cache(self, cache, length: int) -> None:
        """Copy the first `length` positions of a transformers cache (batch 1) into the buffers."""
        copy_cache(self.keys, self.values, cache, length)
        self.length = length

    @torch.no_grad()
    def _compute(self) -> torch.Tensor:
        """One step on the device tensors token, pos and slot: the next token's logits [1, vocab] (fp32)."""
        groups = self.nq // self.nkv
        base = self.lm.model
        h = base.embed_tokens(self.token)  # [1, H]
        cos = self.cos.index_select(0, self.pos)  # [1, D]
        sin = self.sin.index_select(0, self.pos)
        mask = (self.slots <= self.slot).view(1, 1, 1, -1)  # the slots filled, this step's included
        for i, layer in enumerate(base.layers):
            a = layer.self_attn
            x = layer.input_layernorm(h)
            # the single query's heads as [kv heads, their query heads, D]: head h reads KV head h // groups
            q, k = apply_rotary_pos_emb(a.q_proj(x).view(self.nkv, groups, self.D),
                                        a.k_proj(x).view(self.nkv, 1, self.D), cos, sin)
            self.keys[i].index_copy_(1, self.slot, k)
            self.values[i].index_copy_(1, self.slot, a.v_proj(x).view(self.nkv, 1, self.D))
            out = F.scaled_dot_product_attention(q.unsqueeze(0), self.keys[i].unsqueeze(0),
                                                 self.values[i].unsqueeze(0), attn_mask=mask, scale=self.scaling)
            h = h + a.o_proj(out.reshape(1, self.nq * self.D))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.lm.lm_head(base.norm(h)).float()

    def _capture(self) -> None:
        # the warm-up is the step about to be replayed, run once eagerly: it rewrites the same slot
        self._graph, self._logits = capture(self._compute, self.device, warmup=1)

    def step(self, token: int, position: int) -> torch.Tensor:
        """Append `token` at rotary `position`; returns the next token's logits [1, vocab] (fp32)."""
        if self.length >= self.capacity or not 0 <= position < self.capacity:
            raise ValueError(f"decoder full: {self.length} tokens cached, capacity {self.capacity}, position {position}")
        if not 0 <= token < self.vocab:
            raise ValueError(f"token id {token} is outside the vocabulary of {self.vocab}")
        self.token.fill_(token)
        self.pos.fill_(position)
        self.slot.fill_(self.length)
        if self.graphs and self.steps >= EAGER_STEPS and self._graph is None:
            try:
                self._capture()
            except RuntimeError as e:  # a driver or build whose capture fails: eager steps from now on
                self.graphs = False
                setattr(self.lm, GRAPH_DECODE_FLAG, False)  # later generations use transformers' steps
                warnings.warn(f"the decode step's CUDA graph capture failed ({str(e).strip()[:200]}); this "
                              "generation decodes eagerly and later ones through transformers' steps. If CUDA "
                              "memory errors follow, restart without graph_decode", RuntimeWarning, stacklevel=2)
        if self._graph is not None and self.graphs:
            with torch.cuda.device(self.device):
                self._graph.replay()
            logits = self._logits.clone()  # the next replay overwrites it
        else:
            logits = self._compute()
        self.length += 1
        self.steps += 1
        return logits
