"""Run folders: checkpoints that survive a kill at any instant and are never lost silently, strict loading, one
process per run, the step log.

Not in the paper: the engineering that makes a long Eq. (9) run safe to interrupt (SIGKILL, SIGTERM, Ctrl-C) and to
resume. A stage checkpoint is a folder <out>/<stage>/ holding FILES and, written last, the marker COMPLETE: the step
and each file's size and sha256. A save writes <stage>.tmp/, then renames <stage> -> <stage>.old and <stage>.tmp ->
<stage>, then removes <stage>.old (its marker first). Whatever instant the process dies, the newest finished save (or
the one before) is left complete under one of the three names, and `tidy` puts it back under <stage>. A checkpoint
whose files no longer match its marker (cut short, overwritten, missing) is damaged: nothing deletes it unless a
newer complete one exists; `latest` names the file and what is wrong in one line (CheckpointError), and --resume falls
back to the previous complete save, keeping the damaged folder as <stage>.damaged. Every file is written through
files.atomic_write. No pickled objects: tensors in safetensors, optimizer state through torch.load(weights_only=True).
"""
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import sys
import zipfile

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from support import files
from support.cli import REPO

FILES = ("model.safetensors", "ema.safetensors", "state.pt", "config.json")
MARKER = "COMPLETE"
STAGES = ("joint", "base")
# train.py arguments that change a run's trajectory: --resume refuses to change them (unless --allow-changed-args)
TRAJECTORY = ("data", "root", "flist", "cache", "num_clips", "size", "conditioner", "time_align", "video_base",
              "motion_adapter", "audio_base", "fps", "batch_size", "micro_batch", "world_size", "lr", "lr_schedule",
              "optimizer", "max_grad_norm", "p_self_cond", "p_uncond", "shared_t", "ema_decay", "precision", "seed",
              "base_steps", "tiny_bases", "snr_scale_v", "snr_scale_a")
ADDED = dict(snr_scale_v=1.0, snr_scale_a=1.0)  # trajectory values newer than some runs: what those runs had
SUFFIXES = ("", ".tmp", ".old")
NEWEST_FIRST = (".tmp", "", ".old")  # a save renames in this order: <stage>.tmp is newer than <stage>, then .old
_fsync = files.fsync


def stored_path(path):
    """A file path as a run's config stores it: relative to the repository when the file lies inside it (the shipped
    tiny bases: a moved or re-cloned repository still finds them), else absolute."""
    p = os.path.abspath(path)
    rel = os.path.relpath(p, REPO)
    return p if rel == ".." or rel.startswith(".." + os.sep) else rel


def resolve_stored(path):
    """The inverse of stored_path: a relative stored path is relative to the repository (None stays None)."""
    return path if path is None or os.path.isabs(path) else os.path.join(REPO, path)


class CheckpointError(ValueError):
    """A run folder or checkpoint that cannot be used; str(e) is one line that the CLIs print (exit code 2)."""


# ---------------------------------------------------------------- is a checkpoint folder whole?
def _digest(path):
    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _signature(folder):
    """Identifies a folder's files as they are now (inode, size, change times): a rename keeps it, a write does not."""
    sig = [os.stat(folder).st_ino]
    for name in (MARKER,) + FILES:
        try:
            st = os.stat(os.path.join(folder, name), follow_symlinks=False)
            sig.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        except OSError:
            sig.append(None)
    return tuple(sig)


_CHECKED = {}  # _signature -> state_of's answer: each folder is hashed once per process while its files stay


def state_of(folder):
    """-> (state, step, why) of a checkpoint folder. state: "absent"; "incomplete" (no marker: a save or a removal
    that did not finish); "complete" (every file reads back as the save wrote it); "damaged" (why: one line naming
    the file and what is wrong)."""
    if not os.path.lexists(folder):
        return "absent", None, None
    if os.path.islink(folder) or not os.path.isdir(folder):
        return "damaged", None, f"{folder} is not a folder"
    key = _signature(folder)
    if key not in _CHECKED:
        _CHECKED[key] = _inspect(folder)
    return _CHECKED[key]


def _inspect(folder):
    marker = os.path.join(folder, MARKER)
    try:
        with os.fdopen(os.open(marker, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb") as f:
            raw = f.read(1 << 16)
    except FileNotFoundError:
        return "incomplete", None, f"{folder} has no {MARKER} marker (a save that did not finish)"
    except OSError as e:
        return "damaged", None, f"{marker} cannot be read ({e.strerror})"
    try:
        info = json.loads(raw)
        step, want = int(info["step"]), {n: (int(info["files"][n]["size"]), info["files"][n]["sha256"]) for n in FILES}
    except (ValueError, KeyError, TypeError):
        if re.fullmatch(rb"\d+\n?", raw):  # a marker from before markers listed the files
            return _inspect_unlisted(folder, int(raw))
        return "damaged", None, f"{marker} is not a checkpoint marker (cut short or overwritten)"
    for name, (size, digest) in want.items():
        path = os.path.join(folder, name)
        try:
            st = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            return "damaged", step, f"{path} is missing from the save of step {step}"
        if not stat.S_ISREG(st.st_mode):
            return "damaged", step, f"{path} is not a plain file"
        if st.st_size != size:
            return "damaged", step, f"{path} has {st.st_size} bytes, the save of step {step} wrote {size}"
        if _digest(path) != digest:
            return "damaged", step, f"{path} is not what the save of step {step} wrote (its sha256 differs)"
    return "complete", step, None


def _inspect_unlisted(folder, step):
    """A checkpoint whose marker gives its step only: the safetensors must cover their files, state.pt's zip
    checksums hold and config.json give the same step."""
    for name in FILES:
        path = os.path.join(folder, name)
        try:
            if name.endswith(".safetensors"):
                with safe_open(path, "pt"):  # the header parses and the tensors cover the file
                    pass
            elif name == "state.pt":
                with zipfile.ZipFile(path) as z:
                    bad = z.testzip()  # reads every member against its CRC
                if bad is not None:
                    raise ValueError(f"{bad} fails its checksum")
            elif int(json.loads(open(path, "rb").read())["step"]) != step:
                raise ValueError(f"its step is not the marker's {step}")
        except FileNotFoundError:
            return "damaged", step, f"{path} is missing from the save of step {step}"
        except Exception as e:  # OSError, zip / JSON / safetensors errors: the file does not read back
            return "damaged", step, f"{path} cannot be read ({str(e).splitlines()[0][:100] or type(e).__name__})"
    return "complete", step, None


def survey(out, stage):
    """A stage's folders, newest first -> (best, newer, rest). best: (folder, step) of the newest complete checkpoint,
    or None; newer: [(folder, why)], damaged folders that may be newer than best (never deleted); rest: folders that
    may go, being older than best or never finished (.tmp: a killed save, .old: a killed removal) or not folders."""
    best, newer, rest = None, [], []
    for x in NEWEST_FIRST:
        folder = os.path.join(out, stage + x)
        state, step, why = state_of(folder)
        if state == "absent":
            continue
        if best is not None:
            rest.append(folder)
        elif state == "complete":
            best = (folder, step)
        elif x and (state == "incomplete" or os.path.islink(folder) or not os.path.isdir(folder)):
            rest.append(folder)  # nothing a save renames to <stage> (a link there goes, not what it points to)
        else:  # damaged, or <stage> without marker: only a finished save is renamed to <stage>
            newer.append((folder, why))
    return best, newer, rest


def _damaged(newer, best):
    """The one line for a damaged checkpoint, saying what is left."""
    folder, why = newer
    if best is None:
        return f"{why}: checkpoint {folder} is damaged and no earlier complete save exists; move it away to start over"
    return (f"{why}: checkpoint {folder} is damaged; the previous save ({best[0]}, step {best[1]}) is complete and "
            "train.py --resume continues from it")


def latest(out, stage):
    """-> (folder, step) of a stage's newest complete checkpoint, or (None, None). Raises CheckpointError (one line)
    when a newer one is damaged: an older checkpoint is never used in its place silently."""
    best, newer, _ = survey(out, stage)
    if newer:
        raise CheckpointError(_damaged(newer[0], best))
    return best or (None, None)


def _remove(folder):
    """Remove a folder, its marker first: a kill midway leaves a folder without marker, never one that claims to be
    complete."""
    if os.path.islink(folder) or os.path.isfile(folder):
        os.remove(folder)
        return
    try:
        os.remove(os.path.join(folder, MARKER))
    except FileNotFoundError:
        pass
    shutil.rmtree(folder, ignore_errors=True)


def tidy(out, stage):
    """Put the newest complete checkpoint under <stage> and remove the folders that are older or never finished
    (a kill leaves up to three). A damaged folder that may be newer stops it (CheckpointError): nothing moves."""
    best, newer, rest = survey(out, stage)
    if newer:
        raise CheckpointError(_damaged(newer[0], best))
    for folder in rest:
        _remove(folder)
    final = os.path.join(out, stage)
    if best is not None and best[0] != final:
        os.replace(best[0], final)
        _fsync(out)


def _set_aside(folder, out, stage):
    """Rename a damaged checkpoint to <stage>.damaged (or .damaged2, ...): kept for the user, out of the way."""
    aside, k = os.path.join(out, stage + ".damaged"), 1
    while os.path.lexists(aside):
        k += 1
        aside = os.path.join(out, f"{stage}.damaged{k}")
    os.rename(folder, aside)
    _fsync(out)
    return aside


# ---------------------------------------------------------------- saving and loading
def seal(folder, step):
    """Write the marker that makes `folder` a complete checkpoint of `step`: each file's size and sha256, as read
    back now (so a write that failed silently is caught here, not at resume)."""
    listing = {}
    for name in FILES:
        path = os.path.join(folder, name)
        if name.endswith(".safetensors"):
            with safe_open(path, "pt"):  # the header parses and the tensors cover the file
                pass
        listing[name] = dict(size=os.path.getsize(path), sha256=_digest(path))
    files.write_text(os.path.join(folder, MARKER), json.dumps(dict(step=step, files=listing), indent=1))


def save(out, stage, weights, ema, state, config):
    """Atomic checkpoint of a stage: weights / ema {name: tensor}, state (torch.load-able tensors and numbers only),
    config (JSON, with "step"). A full disk: CheckpointError (one line), the unfinished save removed, the previous
    checkpoint kept."""
    tidy(out, stage)
    final, tmp, old = (os.path.join(out, stage + x) for x in SUFFIXES)
    cpu = lambda tensors: {n: t.detach().float().cpu().contiguous() for n, t in tensors.items()}  # noqa: E731
    writers = {"model.safetensors": lambda path: save_file(cpu(weights), path),
               "ema.safetensors": lambda path: save_file(cpu(ema), path),
               "state.pt": lambda path: torch.save(state, path),
               "config.json": lambda path: files.fill(path, json.dumps(config, indent=1).encode())}
    try:
        os.makedirs(tmp)
        for name, write in writers.items():
            files.atomic_write(os.path.join(tmp, name), write)
        seal(tmp, config["step"])
        _fsync(tmp)
    except Exception as e:  # a full disk (files.DiskFull), a write that did not read back, a signal
        _remove(tmp)
        if not isinstance(e, files.DiskFull) and not (isinstance(e, OSError) and e.errno in files.FULL):
            raise
        kept = f"the checkpoint of step {latest(out, stage)[1]} is kept" if os.path.isdir(final) else "none before it"
        raise CheckpointError(f"{final}: the checkpoint of step {config['step']} was not saved, no space left on the "
                              f"device ({kept}); free some space and continue with --resume") from None
    _CHECKED[_signature(tmp)] = ("complete", config["step"], None)  # just hashed: no need to read it again
    if os.path.lexists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync(out)
    _remove(old)


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


# ---------------------------------------------------------------- the run folder
def lock(out):
    """Hold <out>/.lock for this process's lifetime (released by the OS even on SIGKILL); one line if another process
    holds it, or if .lock is not a plain file (a link is never followed, a folder is not a lock)."""
    path = os.path.join(out, ".lock")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as e:
        what = {errno.ELOOP: "a symbolic link", errno.EISDIR: "a folder"}.get(e.errno)
        raise CheckpointError(f"{path} is {what}, not a lock file: remove it and run again" if what else
                              f"{path} cannot be opened ({e.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"{path} is not a plain file, not a lock file: remove it and run again")
    f = os.fdopen(fd, "r+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = f.read(100).strip() or "unknown"
        f.close()
        raise CheckpointError(f"{out} is in use by another process ({holder}); wait for it to finish or choose "
                              "another --out") from None
    try:  # who holds it, for the message above; on a full disk the lock holds all the same
        f.truncate(0)
        f.write(f"pid {os.getpid()}")
        f.flush()
    except OSError:
        pass
    return f


def open_run(out, args, resume, allow_changed=False):
    """Before any model loads: take the run's lock; checkpoints in `out` only with `resume`, and then only with the
    same trajectory arguments (`args`: the new run's, as a dict). -> the lock (keep it while training)."""
    held = lock(out)
    try:
        files.remove_temporaries(out)  # what a kill in the middle of a write left (the step log's rewrite)
        check_resume(out, args, resume, allow_changed)
    except CheckpointError:
        held.close()  # now, not when the traceback is collected
        raise
    return held


def check_resume(out, args, resume, allow_changed):
    surveys = {s: survey(out, s) for s in STAGES}
    found = [f"{s}, damaged" if newer else f"{s} at step {best[1]}" for s, (best, newer, _) in surveys.items()
             if best or newer]
    if found and not resume:
        raise CheckpointError(f"{out} already holds checkpoints ({', '.join(found)}); continue it with --resume or "
                              "choose another --out")
    for s, (best, newer, _) in surveys.items():
        if newer and best is None:
            raise CheckpointError(_damaged(newer[0], best))
    for s, (best, newer, _) in surveys.items():
        if newer:  # fall back to the previous complete save; the damaged one is kept, renamed
            aside = [_set_aside(folder, out, s) for folder, _ in newer]
            print(f"warning: {newer[0][1]}: resuming from the previous complete save ({best[0]}, step {best[1]}); "
                  f"the damaged checkpoint is kept as {aside[0]}", file=sys.stderr)
        tidy(out, s)  # a kill may have left the newest checkpoint under .tmp or .old
    found = [(s, *latest(out, s)) for s in STAGES]
    found = [(s, f, n) for s, f, n in found if f is not None]
    if found and not allow_changed:
        old = json.load(open(os.path.join(found[0][1], "config.json")))
        keys = TRAJECTORY + (("max_steps", "epochs") if args["lr_schedule"] == "cosine" else ())  # lr(step) changes
        was = lambda k: old.get(k, ADDED.get(k))  # noqa: E731
        same = lambda k: (was(k) == args.get(k) or k == "tiny_bases" and  # noqa: E731 (older runs: absolute)
                          resolve_stored(old.get(k)) == resolve_stored(args.get(k)))
        changed = [f"--{k.replace('_', '-')} {was(k)!r} -> {args.get(k)!r}" for k in keys if not same(k)]
        if changed:
            raise CheckpointError(f"--resume would change the run's trajectory: {'; '.join(changed)} "
                                  "(--allow-changed-args accepts that)")


class StepLog:
    """<out>/log_<stage>.jsonl, one JSON line per step; flushed at every checkpoint; on resume cut back to the
    checkpoint's step (rewritten through files.atomic_write), so after any kill and resume every step appears exactly
    once. A full disk: CheckpointError (one line), like a checkpoint's."""

    def __init__(self, path, resume_step=0):
        self.path = path
        kept = []
        if os.path.isfile(path) and not os.path.islink(path):  # a link is replaced below, never read or written through
            for line in open(path, errors="replace"):
                try:
                    if json.loads(line)["step"] <= resume_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
                except (ValueError, KeyError, TypeError):  # a line cut by the kill
                    pass
        try:
            files.write_text(path, "".join(kept))
        except files.DiskFull as e:
            raise CheckpointError(str(e)) from None
        self.f = os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC), "a")

    def write(self, record):
        self.f.write(json.dumps(record) + "\n")

    def flush(self):
        try:
            self.f.flush()
            os.fsync(self.f.fileno())
        except OSError as e:
            if e.errno in files.FULL:
                raise CheckpointError(str(files.DiskFull(self.path))) from None
            raise

    def close(self):
        try:
            self.flush()
        finally:
            try:
                self.f.close()
            except OSError:  # the same full disk: flush said it
                pass
