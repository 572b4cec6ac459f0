"""Training runs as real processes: SIGKILL mid-run then resume, and two processes under torchrun.

Both compare final weights with a run in this process: bit-identical for the resumed run
(CPU, fp32, one thread everywhere), within float tolerance for the two-process run (same
global batch, per-device batch halved). Both run on the CPU even where a GPU is present.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fastvlm.train.checkpointing import list_checkpoints

sys.path.insert(0, os.path.dirname(__file__))
from helpers import train_in_process  # noqa: E402
from test_train import make_dataset, make_tokenizer, tiny_recipe  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _weights(out_dir) -> dict:
    return load_file(os.path.join(out_dir, "final", "model.safetensors"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    make_tokenizer(root / "tok")
    data = make_dataset(root / "data", 20, text_only=4)
    return root, data


def test_sigkill_then_resume_matches_uninterrupted(setup):
    root, data = setup
    # Everything trains, the encoder in its multi-branch form with BatchNorm in train mode (so
    # running statistics are part of the state), grad accumulation 2, checkpoints every 2 steps.
    base = tiny_recipe(data, root / "tok", root / "ref",
                       init={"preset": "fastvlm-tiny", "seed": 0,
                             "vision": {"inference_mode": False, "image_size": 64}},
                       train={"epochs": 2, "global_batch_size": 4, "per_device_batch_size": 2, "seed": 5,
                              "cpu": True},
                       optim={"lr": 2e-3, "warmup_ratio": 0.2, "weight_decay": 0.01})
    base["output"].update(save_every=2, keep_last=2, log_every=1)
    ref = train_in_process(base)
    total = ref["steps"]
    assert total == 12

    out = root / "killed"
    recipe = dict(base, output=dict(base["output"], dir=str(out)))
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cmd = [sys.executable, "-m", "fastvlm.cli", "train", str(path), "--no-progress"]
    proc = subprocess.Popen(cmd, env=_env(), cwd=str(root), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    def logged_steps() -> list[int]:
        steps = []
        if (out / "metrics.jsonl").exists():
            for line in open(out / "metrics.jsonl"):
                try:
                    steps.append(json.loads(line)["step"])
                except (ValueError, KeyError):  # a line being written, or not a step's
                    pass
        return steps

    # killed half-way: after a checkpoint at half the steps or later, and after at least one step past it, so
    # that the resumed run must redo work the killed one had done (and logged)
    try:
        deadline = time.time() + 240
        while True:
            saved = [s for s, _ in list_checkpoints(str(out))]
            if saved and max(saved) >= total // 2 and max(logged_steps(), default=0) > max(saved):
                break
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.time() < deadline, "no checkpoint at half the run appeared"
            time.sleep(0.01)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    steps = [s for s, _ in list_checkpoints(str(out))]
    assert steps and total // 2 <= max(steps) < total and not (out / "final").exists()
    assert max(logged_steps()) > max(steps)  # steps after the last checkpoint were lost with the process

    res = subprocess.run(cmd, env=_env(), cwd=str(root), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.load(open(out / "summary.json"))
    assert summary["resumed_from"] is not None and summary["steps"] == total
    assert summary["samples"] == ref["samples"]

    a, b = _weights(root / "ref"), _weights(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # metrics of the steps the killed run did after its checkpoint were replaced, not duplicated
    logged = [json.loads(line)["step"] for line in open(out / "metrics.jsonl") if '"loss"' in line]
    assert logged == list(range(1, total + 1))
    ref_losses = [json.loads(line)["loss"] for line in open(root / "ref" / "metrics.jsonl") if '"loss"' in line]
    losses = [json.loads(line)["loss"] for line in open(out / "metrics.jsonl") if '"loss"' in line]
    assert losses == ref_losses
    # the last complete checkpoints are kept, nothing half-written is left
    assert len(list_checkpoints(str(out))) == 2
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


def test_two_processes_match_one(setup):
    root, data = setup
    # Per-device batch halved, same global batch; text-only records exercise the zero-gradient
    # path DDP needs. BatchNorm statistics are frozen: per-device batch statistics are not
    # the global batch's, so they could not match.
    one = tiny_recipe(data, root / "tok", root / "one",
                      train={"epochs": 1, "global_batch_size": 8, "per_device_batch_size": 4, "seed": 1,
                             "freeze_bn_stats": True, "cpu": True},
                      optim={"lr": 2e-3, "warmup_ratio": 0.0, "weight_decay": 0.01})
    ref = train_in_process(one)

    two = dict(one, train=dict(one["train"], per_device_batch_size=2), output=dict(one["output"],
                                                                                    dir=str(root / "two")))
    path = root / "two.yaml"
    path.write_text(yaml.safe_dump(two))
    # torchrun, through this interpreter
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fastvlm.cli", "train", str(path), "--no-progress"]
    res = subprocess.run(cmd, env=_env(), cwd=str(root), capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-4000:]
    summary = json.load(open(root / "two" / "summary.json"))
    assert summary["world_size"] == 2 and summary["gradient_accumulation_steps"] == ref["gradient_accumulation_steps"]
    assert summary["steps"] == ref["steps"] == 3 and summary["samples"] == ref["samples"]
    assert abs(summary["final_loss"] - ref["final_loss"]) < 1e-5
    _assert_same_training(_weights(root / "one"), _weights(root / "two"), one["optim"]["lr"])


def _assert_same_training(a: dict, b: dict, lr: float) -> None:
    """Weights of two runs that sum the same gradients in another order. AdamW turns a gradient element that
    nearly cancels to ~eps into a step of up to lr, so such an element can move by a fraction of one step (after
    the session-22 init, one of 8,192 in a down_proj moved 3.5e-5); a real difference (a wrong average, a sample
    seen twice, another learning rate) moves most elements."""
    assert a.keys() == b.keys()
    moved = total = 0
    for k in a:
        d = (a[k] - b[k]).abs()
        n = int((d > 1e-5).sum())
        # Over the whole model (below), and per tensor with slack: an exported conv bias folds a BatchNorm of
        # many such elements into each of its own, while a wrong update
        # confined to one tensor (the projector's learning rate, say) moves nearly all of its elements.
        assert n <= max(3, d.numel() // 4), (k, n, d.numel())
        assert float(d.max()) < 0.1 * lr, (k, float(d.max()))
        moved, total = moved + n, total + d.numel()
    assert moved <= total // 1000, (moved, total)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_matches_plain_training(setup, stage):
    """The shipped ZeRO-2/3 configs train the same weights as a plain run (one process). DeepSpeed is not a
    dependency: this runs where it is installed (its CPU accelerator; accelerate sets DeepSpeed up only where it
    sees a GPU, so the runner reports one)."""
    pytest.importorskip("deepspeed")
    from importlib import resources

    root, data = setup
    base = tiny_recipe(data, root / "tok", root / "ds-plain",
                       init={"preset": "fastvlm-tiny", "seed": 0,
                             "vision": {"inference_mode": False, "image_size": 64}},
                       train={"max_steps": 3, "global_batch_size": 4, "per_device_batch_size": 2, "seed": 5,
                              "cpu": True, "mixed_precision": "no"},
                       optim={"lr": 2e-3, "warmup_ratio": 0.0, "weight_decay": 0.01})
    base["output"].update(save_every=0, log_every=1)
    train_in_process(base)
    ds = json.loads(resources.files("fastvlm.recipes").joinpath(f"ds_zero{stage}.json").read_text())
    ds["train_micro_batch_size_per_gpu"] = 2
    (root / f"ds{stage}.json").write_text(json.dumps(ds))
    out = root / f"ds-zero{stage}"
    recipe = dict(base, train=dict(base["train"], cpu=False), output=dict(base["output"], dir=str(out)))
    (root / f"ds{stage}.yaml").write_text(yaml.safe_dump(recipe))
    runner = ("import sys; import fastvlm.train.trainer as t; t._has_gpu = lambda: True; "
              "from fastvlm.cli import main; sys.exit(main(sys.argv[1:]))")
    env = dict(_env(), ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_CONFIG_FILE=str(root / f"ds{stage}.json"),
               RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29600 + stage))
    res = subprocess.run([sys.executable, "-c", runner, "train", str(root / f"ds{stage}.yaml"), "--no-progress"],
                         env=env, cwd=str(root), capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.load(open(out / "summary.json"))["steps"] == 3
    _assert_same_training(_weights(root / "ds-plain"), _weights(out), base["optim"]["lr"])
