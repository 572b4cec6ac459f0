"""Training: LLaVA-format data, label masking and batching, recipes, the accelerate trainer, the CLI.

    from fastvlm.train import load_recipe, train
    summary = train(load_recipe("synth_stage1", ["output.dir=runs/x"]))

Modules: :mod:`.data` (datasets and record validation), :mod:`.collate` (chat frame,
labels, collator, length-grouped sampler), :mod:`.recipe` (YAML recipes),
:mod:`.build` (model, freezing, LoRA, optimizer groups, schedule), :mod:`.trainer`
(the loop), :mod:`.checkpointing` (atomic checkpoints), :mod:`.cli` (``fastvlm train``).
Importing this package does not import torch.
"""

_LAZY = {
    "train": ".trainer", "Trainer": ".trainer",
    "load_recipe": ".recipe", "Recipe": ".recipe", "recipe_from_dict": ".recipe",
    "ConversationDataset": ".data", "DataError": ".data",
    "DataCollator": ".collate", "GlobalBatchSampler": ".collate", "tokenize_conversation": ".collate",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'fastvlm.train' has no attribute {name!r}")


__all__ = sorted(_LAZY)
