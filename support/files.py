"""Writing files: every file the project writes (checkpoints, step logs, clips, caches, lists) goes through
atomic_write, and every child process it starts (ffmpeg) dies with it. Not in the paper.

A write creates a new temporary file beside the target under a random name, exclusively (O_CREAT | O_EXCL: it never
opens a path that exists, so never writes through a file or link planted there), with the mode any program's files
get (0666 less the umask), lets the writer fill it, fsyncs it and renames it over the target: a reader, or a run
killed at any instant, never sees half a file, and a file or link already at the target is replaced, never written
through. A full disk becomes DiskFull, one line, and leaves no temporary file behind.
"""
import ctypes
import errno
import functools
import os
import re
import secrets
import signal
import stat
import subprocess
import sys

FULL = (errno.ENOSPC, errno.EDQUOT)
# what the writers we call say when the disk fills: safetensors (Rust io::Error), libc; torch.save says only
# "unexpected pos" or "file write failed", so for any other failure the free space decides (DiskFull.check)
FULL_TEXT = re.compile(r"No space left on device|Disk quota exceeded|os error (28|122)")
TEMPORARY = re.compile(r"\.tmp-[0-9a-f]{16}")  # the names temporary() gives, whatever the suffix


class DiskFull(OSError):
    """No space left on the device (or quota exceeded) while writing `path`; str(e) is one line for the CLIs."""

    def __init__(self, path):
        free = _free(os.path.dirname(os.path.abspath(path)))
        left = "" if free is None else f", {free / 2 ** 20:.1f} MiB free"
        super().__init__(errno.ENOSPC, f"{path}: not written, no space left on device{left}; free some space "
                                       "and run again", path)

    def __str__(self):
        return self.strerror

    @staticmethod
    def check(error, path):
        """True when `error`, raised while writing `path`, comes from a full disk."""
        if isinstance(error, OSError) and error.errno in FULL or FULL_TEXT.search(str(error)):
            return True
        free = _free(os.path.dirname(os.path.abspath(path)))
        return free is not None and free < 2 ** 20  # a write that failed on a (nearly) full disk


def _free(folder):
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize  # root may use the reserved blocks


def temporary(folder, suffix=""):
    """A new empty file in `folder` under a random name, created exclusively (0666 less the umask) -> its path."""
    while True:
        path = os.path.join(folder, f".tmp-{secrets.token_hex(8)}{suffix}")
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666))
            return path
        except FileExistsError:  # 2**64 names: only ever a planted file
            continue


def fsync(path):
    """Flush a file's or a folder's contents to the disk (a folder: the names in it)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, write):
    """write(tmp) fills a temporary file beside `path` (created exclusively by temporary()), which is then fsynced
    and renamed over `path`. Raises DiskFull (one line) when the disk fills; no temporary file is left behind."""
    path = os.path.abspath(path)  # also keeps a name starting with "-" from reaching ffmpeg as an option
    tmp = None
    try:
        tmp = temporary(os.path.dirname(path), os.path.splitext(path)[1])
        mode = stat.S_IMODE(os.stat(tmp).st_mode)  # what the umask gives a new file here
        write(tmp)
        if stat.S_IMODE(os.stat(tmp).st_mode) != mode:  # safetensors writes its own 0600 file and renames it over
            os.chmod(tmp, mode)
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException as e:  # a signal too: no temporary file left behind
        full = isinstance(e, Exception) and DiskFull.check(e, path)  # before the space comes back
        if tmp is not None and os.path.lexists(tmp):
            os.remove(tmp)
        if full:
            raise DiskFull(path) from None  # says how much is free now
        raise


def fill(tmp, data):
    """Write bytes into the temporary file that atomic_write made, not following links."""
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC), "wb") as f:
        f.write(data)


def write_bytes(path, data):
    atomic_write(path, lambda tmp: fill(tmp, data))


def write_text(path, text):
    write_bytes(path, text.encode())


def remove_temporaries(folder):
    """Remove the temporary files that a kill in the middle of atomic_write left in `folder` (the caller holds the
    folder, e.g. under a run's lock)."""
    for name in os.listdir(folder):
        if TEMPORARY.match(name):
            path = os.path.join(folder, name)
            if os.path.isfile(path) and not os.path.islink(path):
                os.remove(path)


# ---------------------------------------------------------------- child processes
try:
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
except (OSError, AttributeError):
    _PRCTL = None


def _die_with_parent(parent):
    """Runs in the child between fork and exec (Linux): SIGKILL it when the thread that started it dies, so that a
    killed run leaves no ffmpeg behind. Only a pre-bound C call and a pid check: nothing that could wait on a lock
    that another thread of the parent held at the fork."""
    _PRCTL(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


def run(args, stdin=None):
    """subprocess.run(args) with captured output, the child dying with this process (Linux)."""
    die = functools.partial(_die_with_parent, os.getpid()) if _PRCTL is not None else None
    return subprocess.run(args, input=stdin, capture_output=True, preexec_fn=die)
