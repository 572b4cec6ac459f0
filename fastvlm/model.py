"""FastVLM: FastViTHD encoder -> MLP projector -> a Hugging Face causal LM (Qwen2 for the released models).

Image slots are runs of IMAGE_TOKEN_INDEX (-200) in `input_ids`, one run of
`num_image_tokens` per image (the processor expands each `<image>`). The model embeds
the text ids, then writes the projected image features into those positions in order,
so images are consumed in the order their placeholders appear across the batch.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from .config import IGNORE_INDEX, IMAGE_TOKEN_INDEX, FastVLMConfig, get_preset, mlp_depth
from .errors import CheckpointError, ConfigError, PromptError
from .vision import FastViTHD


def build_projector(config: FastVLMConfig) -> nn.Module:
    """The reference's projector builder: `linear`, `identity` or `mlp{N}x_gelu`."""
    in_dim, out_dim = config.vision.out_channels, config.hidden_size
    kind = config.projector_type
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "identity":
        if in_dim != out_dim:
            raise ConfigError(f"identity projector needs equal widths, got {in_dim} and {out_dim}")
        return nn.Identity()
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(mlp_depth(kind) - 1):  # mlp_depth raises ConfigError for an unknown type
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)


def text_config_object(config: FastVLMConfig):
    from transformers import AutoConfig

    text = dict(config.text)
    model_type = text.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **text)
    except Exception as e:  # noqa: BLE001 - ValueError, TypeError, huggingface_hub's strict-dataclass errors, ...
        detail = " ".join(str(e).split())  # the strict-dataclass errors span several lines
        raise ConfigError(f"transformers cannot build a {model_type!r} language model from the text config: "
                          f"{detail}") from None


def sync_special_tokens(config: FastVLMConfig, tokenizer) -> FastVLMConfig:
    """A copy of `config` whose LM bos/eos/pad ids are the tokenizer's (so saved checkpoints agree)."""
    import copy

    config = copy.deepcopy(config)
    vocab = tokenizer.get_vocab()
    im_end = vocab.get("<|im_end|>", tokenizer.eos_token_id)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else vocab.get("<|endoftext|>")
    config.text.update(eos_token_id=im_end, pad_token_id=pad, bos_token_id=vocab.get("<|endoftext|>", pad))
    if len(tokenizer) > int(config.text["vocab_size"]):
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary is "
                          f"{config.text['vocab_size']}")
    return config


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 dot products (AVX512-BF16 or AMX), where bf16 beats fp32."""
    from .kernels import cpu_flags

    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}


def cuda_has_native_bf16(device: Union[torch.device, int, None] = None) -> bool:
    """Whether the GPU computes in bf16 natively (NVIDIA Ampere and later). `torch.cuda.is_bf16_supported()`
    also says yes for older GPUs (T4, V100), where bf16 is emulated and slow; fp16 is their fast type."""
    if not torch.cuda.is_available():
        return False
    if getattr(torch.version, "hip", None):  # ROCm: its own answer (bf16 on the MI series)
        return bool(torch.cuda.is_bf16_supported())
    return torch.cuda.get_device_capability(device)[0] >= 8


def resolve_dtype(dtype: Union[str, torch.dtype, None], device: torch.device) -> torch.dtype:
    """`None`/"auto": bf16 on CUDA GPUs that compute in it natively (Ampere and later), else fp16; fp16 on MPS;
    bf16 on CPUs with native bf16, else fp32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if cuda_has_native_bf16(device) else torch.float16
        if device.type == "mps":
            return torch.float16
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of fp32, bf16, fp16, auto") from None


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    if device is None or device == "auto":
        return default_device()
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"unknown device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {str(dev)!r} requested but PyTorch sees no CUDA GPU")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise ConfigError(f"device {str(dev)!r} requested but PyTorch sees {n} CUDA GPU{'s' if n != 1 else ''} "
                          f"(cuda:0{f' to cuda:{n - 1}' if n > 1 else ''})")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"device {str(dev)!r} requested but this PyTorch has no MPS support")
    return dev


class FastVLM(nn.Module):
    """A FastVLM model. Build it with `from_pretrained`, `from_preset` or `FastVLM(config)`."""

    def __init__(self, config: FastVLMConfig, *, tokenizer=None, init_weights: bool = True):
        super().__init__()
        from transformers import AutoModelForCausalLM

        self.config = config
        text_cfg = text_config_object(config)
        # Without init the modules are built on the meta device (no memory, no init cost);
        # the caller then loads or initialises every tensor.
        with torch.device("meta") if not init_weights else contextlib.nullcontext():
            self.vision_tower = FastViTHD(config.vision)
            self.mm_projector = build_projector(config)
            self.language_model = AutoModelForCausalLM.from_config(text_cfg)
        self.processor = None
        if tokenizer is not None:
            self.set_tokenizer(tokenizer)
        self.last_timings = None
        self.channels_last = False
        self.inference_settings: dict[str, Any] = {"mode": "default"}

    # ------------------------------------------------------------------ construction
    def set_tokenizer(self, tokenizer) -> None:
        from .processing import FastVLMProcessor

        self.processor = FastVLMProcessor.from_config(self.config, tokenizer)

    @classmethod
    def from_preset(cls, name: str, *, tokenizer=None, device=None, dtype=None, seed: int = 0) -> "FastVLM":
        """A model of a preset architecture with random weights (for tests and benchmarks)."""
        return cls.from_config(get_preset(name), tokenizer=tokenizer, device=device, dtype=dtype, seed=seed)

    @classmethod
    def from_config(cls, config: FastVLMConfig, *, tokenizer=None, device=None, dtype=None, seed: int = 0) -> "FastVLM":
        """Random weights, initialised quickly in place (transformers' own init is slow for large vocabularies)."""
        device = resolve_device(device)
        if tokenizer is not None:
            config = sync_special_tokens(config, tokenizer)
        target = resolve_dtype(dtype, device)
        model = cls(config, tokenizer=tokenizer, init_weights=False)
        # The LLM is allocated in the target dtype straight away (its random numbers are drawn
        # in fp32 and rounded once, the same values an fp32 init cast afterwards gives), so a
        # 7B model in bf16 never needs its 30 GB fp32 copy.
        model.language_model.to(dtype=target)
        model.to_empty(device="cpu")
        model._random_init(seed)
        model._restore_nonpersistent_buffers()
        model._tie_if_needed()
        return model.to(device=device, dtype=target).eval()

    @torch.no_grad()
    def _random_init(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        for module in self.vision_tower.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
                module.reset_parameters()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.vision_tower.init_weights()
        std = float(getattr(text_config_object(self.config), "initializer_range", 0.02))
        for name, module in self.named_modules():
            if name.startswith("vision_tower"):
                continue
            if isinstance(module, (nn.Linear, nn.Embedding)):
                w = module.weight
                if w.dtype == torch.float32:
                    w.normal_(0.0, std, generator=gen)
                else:  # draw in fp32, round once: the same values as an fp32 init cast to w.dtype
                    w.copy_(torch.empty(w.shape, dtype=torch.float32).normal_(0.0, std, generator=gen))
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif hasattr(module, "weight") and isinstance(module.weight, torch.Tensor) and module.weight.dim() == 1:
                module.weight.fill_(1.0)  # RMSNorm / LayerNorm gains
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()

    def _apply(self, fn, recurse: bool = True):
        """`.to(dtype)`, `.half()` and the like leave the LLM's rotary tables (non-persistent buffers of modules
        without parameters, e.g. `inv_freq`) in fp32, as transformers' loading and the reference keep them: in
        bf16, `inv_freq` is off by up to 0.4%, which turns the rotary angle at position 1000 by up to a radian."""
        keep = []
        for module in self.language_model.modules():
            if any(True for _ in module.parameters(recurse=False)):
                continue
            for name in module._non_persistent_buffers_set:
                value = module._buffers.get(name)
                if value is not None and value.dtype == torch.float32 and not value.is_meta:
                    keep.append((module, name, value))
        out = super()._apply(fn, recurse)
        for module, name, value in keep:
            now = module._buffers.get(name)
            if now is not None and now.dtype != torch.float32 and now.is_floating_point():
                module._buffers[name] = value.to(device=now.device)
        return out

    def _restore_nonpersistent_buffers(self) -> None:
        """Rebuild modules whose only state is non-persistent buffers (rotary tables).

        Such buffers are computed at construction and never stored in checkpoints, so after
        building on the meta device (or `to_empty`) they hold nothing valid.
        """
        lm_cfg = self.language_model.config
        for parent in list(self.language_model.modules()):
            for child_name, child in list(parent.named_children()):
                own_buffers = dict(child.named_buffers(recurse=False))
                if not own_buffers or any(True for _ in child.parameters(recurse=False)):
                    continue
                if set(own_buffers) - set(child._non_persistent_buffers_set):
                    continue
                device = next(iter(own_buffers.values())).device
                try:
                    fresh = type(child)(config=lm_cfg)
                except TypeError:
                    fresh = type(child)(lm_cfg)
                setattr(parent, child_name, fresh.to("cpu" if device.type == "meta" else device))
        still = [n for n, b in self.named_buffers() if b.is_meta]
        if still:
            raise CheckpointError(f"buffers left uninitialised: {still[:5]}")

    def _tie_if_needed(self) -> None:
        if getattr(self.language_model.config, "tie_word_embeddings", False):
            self.language_model.lm_head.weight = self.language_model.get_input_embeddings().weight

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo: str,
        *,
        device: Union[str, torch.device, None] = None,
        dtype: Union[str, torch.dtype, None] = None,
        revision: Optional[str] = None,
        progress: bool = True,
        image_size: Optional[int] = None,
    ) -> "FastVLM":
        """Load a checkpoint in Apple's layout, transformers' `fast_vlm` layout or this project's own.

        `path_or_repo` is a local directory or a Hugging Face Hub id (downloaded with
        huggingface_hub when online). No code shipped with a checkpoint is ever run and
        no pickle file is ever loaded. `image_size` overrides the resolution (any multiple of 64).
        """
        from .checkpoints import load_checkpoint

        return load_checkpoint(cls, path_or_repo, device=device, dtype=dtype, revision=revision,
                               progress=progress, image_size=image_size)

    def save_pretrained(self, directory: str, *, layout: str = "fastvlm", max_shard_size: Optional[int] = None) -> None:
        """Write config, safetensors weights and tokenizer in `layout` ('fastvlm', 'apple' or 'hf')."""
        from .checkpoints import save_checkpoint

        if self.inference_settings.get("quantize"):
            raise CheckpointError(f"this model's language model is {self.inference_settings['quantize']}-quantized "
                                  f"for inference, which cannot be saved; reload the checkpoint and save that")
        save_checkpoint(self, directory, layout=layout, max_shard_size=max_shard_size)

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.language_model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.get_input_embeddings().weight.dtype

    @property
    def num_image_tokens(self) -> int:
        return self.config.num_image_tokens

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_attention_implementation(self, mode: str) -> None:
        """'eager' (the reference's arithmetic, exact) or 'sdpa' (fused kernels) for the encoder's attention."""
        self.vision_tower.set_attention_implementation(mode)

    def use_channels_last(self, enabled: bool = True) -> "FastVLM":
        """NHWC convolutions in the encoder: much faster on CPUs with oneDNN and on GPUs."""
        fmt = torch.channels_last if enabled else torch.contiguous_format
        self.vision_tower.to(memory_format=fmt)
        self.channels_last = enabled
        return self

    def optimize_for_inference(
        self,
        mode: str = "fast",
        *,
        compile: bool = False,
        quantize: Optional[str] = None,
        decode_kernels: Optional[bool] = None,
        channels_last: Optional[bool] = None,
        cuda_graphs: Optional[bool] = None,
        graph_decode: bool = False,
    ) -> "FastVLM":
        """Choose the inference path; returns self. Weights, dtype and state dict are unchanged unless `quantize`.

        mode "exact": the reference's arithmetic: NCHW convolutions, the encoder's module
        tree with its unfused softmax attention, PyTorch's linear layers.
        mode "fast" (the default of the CLI): channels-last convolutions (not on MPS), the
        encoder's fused program (BatchNorm and layer scales folded, GELU and residual adds
        fused into oneDNN convolutions on CPU, SDPA attention; see `fastvlm.vision.fused`),
        on CUDA GPUs replayed as a CUDA graph per image shape (`cuda_graphs`), and, on CPUs, a
        faster single-query GQA attention for decode steps (`generation.use_packed_gqa_attention`)
        plus, on AVX-512 CPUs with a C compiler, native matrix-vector kernels for batch-1 decoding
        (`fastvlm.kernels`) and, in bf16,
        Qwen2 decode steps as three native calls per layer (`fastvlm.kernels.decode_layer`); `generate`
        decodes batch-1 requests (bf16 or fp32) with one native call per token over a preallocated KV
        cache (`fastvlm.kernels.decode_model`).
        compile: also `torch.compile` the fused encoder (inductor with weight freezing; the
        first call per input shape compiles, which takes minutes on a small CPU).
        quantize "int8": int8 dynamic quantization of the language model's linear layers
        (CPU only; the LM then computes in fp32 with int8 weights, the encoder keeps its
        dtype). Irreversible: reload the checkpoint to save or train.
        cuda_graphs: on a CUDA GPU, replay the fused encoder as a CUDA graph per image shape for single
        images (batches run it eagerly; `FastViTHD.optimize_for_inference`); "fast" mode only, and not with `compile`. On by default
        there: at batch 1 the encoder otherwise waits on the host issuing its kernels (H200, bf16,
        1024 px: 8.2 ms replayed against 22 ms; benchmarks/results/gpu-encoder-ab-h200.json); the
        environment variable FASTVLM_NO_CUDA_GRAPHS=1 turns that default off (for the CLI, say).
        graph_decode: on a CUDA GPU, run `generate`'s batch-1 decode steps as a lean Qwen2 step replayed
        as a CUDA graph (`fastvlm.kernels.graph_decode`); "fast" mode only. Off by default: its
        arithmetic is tested against transformers' steps on the CPU, but no GPU has run it yet.
        decode_kernels / channels_last / cuda_graphs: override the mode's choice.
        """
        if mode not in ("exact", "fast"):
            raise ConfigError(f"inference mode must be 'exact' or 'fast', got {mode!r}")
        if quantize not in (None, "int8"):
            raise ConfigError(f"quantize must be None or 'int8', got {quantize!r}")
        if compile and mode != "fast":
            raise ConfigError("compile=True needs mode 'fast' (it compiles the fused encoder)")
        if cuda_graphs and (mode != "fast" or compile):
            raise ConfigError("cuda_graphs=True needs mode 'fast' without compile (it replays the fused encoder)")
        if graph_decode and mode != "fast":
            raise ConfigError("graph_decode=True needs mode 'fast'")
        fast = mode == "fast"
        device = self.device
        if channels_last is None:
            channels_last = fast and device.type != "mps"
        self.use_channels_last(channels_last)
        self.set_attention_implementation("sdpa" if fast else "eager")
        compile_opts = None
        if compile:
            compile_opts = {"options": {"freezing": True}} if device.type == "cpu" else {}
        if cuda_graphs is None:  # a compiled encoder is inductor's to schedule
            cuda_graphs = fast and not compile and os.environ.get("FASTVLM_NO_CUDA_GRAPHS", "") in ("", "0")
        cuda_graphs = bool(cuda_graphs) and device.type == "cuda"
        graph_decode = bool(graph_decode) and device.type == "cuda" and quantize is None
        self.vision_tower.optimize_for_inference(fast, onednn=not compile, compile=compile_opts,
                                                 cuda_graphs=cuda_graphs)
        if quantize == "int8":
            self._quantize_int8()
        from . import kernels
        from .generation import native_decoding, use_packed_gqa_attention
        from .graphs import GRAPH_DECODE_FLAG

        setattr(self.language_model, GRAPH_DECODE_FLAG, graph_decode)

        if decode_kernels is None:
            decode_kernels = fast and device.type == "cpu" and kernels.available(self.dtype)
        n_kernels = kernels.use_decode_kernels(self.language_model, bool(decode_kernels))
        from .kernels.decode_layer import LeanQwen2DecoderLayer

        n_lean = sum(type(m) is LeanQwen2DecoderLayer for m in self.language_model.modules())
        packed_gqa = use_packed_gqa_attention(self.language_model, fast and device.type == "cpu")
        self.inference_settings = {
            "mode": mode,
            "channels_last": bool(channels_last),
            "encoder": ("fused, CUDA graphs for single images" if cuda_graphs else "fused") if fast else "reference",
            "attention": "sdpa" if fast else "eager",
            "compile": bool(compile),
            "cuda_graphs": cuda_graphs,
            "graph_decode": graph_decode,
            "quantize": quantize or self.inference_settings.get("quantize"),
            "decode_kernels": bool(decode_kernels) and n_kernels > 0,
            "decode_attention": "packed-gqa sdpa" if packed_gqa else "sdpa",
            "decode_layers": "native bf16 steps" if n_lean else "transformers",
            # what generate's batch-1 decode steps run on
            "decode_loop": (f"{'CUDA graph of a lean step' if graph_decode else 'native whole-model step'}, "
                            "preallocated KV cache (batch 1)" if native_decoding(self.language_model)
                            else "transformers"),
        }
        return self

    def _quantize_int8(self) -> None:
        """Per-channel int8 weights with dynamically quantized int8 activations for every LM linear (fbgemm/x86).

        Layer by layer, so the transient fp32 copy is one linear at a time, not the whole LM.
        """
        import warnings

        if self.device.type != "cpu":
            raise ConfigError("int8 quantization runs on the CPU only (PyTorch's dynamic int8 kernels are CPU kernels)")
        if self.inference_settings.get("quantize") == "int8":
            return
        from . import kernels

        kernels.use_decode_kernels(self.language_model, False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated in favour of torchao
            from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear
            from torch.ao.quantization import per_channel_dynamic_qconfig

            for parent in list(self.language_model.modules()):
                for name, child in list(parent.named_children()):
                    if type(child) is nn.Linear:
                        child.float()
                        child.qconfig = per_channel_dynamic_qconfig
                        setattr(parent, name, DynamicQuantizedLinear.from_float(child))
        self.language_model.float()  # embeddings and norms: the int8 kernels take and return fp32
        self.inference_settings["quantize"] = "int8"

    # ------------------------------------------------------------------ images
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Encoder features before the projector: [batch, tokens, channels] (3072 channels for FastViTHD)."""
        if not isinstance(pixel_values, torch.Tensor):
            raise PromptError(f"pixel_values must be a tensor, got {type(pixel_values).__name__}")
        if pixel_values.dim() == 3:
            pixel_values = pixel_values.unsqueeze(0)
        ref = next(self.vision_tower.parameters())
        x = pixel_values.to(device=ref.device, dtype=ref.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.vision_tower(x)

    def project_features(self, feats: torch.Tensor) -> torch.Tensor:
        """Encoder features (from :meth:`encode_images`) through the projector, in its dtype."""
        proj_param = next(self.mm_projector.parameters(), None)
        if proj_param is not None:
            feats = feats.to(proj_param.dtype)
        return self.mm_projector(feats)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected image features: [batch, tokens, hidden_size], ready to splice into the LM's embeddings."""
        return self.project_features(self.encode_images(pixel_values))

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: Optional[torch.Tensor] = None,
        image_features: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Text embeddings with each image's features written into its run of IMAGE_TOKEN_INDEX positions."""
        input_ids = input_ids.to(self.device)
        is_image = input_ids == IMAGE_TOKEN_INDEX
        n_slots = int(is_image.sum())
        embeds = self.get_input_embeddings()(input_ids.masked_fill(is_image, 0))
        if n_slots == 0:
            if pixel_values is not None or image_features is not None:
                raise PromptError("images were given but input_ids contain no image positions (no <image> in the prompt)")
            return embeds
        if image_features is None:
            if pixel_values is None:
                raise PromptError(f"input_ids contain {n_slots} image positions but no images were given")
            image_features = self.get_image_features(pixel_values)
        n_feat = image_features.shape[0] * image_features.shape[1]
        if n_feat != n_slots:
            raise PromptError(
                f"input_ids have {n_slots} image positions but the {image_features.shape[0]} image(s) give "
                f"{image_features.shape[1]} tokens each ({n_feat}); each <image> needs exactly one image at the "
                f"model's resolution ({self.config.image_size}px -> {self.num_image_tokens} tokens)"
            )
        feats = image_features.reshape(-1, image_features.shape[-1]).to(embeds.dtype)
        return embeds.masked_scatter(is_image.unsqueeze(-1), feats)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        pixel_values: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        past_key_values=None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
        image_features: Optional[torch.Tensor] = None,
        **kwargs: Any,
    ):
        """Returns the language model's output (`.logits`, and `.loss` when labels are given)."""
        embeds = self.embed_inputs(input_ids, pixel_values, image_features)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
            if position_ids is None:
                # left padding: real tokens get positions 0..n-1 as in an unpadded sequence
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        if labels is not None:
            labels = labels.to(self.device).masked_fill(input_ids.to(self.device) == IMAGE_TOKEN_INDEX, IGNORE_INDEX)
        if past_key_values is not None:
            from .generation import cache_argument

            kwargs[cache_argument(self.language_model)] = past_key_values
        return self.language_model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    # ------------------------------------------------------------------ generation
    def generate(self, input_ids: torch.Tensor, attention_mask=None, pixel_values=None, *, return_dict: bool = False,
                 streamer=None, **sampling):
        """Generate new token ids ([batch, new_tokens], padded after eos), as the reference returns only new tokens.

        Sampling options: max_new_tokens, do_sample, temperature, top_p, top_k,
        repetition_penalty, seed, eos_token_id, pad_token_id. Timings of the call are kept
        in `model.last_timings` (and returned with `return_dict=True`). `streamer`: a callable
        given each step's token ids ([batch]), or a transformers streamer (`TextStreamer`,
        `TextIteratorStreamer`: anything with put/end), which gets the prompt first as
        transformers' generate gives it.
        """
        from .generation import generate

        out = generate(self, input_ids, attention_mask, pixel_values, streamer=streamer, **sampling)
        self.last_timings = out.timings
        return out if return_dict else out.sequences

    def _require_processor(self):
        if self.processor is None:
            raise ConfigError("this model has no tokenizer; load it from a checkpoint with tokenizer files "
                              "or call model.set_tokenizer(tokenizer)")
        return self.processor

    def chat(
        self,
        images=None,
        prompt: Union[str, Sequence[dict], None] = None,
        *,
        stream: bool = False,
        system_prompt: Optional[str] = None,
        **sampling,
    ) -> Union[str, Iterator[str]]:
        """Answer `prompt` (a string, or a list of chat messages) about `images` (one or a list; may be None).

        With a string prompt, each image is placed before the text as the reference does
        (`<image>\\n` per image). With messages, images fill the image parts in order.
        `stream=True` returns an iterator of text pieces as they are generated.
        """
        from .generation import build_chat_inputs, stream_text

        processor = self._require_processor()
        inputs = build_chat_inputs(processor, images, prompt, system_prompt=system_prompt)
        if stream:
            return stream_text(self, inputs, **sampling)
        out = self.generate(**inputs, return_dict=True, **sampling)
        return processor.decode(out.sequences[0])

    def chat_batch(self, requests: Sequence[tuple], *, system_prompt: Optional[str] = None, **sampling) -> list[str]:
        """Answer several (images, prompt) pairs in one batch: images encoded together, decoding batched."""
        from .generation import build_batch_inputs

        processor = self._require_processor()
        if not requests:
            raise PromptError("chat_batch needs at least one (images, prompt) request")
        inputs = build_batch_inputs(processor, requests, system_prompt=system_prompt)
        out = self.generate(**inputs, return_dict=True, **sampling)
        return processor.batch_decode(out.sequences)

    # ------------------------------------------------------------------ reparameterisation
    def reparameterize(self) -> "FastVLM":
        """Fuse the encoder's train-time branches (no-op when it is already fused)."""
        self.vision_tower.reparameterize()
        self.config.vision.inference_mode = True
        return self

    def num_parameters(self) -> dict[str, int]:
        def count(m):
            seen, total = set(), 0
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    total += p.numel()
            return total

        head = getattr(self.vision_tower, "head", None)
        return {
            "vision_tower": count(self.vision_tower),
            "vision_tower_head_unused": count(head) if head is not None else 0,
            "mm_projector": count(self.mm_projector),
            "language_model": count(self.language_model),
            "total": count(self),
        }
