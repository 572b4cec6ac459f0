"""FastVLM as an lmms-eval model named ``fastvlm``.

With lmms-eval installed (``pip install 'fastvlm[lmms]'``, which also pins filelock<4; written against 0.7.3)::

    lmms-eval --model fastvlm --model_args pretrained=PATH,device=cuda,dtype=bf16,batch_size=8 \\
        --tasks textvqa_val,docvqa_val,chartqa,pope,scienceqa_img --output_path runs/lmms

``model_args`` (all optional): ``pretrained`` (checkpoint folder or Hub id; default: the
bundled model), ``device`` (auto), ``dtype`` (auto), ``image_size`` (the checkpoint's),
``batch_size`` (8; a ``batch_size`` here wins over lmms-eval's ``--batch_size``, whose
default is 1), ``max_new_tokens`` (256; used when a task sets none), ``system_prompt``,
``attention`` (sdpa or eager), ``max_rounds`` (32, multi-round tasks), ``progress``.

How lmms-eval finds the model. lmms-eval (>= 0.6) builds its model registry from the
built-in list, then the deprecated ``LMMS_EVAL_PLUGINS`` variable (which wants a
``<package>.models.<name>`` module layout), then the Python entry points of the group
``lmms_eval.models`` (a ``ModelManifest``, or a callable returning one). fastvlm uses the
entry point; the package's ``pyproject.toml`` declares::

    [project.entry-points."lmms_eval.models"]
    fastvlm = "fastvlm.eval.lmms:manifest"

Without that entry point installed (an older install of fastvlm), the launcher registers
the model in-process and then runs lmms-eval's own command line with the same
arguments::

    python -m fastvlm.eval.lmms --model fastvlm --model_args pretrained=PATH --tasks ...

From Python, call :func:`register` before ``lmms_eval.evaluator.simple_evaluate``, or
pass an instance: ``simple_evaluate(model=FastVLMLmms(pretrained=PATH), ...)``.

This module imports nothing from lmms-eval until it is used, so ``fastvlm`` works
without it; :class:`~fastvlm.eval.lmms.model.FastVLMLmms` also works without lmms-eval
(on objects shaped like its ``Instance``), which the tests rely on.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MODEL_NAME", "CLASS_PATH", "FastVLMLmms", "lmms_eval_available", "manifest", "register"]

MODEL_NAME = "fastvlm"
CLASS_PATH = "fastvlm.eval.lmms.model.FastVLMLmms"

_MISSING = (
    "lmms-eval is not installed; `pip install 'fastvlm[lmms]'` (or `pip install -e \".[lmms]\"` in a checkout: "
    "lmms-eval with filelock<4, which lmms-eval 0.7.3 needs; the plugin was written against 0.7.3) to run "
    "`lmms-eval --model fastvlm`"
)


def lmms_eval_available() -> bool:
    """Whether ``lmms_eval`` can be imported."""
    try:
        import lmms_eval  # noqa: F401
    except ImportError:
        return False
    return True


def _require_lmms_eval() -> None:
    try:
        import lmms_eval  # noqa: F401
    except ImportError as e:
        raise ImportError(f"{_MISSING} ({e})") from e


def manifest():
    """The ``lmms_eval.models`` entry point's payload: a ``ModelManifest`` for ``fastvlm``."""
    _require_lmms_eval()
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=CLASS_PATH)


def register() -> None:
    """Make ``--model fastvlm`` resolvable in this process's lmms-eval (idempotent)."""
    _require_lmms_eval()
    from lmms_eval import models

    registry = getattr(models, "MODEL_REGISTRY_V2", None)
    if registry is not None:  # lmms-eval >= 0.6: manifests
        registry.register_manifest(manifest(), overwrite=True)
        available = getattr(models, "AVAILABLE_MODELS", None)
        if isinstance(available, dict):
            available[MODEL_NAME] = CLASS_PATH.rsplit(".", 1)[-1]
    else:  # older lmms-eval: a name -> class (path) table read by get_model
        models.AVAILABLE_MODELS[MODEL_NAME] = CLASS_PATH
    try:  # the decorator registry (lmms_eval.api.registry), kept for older code paths
        from lmms_eval.api.registry import MODEL_REGISTRY

        from .model import FastVLMLmms

        MODEL_REGISTRY[MODEL_NAME] = FastVLMLmms
    except ImportError:
        pass


def __getattr__(name: str) -> Any:
    if name == "FastVLMLmms":
        from .model import FastVLMLmms

        return FastVLMLmms
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
