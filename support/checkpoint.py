"""Run folders: checkpoints that survive a kill at any instant, strict loading, one process per run, the step log.

Not in the paper: the engineering that makes a long Eq. (9) run safe to interrupt (SIGKILL, SIGTERM, Ctrl-C).
A stage checkpoint is a folder <out>/<stage>/ holding FILES and, written last after fsync, the marker COMPLETE. A save
writes <stage>.tmp/, then renames <stage> -> <stage>.old and <stage>.tmp -> <stage>, then removes <stage>.old. Whatever
instant the process dies, a complete checkpoint of the newest finished save (or of the one before) is left under one
of the three names; `latest` picks the complete one with the highest step and `tidy` puts it back under <stage>.
No pickled objects: tensors in safetensors, optimizer state through torch.load(weights_only=True).
"""
import fcntl
import json
import os
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from support.cli import REPO

FILES = ("model.safetensors", "ema.safetensors", "state.pt", "config.json")
STAGES = ("joint", "base")
# train.py arguments that change a run's trajectory: --resume refuses to change them (unless --allow-changed-args)
TRAJECTORY = ("data", "root", "flist", "cache", "num_clips", "size", "conditioner", "time_align", "video_base",
              "motion_adapter", "audio_base", "fps", "batch_size", "grad_accum", "world_size", "lr", "lr_schedule",
              "optimizer", "max_grad_norm", "p_self_cond", "p_uncond", "shared_t", "ema_decay", "precision", "seed",
              "base_steps", "tiny_bases")
SUFFIXES = ("", ".tmp", ".old")


def stored_path(path):
    """A file path as a run's config stores it: relative to the repository when the file lies inside it (the shipped
    tiny bases: a moved or re-cloned repository still finds them), else absolute."""
    p = os.path.abspath(path)
    rel = os.path.relpath(p, REPO)
    return p if rel == ".." or rel.startswith(".." + os.sep) else rel


def resolve_stored(path):
    """The inverse of stored_path: a relative stored path is relative to the repository (None stays None)."""
    return path if path is None or os.path.isabs(path) else os.path.join(REPO, path)


class Interrupted(Exception):
    """Raised by on_signal, the SIGINT / SIGTERM handler train.py installs: its loop saves a checkpoint, then exits."""


def on_signal(signum, frame):
    raise Interrupted(signum)


class CheckpointError(ValueError):
    """A run folder or checkpoint that cannot be used; str(e) is one line that the CLIs print (exit code 2)."""


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def step_of(folder):
    """The step of a complete checkpoint folder, else None (missing, half written, half deleted, unreadable)."""
    try:
        if not os.path.isfile(os.path.join(folder, "COMPLETE")):
            return None
        for name in FILES[:2]:
            with safe_open(os.path.join(folder, name), "pt"):  # the header parses: the file is whole
                pass
        os.stat(os.path.join(folder, "state.pt"))
        return int(json.load(open(os.path.join(folder, "config.json")))["step"])
    except Exception:  # OSError, JSON / safetensors errors: not (or no longer) a whole checkpoint
        return None


def latest(out, stage):
    """-> (folder, step) of the newest complete checkpoint of a stage, or (None, None)."""
    found = [(s, f) for f in (os.path.join(out, stage + x) for x in SUFFIXES) if (s := step_of(f)) is not None]
    return max(found, key=lambda c: c[0])[::-1] if found else (None, None)


def tidy(out, stage):
    """Put the newest complete checkpoint under <stage> and remove the rest (a kill leaves up to three folders)."""
    best, _ = latest(out, stage)
    final = os.path.join(out, stage)
    for x in SUFFIXES:
        f = final + x
        if os.path.lexists(f) and f != best:
            shutil.rmtree(f) if os.path.isdir(f) and not os.path.islink(f) else os.remove(f)
    if best is not None and best != final:
        os.replace(best, final)
        _fsync(out)


def save(out, stage, weights, ema, state, config):
    """Atomic checkpoint of a stage: weights / ema {name: tensor}, state (torch.load-able tensors and numbers only),
    config (JSON, with "step")."""
    tidy(out, stage)
    final, tmp, old = (os.path.join(out, stage + x) for x in SUFFIXES)
    os.makedirs(tmp)
    save_file({n: p.detach().float().cpu().contiguous() for n, p in weights.items()}, f"{tmp}/model.safetensors")
    save_file({n: e.detach().float().cpu().contiguous() for n, e in ema.items()}, f"{tmp}/ema.safetensors")
    torch.save(state, f"{tmp}/state.pt")
    with open(f"{tmp}/config.json", "w") as f:
        json.dump(config, f, indent=1)
    for name in FILES:
        _fsync(f"{tmp}/{name}")
    with open(f"{tmp}/COMPLETE", "w") as f:
        f.write(f"{config['step']}\n")
    _fsync(f"{tmp}/COMPLETE")
    _fsync(tmp)
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync(out)
    shutil.rmtree(old, ignore_errors=True)


def load_weights(model, folder, names, ema=True):
    """Copy a checkpoint's tensors (EMA by default) into the model's parameters `names`, strictly both ways: one
    line naming the file and the first missing, unexpected or mis-shaped tensor."""
    path = os.path.join(folder, "ema.safetensors" if ema else "model.safetensors")
    try:
        sd = load_file(path)
    except Exception as e:  # missing or damaged file
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__})") from None
    own = dict(model.named_parameters())
    missing, unexpected = [n for n in names if n not in sd], [n for n in sd if n not in names]
    if missing or unexpected:
        raise CheckpointError(f"{path}: {len(missing)} tensors missing (first: {missing[:1]}), {len(unexpected)} "
                              f"unexpected (first: {unexpected[:1]}): not a checkpoint of this model")
    bad = [n for n in names if sd[n].shape != own[n].shape]
    if bad:
        raise CheckpointError(f"{path}: {bad[0]} has shape {tuple(sd[bad[0]].shape)}, the model's is "
                              f"{tuple(own[bad[0]].shape)}")
    with torch.no_grad():
        for n in names:
            own[n].copy_(sd[n])


def lock(out):
    """Hold <out>/.lock for this process's lifetime (released by the OS even on SIGKILL); one line if taken."""
    f = open(os.path.join(out, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        raise CheckpointError(f"{out} is in use by another process ({f.read().strip() or 'unknown'}); wait for it "
                              "to finish or choose another --out") from None
    f.seek(0), f.truncate(), f.write(f"pid {os.getpid()}"), f.flush()
    return f


def open_run(out, args, resume, allow_changed=False):
    """Before any model loads: take the run's lock; checkpoints in `out` only with `resume`, and then only with the
    same trajectory arguments (`args`: the new run's, as a dict). -> the lock (keep it while training)."""
    held = lock(out)
    try:
        check_resume(out, args, resume, allow_changed)
    except CheckpointError:
        held.close()  # now, not when the traceback is collected
        raise
    return held


def check_resume(out, args, resume, allow_changed):
    for s in STAGES:
        tidy(out, s)  # a kill may have left the newest checkpoint under .tmp or .old
    found = [(s, *latest(out, s)) for s in STAGES]
    found = [(s, f, n) for s, f, n in found if f is not None]
    if found and not resume:
        raise CheckpointError(f"{out} already holds checkpoints ({', '.join(f'{s} at step {n}' for s, _, n in found)});"
                              " continue it with --resume or choose another --out")
    if found and not allow_changed:
        old = json.load(open(os.path.join(found[0][1], "config.json")))
        keys = TRAJECTORY + (("max_steps", "epochs") if args["lr_schedule"] == "cosine" else ())  # lr(step) changes
        same = lambda k: (old.get(k) == args.get(k) or k == "tiny_bases" and  # noqa: E731 (older runs: absolute)
                          resolve_stored(old.get(k)) == resolve_stored(args.get(k)))
        changed = [f"--{k.replace('_', '-')} {old.get(k)!r} -> {args.get(k)!r}" for k in keys if not same(k)]
        if changed:
            raise CheckpointError(f"--resume would change the run's trajectory: {'; '.join(changed)} "
                                  "(--allow-changed-args accepts that)")


class StepLog:
    """<out>/log_<stage>.jsonl, one JSON line per step; flushed at every checkpoint; on resume cut back to the
    checkpoint's step, so after any kill and resume every step appears exactly once."""

    def __init__(self, path, resume_step=0):
        kept = []
        if os.path.exists(path):
            for line in open(path, errors="replace"):
                try:
                    if json.loads(line)["step"] <= resume_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
                except (ValueError, KeyError, TypeError):  # a line cut by the kill
                    pass
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)
        self.f = open(path, "a")

    def write(self, record):
        self.f.write(json.dumps(record) + "\n")

    def flush(self):
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self):
        self.flush()
        self.f.close()
