"""The training loop, on accelerate: one CPU/GPU, DDP (``torchrun`` / ``accelerate launch``), FSDP.

What a step is. A step consumes one *global batch* of ``train.global_batch_size``
samples: ``gradient_accumulation_steps`` micro-batches on each of the processes. The
loss of the step is the mean cross-entropy over every supervised token of the global
batch (the token count is summed over micro-batches and processes before the backward
passes), so the gradient does not depend on how the batch is split: one process with
per-device batch B and two with B/2 compute the same update (up to float rounding).

Data order. The sampler orders each epoch from (seed, epoch) alone and each process
takes its share of each global batch (:mod:`fastvlm.train.collate`); a checkpoint
stores the epoch and the number of steps done in it, so a resumed run continues with
exactly the batches the interrupted one would have seen and, on a deterministic device,
ends with bit-identical weights.

Text-only batches. When a micro-batch has no image while the encoder or projector
train, their parameters enter the loss multiplied by 0 (LLaVA feeds a zero image with
every text-only sample for the same reason): every trainable parameter then takes part in
every step, which DDP requires, and the update is the same as without it.

Outputs under ``output.dir``: ``recipe.yaml`` (the effective recipe), ``metrics.jsonl``
(one JSON object per logged step / evaluation), ``step_N/`` checkpoints
(:mod:`fastvlm.train.checkpointing`), ``final/`` (the model in the fastvlm layout, LoRA
merged and the encoder fused, with its tokenizer), ``final_apple/`` if configured,
``summary.json`` and ``tensorboard/`` when TensorBoard is installed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import time
from typing import Optional

import torch
from torch import nn

from ..errors import EARLIER_STEP_HINT, CheckpointError, ConfigError
from . import build
from . import checkpointing as ckpt
from .collate import DataCollator, GlobalBatchSampler, eval_batches
from .data import SKIP_LOGGER, ConversationDataset, DataError
from .recipe import Recipe

logger = logging.getLogger("fastvlm.train")


class TrainStep(nn.Module):
    """The module accelerate wraps: FastVLM forward + loss, with the zero-image term for text-only batches.

    Returns the sum of token cross-entropies divided by ``num_items`` (so ``num_items=1``
    gives the plain sum, used for validation).
    """

    def __init__(self, vlm: nn.Module) -> None:
        super().__init__()
        self.vlm = vlm
        self.touch_vision = False

    @property
    def config(self):
        """The LLM's config: accelerate sizes a DeepSpeed config's `auto` buckets from its hidden_size."""
        return self.vlm.language_model.config

    def forward(self, input_ids, attention_mask, labels, pixel_values=None, num_items: float = 1.0,
                image_features=None):
        # cached encoder outputs (data.cache_image_features): only the projector runs here
        projected = None if image_features is None else self.vlm.project_features(image_features)
        out = self.vlm(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, labels=labels,
                       image_features=projected, use_cache=False, num_items_in_batch=num_items)
        loss = out.loss
        if pixel_values is None and image_features is None and self.touch_vision and self.training:
            # No image in this micro-batch: give every trainable encoder/projector parameter a zero
            # gradient so DDP/FSDP see it used (a zero image through the encoder would do the same
            # but would also move BatchNorm statistics).
            touched = [p.reshape(-1)[:1].sum() for m in (self.vlm.vision_tower, self.vlm.mm_projector)
                       for p in m.parameters() if p.requires_grad]
            if touched:
                loss = loss + 0.0 * torch.stack(touched).sum().float()
        return loss


def _has_gpu() -> bool:
    if torch.cuda.is_available():
        return True
    return bool(getattr(torch, "xpu", None) and torch.xpu.is_available())


def resolve_mixed_precision(value: str, cpu: bool) -> str:
    if value != "auto":
        return value
    from ..model import cuda_has_native_bf16

    if not cpu and cuda_has_native_bf16():  # emulated bf16 (T4, V100) would be slower than fp32
        return "bf16"
    return "no"


def _to(batch: dict, device) -> dict:
    out = dict(batch)
    for k in ("input_ids", "attention_mask", "labels", "pixel_values", "image_features"):
        if out.get(k) is not None:
            out[k] = out[k].to(device, non_blocking=True)
    return out


@contextlib.contextmanager
def _whole_parameters():
    """Build the model with whole parameters under DeepSpeed ZeRO-3 too. accelerate registers the config with
    transformers, whose `from_config` would then create the LLM partitioned (zero.Init), which fails on its
    rotary buffers and would leave our weight loading only a rank's shard; DeepSpeed partitions the whole model
    when accelerate prepares it instead (each process holds it whole until then)."""
    try:
        from transformers.integrations import deepspeed as hf_ds
    except ImportError:  # pragma: no cover
        yield
        return
    ref = getattr(hf_ds, "_hf_deepspeed_config_weak_ref", None)
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = ref


# what a resumed optimizer takes from its checkpoint, per parameter group: a recipe that changes them would be
# written down but not followed
RESTORED_GROUP_KEYS = ("initial_lr", "weight_decay", "betas", "eps")


def restored_optim_changes(new_groups: list, saved_groups: list) -> list[str]:
    """What the recipe's optimizer groups set differently from a checkpoint's (its values would win)."""
    changed = []
    for new, old in zip(new_groups, saved_groups):
        for k in RESTORED_GROUP_KEYS:
            a, b = old.get(k), new.get(k)
            if a is None or b is None:
                continue
            same = list(a) == list(b) if isinstance(a, (list, tuple)) else float(a) == float(b)
            if not same:
                what = "lr" if k == "initial_lr" else k
                changed.append(f"{what} of group {new.get('name', '?')}: {a!r} -> {b!r}")
    return changed


def frozen_weights_fingerprint(model: nn.Module) -> Optional[dict]:
    """SHA-256 of the names and of the values of the parameters that do not train (in name order), or None if all
    train."""
    import hashlib

    frozen = sorted(((n, p) for n, p in model.named_parameters() if not p.requires_grad), key=lambda x: x[0])
    if not frozen:
        return None
    names, values = hashlib.sha256(), hashlib.sha256()
    for name, p in frozen:
        names.update(f"{name}:{tuple(p.shape)};".encode())
        values.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return {"names": names.hexdigest(), "values": values.hexdigest()}


def _untied_missing(model, missing: list[str]) -> list[str]:
    """Missing keys that matter: a tied LM head is the embedding, which the state holds."""
    tied = getattr(model.language_model.config, "tie_word_embeddings", False)
    return [k for k in missing if not (tied and k.endswith("lm_head.weight"))]


def deepspeed_data_problem(has_images, world_size: int) -> Optional[str]:
    """Why DeepSpeed cannot train this data with `world_size` processes, or None. Its collectives follow the
    modules each process runs: a process with a text-only micro-batch would skip the encoder and projector while
    the others run them (ZeRO-3's gathers hang, ZeRO-2's gradient buckets mismatch). DDP and FSDP have
    TrainStep's zero-gradient path for this."""
    import numpy as np

    has_images = np.asarray(has_images, dtype=bool)
    if world_size > 1 and has_images.any() and not has_images.all():
        return (f"DeepSpeed with {world_size} processes needs an image in every sample, and "
                f"{int((~has_images).sum())} of the {len(has_images)} training records are text-only: train with "
                "DDP or FSDP, or without the text-only records")
    return None


def deepspeed_config_problem(ds_config: dict, recipe, accum: Optional[int] = None) -> Optional[str]:
    """Why a DeepSpeed config cannot run `recipe`, or None. The trainer builds its own data loader (accelerate
    cannot fill in `auto` micro-batches from it), and its checkpoints do not cover DeepSpeed's partitioned state."""
    if recipe.output.save_every:
        return ("checkpoints under DeepSpeed are not implemented (its optimizer state is partitioned in its own "
                "format): set output.save_every: 0, or train with DDP / FSDP")
    micro = ds_config.get("train_micro_batch_size_per_gpu")
    if micro in (None, "auto"):
        return (f"the DeepSpeed config must set train_micro_batch_size_per_gpu to the recipe's "
                f"train.per_device_batch_size ({recipe.train.per_device_batch_size}), not {micro!r}: pass a "
                "config file (accelerate launch --deepspeed_config_file fastvlm/recipes/ds_zero2.json) and set it there")
    if int(micro) != recipe.train.per_device_batch_size:
        return (f"the DeepSpeed config's train_micro_batch_size_per_gpu is {micro}, but the recipe's "
                f"train.per_device_batch_size is {recipe.train.per_device_batch_size}: set them equal")
    # DeepSpeed clips with its own value (accelerate fills 'auto' with 1.0, a missing key is DeepSpeed's 0: none)
    # and accelerator.clip_grad_norm_ does nothing under it, so the recipe's must be the config's
    clip = ds_config.get("gradient_clipping", 0.0)
    clip = 1.0 if clip == "auto" else float(clip or 0.0)
    if clip != float(recipe.optim.max_grad_norm or 0.0):
        return (f"the DeepSpeed config's gradient_clipping is {ds_config.get('gradient_clipping', 'missing (0)')}"
                f"{' (1.0)' if ds_config.get('gradient_clipping') == 'auto' else ''}, but the recipe's "
                f"optim.max_grad_norm is {recipe.optim.max_grad_norm}: set them equal")
    # DeepSpeed steps its optimizer every gradient_accumulation_steps micro-batches (accelerate fills a missing
    # key with 1 and keeps a number that differs from the recipe's, with only a log line)
    gas = ds_config.get("gradient_accumulation_steps", 1)
    if accum is not None and gas != "auto" and int(gas) != accum:
        return (f"the DeepSpeed config's gradient_accumulation_steps is {gas}, but the recipe accumulates {accum} "
                "micro-batches per step: set it to \"auto\" (or to that number)")
    return None


class Trainer:
    """Runs one recipe. ``Trainer(recipe).train()`` returns the run summary (also written to summary.json)."""

    def __init__(self, recipe: Recipe, *, progress: bool = True) -> None:
        self.recipe = recipe
        self.progress = progress

    # ------------------------------------------------------------------ set-up
    def _setup_accelerator(self) -> None:
        from accelerate import Accelerator, PartialState

        r = self.recipe
        cpu = r.train.cpu or not _has_gpu()
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
            import importlib.util

            if importlib.util.find_spec("deepspeed") is None:
                raise ConfigError("the accelerate config asks for DeepSpeed, which is not installed: pip install "
                                  "deepspeed, or train with DDP / FSDP")
        state = PartialState(cpu=cpu)
        self.world_size = state.num_processes
        self.rank = state.process_index
        self.accum = r.accumulation_steps(self.world_size)
        self.mixed_precision = resolve_mixed_precision(r.train.mixed_precision, cpu)
        self.accelerator = Accelerator(cpu=cpu, mixed_precision=self.mixed_precision,
                                       gradient_accumulation_steps=self.accum, step_scheduler_with_optimizer=False)
        if self.accelerator.gradient_accumulation_steps != self.accum:
            # accelerate takes ACCELERATE_GRADIENT_ACCUMULATION_STEPS (accelerate launch --gradient_accumulation_steps)
            # over the argument and would then skip optimizer steps the loop counts
            raise ConfigError(f"accelerate was told to accumulate {self.accelerator.gradient_accumulation_steps} "
                              f"micro-batches (ACCELERATE_GRADIENT_ACCUMULATION_STEPS or accelerate launch "
                              f"--gradient_accumulation_steps), but the recipe needs {self.accum} "
                              f"(train.global_batch_size / (per_device_batch_size x {self.world_size} processes)): "
                              "drop that setting and size the batch in the recipe")
        self.is_main = self.accelerator.is_main_process
        self.device = self.accelerator.device
        from accelerate.utils import DistributedType

        self.is_fsdp = self.accelerator.distributed_type == DistributedType.FSDP
        self.is_deepspeed = self.accelerator.distributed_type == DistributedType.DEEPSPEED
        for engine, env, active in (("FSDP", "ACCELERATE_USE_FSDP", self.is_fsdp),
                                    ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED", self.is_deepspeed)):
            if os.environ.get(env, "").lower() in ("1", "true") and not active:
                # accelerate falls back to plain DDP (or one process) on CPUs without a word
                raise ConfigError(f"the accelerate config asks for {engine}, but accelerate set up "
                                  f"{self.accelerator.distributed_type.value} here ({engine} needs CUDA GPUs); "
                                  "on CPUs train with DDP: torchrun --nproc_per_node N -m fastvlm.cli train ...")
        if self.is_deepspeed:  # before any model is built: both would otherwise fail late, or train wrongly
            problem = deepspeed_config_problem(self.accelerator.state.deepspeed_plugin.deepspeed_config, r,
                                               self.accum)
            if problem:
                raise ConfigError(problem)
        if self.is_fsdp and self.mixed_precision != "no":
            # FSDP's own mixed precision would cast the encoder's parameters to bf16 while its
            # BatchNorm statistics stay fp32, which BatchNorm refuses. Keep FSDP in fp32 and
            # compute in bf16 through autocast (which keeps BatchNorm in fp32).
            self.accelerator.state.fsdp_plugin.set_mixed_precision("fp32", override=True)
        if not self.is_main:
            logging.getLogger("fastvlm").setLevel(logging.ERROR)
            # a sample skipped at load time is seen only by the process that loaded it
            logging.getLogger(SKIP_LOGGER).setLevel(logging.WARNING)

    def _resume_target(self) -> Optional[str]:
        r, out = self.recipe, self.recipe.output.dir
        if r.output.resume == "auto":
            return ckpt.latest_checkpoint(out)
        if r.output.resume == "never":
            if ckpt.list_checkpoints(out):
                raise ConfigError(f"{out} already holds checkpoints of an earlier run; use --resume auto to continue "
                                  "it, or choose another --output-dir")
            return None
        path = r.output.resume
        ckpt.read_state(path)  # raises if incomplete
        return path

    def _build_data(self, model) -> None:
        r = self.recipe
        processor = model.processor
        common = dict(tokenizer=processor.tokenizer, num_image_tokens=model.num_image_tokens,
                      image_size=model.config.image_size, image_aspect_ratio=model.config.image_aspect_ratio,
                      system_prompt=model.config.system_prompt,
                      max_length=r.data.max_length or model.config.max_length, skip_bad=r.data.skip_bad,
                      check_images=r.data.check_images, add_missing_placeholder=r.data.add_missing_placeholder,
                      progress=self.progress and self.is_main)
        folders = r.data.image_folder or [None]
        if len(folders) == 1:
            folders = folders * len(r.data.train)
        # a missing file, or an image folder that is not one, is named with the recipe key that gave it
        for key, paths, kind in (("data.train", r.data.train, "file"), ("data.val", r.data.val or [], "file"),
                                 ("data.image_folder", r.data.image_folder or [], "folder"),
                                 ("data.val_image_folder", [r.data.val_image_folder] if r.data.val_image_folder
                                  else [], "folder")):
            for path in paths:
                if kind == "file" and os.path.isdir(path):
                    raise DataError(f"{key}: {path} is a folder; give a LLaVA-format .json or .jsonl file in it")
                if not (os.path.isfile(path) if kind == "file" else os.path.isdir(path)):
                    raise DataError(f"{key}: no such data {kind}: {path}")
        self.train_data = ConversationDataset(r.data.train, folders, **common)
        self.val_data = None
        if r.data.val:
            vfolder = r.data.val_image_folder or (r.data.image_folder[0] if r.data.image_folder else None)
            self.val_data = ConversationDataset(r.data.val, vfolder, **common)
        self.collator = DataCollator(processor.pad_token_id)
        self.sampler = GlobalBatchSampler(
            self.train_data.lengths, global_batch_size=r.train.global_batch_size, accumulation_steps=self.accum,
            world_size=self.world_size, rank=self.rank, seed=r.train.seed, group_by_length=r.data.group_by_length,
            has_images=self.train_data.has_images)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        if self.steps_per_epoch == 0:
            raise ConfigError(f"the training data has {len(self.train_data)} usable samples, fewer than one global "
                              f"batch ({r.train.global_batch_size}); lower train.global_batch_size")
        self.total_steps = r.train.max_steps or r.train.epochs * self.steps_per_epoch

    def _cache_image_features(self, vlm) -> None:
        """Encode every distinct image once (frozen encoder) and serve the features instead of pixels."""
        from .features import CachedFeatureDataset, FeatureCache

        datasets = [d for d in (self.train_data, self.val_data) if d is not None]
        autocast = self.accelerator.autocast if self.mixed_precision != "no" else None
        cache, path, key, first_use = None, None, None, None
        folder = self.recipe.data.feature_cache_dir
        if folder:
            from .features import cache_key, first_uses

            first_use = first_uses(datasets)  # reads every record once, for the key and, if needed, the build
            key = cache_key(vlm, datasets, self.mixed_precision, list(first_use))
            path = os.path.join(folder, f"features-{key[:24]}.safetensors")
            if os.path.exists(path):
                try:
                    cache = FeatureCache.load(path, key)
                    logger.info("loaded the encoder features of %d images from %s", len(cache), path)
                except DataError as e:  # unreadable: encode again and write it anew
                    logger.warning("%s; encoding the images again", e)
        loaded = cache is not None
        if cache is None:
            cache = FeatureCache.build(vlm, datasets, batch_size=self.recipe.train.per_device_batch_size,
                                       autocast=autocast, progress=self.progress and self.is_main,
                                       workers=self.recipe.data.num_workers, first_use=first_use)
            if path is not None and self.accelerator.is_local_main_process:  # one writer per machine
                cache.save(path, key)
        self.feature_cache = {"images": len(cache), "seconds": round(cache.seconds, 1)}
        if path is not None:
            self.feature_cache.update(file=path, loaded=loaded)
        self.train_data = CachedFeatureDataset(self.train_data, cache)
        if self.val_data is not None:
            self.val_data = CachedFeatureDataset(self.val_data, cache)

    def _loader(self, dataset, batch_sampler):
        from torch.utils.data import DataLoader

        workers = self.recipe.data.num_workers
        if workers:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=self.collator, num_workers=workers,
                          pin_memory=self.device.type == "cuda",
                          # its own generator: iterating never draws from the global RNG, so resuming
                          # mid-epoch leaves the RNG stream (dropout) exactly as the uninterrupted run has it
                          generator=torch.Generator().manual_seed(self.recipe.train.seed))

    # ------------------------------------------------------------------ state
    def _model_state(self) -> dict:
        """Full state dict of the FastVLM (all processes must call it under FSDP)."""
        if self.is_fsdp or self.is_deepspeed:
            state = self.accelerator.get_state_dict(self.model)
            return {k[len("vlm."):] if k.startswith("vlm.") else k: v for k, v in state.items()}
        return self.vlm.state_dict()

    def _weights_to_save(self, state: dict) -> dict:
        if self.recipe.output.checkpoint_weights == "full":
            return state
        keep = {n for n, p in self.vlm.named_parameters() if p.requires_grad}
        keep |= {build.clean_name(n) for n, p in self.vlm.named_parameters() if p.requires_grad}
        keep |= {n for n, _ in self.vlm.named_buffers()}
        return {k: v for k, v in state.items() if k in keep}

    def _optimizer_state(self) -> dict:
        if self.is_fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(self.model, self.optimizer.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.optimizer.state_dict()

    def _load_optimizer_state(self, state: dict) -> None:
        if self.is_fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.model, self.optimizer.optimizer, optim_state_dict=state,
                                     options=StateDictOptions(full_state_dict=True))
        else:
            self.optimizer.load_state_dict(state)

    def _trainer_state(self) -> dict:
        epoch, in_epoch = self.epoch, self.step_in_epoch
        if in_epoch >= self.steps_per_epoch:
            epoch, in_epoch = epoch + 1, 0
        from .. import __version__

        return {
            "step": self.step,
            "epoch": epoch,
            "step_in_epoch": in_epoch,
            "total_steps": self.total_steps,
            "samples_seen": self.samples_seen,
            "skipped_at_load": self._skipped_at_load_global(),
            "train_time_s": round(self.train_time_before + (time.time() - self.t_start), 3),
            "feature_cache": self.feature_cache,  # data.cache_image_features: images cached, seconds it took
            "last_loss": self.last_loss,
            "world_size": self.world_size,
            "gradient_accumulation_steps": self.accum,
            "checkpoint_weights": self.recipe.output.checkpoint_weights,
            "frozen_weights": self.frozen_fingerprint,
            "stage": self.recipe.stage,
            "sampler": self.sampler.state_dict(),
            "fastvlm_version": __version__,
        }

    def _skipped_at_load_examples(self) -> list[str]:
        """Samples skipped because their image failed to load, from every process (collective)."""
        msgs = self.skipped_at_load_msgs[:5]
        if self.world_size > 1:
            from accelerate.utils import gather_object

            msgs = gather_object([msgs])  # one list per process
            msgs = [m for part in msgs for m in part]
        return msgs

    def _skipped_at_load_global(self) -> int:
        t = torch.tensor([len(self.skipped_at_load_msgs)], dtype=torch.long, device=self.device)
        t = self.accelerator.reduce(t, reduction="sum") if self.world_size > 1 else t
        return int(t.item()) + self.skipped_at_load_before

    def save_checkpoint(self) -> str:
        out = self.recipe.output.dir
        acc = self.accelerator
        if self.is_main:
            ckpt.begin(out, self.step)
        acc.wait_for_everyone()
        tmp = os.path.join(out, f"step_{self.step}.tmp")
        model_state = self._model_state()
        optim_state = self._optimizer_state()
        state = self._trainer_state()  # collective (skip counts)
        if self.is_main:
            from ..checkpoints.io import save_state_dict

            save_state_dict(self._weights_to_save(model_state), tmp)
            ckpt.save_torch(optim_state, os.path.join(tmp, ckpt.OPTIMIZER_FILE))
            ckpt.save_torch(self.scheduler.state_dict(), os.path.join(tmp, ckpt.SCHEDULER_FILE))
            if self.accelerator.scaler is not None:  # fp16 loss scaling
                ckpt.save_torch(self.accelerator.scaler.state_dict(), os.path.join(tmp, ckpt.SCALER_FILE))
        del model_state, optim_state
        ckpt.save_torch(ckpt.capture_rng(), os.path.join(tmp, ckpt.rng_file(self.rank)))
        acc.wait_for_everyone()
        path = os.path.join(out, f"step_{self.step}")
        if self.is_main:
            path = ckpt.commit(out, self.step, state)
            ckpt.rotate(out, self.recipe.output.keep_last)
        acc.wait_for_everyone()
        self.last_saved_step = self.step
        return path

    def _load_weights(self, path: str) -> None:
        from ..checkpoints.io import load_state_dict

        state = load_state_dict(path, progress=False)
        mode = ckpt.read_state(path).get("checkpoint_weights", "full")
        try:
            missing, unexpected = self.vlm.load_state_dict(state, strict=False)
        except RuntimeError as e:  # tensors of other shapes: another model's checkpoint
            shapes = [line.strip() for line in str(e).splitlines() if "size mismatch" in line][:3]
            raise CheckpointError(f"cannot resume from {path}: it holds another model's weights "
                                  f"({'; '.join(shapes) or e}); resume only a run of the same model and recipe, "
                                  "or start a new output directory") from None
        if unexpected:
            raise CheckpointError(f"{path}: weights do not match the model built from the recipe: unexpected "
                                  f"{unexpected[:5]} (did the stage or LoRA settings change?)")
        if mode == "full":
            missing = _untied_missing(self.vlm, missing)
        else:
            trainable = {n for n, p in self.vlm.named_parameters() if p.requires_grad}
            missing = [k for k in missing if k in trainable]
        if missing:
            raise CheckpointError(f"{path}: checkpoint lacks weights {missing[:5]} of the model built from the recipe")

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        if self.val_data is None:
            return None
        n = len(self.val_data)
        if self.recipe.data.max_val_samples:
            n = min(n, self.recipe.data.max_val_samples)
        batches = eval_batches(n, self.recipe.train.per_device_batch_size, self.world_size, self.rank)
        loader = self._loader(self.val_data, batches)
        self.model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = torch.zeros((), dtype=torch.float64, device=self.device)
        for batch in loader:
            batch = _to(batch, self.device)
            loss_sum = self.model(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                  batch["pixel_values"], 1.0, batch.get("image_features"))
            total += loss_sum.detach().double()
            count += batch["num_label_tokens"]
        build.set_train_mode(self.vlm, self.recipe)
        if self.world_size > 1:
            total = self.accelerator.reduce(total, reduction="sum")
            count = self.accelerator.reduce(count, reduction="sum")
        return float(total / count) if count > 0 else None

    # ------------------------------------------------------------------ logging
    def _log(self, record: dict) -> None:
        if not self.is_main:
            return
        with open(os.path.join(self.recipe.output.dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])
                elif isinstance(v, dict):
                    for kk, vv in v.items():
                        self.tb.add_scalar(f"{k}/{kk}", vv, record["step"])

    def _truncate_metrics(self, step: int) -> None:
        """On resume, drop metrics of steps after the checkpoint (the killed run logged them; they rerun)."""
        path = os.path.join(self.recipe.output.dir, "metrics.jsonl")
        if not self.is_main or not os.path.isfile(path):
            return
        kept = []
        with open(path) as f:
            for line in f:
                try:
                    if json.loads(line).get("step", 0) <= step:
                        kept.append(line if line.endswith("\n") else line + "\n")
                except json.JSONDecodeError:
                    continue
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)

    def _open_tensorboard(self):
        if not (self.is_main and self.recipe.output.tensorboard):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # noqa: BLE001 - tensorboard is optional
            return None
        return SummaryWriter(os.path.join(self.recipe.output.dir, "tensorboard"))

    # ------------------------------------------------------------------ export
    def export(self) -> str:
        """final/ in the fastvlm layout (LoRA merged, encoder fused) and final_apple/ if configured."""
        out = self.recipe.output.dir
        acc = self.accelerator
        acc.wait_for_everyone()
        if self.is_fsdp or self.is_deepspeed:
            state = self._model_state()
            vlm = None
            if self.is_main:
                vlm = self._skeleton_with(state)
        else:
            vlm = self.vlm
        final = os.path.join(out, "final")
        if self.is_main:
            # the multi-branch encoder, if the model has one, goes beside the fused weights (final/train_form/),
            # where a later stage that trains the encoder picks it up (build.use_train_form_encoder)
            train_form = build.train_form_encoder_state(vlm)
            vlm = build.merged_for_export(vlm)
            for layout, name in (("fastvlm", "final"), ("apple", "final_apple")):
                if layout == "apple" and not self.recipe.output.export_apple:
                    continue
                target = os.path.join(out, name)
                tmp = target + ".tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                vlm.save_pretrained(tmp, layout=layout)
                if layout == "fastvlm" and train_form is not None:
                    from safetensors.torch import save_file

                    os.makedirs(os.path.join(tmp, os.path.dirname(build.TRAIN_FORM_FILE)), exist_ok=True)
                    save_file({k: v.contiguous() for k, v in train_form.items()},
                              os.path.join(tmp, build.TRAIN_FORM_FILE),
                              metadata={"format": "pt", "what": "FastViTHD, multi-branch (train-time) form"})
                ckpt.fsync_tree(tmp)
                if os.path.exists(target):
                    shutil.rmtree(target)
                os.rename(tmp, target)
                ckpt.fsync_dir(out)
        acc.wait_for_everyone()
        return final

    def _skeleton_with(self, state: dict):
        """A CPU copy of the model holding `state` (for sharded runs, where no process has the whole model)."""
        import copy

        from ..model import FastVLM

        with _whole_parameters():
            skel = FastVLM(copy.deepcopy(self.vlm.config), init_weights=False)
            skel.to_empty(device="cpu")
            if build.is_lora(self.vlm):
                build.apply_lora(skel, self.recipe)
        missing, unexpected = skel.load_state_dict({k: v.float().cpu() for k, v in state.items()}, strict=False)
        missing = _untied_missing(skel, missing)
        if missing or unexpected:  # to_empty left those tensors uninitialised: never export them
            raise CheckpointError(f"the gathered weights do not fit the model: missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]}")
        skel._restore_nonpersistent_buffers()
        skel._tie_if_needed()
        skel.processor = self.vlm.processor
        skel._train_form_encoder = getattr(self.vlm, "_train_form_encoder", None)
        return skel

    # ------------------------------------------------------------------ the run
    def train(self) -> dict:
        try:
            self._setup_accelerator()
            return self._train()
        finally:
            if getattr(self, "world_size", 1) == 1:
                # Forget accelerate's process-wide state so another run in this process (a notebook,
                # a test) may choose other settings, also after an error.
                from accelerate.state import AcceleratorState, GradientState

                AcceleratorState._reset_state(reset_partial_state=True)
                GradientState._reset_state()

    def _train(self) -> dict:
        from accelerate.utils import set_seed

        t_wall = time.time()
        r = self.recipe
        acc = self.accelerator
        out = r.output.dir
        if self.is_main:
            os.makedirs(out, exist_ok=True)
            stale = ckpt.remove_stale(out)
            if stale:  # a save that a crash cut short: the step before it is where the run resumes
                logger.warning("removed %s in %s: checkpoint(s) a stopped run was still writing",
                               ", ".join(sorted(stale)), out)
        acc.wait_for_everyone()
        resume_from = self._resume_target()
        resume_state = ckpt.read_state(resume_from) if resume_from else None

        set_seed(r.train.seed, device_specific=True)
        with _whole_parameters():
            vlm = build.build_model(r)
            build.apply_stage(vlm, r)
            # Checkpoints without the frozen weights (output.checkpoint_weights: trainable) take them from the
            # recipe's model on resume: it must be the same model, not just one of the same shapes. (Other frozen
            # parts, another stage or train.trainable, are the optimizer check's to name.)
            saved = (resume_state or {}).get("frozen_weights")
            self.frozen_fingerprint = None
            if r.output.checkpoint_weights != "full" and (r.output.save_every or saved):
                self.frozen_fingerprint = frozen_weights_fingerprint(vlm)
            if (saved and self.frozen_fingerprint and saved["names"] == self.frozen_fingerprint["names"]
                    and saved["values"] != self.frozen_fingerprint["values"]):
                source = f"model: {r.model}" if r.model else "the recipe's init"
                raise CheckpointError(f"cannot resume from {resume_from}: its run trained on other frozen weights "
                                      f"than {source} gives (the checkpoint holds only the trained ones); resume "
                                      "with the model it was trained from, or start a new output directory")
            if resume_from:
                self.vlm = vlm
                self._load_weights(resume_from)
        build.enable_gradient_checkpointing(vlm, r)
        self.vlm = vlm
        self._build_data(vlm)
        if self.is_deepspeed:
            problem = deepspeed_data_problem(self.train_data.has_images, self.world_size)
            if problem:
                raise ConfigError(problem)
        if resume_state and resume_state.get("total_steps") != self.total_steps:
            logger.warning("the checkpoint was written by a run of %s steps, this one has %s: the learning-rate "
                           "schedule changes from here", resume_state.get("total_steps"), self.total_steps)
        step_module = TrainStep(vlm)
        trainable = r.trainable_modules()
        # DDP/FSDP need every trainable parameter used. Under DeepSpeed the parameters are not touched from
        # outside their modules' forward (ZeRO-3 holds them as empty shards there): one process trains with text-only
        # batches as it likes, and several are refused above on data that mixes them with images.
        step_module.touch_vision = (trainable["vision_tower"] or trainable["mm_projector"]) and not self.is_deepspeed
        build.set_train_mode(vlm, r)
        if not self.is_deepspeed:
            vlm.to(self.device)  # so a fused optimizer sees the parameters where they will train
        self.feature_cache = None
        if r.data.cache_image_features:
            self._cache_image_features(vlm)
        optimizer = build.build_optimizer(vlm, r)
        # Together in one call: DeepSpeed needs that, and FSDP maps the optimizer onto its sharded parameters.
        self.model, self.optimizer = acc.prepare(step_module, optimizer)
        self.vlm = acc.unwrap_model(self.model).vlm
        inner = self.optimizer.optimizer
        if not isinstance(inner, torch.optim.Optimizer):  # DeepSpeed's ZeRO optimizer wraps the torch one and
            inner = inner.optimizer                      # steps it with that one's param_groups (and their lr)
        self.scheduler = build.build_scheduler(inner, r, self.total_steps)

        self.step = 0
        self.epoch = 0
        self.step_in_epoch = 0
        self.samples_seen = 0
        self.skipped_at_load_msgs: list[str] = []  # this process's, this session's
        self.skipped_at_load_before = 0
        self.train_time_before = 0.0
        self.last_loss = None
        self.last_saved_step = None
        if resume_state is not None:
            self.sampler.check_compatible(resume_state["sampler"])
            spe = self.steps_per_epoch
            where = (int(resume_state["epoch"]), int(resume_state["step_in_epoch"]))
            if where[1] > spe or int(resume_state["step"]) != where[0] * spe + where[1]:
                raise CheckpointError(
                    f"{os.path.join(resume_from, ckpt.STATE_FILE)}: step {resume_state['step']} does not fit epoch "
                    f"{where[0]}, step {where[1]} of its {spe} steps per epoch; the checkpoint is damaged or from "
                    f"another run: {EARLIER_STEP_HINT}")
            new_groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
            optim_state = ckpt.load_torch(os.path.join(resume_from, ckpt.OPTIMIZER_FILE))
            changed = restored_optim_changes(new_groups, optim_state.get("param_groups", []))
            if changed:
                raise ConfigError(f"cannot resume from {resume_from} with another optimizer setting "
                                  f"({'; '.join(changed[:4])}): resuming restores the optimizer and learning-rate "
                                  "schedule as the checkpoint has them. Resume with the recipe's earlier values, or "
                                  "start a new run from its weights (--set model=... in a new --output-dir)")
            try:
                self._load_optimizer_state(optim_state)
            except ValueError as e:  # torch: "loaded state dict has a different number of parameter groups", ...
                raise CheckpointError(f"cannot resume from {resume_from}: its optimizer state does not fit this run "
                                      f"({e}); did train.trainable or the learning-rate groups change? Resume "
                                      "with the recipe that wrote it, or start a new output directory") from None
            self.scheduler.load_state_dict(ckpt.load_torch(os.path.join(resume_from, ckpt.SCHEDULER_FILE)))
            scaler_path = os.path.join(resume_from, ckpt.SCALER_FILE)
            if self.accelerator.scaler is not None and os.path.isfile(scaler_path):
                self.accelerator.scaler.load_state_dict(ckpt.load_torch(scaler_path))
            self.step = int(resume_state["step"])
            self.epoch = int(resume_state["epoch"])
            self.step_in_epoch = int(resume_state["step_in_epoch"])
            self.samples_seen = int(resume_state["samples_seen"])
            self.skipped_at_load_before = int(resume_state.get("skipped_at_load", 0))
            self.train_time_before = float(resume_state.get("train_time_s", 0.0))
            self.last_loss = resume_state.get("last_loss")
            self.last_saved_step = self.step
            rng_path = os.path.join(resume_from, ckpt.rng_file(self.rank))
            if os.path.isfile(rng_path):
                ckpt.restore_rng(ckpt.load_torch(rng_path))
            else:
                logger.warning("%s has no RNG state for process %d (the run had %s processes); random streams "
                               "start from the seed", resume_from, self.rank, resume_state.get("world_size"))
            self._truncate_metrics(self.step)
            if self.is_main:
                logger.info("resuming from %s (step %d, epoch %d)", resume_from, self.step, self.epoch)
                if self.step >= self.total_steps:
                    logger.warning("%s is at step %d, at or past this run's %d steps: nothing is trained, the "
                                   "checkpoint is exported as the final model", resume_from, self.step,
                                   self.total_steps)

        if self.is_main:  # once the resume checks passed: the recipe the run follows from here
            import yaml

            with open(os.path.join(out, "recipe.yaml"), "w") as f:
                yaml.safe_dump(r.to_dict(), f, sort_keys=False)
        self.tb = self._open_tensorboard()
        self.t_start = time.time()
        summary = self._loop(resume_from)
        summary["wall_time_s"] = round(time.time() - t_wall, 3)
        if self.is_main:
            ckpt.write_json(os.path.join(out, "summary.json"), summary)
        if self.tb is not None:
            self.tb.close()
        acc.wait_for_everyone()
        acc.end_training()
        return summary

    def _loop(self, resume_from: Optional[str]) -> dict:
        from tqdm.auto import tqdm

        r, acc = self.recipe, self.accelerator
        W, A = self.world_size, self.accum
        G = r.train.global_batch_size
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not (self.is_main and self.progress), file=sys.stderr)
        group_names = [g["name"] for g in self.optimizer.param_groups]
        window_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        window_steps = 0
        window_samples = 0
        window_t = time.time()
        val_loss = None
        grad_norm = None
        max_norm = r.optim.max_grad_norm

        while self.step < self.total_steps:
            self.sampler.set_epoch(self.epoch, self.step_in_epoch)
            it = iter(self._loader(self.train_data, self.sampler))
            while self.step < self.total_steps and self.step_in_epoch < self.steps_per_epoch:
                micro = [next(it) for _ in range(A)]
                counts = torch.tensor([sum(b["num_label_tokens"] for b in micro),
                                       sum(b["num_samples"] for b in micro),
                                       sum(len(b["skipped"]) for b in micro)], dtype=torch.long, device=self.device)
                if W > 1:
                    counts = acc.reduce(counts, reduction="sum")
                n_tokens, n_samples, n_skipped = (int(x) for x in counts.tolist())
                self.skipped_at_load_msgs.extend(m for b in micro for m in b["skipped"])
                step_loss = torch.zeros((), dtype=torch.float64, device=self.device)
                if n_tokens > 0:
                    # Each micro-batch's loss is sum(CE) / (N / (W*A)): accelerate divides by A and DDP
                    # averages over W, which leaves sum(CE) / N over the whole global batch.
                    per_micro = n_tokens / (W * A)
                    for batch in micro:
                        batch = _to(batch, self.device)
                        with acc.accumulate(self.model):
                            loss = self.model(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                              batch["pixel_values"], per_micro, batch.get("image_features"))
                            acc.backward(loss)
                        step_loss += loss.detach().double() / (W * A)
                    if max_norm:
                        grad_norm = acc.clip_grad_norm_(self.model.parameters(), max_norm)
                    self.optimizer.step()
                else:
                    logger.warning("step %d has no supervised tokens (every sample skipped?); no update",
                                   self.step + 1)
                step_lrs = self.scheduler.get_last_lr()  # the rates this step's update used
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)

                self.step += 1
                self.step_in_epoch += 1
                self.samples_seen += n_samples
                window_loss += step_loss
                window_steps += 1
                window_samples += n_samples
                bar.update(1)

                if self.step % r.output.log_every == 0 or self.step == self.total_steps:
                    wl = acc.reduce(window_loss, reduction="sum") if W > 1 else window_loss
                    self.last_loss = float(wl) / window_steps
                    dt = max(time.time() - window_t, 1e-9)
                    lrs = dict(zip(group_names, step_lrs))
                    epoch_pos = self.epoch + self.step_in_epoch / self.steps_per_epoch
                    record = {"step": self.step, "epoch": round(epoch_pos, 4),
                              "loss": round(self.last_loss, 6), "lr": lrs,
                              "samples_per_s": round(window_samples / dt, 3)}
                    if grad_norm is not None:
                        record["grad_norm"] = round(float(grad_norm), 6)
                    if n_skipped:
                        record["skipped"] = n_skipped
                    self._log(record)
                    bar.set_postfix(loss=f"{self.last_loss:.4f}", lr=f"{max(lrs.values()):.2e}",  # the highest group's
                                    sps=f"{window_samples / dt:.1f}")
                    window_loss.zero_()
                    window_steps = window_samples = 0
                    window_t = time.time()

                if r.output.eval_every and self.step % r.output.eval_every == 0 and self.val_data is not None:
                    val_loss = self.evaluate()
                    self._log({"step": self.step, "val_loss": val_loss})

                if r.output.save_every and self.step % r.output.save_every == 0:
                    self.save_checkpoint()
            if self.step_in_epoch >= self.steps_per_epoch:
                self.epoch += 1
                self.step_in_epoch = 0
        bar.close()

        if self.val_data is not None and not (r.output.eval_every and self.step % r.output.eval_every == 0
                                              and val_loss is not None):
            val_loss = self.evaluate()
            self._log({"step": self.step, "val_loss": val_loss})
        if r.output.save_every and self.last_saved_step != self.step:
            self.save_checkpoint()
        trainable_params = build.trainable_summary(self.vlm)
        final = self.export()
        skipped_load = self._skipped_at_load_global()
        bad = dict(self.train_data.bad_counts)
        if skipped_load:
            bad["unreadable_image_at_load"] = bad.get("unreadable_image_at_load", 0) + skipped_load
        return {
            "steps": self.step,
            "total_steps": self.total_steps,
            "epochs": round(self.step / self.steps_per_epoch, 4),
            "samples": self.samples_seen,
            "train_records": len(self.train_data),
            "skipped_bad_records": self.train_data.num_bad + skipped_load,
            "skipped_by_kind": bad,
            "skipped_examples": (self.train_data.bad_examples + self._skipped_at_load_examples())[:5],
            "val_skipped_bad_records": self.val_data.num_bad if self.val_data is not None else 0,
            "image_placeholders_added": self.train_data.placeholders_added,
            "final_loss": self.last_loss,
            "final_val_loss": val_loss,
            "train_time_s": round(self.train_time_before + (time.time() - self.t_start), 3),
            "feature_cache": self.feature_cache,  # data.cache_image_features: images cached, seconds it took
            "world_size": W,
            "global_batch_size": G,
            "per_device_batch_size": r.train.per_device_batch_size,
            "gradient_accumulation_steps": A,
            "mixed_precision": self.mixed_precision,
            "device": str(self.device),
            "stage": r.stage,
            "trainable_parameters": trainable_params,
            "resumed_from": resume_from,
            "final_dir": final,
            "output_dir": r.output.dir,
        }


def train(recipe: Recipe, *, progress: bool = True) -> dict:
    """Train per `recipe`; returns the run summary."""
    return Trainer(recipe, progress=progress).train()


__all__ = ["TrainStep", "Trainer", "resolve_mixed_precision", "train"]
