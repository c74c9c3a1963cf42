"""Run folders as diffusers' training examples keep them (not in the paper), so a long Eq. (9) run is safe to kill: a
checkpoint-<step>/ is written as .tmp and renamed into place, the newest two kept; <out>/.lock bars a second process."""
import contextlib
import fcntl
import glob
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from support.media import write_atomic

# train.py arguments that --resume may change: the GLOBAL batch fixes every draw, whatever the split over processes
MAY_CHANGE = ("resume", "allow_changed_args", "ckpt_every", "keep", "num_workers", "device", "out", "rank",
              "world_size", "micro_batch", "accumulation")


class CheckpointError(ValueError):
    """A run folder or checkpoint that cannot be used; str(e) is one line that the CLIs print (exit code 2)."""


def checkpoints(out):
    """-> [(step, folder)] of the complete checkpoints in `out`, oldest first."""
    return sorted((int(m[1]), p) for p in glob.glob(os.path.join(glob.escape(out), "checkpoint-*"))
                  if (m := re.fullmatch(r"checkpoint-(\d+)", os.path.basename(p))))


def latest(out):
    return (checkpoints(out) or [(0, None)])[-1][1]


def save(out, step, params, ema, opt, scaler, config, keep=2):
    """Checkpoint of `step`: {name: param}, EMA, optimizer and scaler state (torch.load(weights_only=True) reads it)."""
    tmp = os.path.join(out, f"checkpoint-{step}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    cpu = lambda tensors: {n: t.detach().float().cpu().contiguous() for n, t in tensors.items()}  # noqa: E731
    save_file(cpu(params), os.path.join(tmp, "model.safetensors"))
    save_file(cpu(dict(zip(params, ema.shadow_params))), os.path.join(tmp, "ema.safetensors"))
    state = dict(step=step, opt=opt.state_dict(), scaler=scaler.state_dict(), ema_step=ema.optimization_step)
    torch.save(state, os.path.join(tmp, "state.pt"))
    Path(tmp, "config.json").write_text(json.dumps(dict(config, step=step), indent=1))
    os.rename(tmp, os.path.join(out, f"checkpoint-{step}"))
    for _, old in checkpoints(out)[:-keep]:
        os.rename(old, old + ".tmp")  # no longer a checkpoint from here on, however far rmtree gets
        shutil.rmtree(old + ".tmp")


def resume(folder, params, ema, opt, scaler):
    """A checkpoint into the parameters, EMA, optimizer and loss scaler -> its step; CheckpointError for a misfit."""
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
    """reader(path), or CheckpointError naming the file (--resume stops with one line, deletes nothing)."""
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
    """Before any model loads: lock `out`; its checkpoints only with `resume` and the same config (dict) -> the lock."""
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
    """The step log (a JSON line per step) cut back to the resumed `step`, every step once -> open for appending."""
    kept = []
    for line in open(path) if os.path.isfile(path) else []:
        with contextlib.suppress(ValueError, KeyError):  # a line cut by the kill
            kept += [line] if json.loads(line)["step"] <= step else []
    write_atomic(path, lambda tmp: open(tmp, "w").write("".join(kept)))
    return open(path, "a")
