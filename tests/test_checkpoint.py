"""support/checkpoint.py: a damaged checkpoint (each file cut short, overwritten or removed in turn, the marker
included) is reported in one line naming the file, or --resume falls back to the previous complete save; it is never
deleted, and training never restarts from step 0 over it. A full disk during a save is one line and keeps the
previous checkpoint."""
import errno
import json
import os
import pathlib
import shutil

import pytest
import torch

from support import checkpoint
import train

COMMON = ["--data", "synthetic", "--size", "tiny", "--base-steps", "0", "--batch-size", "1", "--num-clips", "3",
          "--lr-schedule", "constant"]
DAMAGES = {"cut short": lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
           "overwritten": lambda p: p.write_bytes(bytes(255 - b for b in p.read_bytes())),  # same size
           "removed": lambda p: p.unlink()}
NAMES = checkpoint.FILES + (checkpoint.MARKER,)


def tensors(seed):
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(4, 3, generator=g), "b.bias": torch.randn(5, generator=g)}


def save(out, step):
    checkpoint.save(str(out), "joint", tensors(step), tensors(100 + step), dict(step=step, opt={}), dict(step=step))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """run/: joint at step 2; with_old/: the same plus joint.old at step 1, as a kill just before the save of step 2
    removes the previous one leaves it."""
    root = tmp_path_factory.mktemp("saved")
    save(root / "with_old", 1)
    shutil.copytree(root / "with_old" / "joint", root / "step1")
    save(root / "with_old", 2)
    shutil.copytree(root / "with_old", root / "run")
    os.rename(root / "step1", root / "with_old" / "joint.old")
    return root


def snapshot(folder):
    return {p.name: p.read_bytes() for p in pathlib.Path(folder).iterdir()}


def test_a_save_lists_every_file_and_reads_back(saved):
    run = saved / "run"
    assert sorted(os.listdir(run)) == ["joint"]
    listing = json.loads((run / "joint" / checkpoint.MARKER).read_text())
    assert listing["step"] == 2 and sorted(listing["files"]) == sorted(checkpoint.FILES)
    assert all(listing["files"][n]["size"] == (run / "joint" / n).stat().st_size for n in checkpoint.FILES)
    assert checkpoint.latest(str(run), "joint") == (str(run / "joint"), 2)
    assert checkpoint.survey(str(saved / "with_old"), "joint")[0] == (str(saved / "with_old" / "joint"), 2)


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("name", NAMES)
def test_damage_without_an_earlier_save_is_one_line_and_deletes_nothing(saved, tmp_path, name, damage):
    out = tmp_path / "run"
    shutil.copytree(saved / "run", out)
    DAMAGES[damage](out / "joint" / name)
    before = snapshot(out / "joint")
    for call in (lambda: checkpoint.latest(str(out), "joint"), lambda: checkpoint.tidy(str(out), "joint"),
                 lambda: checkpoint.open_run(str(out), {}, resume=True)):
        with pytest.raises(checkpoint.CheckpointError) as e:
            call()
        message = str(e.value)
        assert "\n" not in message and "no earlier complete save" in message, message
        assert message.startswith(str(out / "joint")) and name in message, message  # names the file
    with pytest.raises(checkpoint.CheckpointError, match=r"already holds checkpoints \(joint, damaged\)"):
        checkpoint.open_run(str(out), {}, resume=False)  # no silent fresh start over it either
    assert snapshot(out / "joint") == before and sorted(os.listdir(out)) == [".lock", "joint"]


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("name", NAMES)
def test_damage_with_an_earlier_save_falls_back_on_resume(saved, tmp_path, capsys, name, damage):
    out = tmp_path / "run"
    shutil.copytree(saved / "with_old", out)
    DAMAGES[damage](out / "joint" / name)
    before = snapshot(out / "joint")
    with pytest.raises(checkpoint.CheckpointError, match="previous save .*joint.old, step 1. is complete"):
        checkpoint.latest(str(out), "joint")  # sampling: never the older one in its place, silently
    checkpoint.open_run(str(out), {}, resume=True, allow_changed=True).close()
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith("warning: ") and "resuming from the previous complete save" \
        in warning[0] and warning[0].endswith(f"kept as {out / 'joint.damaged'}"), warning
    assert checkpoint.latest(str(out), "joint") == (str(out / "joint"), 1)
    assert snapshot(out / "joint.damaged") == before  # kept as it was, for the user to look at
    assert sorted(os.listdir(out)) == [".lock", "joint", "joint.damaged"]


def test_checkpoints_from_before_the_listing_marker_still_resume_and_are_checked(saved, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(saved / "run", out)
    (out / "joint" / checkpoint.MARKER).write_text("2\n")  # the marker as earlier versions wrote it
    assert checkpoint.latest(str(out), "joint") == (str(out / "joint"), 2)
    state = out / "joint" / "state.pt"
    state.write_bytes(state.read_bytes()[:-20])
    with pytest.raises(checkpoint.CheckpointError, match=f"{state} cannot be read"):
        checkpoint.latest(str(out), "joint")


@pytest.mark.parametrize("fails", ["save_file", "torch.save", "fsync"])
def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(saved, tmp_path, monkeypatch, fails):
    out = tmp_path / "run"
    shutil.copytree(saved / "run", out)
    before = snapshot(out / "joint")

    def full(*a, **kw):
        if fails != "fsync":
            pathlib.Path(a[1]).write_bytes(b"half")  # some of the file got written first
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    target = dict(save_file=(checkpoint, "save_file"), fsync=(checkpoint, "_fsync"))
    if fails == "torch.save":
        monkeypatch.setattr(torch, "save", lambda obj, path: full(obj, path))
    else:
        monkeypatch.setattr(*target[fails], full)
    with pytest.raises(checkpoint.CheckpointError) as e:
        save(out, 3)
    assert str(e.value).startswith(f"{out / 'joint'}: the checkpoint of step 3 was not saved, no space left on the "
                                   "device (the checkpoint of step 2 is kept)"), str(e.value)
    monkeypatch.undo()
    assert sorted(os.listdir(out)) == ["joint"] and snapshot(out / "joint") == before  # no temporary left behind
    assert checkpoint.latest(str(out), "joint") == (str(out / "joint"), 2)


def test_a_full_disk_in_the_step_log_is_one_line(tmp_path, monkeypatch):
    log = checkpoint.StepLog(str(tmp_path / "log_joint.jsonl"))
    log.write(dict(step=1))

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(checkpoint.CheckpointError, match="log_joint.jsonl: not written, no space left on device"):
        log.flush()
    monkeypatch.undo()
    log.close()


# ---------------------------------------------------------------- through train.py
@pytest.fixture(scope="module")
def two_saves(tmp_path_factory):
    """A tiny run trained to step 1, then resumed to step 2; step1/: its checkpoint of step 1."""
    root = tmp_path_factory.mktemp("two")
    train.main(COMMON + ["--out", str(root / "run"), "--max-steps", "1"])
    shutil.copytree(root / "run" / "joint", root / "step1")
    train.main(COMMON + ["--out", str(root / "run"), "--max-steps", "2", "--resume"])
    return root


def test_train_never_restarts_over_a_damaged_checkpoint(two_saves, tmp_path, capsys):
    """Before: a damaged joint/ was deleted and training restarted from step 0, with or without --resume."""
    out = tmp_path / "run"
    shutil.copytree(two_saves / "run", out)
    ema = out / "joint" / "ema.safetensors"
    ema.write_bytes(ema.read_bytes()[:-100])
    damaged = snapshot(out / "joint")
    capsys.readouterr()
    for resume in ([], ["--resume"]):
        with pytest.raises(SystemExit) as e:
            train.main(COMMON + ["--out", str(out), "--max-steps", "2"] + resume)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error:"), err
        assert ("already holds checkpoints (joint, damaged)" if not resume else f"{ema} has ") in err[0], err
    assert snapshot(out / "joint") == damaged  # kept as it was
    assert [json.loads(line)["step"] for line in open(out / "log_joint.jsonl")] == [1, 2]  # the log too


def test_train_resume_falls_back_to_the_previous_complete_save(two_saves, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(two_saves / "run", out)
    good = snapshot(out / "joint")
    ema = out / "joint" / "ema.safetensors"
    ema.write_bytes(ema.read_bytes()[:-100])
    shutil.copytree(two_saves / "step1", out / "joint.old")  # the previous save, as a kill before its removal leaves it
    capsys.readouterr()
    train.main(COMMON + ["--out", str(out), "--max-steps", "2", "--resume"])
    err = capsys.readouterr().err
    assert f"warning: {ema} has " in err and "resuming from the previous complete save" in err, err
    assert [json.loads(line)["step"] for line in open(out / "log_joint.jsonl")] == [1, 2]
    redone = snapshot(out / "joint")
    for name in ("model.safetensors", "ema.safetensors"):  # step 2 again from step 1: bit-identical
        assert redone[name] == good[name], name
    assert sorted(os.listdir(out)) == [".lock", "joint", "joint.damaged", "log_joint.jsonl"]
