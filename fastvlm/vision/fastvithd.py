"""FastViTHD, the image encoder of FastVLM (Apple's `MCi("fastvithd")`).

Module names and the flat `network` list follow Apple's FastViT, so the state dict of
the fused model is exactly what Apple checkpoints store under
`model.vision_tower.vision_tower.model.`; `fastvlm.checkpoints.timm_keys` maps it to the
staged layout of timm / transformers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import warnings
from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import VisionConfig
from ..errors import ConfigError, ImageError
from .blocks import (
    ATTENTION_IMPLEMENTATIONS,
    MHSA,
    AttentionBlock,
    GlobalPoolHead,
    LayerNormChannel,
    MobileOneBlock,
    PatchEmbed,
    RepCPE,
    RepMixerBlock,
)

IN_CHANNELS = 3


def network_layout(config: VisionConfig) -> list[tuple[str, int]]:
    """Role and stage of each entry of `FastViTHD.network`, in order.

    Roles: "pos_emb" (RepCPE before stage i), "stage" (the blocks of stage i) and
    "downsample" (the PatchEmbed after stage i-1, listed with stage i because that is
    where timm keeps it). Every stage but the last is followed by a PatchEmbed, as in
    Apple's code with downsamples all True.
    """
    layout: list[tuple[str, int]] = []
    for i in range(len(config.depths)):
        if i > 0:
            layout.append(("downsample", i))
        if config.pos_embs[i]:
            layout.append(("pos_emb", i))
        layout.append(("stage", i))
    return layout


def _check_config(config: VisionConfig) -> None:
    dims = config.embed_dims
    for i in range(len(dims) - 1):
        if dims[i + 1] % dims[i]:
            raise ConfigError(
                f"vision.embed_dims[{i + 1}]={dims[i + 1]} is not a multiple of embed_dims[{i}]={dims[i]}: "
                "the downsampling conv is grouped per input channel"
            )
    if config.out_channels % dims[-1]:
        raise ConfigError(
            f"vision.expansion_ratio={config.expansion_ratio} must give a multiple of embed_dims[-1]={dims[-1]} "
            f"(got {config.out_channels}): conv_exp is grouped per input channel"
        )


@contextlib.contextmanager
def _frozen_batchnorm_stats(module: nn.Module):
    """Run `module` again (a gradient-checkpoint recompute) without updating BatchNorm running statistics.

    The recompute sees the same batch as the forward that already updated them; a second update would
    apply the momentum twice per batch. Momentum 0 leaves the running mean and variance as they are, and
    the batch counter is put back.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
             for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(norms, saved):
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)


class FastViTHD(nn.Module):
    """The FastViTHD encoder: [B, 3, H, W] pixels -> [B, (H/64)*(W/64), 3072] tokens (full model).

    Build with `config.inference_mode=True` (default) for the fused form of the released
    checkpoints, or False for the multi-branch train form; `reparameterize()` turns the
    latter into the former in place.
    """

    def __init__(self, config: Optional[VisionConfig] = None, attn_impl: str = "eager") -> None:
        super().__init__()
        config = config if config is not None else VisionConfig()
        _check_config(config)
        self.config = config
        self.grad_checkpointing = False
        fused = config.inference_mode
        dims = config.embed_dims
        c0 = dims[0]

        # Apple's stem has no 1x1 scale branch (stem_scale_branch=False); the other MobileOne
        # blocks keep theirs.
        self.patch_embed = nn.Sequential(
            MobileOneBlock(IN_CHANNELS, c0, 3, stride=2, inference_mode=fused, use_scale_branch=False),
            MobileOneBlock(c0, c0, 3, stride=2, groups=c0, inference_mode=fused, use_scale_branch=False),
            MobileOneBlock(c0, c0, 1, inference_mode=fused, use_scale_branch=False),
        )

        network: list[nn.Module] = []
        for role, i in network_layout(config):
            if role == "downsample":
                network.append(PatchEmbed(dims[i - 1], dims[i], patch_size=config.down_patch_size, stride=2,
                                          inference_mode=fused))
            elif role == "pos_emb":
                network.append(RepCPE(dims[i], config.pos_emb_kernel_size, inference_mode=fused))
            else:
                network.append(self._stage(config, i))
        self.network = nn.ModuleList(network)

        self.conv_exp = MobileOneBlock(dims[-1], config.out_channels, 3, groups=dims[-1], inference_mode=fused,
                                       use_se=True)
        if config.projection_dim is not None:
            self.head = GlobalPoolHead(config.out_channels, config.projection_dim)

        self.set_attention_implementation(attn_impl)
        self.init_weights()
        # The fused inference program (vision/fused.py) is a cache derived from the
        # parameters, kept outside the module tree so state_dict() stays the checkpoint's.
        self._fused_enabled = False
        self._fused_onednn = True
        self._fused_compile: Optional[dict] = None
        self._fused_cuda_graphs = False
        self._fused_cache: dict = {}

    @staticmethod
    def _stage(config: VisionConfig, i: int) -> nn.Sequential:
        dim = config.embed_dims[i]
        blocks: list[nn.Module] = []
        for _ in range(config.depths[i]):
            if config.token_mixers[i] == "repmixer":
                blocks.append(RepMixerBlock(dim, config.repmixer_kernel_size, config.mlp_ratios[i],
                                            config.layer_scale_init_value, inference_mode=config.inference_mode))
            else:
                blocks.append(AttentionBlock(dim, config.head_dim, config.mlp_ratios[i],
                                             config.layer_scale_init_value, config.norm_eps))
        return nn.Sequential(*blocks)

    # ------------------------------------------------------------------ properties

    @property
    def patch_size(self) -> int:
        """Pixels per output token along each side (the encoder's total stride)."""
        return self.config.patch_size

    @property
    def out_channels(self) -> int:
        return self.config.out_channels

    @property
    def attn_impl(self) -> str:
        return self._attn_impl

    def num_tokens(self, height: int, width: Optional[int] = None) -> int:
        width = height if width is None else width
        return (height // self.patch_size) * (width // self.patch_size)

    # ------------------------------------------------------------------ set-up

    def set_attention_implementation(self, mode: str) -> None:
        """"eager": the reference's arithmetic (parity); "sdpa": torch's fused attention (speed)."""
        if mode not in ATTENTION_IMPLEMENTATIONS:
            raise ConfigError(f"attention implementation must be one of {ATTENTION_IMPLEMENTATIONS}, got {mode!r}")
        self._attn_impl = mode
        for m in self.modules():
            if isinstance(m, MHSA):
                m.attn_impl = mode

    def optimize_for_inference(self, enabled: bool = True, *, onednn: bool = True,
                               compile: Optional[dict] = None, cuda_graphs: bool = False) -> "FastViTHD":
        """Run a fused program in eval mode: BN and layer scales folded, GELU and residual adds fused, SDPA.

        The parameters, buffers and `state_dict()` are unchanged (the checkpoint layout is
        kept); the fused weights are derived from them and rebuilt automatically when any
        of them changes, moves or is cast (an edit through `.data`, or of weights created under
        `torch.inference_mode`, keeps a tensor's version: call this again after one). Training
        mode always runs the module tree, and so do forwards that need what only the tree gives:
        gradients for parameters that require them, forward hooks, modules swapped in by other
        libraries (see `_fused_key`).
        `onednn=False` uses plain torch ops instead of oneDNN's fused kernels (for
        torch.compile, which does its own fusion). `compile`: keyword arguments for
        `torch.compile` of the fused program (None: run it eagerly). `cuda_graphs`: for a single image on
        CUDA of at most `CUDA_GRAPH_MAX_PIXELS` (height x width), with no gradient wanted and autocast off,
        replay the fused program as a CUDA graph, captured on the first call per input shape, dtype and
        layout (the last `MAX_CUDA_GRAPHS` kept, each holding its activations' memory); at batch 1 a GPU
        otherwise waits on the host issuing hundreds of small kernels. Ignored with `compile` and on other devices.
        `enabled=False` returns to the module tree.
        """
        self._fused_enabled = enabled
        self._fused_onednn = onednn
        self._fused_compile = None if compile is None else dict(compile)
        self._fused_cuda_graphs = bool(cuda_graphs) and compile is None  # a compiled program is inductor's
        self._fused_cache.clear()
        return self

    def __getstate__(self):
        # copies and pickles rebuild the fused program on demand rather than carry it
        state = self.__dict__.copy()
        state["_fused_cache"] = {}
        return state

    @property
    def fused(self) -> bool:
        """Whether eval-mode forwards run the fused program (see `optimize_for_inference`)."""
        return self._fused_enabled

    def _state_key(self) -> tuple:
        key = []
        for t in (*self.parameters(), *self.buffers()):
            try:
                version = t._version
            except RuntimeError:  # inference tensors carry no version counter
                version = -1
            key.append((t.data_ptr(), version, t.dtype, t.device))
        return tuple(key)

    def _fused_key(self) -> Optional[tuple]:
        """The state key of the fused program when it is on and computes what the module tree would, else None.
        It reads the weights, not the modules: it cannot give the parameters gradients, run forward hooks, or see
        modules swapped in (peft's LoRA layers, say), so those run the module tree."""
        if not self._fused_enabled or self.training or self._grads_needed():
            return None
        key = self._state_key()
        return key if self._tree_allows_fusion(key) else None

    def _grads_needed(self) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())

    def _tree_allows_fusion(self, key: tuple) -> bool:
        """No forward hooks and no foreign modules. The module list is cached with the program (walking the
        tree every call costs far more than checking a list) and dropped with it when the parameters change;
        a module swapped in without parameters needs `optimize_for_inference` again."""
        if self._fused_cache.get("key") != key:  # parameters changed: the program and module list are stale
            self._fused_cache.clear()
            self._fused_cache["key"] = key
        tree = self._fused_cache.get("tree")
        if tree is None:
            mods = [m for m in self.modules() if m is not self]  # the encoder's own hooks run around either path
            foreign = any(not type(m).__module__.startswith(("torch.", "fastvlm.")) for m in mods)
            tree = self._fused_cache["tree"] = (mods, foreign)
        mods, foreign = tree
        return not foreign and not any(m._forward_hooks or m._forward_pre_hooks for m in mods)

    def fused_program(self, key: Optional[tuple] = None):
        """The fused program for the current parameters (built, or rebuilt after a change, on demand)."""
        from .fused import FusedFastViTHD

        key = self._state_key() if key is None else key
        program = self._fused_cache.get("program")
        if program is None or self._fused_cache.get("key") != key:
            tree = self._fused_cache.get("tree") if self._fused_cache.get("key") == key else None
            self._fused_cache.clear()
            if tree is not None:
                self._fused_cache["tree"] = tree
            with torch.no_grad():
                program = FusedFastViTHD(self)
            program.set_onednn(self._fused_onednn)
            if self._fused_compile is not None:
                program = torch.compile(program, **self._fused_compile)
            self._fused_cache.update(program=program, key=key)
        return program

    MAX_CUDA_GRAPHS = 4  # input shapes whose graphs (and their activation memory) are kept, least recent dropped
    # Batches and larger images run eagerly: their kernels are long enough to hide the host's launches, a graph
    # would keep their activation memory from the LLM, and a server's varying batch sizes would keep capturing.
    # One 2048x2048 image still gains (H200, bf16: 27 against 38 ms).
    CUDA_GRAPH_MAX_PIXELS = 2048 * 2048
    _graph_lock = threading.Lock()

    def _replay_cuda_graph(self, program, x: torch.Tensor) -> torch.Tensor:
        """program(x) replayed from a CUDA graph captured for x's shape, dtype, layout and device.
        The graphs live in the fused cache, so a change to the weights drops them with the program."""
        if torch.cuda.is_current_stream_capturing():  # inside someone else's capture: just record the kernels
            return program(x)
        with self._graph_lock:  # one input buffer per graph: callers on other threads (and streams) take turns
            graphs = self._fused_cache.setdefault("cuda_graphs", {})
            gkey = (tuple(x.shape), x.stride(), x.dtype, x.device, torch.is_inference_mode_enabled())
            entry = graphs.pop(gkey, None)
            if entry is None:
                while len(graphs) >= self.MAX_CUDA_GRAPHS:
                    # dicts keep insertion order: the least recently used; its last replay may still be running
                    # on another stream, reading the input buffer about to be freed
                    graphs.pop(next(iter(graphs)))[3].synchronize()
                try:
                    entry = _capture_cuda_graph(program, x)
                except RuntimeError as e:  # a GPU, driver or build whose capture fails: run eagerly from now on
                    self._fused_cuda_graphs = False
                    warnings.warn(f"the encoder's CUDA graph capture failed ({str(e).strip()[:200]}); it runs eagerly "
                                  "from now on. If CUDA memory errors follow, restart with FASTVLM_NO_CUDA_GRAPHS=1, "
                                  "which skips the attempt", RuntimeWarning, stacklevel=2)
                    return program(x)
            graphs[gkey] = entry
            graph, static_in, static_out, done = entry
            with torch.cuda.device(x.device):
                stream = torch.cuda.current_stream()
                stream.wait_event(done)  # the last replay's output copied out, on whichever stream it ran
                static_in.copy_(x)
                graph.replay()
                out = static_out.clone()  # the next replay overwrites static_out
                done.record(stream)
            return out

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each stage's activations in backward: ~1 extra forward, far less memory at 1024 px."""
        self.grad_checkpointing = enable

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialisation for training from scratch (a no-op on the meta device)."""
        if any(p.is_meta for p in self.parameters()):
            return
        ls = self.config.layer_scale_init_value
        for m in self.modules():
            # As the reference (Apple's FastViT/MCi `cls_init_weights`): truncated normal (std 0.02) for linear
            # layers; convolutions keep PyTorch's default initialisation, except ConvFFN's, which that block's
            # own rule below gives the same normal (as the reference's ConvFFN does). (std 0.02 on every conv, as
            # before session 21, shrinks each conv's output by 20-200x, so an untrained encoder's features were ~0.)
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                m.reset_parameters()
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()
            elif isinstance(m, LayerNormChannel):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Block-level rules last, so they override the generic conv init above.
        for m in self.modules():
            if m is not self and hasattr(m, "init_weights"):
                m.init_weights(ls)

    @torch.no_grad()
    def reparameterize(self) -> "FastViTHD":
        """Fuse every train-time branch in place; the state dict becomes the checkpoint layout."""

        def fuse(module: nn.Module) -> None:
            for child in module.children():
                # A reparameterisable block fuses its own sub-blocks (RepMixer needs the
                # unfused mixer/norm branches), so do not descend into it.
                if hasattr(child, "reparameterize"):
                    child.reparameterize()
                else:
                    fuse(child)

        fuse(self)
        self.config = dataclasses.replace(self.config, inference_mode=True)
        return self

    # ------------------------------------------------------------------ forward

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ImageError unless x is float [B, 3, H, W] with H and W multiples of the patch size."""
        if not isinstance(x, torch.Tensor):
            raise ImageError(f"expected a pixel tensor of shape [batch, 3, height, width], got {type(x).__name__}")
        if x.dim() != 4:
            raise ImageError(f"expected pixel values of shape [batch, 3, height, width], got shape {list(x.shape)}")
        if x.shape[1] != IN_CHANNELS:
            hint = "; it looks channels-last (HWC): permute to [B, 3, H, W]" if x.shape[-1] == IN_CHANNELS else ""
            raise ImageError(f"expected 3 colour channels (RGB) in dim 1, got shape {list(x.shape)}{hint}")
        if not x.is_floating_point():
            raise ImageError(f"pixel values must be floating point (scaled to [0, 1]), got dtype {x.dtype}")
        p = self.patch_size
        for name, side in (("height", x.shape[2]), ("width", x.shape[3])):
            if side == 0 or side % p:
                lower, upper = (side // p) * p, (side // p + 1) * p
                sizes = f"{lower} or {upper}" if lower else f"{upper}"
                raise ImageError(
                    f"image {name} {side} is not a multiple of {p} (the encoder's stride); resize it to {sizes}"
                )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> conv_exp output [B, out_channels, H/patch, W/patch]."""
        self.check_input(x)
        key = self._fused_key()
        if key is not None:
            program = self.fused_program(key)
            if (self._fused_cuda_graphs and x.is_cuda and x.shape[0] == 1
                    and x.shape[2] * x.shape[3] <= self.CUDA_GRAPH_MAX_PIXELS
                    and not (x.requires_grad and torch.is_grad_enabled())
                    and not torch.is_autocast_enabled()):  # a graph replays the kernels of its capture's dtypes
                return self._replay_cuda_graph(program, x)
            return program(x)
        x = self.patch_embed(x)
        use_ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for module in self.network:
            if use_ckpt:
                # the backward pass runs the module again: its BatchNorms must not count that batch twice
                x = checkpoint(module, x, use_reentrant=False,
                               context_fn=lambda m=module: (contextlib.nullcontext(), _frozen_batchnorm_stats(m)))
            else:
                x = module(x)
        return self.conv_exp(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> tokens [B, (H/patch)*(W/patch), out_channels], row-major, no CLS token."""
        return self.forward_features(x).flatten(2).transpose(1, 2)


def _capture_cuda_graph(program, x: torch.Tensor):
    """(graph, input buffer, output buffer, event) for program on x's shape (`fastvlm.graphs.capture`: two
    runs on a side stream first, so that cuDNN's algorithm search happens outside the capture)."""
    from ..graphs import capture

    with torch.cuda.device(x.device):
        static_in = x.clone()
        graph, static_out = capture(lambda: program(static_in), x.device, warmup=2)
        done = torch.cuda.Event()
        done.record()
    return graph, static_in, static_out, done


def build_encoder(config: Optional[VisionConfig] = None, *, attn_impl: str = "eager",
                  device: Optional[torch.device | str] = None, dtype: Optional[torch.dtype] = None) -> FastViTHD:
    """Build a FastViTHD (randomly initialised) and move it to device/dtype."""
    model = FastViTHD(config, attn_impl=attn_impl)
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    return model
