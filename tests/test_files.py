"""support/files.py and its users: every write goes through a temporary file created exclusively and renamed into
place (links planted at the target or at the old fixed temporary names are never written through), files get the
umask's mode, a full disk is one line with no temporary file left, a .lock that is a link or a folder is one line,
and ffmpeg dies with the process that started it."""
import errno
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import scipy.io.wavfile
import torch
from safetensors.torch import save_file

import data
from support import checkpoint, files, media
import train

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture
def victim(tmp_path):
    """A file and a folder that a planted link points to: they must stay as they are."""
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "precious.txt").write_text("precious")
    return tmp_path / "victim"


def untouched(victim):
    return os.listdir(victim) == ["precious.txt"] and (victim / "precious.txt").read_text() == "precious"


def no_space(*a, **kw):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def fails_with(error):
    def write(tmp):
        raise error
    return write


def test_temporary_files_are_created_exclusively_never_through_what_is_there(tmp_path, victim, monkeypatch):
    names = iter(["0" * 16, "1" * 16])
    monkeypatch.setattr(files.secrets, "token_hex", lambda n: next(names))
    os.symlink(victim / "precious.txt", tmp_path / f".tmp-{'0' * 16}.txt")  # planted at the first name drawn
    files.write_text(tmp_path / "out.txt", "new")
    assert (tmp_path / "out.txt").read_text() == "new" and untouched(victim)
    assert os.path.islink(tmp_path / f".tmp-{'0' * 16}.txt") and not os.path.lexists(tmp_path / f".tmp-{'1' * 16}.txt")


@pytest.mark.parametrize("write", ["text", "wav", "mp4", "step log"])
def test_a_link_at_the_target_is_replaced_not_written_through(tmp_path, victim, write):
    target = tmp_path / {"text": "captions.txt", "wav": "a.wav", "mp4": "a.mp4", "step log": "log_joint.jsonl"}[write]
    os.symlink(victim / "precious.txt", target)
    if write == "text":
        files.write_text(target, "x\n")
    elif write == "wav":
        media.write_wav(target, np.zeros(160))
    elif write == "mp4":
        media.write_mp4(target, np.zeros((4, 16, 16, 3), np.uint8), 8, np.zeros(8000))
    else:
        checkpoint.StepLog(str(target)).close()
    assert untouched(victim) and target.is_file() and not target.is_symlink()
    assert sorted(os.listdir(tmp_path)) == sorted([target.name, "victim"])  # no temporary file left


def test_links_at_the_old_fixed_temporary_names_stay_untouched(tmp_path, victim):
    """Earlier versions wrote <log>.tmp, <stage>.tmp/ and <cache file>.tmp, following whatever was there."""
    out = tmp_path / "run"
    out.mkdir()
    os.symlink(victim / "precious.txt", out / "log_joint.jsonl.tmp")
    os.symlink(victim, out / "joint.tmp")
    (out / "log_joint.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    log = checkpoint.StepLog(str(out / "log_joint.jsonl"), resume_step=1)
    log.write(dict(step=2))
    log.close()
    assert (out / "log_joint.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'
    weights = {"w": torch.ones(3)}
    checkpoint.save(str(out), "joint", weights, weights, dict(step=1), dict(step=1))
    assert untouched(victim) and checkpoint.latest(str(out), "joint") == (str(out / "joint"), 1)
    assert not os.path.lexists(out / "joint.tmp")  # the link itself is removed, not what it points to


@pytest.mark.parametrize("kind", ["link", "folder", "fifo"])
def test_a_lock_that_is_not_a_plain_file_is_one_line(tmp_path, victim, kind, capsys):
    out = tmp_path / "run"
    out.mkdir()
    plant = {"link": lambda p: os.symlink(victim / "precious.txt", p), "folder": os.mkdir, "fifo": os.mkfifo}[kind]
    plant(out / ".lock")
    with pytest.raises(checkpoint.CheckpointError, match=r"\.lock is (a symbolic link|a folder|not a plain file)"):
        checkpoint.lock(str(out))
    assert untouched(victim)
    if kind == "folder":  # through the CLI: one line, exit 2, before any model
        with pytest.raises(SystemExit) as e:
            train.main(["--data", "synthetic", "--size", "tiny", "--num-clips", "2", "--batch-size", "1",
                        "--out", str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0] == f"error: {out / '.lock'} is a folder, not a lock " \
            "file: remove it and run again", err


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_get_the_umask_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        media.write_wav(tmp_path / "a.wav", np.zeros(160))
        media.write_mp4(tmp_path / "a.mp4", np.zeros((4, 16, 16, 3), np.uint8), 8, np.zeros(8000))
        files.write_text(tmp_path / "captions.txt", "x\n")
        files.atomic_write(tmp_path / "shard.safetensors", lambda t: save_file({"a": torch.ones(2)}, t))  # as cache
        checkpoint.StepLog(str(tmp_path / "log_joint.jsonl")).close()
        checkpoint.lock(str(tmp_path)).close()
        checkpoint.save(str(tmp_path), "joint", {"w": torch.ones(3)}, {"w": torch.ones(3)}, dict(step=1), dict(step=1))
    finally:
        os.umask(old)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) == 11  # 6 files here, 5 in the checkpoint
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in written} == {p.name: oct(0o666 & ~umask) for p in written}


@pytest.mark.parametrize("write", ["wav", "mp4", "text", "torch-like"])
def test_a_full_disk_is_one_line_and_leaves_no_temporary_file(tmp_path, monkeypatch, write):
    target = tmp_path / f"clip.{write}"

    def half_then_full(path, *a, **kw):
        pathlib.Path(path).write_bytes(b"half")
        no_space()
    if write == "wav":
        monkeypatch.setattr(scipy.io.wavfile, "write", half_then_full)
        call = lambda: media.write_wav(target, np.zeros(160))  # noqa: E731
    elif write == "mp4":
        monkeypatch.setattr(media, "_ffmpeg", lambda *a, **kw: (1, b"", "av_interleaved_write_frame(): No space left "
                                                                          "on device\nError writing trailer"))
        call = lambda: media.write_mp4(target, np.zeros((4, 16, 16, 3), np.uint8), 8, np.zeros(8000))  # noqa: E731
    elif write == "text":
        monkeypatch.setattr(files, "fill", half_then_full)
        call = lambda: files.write_text(target, "x")  # noqa: E731
    else:  # torch.save says only "unexpected pos ..." when the disk fills: the free space tells
        monkeypatch.setattr(files, "_free", lambda folder: 4096)
        call = lambda: files.atomic_write(target, fails_with(RuntimeError("unexpected pos")))  # noqa: E731
    with pytest.raises(files.DiskFull) as e:
        call()
    assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC
    assert str(e.value).startswith(f"{target}: not written, no space left on device") and "\n" not in str(e.value)
    assert os.listdir(tmp_path) == []


def test_other_failures_are_not_called_a_full_disk(tmp_path):
    with pytest.raises(RuntimeError, match="a bug"):
        files.atomic_write(tmp_path / "x", fails_with(RuntimeError("a bug")))
    assert os.listdir(tmp_path) == []


def test_a_full_disk_in_a_cli_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(scipy.io.wavfile, "write", no_space)
    with pytest.raises(SystemExit) as e:
        data.main(["synthetic", "--out", str(tmp_path), "--num-clips", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    wav = tmp_path / "synth_1000000.wav"
    assert e.value.code == 2 and err[-1].startswith(f"error: {wav}: not written, no space"), err
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux's")
def test_ffmpeg_dies_with_the_process_that_started_it():
    """A real SIGKILL of a Python process running a long ffmpeg: the ffmpeg is gone within seconds (before: it ran on,
    e.g. filling the memory at --fps 1e9 after data.py was killed)."""
    script = ("import sys; sys.path.insert(0, sys.argv[1]); from support import media; media._ffmpeg(['-re', '-f', "
              "'lavfi', '-i', 'testsrc=size=16x16:rate=5', '-t', '600', '-f', 'null', '-'])")  # 600 s in real time
    parent = subprocess.Popen([sys.executable, "-c", script, str(ROOT)])
    child = None
    try:
        for _ in range(600):  # its import takes a few seconds on a busy machine
            pids = map(int, filter(str.isdigit, os.listdir("/proc")))
            child = next((pid for pid in pids if _ppid(pid) == parent.pid), None)
            if child or parent.poll() is not None:
                break
            time.sleep(0.1)
        assert child is not None and parent.poll() is None, "no ffmpeg started"
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        for _ in range(50):
            if _state(child) in (None, "Z"):  # gone, or dead and not yet reaped by its new parent
                break
            time.sleep(0.1)
        assert _state(child) in (None, "Z"), "ffmpeg outlived its parent"
    finally:
        if child is not None and _state(child) not in (None, "Z"):
            os.kill(child, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()


def _stat_fields(pid):
    try:
        text = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, ...


def _ppid(pid):
    fields = _stat_fields(pid)
    return int(fields[1]) if fields else None


def _state(pid):
    fields = _stat_fields(pid)
    return fields[0] if fields else None
