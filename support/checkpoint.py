"""Run folders as diffusers' training examples keep them: <out>/checkpoint-<step>/ holds the trained weights, their EMA,
the optimizer state and the run's config. Not in the paper: what makes a long Eq. (9) run safe to kill and resume.

A save writes checkpoint-<step>.tmp/ and renames it into place (a folder rename is atomic), then removes all but the
newest two: a run killed at any instant (SIGKILL included) leaves its previous checkpoint whole, and a .tmp folder
that the next --resume removes. The run's lock (<out>/.lock, released by the OS even on SIGKILL) keeps a second
process out. A checkpoint that cannot be read stops --resume with one line naming the file; nothing is deleted.
"""
import fcntl
import glob
import json
import os
import re
import shutil

import torch
from safetensors.torch import load_file, save_file

from support.media import write_atomic

# train.py arguments that do not change what a run computes: --resume may change them
# (the GLOBAL batch fixes every draw: 1 or 8 GPUs, with or without accumulation, take the same steps)
MAY_CHANGE = ("resume", "allow_changed_args", "ckpt_every", "num_workers", "device", "out", "rank", "world_size",
              "micro_batch", "accumulation")


class CheckpointError(ValueError):
    """A run folder or checkpoint that cannot be used; str(e) is one line that the CLIs print (exit code 2)."""


def checkpoints(out):
    """-> [(step, folder)] of the complete checkpoints in `out`, oldest first."""
    found = [(int(m[1]), p) for p in glob.glob(os.path.join(glob.escape(out), "checkpoint-*"))
             if (m := re.fullmatch(r"checkpoint-(\d+)", os.path.basename(p)))]
    return sorted(found)


def latest(out):
    """-> the newest complete checkpoint folder of a run, or None."""
    found = checkpoints(out)
    return found[-1][1] if found else None


def save(out, step, params, ema, opt, scaler, config, keep=2):
    """Checkpoint of `step`: the trained parameters {name: param}, their EMA (diffusers' EMAModel), the optimizer and
    loss-scaler state (tensors and numbers: torch.load(weights_only=True) reads them) and the run's config (JSON)."""
    tmp, final = os.path.join(out, f"checkpoint-{step}.tmp"), os.path.join(out, f"checkpoint-{step}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    cpu = lambda tensors: {n: t.detach().float().cpu().contiguous() for n, t in tensors.items()}  # noqa: E731
    save_file(cpu(params), os.path.join(tmp, "model.safetensors"))
    save_file(cpu(dict(zip(params, ema.shadow_params))), os.path.join(tmp, "ema.safetensors"))
    state = dict(step=step, opt=opt.state_dict(), scaler=scaler.state_dict(), ema_step=ema.optimization_step)
    torch.save(state, os.path.join(tmp, "state.pt"))
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(dict(config, step=step), f, indent=1)
    os.rename(tmp, final)
    for _, old in checkpoints(out)[:-keep]:
        os.rename(old, old + ".tmp")  # no longer a checkpoint from here on, however far rmtree gets
        shutil.rmtree(old + ".tmp")


def resume(folder, params, ema, opt, scaler):
    """A checkpoint into the parameters, EMA, optimizer and loss scaler. -> its step. CheckpointError (one line naming
    the file) for anything that does not fit."""
    load_weights(params, os.path.join(folder, "model.safetensors"))
    load_weights(dict(zip(params, ema.shadow_params)), os.path.join(folder, "ema.safetensors"))
    path = os.path.join(folder, "state.pt")
    state = read(path, lambda p: torch.load(p, weights_only=True))
    try:
        opt.load_state_dict(state["opt"])
        scaler.load_state_dict(state["scaler"])
        ema.optimization_step = int(state["ema_step"])
        return int(state["step"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not this run's optimizer state ({type(e).__name__})") from None


def read(path, reader):
    """reader(path), or CheckpointError naming the file."""
    try:
        return reader(path)
    except Exception as e:  # missing, cut short, not what it should be
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}); move the checkpoint away to resume "
                              "from the one before it") from None


def load_weights(params, path):
    """A weights file into {name: tensor} (in place): the same names and shapes, or CheckpointError naming it."""
    sd = read(path, load_file)
    differ = sorted(sd.keys() ^ params.keys()) or [n for n in params if sd[n].shape != params[n].shape]
    if differ:
        raise CheckpointError(f"{path}: not this model's {len(params)} trained tensors (first difference: {differ[0]})")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(sd[name])


def read_config(folder):
    return read(os.path.join(folder, "config.json"), lambda p: json.load(open(p)))


def open_run(out, config, resume, allow_changed):
    """Before any model loads: lock the run folder; checkpoints in it only with `resume`, and then only with the same
    arguments (config: the new run's, as a dict). -> the lock (held while the file stays open)."""
    try:
        os.makedirs(out, exist_ok=True)
        lock = open(os.path.join(out, ".lock"), "a")
    except OSError as e:
        raise CheckpointError(f"--out: cannot write to {out} ({e.strerror})") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by the OS when the process ends, however
        for tmp in glob.glob(os.path.join(glob.escape(out), "checkpoint-*.tmp")):  # a killed save: ours, unfinished
            shutil.rmtree(tmp)
        folder = latest(out)
        if folder and not resume:
            raise CheckpointError(f"{out} already holds {os.path.basename(folder)}; continue it with --resume or "
                                  "choose another --out")
        old = read_config(folder) if folder and not allow_changed else config
        changed = [f"--{k.replace('_', '-')} {old.get(k)!r} -> {v!r}" for k, v in config.items()
                   if k not in MAY_CHANGE and old.get(k) != v]
        if changed:
            raise CheckpointError(f"--resume would change the run: {'; '.join(changed)} (--allow-changed-args "
                                  "accepts that)")
    except BaseException as e:
        lock.close()  # now, not when the traceback goes
        if isinstance(e, BlockingIOError):
            raise CheckpointError(f"{out} is in use by another process; wait for it or choose another --out") from None
        raise
    return lock


def open_log(path, step):
    """The step log (one JSON line per step), cut back to the resumed checkpoint's `step`: after any kill and resume,
    every step appears exactly once. -> the file, open for appending."""
    kept = []
    for line in open(path) if os.path.isfile(path) else []:
        try:
            kept += [line] if json.loads(line)["step"] <= step else []
        except (ValueError, KeyError):  # a line cut by the kill
            pass
    write_atomic(path, lambda tmp: open(tmp, "w").write("".join(kept)))
    return open(path, "a")
