"""Autoregressive generation with a KV cache: greedy and sampled decoding, streaming, batching, timings.

The loop is our own rather than transformers' `generate` so that each phase can be
timed (image encoding, prefill, time to first token, decode rate), prefill computes
logits only for the last position, and text can be streamed as it is produced.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Optional, Sequence

import torch

from .config import IMAGE_TOKEN_INDEX
from .errors import ConfigError, ImageError, PromptError
from .graphs import GRAPH_DECODE_FLAG


@dataclass
class Timings:
    """Seconds per phase of one generate call (batch as a whole)."""

    encode_s: float = 0.0  # vision encoder + projector
    prefill_s: float = 0.0  # LLM over the prompt, up to the first token's logits
    ttft_s: float = 0.0  # encode + splice + prefill + choosing the first token
    decode_s: float = 0.0  # every token after the first
    prompt_tokens: int = 0  # per sequence, image tokens included (longest in the batch)
    new_tokens: int = 0  # generated tokens, summed over the batch
    batch_size: int = 1

    @property
    def decode_tokens_per_s(self) -> float:
        # tokens after the first, per second, per sequence
        steps = max(self.new_tokens / max(self.batch_size, 1) - 1, 0)
        return steps / self.decode_s if self.decode_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["decode_tokens_per_s"] = self.decode_tokens_per_s
        return d

    def summary(self) -> str:
        return (f"encode {self.encode_s * 1000:.0f} ms | prefill {self.prefill_s * 1000:.0f} ms "
                f"({self.prompt_tokens} tokens) | TTFT {self.ttft_s * 1000:.0f} ms | "
                f"decode {self.decode_tokens_per_s:.1f} tokens/s ({self.new_tokens} tokens)")


@dataclass
class GenerationOutput:
    sequences: torch.Tensor  # [batch, new_tokens], pad_token_id after a sequence finished
    timings: Timings
    finish_reasons: list[str] = field(default_factory=list)  # "stop" (eos) or "length"


def _warn_caller(message: str) -> None:
    """A UserWarning pointing at the first frame outside fastvlm (and the wrappers it goes through)."""
    import os
    import sys

    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and (frame.f_code.co_filename.startswith(package) or frame.f_code.co_filename == "<string>"
                                 or frame.f_code.co_filename.endswith(os.path.join("utils", "_contextlib.py"))):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level + 1)


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        import numbers

        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if value is None:
                if f.name != "seed":  # None: the default, as transformers reads it
                    setattr(self, f.name, f.default)
                continue
            is_bool = isinstance(value, bool) or type(value).__name__ in ("bool", "bool_")  # numpy's too
            if f.name == "do_sample":
                if not is_bool:
                    raise ConfigError(f"do_sample must be true or false, got {value!r}")
                setattr(self, f.name, bool(value))
            elif f.name in ("max_new_tokens", "top_k", "seed"):
                if is_bool or not isinstance(value, numbers.Integral):
                    raise ConfigError(f"{f.name} must be a whole number, got {value!r}")
                setattr(self, f.name, int(value))
            else:
                if is_bool or not isinstance(value, numbers.Real):
                    raise ConfigError(f"{f.name} must be a number, got {value!r}")
                setattr(self, f.name, float(value))
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.temperature == 0:
            self.do_sample = False  # temperature 0 means greedy, as in the reference's predict.py
        if not 0 <= self.top_p <= 1:
            raise ConfigError(f"top_p must be in [0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if not 1e-4 <= self.repetition_penalty <= 1e4:  # beyond, float32 logits overflow or vanish
            raise ConfigError(f"repetition_penalty must be in [1e-4, 1e4], got {self.repetition_penalty}")
        if not self.do_sample and (self.temperature not in (0, 1.0) or self.top_p != 1.0 or self.top_k
                                   or self.seed is not None):
            # transformers' convention: sampling settings act only with do_sample=True (the CLI and the
            # server turn sampling on for a temperature above 0); say so rather than ignore them silently
            _warn_caller("temperature, top_p, top_k and seed take effect only with do_sample=True; decoding "
                         "greedily")


# the keyword arguments generate/chat take for sampling (anything else is refused, naming these)
SAMPLING_ARGUMENTS = tuple(f.name for f in dataclasses.fields(SamplingParams))


def cache_argument(language_model) -> str:
    """transformers renamed `past_key_values` to `cache` (5.x); use whichever this version takes."""
    import inspect

    params = inspect.signature(type(language_model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


PACKED_GQA_ATTENTION = "fastvlm_packed_gqa_sdpa"


def _packed_gqa_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' SDPA attention, except one-token decode steps with grouped KV heads.

    With `enable_gqa=True` (transformers' choice on CPUs) PyTorch's CPU kernel spends about
    250 us per call on a single query row; folding the query heads that share a KV head
    into the query-length dimension gives the same products through the plain kernel in
    about 25 us (bit-identical output), which is 12% of a 0.5B decode step on 2 cores.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    if (query.shape[2] == 1 and groups > 1 and attention_mask is None and not dropout
            and not kwargs.get("output_attentions") and kwargs.get("softcap") is None):
        B, H, _, D = query.shape
        q = query.reshape(B, H // groups, groups, D)  # head h = kv * groups + g attends with kv head h // groups
        out = torch.nn.functional.scaled_dot_product_attention(q, key, value, scale=scaling)
        return out.reshape(B, H, 1, D).transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def use_packed_gqa_attention(language_model, enabled: bool = True) -> bool:
    """Switch a transformers LM between "sdpa" and the packed-GQA decode variant; False if it cannot."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    except ImportError:
        return False
    current = getattr(language_model.config, "_attn_implementation", None)
    if current not in ("sdpa", PACKED_GQA_ATTENTION):
        return False  # eager, flash or a user's choice: leave it alone
    if enabled:
        AttentionInterface.register(PACKED_GQA_ATTENTION, _packed_gqa_sdpa)
        AttentionMaskInterface.register(PACKED_GQA_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    target = PACKED_GQA_ATTENTION if enabled else "sdpa"
    if current != target:
        try:
            language_model.set_attn_implementation(target)
        except (AttributeError, ValueError, KeyError):
            return False
    return enabled


def native_decoder(language_model, capacity: int):
    """The whole-step decoder for a batch-1 generation of up to `capacity` tokens: native
    (`fastvlm.kernels.decode_model`) where the language model's layers run on the native decode kernels (the
    `fast` mode on AVX-512 CPUs, bf16 or fp32), replayed as a CUDA graph (`fastvlm.kernels.graph_decode`) where
    `optimize_for_inference("fast", graph_decode=True)` set it up on a CUDA GPU; None otherwise, and then
    transformers' model and DynamicCache take the steps."""
    if getattr(language_model, GRAPH_DECODE_FLAG, False):
        from .kernels.graph_decode import GraphQwen2Decoder

        return GraphQwen2Decoder.for_model(language_model, capacity)  # also eagerly off CUDA, as the tests run it
    if not _on_decode_kernels(language_model):
        return None  # checked first: in every other mode nothing here loads or builds the kernels
    from .kernels.decode_model import NativeQwen2Decoder

    return NativeQwen2Decoder.for_model(language_model, capacity)


def native_decoding(language_model) -> bool:
    """Whether `generate` decodes batch-1 requests of this language model natively (nothing allocated)."""
    if getattr(language_model, GRAPH_DECODE_FLAG, False):
        from .kernels.graph_decode import GraphQwen2Decoder

        return GraphQwen2Decoder.plan(language_model) is not None
    if not _on_decode_kernels(language_model):
        return False
    from .kernels.decode_model import NativeQwen2Decoder

    return NativeQwen2Decoder.plan(language_model) is not None


def _on_decode_kernels(language_model) -> bool:
    from .kernels import DecodeLinear

    layers = getattr(getattr(language_model, "model", None), "layers", None)
    return bool(layers) and all(type(getattr(getattr(layer, "self_attn", None), "q_proj", None)) is DecodeLinear
                                for layer in layers)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty as in transformers: divide positive, multiply negative logits of seen tokens.

    ``seen`` [batch, n] holds token ids; negative entries (image slots, padding) are no token and are skipped.
    """
    if penalty == 1.0:
        return logits
    valid = seen >= 0
    all_valid = bool(valid.all())
    big = torch.finfo(logits.dtype).max  # a large penalty overflows to inf, which sampling turns into NaN
    if not all_valid:
        # Entries that are no token take a token the row has seen anyway (a repeated id is penalised once, as
        # in transformers); a row with none keeps its logits (below).
        filler = seen.masked_fill(~valid, -1).amax(dim=1, keepdim=True).clamp(min=0)
        seen = torch.where(valid, seen, filler)
    picked = logits.gather(1, seen)
    penalised = torch.where(picked > 0, picked / penalty, picked * penalty).clamp(-big, big)
    if not all_valid:
        penalised = torch.where(valid.any(dim=1, keepdim=True), penalised, picked)
    return logits.scatter(1, seen, penalised)


def sample_next(logits: torch.Tensor, p: SamplingParams, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Pick the next token per row from float32 logits [batch, vocab]."""
    if not p.do_sample:
        # the first of the largest, as argmax returns; max's CPU kernel was the quicker of the two over a 152k
        # vocabulary (a dev measurement on the Intel Xeon, not a committed benchmark)
        return logits.max(dim=-1).indices
    # the row's best at 0 first: a clamped, very large logit divided by a temperature below 1 would be inf
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / max(p.temperature, 1e-5)
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p; the top token always stays (top_p 0, which
        # OpenAI's API allows, keeps only it)
        drop = (probs.cumsum(-1) - probs) >= p.top_p
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def eos_token_ids(model, eos_token_id) -> list[int]:
    if eos_token_id is not None:
        return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    ids: list[int] = []
    if model.processor is not None:
        # the tokenizer is the authority on which ids end a turn (<|im_end|> and its eos)
        return sorted(set(model.processor.eos_token_ids))
    cfg_eos = getattr(model.language_model.config, "eos_token_id", None)
    if cfg_eos is not None:
        ids += [cfg_eos] if isinstance(cfg_eos, int) else list(cfg_eos)
    return sorted(set(ids))


def pad_token_id_for(model, pad_token_id) -> int:
    if pad_token_id is not None:
        return pad_token_id
    if model.processor is not None and model.processor.pad_token_id is not None:
        return model.processor.pad_token_id
    cfg_pad = getattr(model.language_model.config, "pad_token_id", None)
    return cfg_pad if cfg_pad is not None else 0


def generate_steps(model, *args, **kwargs) -> Iterator[tuple[torch.Tensor, torch.Tensor, Timings]]:
    """Yield (next_tokens [B], finished [B], timings) after each step; timings are filled in as they happen.

    Each step runs under ``torch.inference_mode`` in the thread that asks for it, and the caller's grad mode is
    untouched between steps: the iterator may be advanced from any thread (a web framework's thread pool, an
    event loop interleaving several streams). ``timings.decode_s`` counts the time spent in the steps, not the
    time the consumer spends between them.
    """
    steps = _generate_steps(model, *args, **kwargs)
    try:
        while True:
            with torch.inference_mode():
                try:
                    item = next(steps)
                except StopIteration:
                    return
            yield item
    finally:
        steps.close()  # a consumer that stops early ends the steps now, not at garbage collection


def _generate_steps(
    model,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    pixel_values: Optional[torch.Tensor] = None,
    *,
    eos_token_id=None,
    pad_token_id=None,
    image_features: Optional[torch.Tensor] = None,
    **sampling,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, Timings]]:
    from transformers import DynamicCache

    unknown = sorted(set(sampling) - set(SAMPLING_ARGUMENTS))
    if unknown:
        raise ConfigError(f"unknown generation argument(s) {', '.join(unknown)}; the sampling arguments are "
                          f"{', '.join(SAMPLING_ARGUMENTS)}, besides eos_token_id and pad_token_id")
    params = SamplingParams(**sampling)
    device = model.device
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    input_ids = input_ids.to(device)
    batch = input_ids.shape[0]
    if input_ids.shape[1] == 0:
        raise PromptError("the prompt is empty")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device=device, dtype=torch.long)
    if attention_mask.dim() == 1:
        attention_mask = attention_mask.unsqueeze(0)
    if attention_mask.shape != input_ids.shape:
        raise PromptError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
                          f"{tuple(input_ids.shape)}")
    if not bool(attention_mask.any(dim=1).all()):
        raise PromptError("a row of attention_mask is all zeros: that prompt has no tokens to answer from")
    if getattr(model, "training", False):
        _warn_caller("generating with the model in train mode: the encoder's BatchNorm statistics move with these "
                     "images and dropout is on; call model.eval() first")
    if bool((attention_mask[:, -1] == 0).any()):
        # Right (or inner) padding: generation continues from each row's last position, so move every row's
        # padding to its left, keeping the order of its tokens (a stable sort of the mask).
        order = torch.sort(attention_mask, dim=1, stable=True).indices
        input_ids, attention_mask = input_ids.gather(1, order), attention_mask.gather(1, order)
    max_pos = getattr(model.language_model.config, "max_position_embeddings", None)
    if max_pos and input_ids.shape[1] + params.max_new_tokens > max_pos:
        raise PromptError(
            f"prompt ({input_ids.shape[1]} tokens, images included) plus max_new_tokens "
            f"({params.max_new_tokens}) exceeds the model's context of {max_pos} tokens"
        )
    trained = getattr(getattr(model, "config", None), "max_length", None)
    if trained and input_ids.shape[1] > trained:
        # The reference cuts every sequence to tokenizer_model_max_length, which can drop the question and the
        # generation prompt; we answer from the whole prompt and say so.
        warnings.warn(
            f"the prompt is {input_ids.shape[1]} tokens long (images included), longer than the {trained} the "
            f"model was trained with (its max_length / tokenizer_model_max_length); the reference implementation "
            f"would cut it to {trained} tokens, this answers from all of it", stacklevel=3,
        )
    eos = torch.tensor(eos_token_ids(model, eos_token_id) or [-1], device=device)
    pad = pad_token_id_for(model, pad_token_id)
    gen = None
    if params.do_sample and params.seed is not None:
        gen = torch.Generator(device=device).manual_seed(params.seed)
    timings = Timings(prompt_tokens=int(input_ids.shape[1]), batch_size=batch)

    _sync(device)
    t0 = time.perf_counter()
    if image_features is None and pixel_values is not None and (input_ids == IMAGE_TOKEN_INDEX).any():
        image_features = model.get_image_features(pixel_values)
        _sync(device)
    t_enc = time.perf_counter()
    timings.encode_s = t_enc - t0
    embeds = model.embed_inputs(input_ids, pixel_values if image_features is None else None, image_features)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    cache_kw = cache_argument(model.language_model)
    cache = DynamicCache()
    out = model.language_model(
        inputs_embeds=embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
        logits_to_keep=1,
        **{cache_kw: cache},
    )
    logits = out.logits[:, -1, :].float()
    out = None  # it referenced the cache; the native decoder below may take the cache over
    # batch-1 steps on the CPU (or on CUDA with graph_decode) may go to a whole-step decoder, built at the first
    # step after the first token (so that TTFT does not pay for it, nor a reply that ends at its first token)
    lean = device.type == "cpu" or (device.type == "cuda" and getattr(model.language_model, GRAPH_DECODE_FLAG, False))
    native, try_native = None, batch == 1 and lean and bool(attention_mask.all())
    # token history for the repetition penalty: the prompt's text ids (images and padding excluded)
    history = (input_ids.masked_fill((input_ids < 0) | (attention_mask == 0), -1)
               if params.repetition_penalty != 1.0 else None)
    if history is not None:
        logits = apply_repetition_penalty(logits, history, params.repetition_penalty)
    next_tokens = sample_next(logits, params, gen)
    _sync(device)
    t_first = time.perf_counter()
    timings.prefill_s = t_first - t_enc
    timings.ttft_s = t_first - t0

    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    next_pos = position_ids[:, -1] + 1
    consumer_s = 0.0
    for step in range(params.max_new_tokens):
        next_tokens = torch.where(finished, torch.full_like(next_tokens, pad), next_tokens)
        # a comparison, not torch.isin: isin's MPS kernel gives wrong answers on macOS 13 (pytorch #151600)
        newly_done = (next_tokens.unsqueeze(1) == eos).any(1) & ~finished
        timings.new_tokens += int((~finished).sum())
        finished = finished | newly_done
        timings.decode_s = time.perf_counter() - t_first - consumer_s
        t_yield = time.perf_counter()
        yield next_tokens, finished, timings
        consumer_s += time.perf_counter() - t_yield  # the caller's time between steps is not decoding
        if bool(finished.all()) or step == params.max_new_tokens - 1:
            break
        if try_native:
            try_native = False
            native = native_decoder(model.language_model, input_ids.shape[1] + params.max_new_tokens)
            if native is not None:
                native.load_cache(cache, input_ids.shape[1])
                cache = None  # the decoder's buffers hold it from here on
        if native is not None:
            logits = native.step(int(next_tokens[0]), int(next_pos[0]))
        else:
            attention_mask = torch.cat([attention_mask, torch.ones((batch, 1), dtype=attention_mask.dtype,
                                                                   device=device)], 1)
            out = model.language_model(
                input_ids=next_tokens.unsqueeze(1),
                attention_mask=attention_mask,
                position_ids=next_pos.unsqueeze(1),
                use_cache=True,
                **{cache_kw: cache},
            )
            logits = out.logits[:, -1, :].float()
        next_pos = next_pos + 1
        if history is not None:  # a finished row's padding is no token either
            history = torch.cat([history, next_tokens.masked_fill(finished, -1).unsqueeze(1)], 1)
            logits = apply_repetition_penalty(logits, history, params.repetition_penalty)
        next_tokens = sample_next(logits, params, gen)
    _sync(device)
    timings.decode_s = time.perf_counter() - t_first - consumer_s


def check_pixel_values(pixel_values) -> None:
    """Refuse pixel values that are not the processor's output (floats in [0, 1]): the public `generate` takes
    them from callers; the step loop itself, fed by the processor in chat, streams and serve, does not check."""
    if pixel_values is None:
        return
    if not isinstance(pixel_values, torch.Tensor):
        raise PromptError(f"pixel_values must be a tensor (the processor's output), got {type(pixel_values).__name__}")
    if not torch.is_floating_point(pixel_values):
        raise ImageError(f"pixel_values are {pixel_values.dtype}; give the processor's output: floats in [0, 1] "
                         "(RGB / 255, no mean/std normalisation)")
    lo, hi = (float(v) for v in torch.aminmax(pixel_values)) if pixel_values.numel() else (0.0, 0.0)
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ImageError(f"pixel_values range from {lo:.3g} to {hi:.3g}; FastVLM takes floats in [0, 1] (RGB / 255, "
                         "no mean/std normalisation), as the processor gives them")


@torch.inference_mode()
def generate(model, input_ids, attention_mask=None, pixel_values=None, *, streamer=None, **kwargs) -> GenerationOutput:
    steps: list[torch.Tensor] = []
    finished = None
    timings = Timings()
    if kwargs.get("image_features") is None:
        check_pixel_values(pixel_values)
    hf_streamer = streamer is not None and hasattr(streamer, "put") and hasattr(streamer, "end")
    if streamer is not None and not (hf_streamer or callable(streamer)):
        raise ConfigError(f"streamer must be a callable taking each step's token ids, or a transformers streamer "
                          f"(put/end), got {type(streamer).__name__}")
    try:
        if hf_streamer:  # transformers' protocol: the prompt first (skip_prompt drops it), each step, then end()
            ids = torch.as_tensor(input_ids)
            ids = ids.reshape(-1, ids.shape[-1])
            streamer.put(ids[:, ids[0] >= 0].cpu())  # image slots are no tokens
        for tokens, finished, timings in generate_steps(model, input_ids, attention_mask, pixel_values, **kwargs):
            steps.append(tokens)
            if hf_streamer:
                streamer.put(tokens.cpu())
            elif streamer is not None:
                streamer(tokens)
    finally:
        if hf_streamer:
            streamer.end()  # also after an error: a TextIteratorStreamer's reader would wait for ever
    sequences = torch.stack(steps, 1) if steps else torch.empty((input_ids.shape[0], 0), dtype=torch.long)
    reasons = ["stop" if bool(f) else "length" for f in finished] if finished is not None else []
    return GenerationOutput(sequences=sequences, timings=timings, finish_reasons=reasons)


def stream_text(model, inputs: dict, **sampling) -> Iterator[str]:
    """Yield decoded text pieces for a single sequence as tokens arrive.

    The whole generated sequence is re-decoded each step and only the new suffix is
    yielded, so characters split over several tokens come out whole, and whitespace at
    the ends is held back: the pieces join to exactly the non-streamed answer.
    """
    processor = model._require_processor()
    ids: list[int] = []
    emitted = ""
    eos_ids = set(eos_token_ids(model, sampling.get("eos_token_id")))
    # (no inference_mode around the loop: it would stay on in whichever thread iterates, between pieces)
    for tokens, finished, timings in generate_steps(model, **inputs, **sampling):
        model.last_timings = timings
        tok = int(tokens[0])
        if tok in eos_ids or bool(finished[0]) and tok == pad_token_id_for(model, sampling.get("pad_token_id")):
            continue
        ids.append(tok)
        text = processor.decode(ids)
        if text.endswith("\ufffd") or not text.startswith(emitted):
            continue  # an incomplete UTF-8 sequence: wait for the next token
        if len(text) > len(emitted):
            yield text[len(emitted):]
            emitted = text
    final = processor.decode(ids)
    if final.startswith(emitted) and len(final) > len(emitted):
        yield final[len(emitted):]


def _messages_from(images, prompt, system_prompt=None):
    """Messages and the flat image list for one chat request."""
    if images is None:
        images = []
    elif not isinstance(images, (list, tuple)):
        images = [images]
    else:
        images = list(images)
    if prompt is None:
        raise PromptError("a prompt (text or a list of messages) is required")
    if isinstance(prompt, str):
        content: list[dict] = [{"type": "image"} for _ in images]
        if "<image>" in prompt:
            content = []  # the caller placed the placeholders in the text
        content.append({"type": "text", "text": prompt})
        messages = [{"role": "user", "content": content}]
    elif isinstance(prompt, (list, tuple)):
        messages = list(prompt)
        from .processing import message_images

        payloads = message_images(messages)  # the images carried in the parts ({"type": "image", "image": ...})
        if any(p is not None for p in payloads):
            if images:
                raise PromptError("images were given both inside the messages' image parts and as `images`; "
                                  "give them one way")
            if any(p is None for p in payloads):
                raise PromptError(f"{sum(p is None for p in payloads)} of the messages' {len(payloads)} image parts "
                                  f"carry no image while others do; give every image part its image, or none "
                                  f"and pass them as `images`")
            images = payloads
    else:
        raise PromptError(f"prompt must be a string or a list of messages, got {type(prompt).__name__}")
    if system_prompt is not None and not (messages and messages[0].get("role") == "system"):
        messages = [{"role": "system", "content": system_prompt}] + messages
    return messages, images


def build_chat_inputs(processor, images, prompt, *, system_prompt=None) -> dict:
    messages, images = _messages_from(images, prompt, system_prompt)
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return dict(processor(images=images or None, text=text))


def build_batch_inputs(processor, requests: Sequence[tuple], *, system_prompt=None) -> dict:
    texts, all_images = [], []
    for images, prompt in requests:
        messages, imgs = _messages_from(images, prompt, system_prompt)
        texts.append(processor.apply_chat_template(messages, add_generation_prompt=True))
        all_images += imgs
    return dict(processor(images=all_images or None, text=texts, padding_side="left"))
