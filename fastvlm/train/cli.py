"""Train or fine-tune FastVLM from a recipe (YAML): stage 1 (projector), stage 1.5 / 2 (everything), LoRA.

RECIPE is a YAML file or the name of a bundled recipe (stage1, stage1_5, stage2, lora,
synth_stage1, synth_stage2; see fastvlm/recipes/). The run writes checkpoints, metrics and
the final model under output.dir; an interrupted run continues from its latest checkpoint
(--resume auto, the default) with the same data order and ends with the same weights.

examples:
  fastvlm train synth_stage1 --output-dir runs/synth1
  fastvlm train my_recipe.yaml --set optim.lr=1e-4 --set train.max_steps=200
  fastvlm train stage2 --set model=runs/stage1/final --set data.train=data/llava_665k.json \\
      --set data.image_folder=data/images --output-dir runs/stage2
  accelerate launch -m fastvlm.cli train recipe.yaml                 # all GPUs of this machine, DDP
  torchrun --nproc_per_node 2 -m fastvlm.cli train recipe.yaml       # DDP (CPU processes use gloo)
  accelerate launch --config_file fastvlm/recipes/accelerate_fsdp.yaml -m fastvlm.cli train recipe.yaml

The global batch (train.global_batch_size) stays fixed: gradient accumulation is derived
from it, the per-device batch and the number of processes.
"""

from __future__ import annotations

import argparse

from ..commands.common import int_arg


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML file, or the name of a bundled recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key (dotted, e.g. optim.lr=1e-4 or data.train=[a.json,b.json]); "
                             "repeatable")
    parser.add_argument("--output-dir", default=None, help="output directory (overrides output.dir)")
    parser.add_argument("--resume", default=None, metavar="{auto,never,PATH}",
                        help="auto: continue from the latest complete checkpoint in the output directory "
                             "(default); never: start fresh (refuses a directory with checkpoints); "
                             "PATH: a step_N checkpoint")
    parser.add_argument("--skip-bad", action="store_true",
                        help="log, count and skip malformed records instead of stopping at the first one")
    parser.add_argument("--max-steps", type=int_arg(1), default=None, help="stop after this many optimizer steps "
                        "(also sizes the learning-rate schedule)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--print-recipe", action="store_true", help="print the effective recipe and exit")


def run(args: argparse.Namespace) -> int:
    import json
    import logging
    import sys

    from .recipe import load_recipe

    overrides = list(args.overrides)
    if args.output_dir is not None:
        overrides.append(f"output.dir={json.dumps(args.output_dir)}")
    if args.resume is not None:
        overrides.append(f"output.resume={json.dumps(args.resume)}")
    if args.skip_bad:
        overrides.append("data.skip_bad=true")
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    recipe = load_recipe(args.recipe, overrides)
    if args.print_recipe:
        import yaml

        yaml.safe_dump(recipe.to_dict(), sys.stdout, sort_keys=False)
        return 0

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("accelerate", "transformers", "peft"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from .. import kernels
    from .trainer import Trainer

    # keep freed activation memory in the heap: without it every CPU step page-faults its big
    # buffers in again (see kernels.tune_allocator; FASTVLM_NO_MALLOPT=1 turns it off)
    kernels.tune_allocator()
    trainer = Trainer(recipe, progress=not args.no_progress)
    try:
        summary = trainer.train()
    except KeyboardInterrupt:
        if trainer.is_main:
            step, saved = getattr(trainer, "step", None), getattr(trainer, "last_saved_step", None)
            where = f" at step {step}" if step is not None else ""
            if saved is not None:
                how = "the same command resumes from it" if recipe.output.resume == "auto" else \
                    "run the same command with --resume auto to continue from it"
                again = ""
                if step is not None and step > saved:
                    again = f" (step {step} runs again)" if step == saved + 1 else \
                        f" (steps {saved + 1}-{step} run again)"
                last = f"the last checkpoint is {recipe.output.dir}/step_{saved}: {how}{again}"
            else:
                last = "no checkpoint was written yet: the same command starts again"
            print(f"interrupted{where}; {last}", file=sys.stderr)
        return 130
    if trainer.is_main:
        print(f"done: {summary['steps']} steps, {summary['samples']} samples, final loss "
              f"{summary['final_loss']}, val loss {'-' if summary['final_val_loss'] is None else summary['final_val_loss']}, "
              f"skipped bad records "
              f"{summary['skipped_bad_records']}, {summary['wall_time_s']:.1f} s", file=sys.stderr)
        print(f"model: {summary['final_dir']}", file=sys.stderr)
    return 0
