"""Training recipes: one YAML file says what to train, on what data, and how.

Sections (every key is optional unless marked; unknown keys are errors):

    stage: stage1 | stage1.5 | stage2 | lora           (required)
    model: PATH            fine-tune a checkpoint (any layout FastVLM.from_pretrained reads)
    init:                  or build a new model (exactly one of model / init)
      preset: NAME         a preset architecture from fastvlm.config (required in init)
      vision: {...}        VisionConfig overrides (e.g. image_size, depths, inference_mode)
      text: {...}          language-model config overrides (hidden_size, num_hidden_layers, ...)
      language_model: DIR  initialise the LLM from a transformers checkpoint (e.g. Qwen2-0.5B-Instruct)
      vision_tower: PATH   initialise the encoder from safetensors (fastvlm/Apple or timm key names)
      seed: 0              seed of the random initialisation
    tokenizer: DIR         tokenizer directory (default: the checkpoint's, or init.language_model's)
    data:
      train: PATH | [PATH, ...]          (required) LLaVA JSON / JSONL files
      val: PATH | [PATH, ...]
      image_folder: DIR | [DIR, ...]     image paths in the files are relative to this
      val_image_folder: DIR              default: image_folder
      image_size: null                   train at another resolution (multiple of 64)
      max_length: null                   token limit after image expansion (default: the model's)
      skip_bad: false                    skip (log and count) bad records instead of stopping
      check_images: open                 open | exists | none: how images are checked up front
      group_by_length: true
      num_workers: 2
      max_val_samples: null
      cache_image_features: false        encode each image once with the frozen encoder and train on the
                                         stored features (needs a frozen vision tower; memory: images x
                                         tokens x channels x 4 bytes, per process); images are
                                         decoded in num_workers threads while it is built
      feature_cache_dir: null            keep that cache on disk here, keyed by a hash of the encoder's
                                         weights, the preprocessing and the image files: a resumed
                                         run, or another seed, loads it instead of encoding again
      add_missing_placeholder: false     a record with one image and no <image>: put one before its
                                         first question (counted and logged) instead of refusing it
    optim:
      lr: 2e-5               base learning rate
      lr_projector / lr_vision_tower / lr_language_model: null   per-module overrides
      weight_decay: 0.0      never applied to biases and normalisation weights
      betas: [0.9, 0.999]
      eps: 1e-8
      schedule: cosine       cosine | linear | constant (after warmup)
      warmup_ratio: 0.03
      warmup_steps: null     overrides warmup_ratio
      min_lr_ratio: 0.0      floor of the decay, as a fraction of the peak
      max_grad_norm: 1.0     0 or null: no clipping
    train:
      epochs: 1
      max_steps: null        stop (and size the schedule) at this many optimizer steps
      global_batch_size: 128 = per_device_batch_size x gradient accumulation x processes
      per_device_batch_size: 4
      gradient_accumulation_steps: null   derived from the two above and the process count
      gradient_checkpointing: false       the LLM's (transformers)
      vision_gradient_checkpointing: false
      mixed_precision: auto  auto (bf16 on GPUs that support it, else none) | no | bf16 | fp16
      seed: 42
      freeze_bn_stats: false keep the encoder's BatchNorm statistics fixed while it trains
      trainable: {}          override the stage: {vision_tower: bool, mm_projector: bool, language_model: bool}
      cpu: false             force CPU even when a GPU is present
    lora:                    used by stage: lora
      r: 128
      alpha: 256
      dropout: 0.05
      target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]
      train_vision_tower: false
    output:
      dir: runs/NAME         (required)
      save_every: 500        checkpoint every N optimizer steps (0: no step checkpoints, only final/)
      keep_last: 2           complete checkpoints to keep
      log_every: 10
      eval_every: 0          validation loss every N steps (0: only at the end, if val is given)
      resume: auto           auto | never | PATH of a step_N checkpoint
      export_apple: false    also write final_apple/ in Apple's layout
      checkpoint_weights: full   full | trainable (trainable: frozen weights are rebuilt from the recipe on resume)
      tensorboard: true      write TensorBoard events when tensorboard is installed

Relative paths are relative to the current directory. ``--set section.key=value``
overrides any key from the command line (values are parsed as YAML).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Optional, Union

from ..errors import ConfigError

STAGES = ("stage1", "stage1.5", "stage2", "lora")
SCHEDULES = ("cosine", "linear", "constant")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
MODULES = ("vision_tower", "mm_projector", "language_model")


@dataclass
class InitSpec:
    preset: str = ""
    vision: dict = field(default_factory=dict)
    text: dict = field(default_factory=dict)
    language_model: Optional[str] = None
    vision_tower: Optional[str] = None
    seed: int = 0


@dataclass
class DataSpec:
    train: list = field(default_factory=list)
    val: list = field(default_factory=list)
    image_folder: list = field(default_factory=list)
    val_image_folder: Optional[str] = None
    image_size: Optional[int] = None
    max_length: Optional[int] = None
    skip_bad: bool = False
    check_images: str = "open"
    group_by_length: bool = True
    num_workers: int = 2
    max_val_samples: Optional[int] = None
    cache_image_features: bool = False
    feature_cache_dir: Optional[str] = None
    add_missing_placeholder: bool = False


@dataclass
class OptimSpec:
    lr: float = 2e-5
    lr_projector: Optional[float] = None
    lr_vision_tower: Optional[float] = None
    lr_language_model: Optional[float] = None
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    schedule: str = "cosine"
    warmup_ratio: float = 0.03
    warmup_steps: Optional[int] = None
    min_lr_ratio: float = 0.0
    max_grad_norm: Optional[float] = 1.0


@dataclass
class TrainSpec:
    epochs: int = 1
    max_steps: Optional[int] = None
    global_batch_size: int = 128
    per_device_batch_size: int = 4
    gradient_accumulation_steps: Optional[int] = None
    gradient_checkpointing: bool = False
    vision_gradient_checkpointing: bool = False
    mixed_precision: str = "auto"
    seed: int = 42
    freeze_bn_stats: bool = False
    trainable: dict = field(default_factory=dict)
    cpu: bool = False


@dataclass
class LoraSpec:
    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    target_modules: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                          "gate_proj", "up_proj", "down_proj"])
    train_vision_tower: bool = False


@dataclass
class OutputSpec:
    dir: str = ""
    save_every: int = 500
    keep_last: int = 2
    log_every: int = 10
    eval_every: int = 0
    resume: str = "auto"
    export_apple: bool = False
    checkpoint_weights: str = "full"
    tensorboard: bool = True


@dataclass
class Recipe:
    stage: str = ""
    model: Optional[str] = None
    init: Optional[InitSpec] = None
    tokenizer: Optional[str] = None
    data: DataSpec = field(default_factory=DataSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    lora: LoraSpec = field(default_factory=LoraSpec)
    output: OutputSpec = field(default_factory=OutputSpec)
    # where the recipe came from (not a recipe key)
    source: Optional[str] = field(default=None, compare=False)

    # ------------------------------------------------------------------ derived values
    def trainable_modules(self) -> dict[str, bool]:
        """Which of vision_tower / mm_projector / language_model train (LoRA: the LLM's adapters)."""
        if self.stage == "stage1":
            out = {"vision_tower": False, "mm_projector": True, "language_model": False}
        elif self.stage == "lora":
            out = {"vision_tower": self.lora.train_vision_tower, "mm_projector": True, "language_model": True}
        else:
            out = {"vision_tower": True, "mm_projector": True, "language_model": True}
        out.update(self.train.trainable)
        return out

    def module_lr(self, module: str) -> float:
        value = getattr(self.optim, f"lr_{module.replace('mm_projector', 'projector')}")
        return float(self.optim.lr if value is None else value)

    def accumulation_steps(self, world_size: int) -> int:
        per_step = self.train.per_device_batch_size * world_size
        gbs = self.train.global_batch_size
        if gbs % per_step:
            raise ConfigError(
                f"train.global_batch_size={gbs} is not a multiple of per_device_batch_size "
                f"({self.train.per_device_batch_size}) x processes ({world_size}); change one of them")
        accum = gbs // per_step
        given = self.train.gradient_accumulation_steps
        if given is not None and given != accum:
            raise ConfigError(
                f"train.gradient_accumulation_steps={given} disagrees with global_batch_size={gbs} = "
                f"per_device_batch_size {self.train.per_device_batch_size} x processes {world_size} x {accum}; "
                "leave gradient_accumulation_steps unset to derive it")
        return accum

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source", None)
        if d["init"] is None:
            d.pop("init")
        return d

    def validate(self) -> "Recipe":
        if self.stage not in STAGES:
            raise ConfigError(f"stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        if (self.model is None) == (self.init is None):
            raise ConfigError("give exactly one model source: `model: PATH` (fine-tune a checkpoint) or "
                              "`init: {preset: NAME, ...}` (a new model)")
        if self.init is not None:
            if not self.init.preset:
                raise ConfigError("init.preset is required (e.g. fastvlm-0.5b)")
            from ..config import PRESETS

            if self.init.preset not in PRESETS:
                raise ConfigError(f"init.preset: unknown preset {self.init.preset!r}; choose one of "
                                  f"{', '.join(sorted(PRESETS))}")
            if self.tokenizer is None and self.init.language_model is None:
                raise ConfigError("a new model (init) needs `tokenizer: DIR` or init.language_model")
        d = self.data
        if not d.train:
            raise ConfigError("data.train is required: one LLaVA JSON/JSONL file or a list of them")
        if d.image_folder and len(d.image_folder) not in (1, len(d.train)):
            raise ConfigError(f"data.image_folder has {len(d.image_folder)} entries for {len(d.train)} train files; "
                              "give one folder for all files or one per file")
        from .data import CHECK_IMAGES

        if d.check_images not in CHECK_IMAGES:
            raise ConfigError(f"data.check_images must be one of {', '.join(CHECK_IMAGES)}, got {d.check_images!r}")
        if d.image_size is not None and (d.image_size <= 0 or d.image_size % 64):
            raise ConfigError(f"data.image_size must be a positive multiple of 64, got {d.image_size}")
        _positive("data.max_length", d.max_length, allow_none=True)
        _non_negative("data.num_workers", d.num_workers)
        o = self.optim
        if o.schedule not in SCHEDULES:
            raise ConfigError(f"optim.schedule must be one of {', '.join(SCHEDULES)}, got {o.schedule!r}")
        for name in ("lr", "lr_projector", "lr_vision_tower", "lr_language_model"):
            v = getattr(o, name)
            if v is not None and not v > 0:
                raise ConfigError(f"optim.{name} must be > 0, got {v}")
        if not 0 <= o.warmup_ratio < 1:
            raise ConfigError(f"optim.warmup_ratio must be in [0, 1), got {o.warmup_ratio}")
        if not 0 <= o.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
        if o.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {o.weight_decay}")
        if len(o.betas) != 2 or not all(0 <= float(b) < 1 for b in o.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {o.betas}")
        o.betas = [float(b) for b in o.betas]
        t = self.train
        _positive("train.epochs", t.epochs)
        _positive("train.max_steps", t.max_steps, allow_none=True)
        _positive("train.global_batch_size", t.global_batch_size)
        _positive("train.per_device_batch_size", t.per_device_batch_size)
        _positive("train.gradient_accumulation_steps", t.gradient_accumulation_steps, allow_none=True)
        if t.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(f"train.mixed_precision must be one of {', '.join(MIXED_PRECISION)}, "
                              f"got {t.mixed_precision!r}")
        for k, v in t.trainable.items():
            if k not in MODULES:
                raise ConfigError(f"train.trainable: unknown module {k!r} (expected {', '.join(MODULES)})")
            if not isinstance(v, bool):
                raise ConfigError(f"train.trainable.{k} must be true or false, got {v!r}")
        if self.stage == "lora":
            _positive("lora.r", self.lora.r)
            _positive("lora.alpha", self.lora.alpha)
            if not 0 <= self.lora.dropout < 1:
                raise ConfigError(f"lora.dropout must be in [0, 1), got {self.lora.dropout}")
            if not self.lora.target_modules:
                raise ConfigError("lora.target_modules is empty")
        else:
            default = dataclasses.asdict(LoraSpec())
            changed = sorted(k for k, v in dataclasses.asdict(self.lora).items() if v != default[k])
            if changed:
                raise ConfigError(f"lora settings ({', '.join('lora.' + k for k in changed)}) apply only to stage: "
                                  f"lora; this recipe's stage is {self.stage}, which trains its modules in full: set "
                                  "stage: lora, or drop the lora settings")
        if d.feature_cache_dir and not d.cache_image_features:
            raise ConfigError("data.feature_cache_dir keeps the cache of data.cache_image_features on disk; set "
                              "data.cache_image_features: true too, or leave feature_cache_dir null")
        if d.cache_image_features and self.trainable_modules()["vision_tower"]:
            raise ConfigError("data.cache_image_features needs a frozen vision tower (stage1, or "
                              "train.trainable.vision_tower: false): a training encoder changes its features")
        if not any(self.trainable_modules().values()):
            raise ConfigError("nothing to train: every module is frozen (check stage and train.trainable)")
        out = self.output
        if not out.dir:
            raise ConfigError("output.dir is required (or pass --output-dir)")
        if os.path.exists(out.dir) and not os.path.isdir(out.dir):
            raise ConfigError(f"output.dir {out.dir} exists and is not a directory")
        _non_negative("output.save_every", out.save_every)
        _positive("output.keep_last", out.keep_last)
        _positive("output.log_every", out.log_every)
        _non_negative("output.eval_every", out.eval_every)
        if out.checkpoint_weights not in ("full", "trainable"):
            raise ConfigError(f"output.checkpoint_weights must be 'full' or 'trainable', "
                              f"got {out.checkpoint_weights!r}")
        if not out.resume:
            raise ConfigError("output.resume must be auto, never or a checkpoint path")
        if str(out.resume).lower() in ("no", "none", "false", "off", "0") and not os.path.exists(out.resume):
            raise ConfigError("output.resume: to start without resuming, use never (the values are auto, never or "
                              "a checkpoint path)")
        return self


def _positive(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise ConfigError(f"{name} must be a positive number, got {value!r}")


def _non_negative(name: str, value: Any) -> None:
    if value is None or value < 0:
        raise ConfigError(f"{name} must be >= 0, got {value!r}")


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------

_LIST_OF_PATHS = {("data", "train"), ("data", "val"), ("data", "image_folder")}


def _unknown(name: str, key: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown recipe key {name}{key!r}{hint}; valid keys here: {', '.join(known)}")


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Check/convert a YAML value against a dataclass field type (int, float, bool, str, list, dict, Optional)."""
    origin = typing.get_origin(tp)
    if origin is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], name)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{name} must be a whole number, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, bool):
            # YAML 1.1 reads no/off/yes/on as booleans: `mixed_precision: no` means the string
            return "yes" if value else "no"
        if isinstance(value, (str, int, float)):
            return str(value)
        raise ConfigError(f"{name} must be a string, got {value!r}")
    if tp is list or origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return list(value)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping, got {value!r}")
        return dict(value)
    return value


def _build(cls, data: Any, prefix: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe section {prefix.rstrip('.') or 'top level'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown(prefix, str(key), list(fields))
        tp = hints[key]
        name = prefix + key
        sub = _dataclass_of(tp)
        if sub is not None:
            kwargs[key] = None if value is None and key == "init" else _build(sub, value, name + ".")
            continue
        section = prefix.rstrip(".")
        if (section, key) in _LIST_OF_PATHS and isinstance(value, str):
            value = [value]
        if (section, key) in _LIST_OF_PATHS and value is None:
            value = []
        kwargs[key] = _coerce(value, tp, name)
    return cls(**kwargs)


def _dataclass_of(tp: Any):
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) is Union:
        for a in typing.get_args(tp):
            if dataclasses.is_dataclass(a):
                return a
    return None


def recipe_from_dict(data: dict, *, source: Optional[str] = None, validate: bool = True) -> Recipe:
    recipe = _build(Recipe, data, "")
    recipe.source = source
    return recipe.validate() if validate else recipe


def bundled_recipes() -> dict[str, str]:
    """Name -> path of the recipes shipped in fastvlm/recipes."""
    root = resources.files("fastvlm") / "recipes"
    out = {}
    try:
        for entry in root.iterdir():
            if entry.name.endswith(".yaml") and not entry.name.startswith("accelerate"):
                out[entry.name[:-5]] = str(entry)
    except FileNotFoundError:
        pass
    return out


def resolve_recipe_path(path: str) -> str:
    if os.path.isfile(path):
        return path
    bundled = bundled_recipes()
    name = os.path.basename(path)
    name = name[:-5] if name.endswith(".yaml") else name
    # a bare name is a bundled recipe unless a file of that name exists (a folder of that name, e.g. an
    # earlier run's output directory called lora/, does not hide the bundled recipe)
    if not os.path.isfile(path) and name in bundled and os.sep not in path.rstrip(os.sep):
        return bundled[name]
    known = f"; bundled recipes: {', '.join(sorted(bundled))}" if bundled else ""
    if os.path.isdir(path):
        raise ConfigError(f"{path!r} is a directory, not a recipe file{known}")
    raise ConfigError(f"no recipe file {path!r}{known}")


def parse_override(text: str) -> tuple[list[str], Any]:
    import yaml

    if "=" not in text:
        raise ConfigError(f"--set expects KEY=VALUE (e.g. optim.lr=1e-4), got {text!r}")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set: bad key {key!r}")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: cannot parse value {value!r} as YAML ({e})") from None
    return key.split("."), parsed


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            nxt = node.get(k)
            if nxt is None:
                nxt = node[k] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {'.'.join(keys)}: {k!r} is not a section")
            node = nxt
        node[keys[-1]] = value
    return data


def load_recipe(path: str, overrides: Optional[list[str]] = None, *, validate: bool = True) -> Recipe:
    """Read a recipe YAML file (or a bundled recipe by name), apply ``section.key=value`` overrides."""
    import yaml

    path = resolve_recipe_path(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    except OSError as e:
        raise ConfigError(f"cannot read recipe {path}: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    data = apply_overrides(data, overrides or [])
    try:
        return recipe_from_dict(data, source=path, validate=validate)
    except ConfigError as e:
        # blame the --set that gave the bad value, when one did, rather than the (correct) recipe file
        msg = str(e)
        for text in reversed(overrides or []):
            parts = text.split("=", 1)[0].strip().split(".")
            # the key itself, or the first unknown part of it ("unknown recipe key data.'nope'")
            if msg.startswith(".".join(parts)) or any(
                    f"'{parts[i]}'" in msg and ".".join(parts[:i]) in msg for i in range(len(parts))):
                raise ConfigError(f"--set {text}: {msg} (recipe {path})") from None
        raise ConfigError(f"{path}: {msg}") from None


__all__ = [
    "DataSpec", "InitSpec", "LoraSpec", "MODULES", "OptimSpec", "OutputSpec", "Recipe", "STAGES", "TrainSpec",
    "apply_overrides", "bundled_recipes", "load_recipe", "recipe_from_dict", "resolve_recipe_path",
]
