"""One global batch, however it is split: under torchrun (DistributedDataParallel, 2 gloo processes on the CPU) or
into --micro-batch pieces (accumulation), one step updates the weights as one process does on the whole batch. train.py
seeds every per-sample draw (noise, timesteps, caption dropout) by (seed, step, index in the global batch) and draws
one self-conditioning coin per step, so all runs see the same samples, noise and timesteps; DDP averages the half-
batch gradients and accumulation sums micro-batch losses / N, both the whole batch's mean gradient. And clipping."""
import os
import pathlib
import subprocess
import sys

import torch
from safetensors.torch import load_file

from support import cli
import train
from model import build_model

ROOT = pathlib.Path(__file__).resolve().parent.parent
RUN = ["train.py", "--data", "synthetic", "--size", "tiny", "--max-steps", "1", "--num-clips", "4", "--device", "cpu"]


def launch(cmd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]


def read(run):
    return (load_file(run / "checkpoint-1" / "model.safetensors"),
            torch.load(run / "checkpoint-1" / "state.pt", weights_only=True)["opt"])


def gradients(opt, beta1=0.9):  # after Adam's first step exp_avg = (1 - beta1) * g
    return [s["exp_avg"] / (1 - beta1) for _, s in sorted(opt["state"].items())]


def test_two_half_batches_equal_one_whole_batch(tmp_path):
    launch(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *RUN, "--batch-size", "4",
            "--out", str(tmp_path / "ddp")])  # --batch-size: the global batch, 2 clips per process
    train.main([*RUN[1:], "--batch-size", "4", "--out", str(tmp_path / "one")])  # in this process: no fresh imports
    assert_same_update(read(tmp_path / "ddp"), read(tmp_path / "one"))


def test_gradient_accumulation_equals_one_big_batch_and_clipping_bounds_the_norm(tmp_path):
    main = lambda *a: train.main([*RUN[1:], *a])  # in this process: no fresh imports
    main("--batch-size", "4", "--micro-batch", "2", "--out", str(tmp_path / "accum"))  # accumulation 2
    main("--batch-size", "4", "--out", str(tmp_path / "one"))
    assert_same_update(read(tmp_path / "accum"), read(tmp_path / "one"))
    main("--batch-size", "4", "--max-grad-norm", "0", "--out", str(tmp_path / "free"))
    main("--batch-size", "4", "--max-grad-norm", "0.01", "--out", str(tmp_path / "clip"))
    norm = lambda run: torch.cat([g.flatten() for g in gradients(read(tmp_path / run)[1])]).norm().item()
    assert norm("free") > 0.05 and abs(norm("clip") - 0.01) < 1e-4  # default 1.0 (official code); 0: off


def assert_same_update(a, b):
    (w_ddp, opt_ddp), (w_one, opt_one) = a, b
    model, _ = build_model("tiny", tiny_bases=cli.TINY_BASES)  # the runs' initial weights (seeded build)
    names = [n for n, _ in model.trainable_parameters()]  # the optimizer's parameter order
    w0 = dict(model.trainable_parameters())
    group = opt_one["param_groups"][0]
    lr, eps, beta1 = group["lr"], group["eps"], group["betas"][0]
    assert len(names) == len(opt_one["state"]) == len(opt_ddp["state"]) and set(w_ddp) == set(names)
    moved = total = 0
    for i, n in enumerate(names):
        # After Adam's first step exp_avg = (1 - beta1) * g: the gradient itself, a linear (sharp) thing to compare.
        g_ddp, g_one = (o["state"][i]["exp_avg"] / (1 - beta1) for o in (opt_ddp, opt_one))
        scale = g_one.abs().max().clamp(min=1e-30)
        assert (g_ddp - g_one).abs().max() <= 1e-4 * scale, n  # float summation order only (measured ~4e-6)
        # The first Adam update is lr * g / (|g| + eps) (bias-corrected m = g, v = g^2): sign-like, and
        # lr / (eps + min |g|)-Lipschitz between two gradients. So the weights may differ only by what the gradients'
        # float differences explain (large where |g| ~ eps), plus float32 rounding of w and of the update.
        allowed = (1.05 * lr * (g_ddp - g_one).abs() / (eps + torch.minimum(g_ddp.abs(), g_one.abs()))
                   + 4 * torch.finfo(torch.float32).eps * w_one[n].abs() + 1e-6 * lr)
        assert ((w_ddp[n] - w_one[n]).abs() <= allowed).all(), n
        moved += ((w_one[n] - w0[n].detach()).abs() > 0.5 * lr).sum().item()
        total += w0[n].numel()
    assert moved > 0.1 * total  # the step really moved the weights (by ~lr; zero grads behind zero-init outputs stay)
