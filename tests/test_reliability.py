"""Runs that survive any kill (train.py, support/checkpoint.py): a real SIGKILL at every file operation of a save and
at a random instant of a run, SIGTERM and Ctrl-C, then --resume gives bit-identical weights and a log with every
step once; one process per run folder; no silent restart, changed run or use of a damaged checkpoint; bad input is one
line and exit 2 before any model; ffmpeg dies with its parent."""
import contextlib
import json
import multiprocessing
import os
import pathlib
import shutil
import signal
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import model  # noqa: F401  (imported before forking: the children need not import it again)
import train
from support import checkpoint, media

COMMON = ["--data", "synthetic", "--size", "tiny", "--batch-size", "1", "--num-clips", "3", "--max-steps", "4",
          "--ckpt-every", "1"]  # 3 steps per epoch: a resume crosses an epoch
OPS = ("rmtree", "makedirs", "save_file", "save", "rename")  # what a save does to the disk


def forked(target, *args):
    """target(*args) in a forked child of this process (which has imported torch already): a real process that a
    real SIGKILL kills. -> the process, started."""
    p = multiprocessing.get_context("fork").Process(target=target, args=args)
    p.start()
    return p


def quiet_train(argv):
    torch.set_num_threads(1)
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        train.main(argv)


def weights(out):
    folder = checkpoint.latest(str(out))
    return {f"{f}:{k}": v for f in ("model", "ema") for k, v in load_file(f"{folder}/{f}.safetensors").items()}


def logged_steps(out):
    return [json.loads(line)["step"] for line in open(out / "log.jsonl")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of COMMON."""
    out = tmp_path_factory.mktemp("ref") / "run"
    quiet_train(COMMON + ["--out", str(out)])
    return out


def save_killed_at(k, out):
    """checkpoint.save of fake parameters, SIGKILLed just before its k-th file operation (k = 0: never)."""
    seen = []

    def hook(owner, name):
        real = getattr(owner, name)

        def op(*a, **kw):
            seen.append(name)
            if len(seen) == k:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **kw)
        setattr(owner, name, op)
    for owner, name in ((os, "makedirs"), (checkpoint, "save_file"), (torch, "save"), (os, "rename"),
                        (shutil, "rmtree")):
        hook(owner, name)
    params = {"w": torch.full((3,), 2.0)}
    opt = torch.optim.Adam(params.values())
    ema = type("EMA", (), dict(shadow_params=[torch.full((3,), 2.5)], optimization_step=2))()
    checkpoint.save(out, 2, params, ema, opt, torch.amp.GradScaler("cpu", enabled=False), {"a": 1})
    open(os.path.join(out, "ops"), "w").write(",".join(seen))


def test_sigkill_at_every_file_operation_of_a_save_leaves_a_whole_checkpoint(tmp_path):
    """Before a save: checkpoint-1 and checkpoint-0 (keep 2). A SIGKILL at any file operation of the save of step 2
    leaves checkpoint-1 whole or checkpoint-2 whole as the newest, and what --resume removes is only unfinished."""
    def fresh(out):
        os.makedirs(out)
        for step in (0, 1):
            os.makedirs(out / f"checkpoint-{step}")
            torch.save({"step": step}, out / f"checkpoint-{step}" / "state.pt")
            (out / f"checkpoint-{step}" / "config.json").write_text('{"a": 1}')
    probe = tmp_path / "probe"
    fresh(probe)
    p = forked(save_killed_at, 0, str(probe))
    p.join()
    assert p.exitcode == 0
    ops = (probe / "ops").read_text().split(",")
    assert set(ops) == set(OPS) and len(ops) >= 7, ops
    for k in range(1, len(ops) + 1):
        out = tmp_path / f"k{k}"
        fresh(out)
        p = forked(save_killed_at, k, str(out))
        p.join()
        assert p.exitcode == -signal.SIGKILL, k
        checkpoint.open_run(str(out), {"a": 1}, resume=True, allow_changed=False).close()  # removes the .tmp
        newest = checkpoint.latest(str(out))
        if newest.endswith("checkpoint-2"):
            assert load_file(f"{newest}/model.safetensors")["w"].tolist() == [2.0] * 3, k
            assert torch.load(f"{newest}/state.pt", weights_only=True)["ema_step"] == 2, k
        else:
            assert newest.endswith("checkpoint-1") and torch.load(f"{newest}/state.pt")["step"] == 1, k
        assert not [n for n in os.listdir(out) if n.endswith(".tmp")], (k, os.listdir(out))


def test_sigkill_at_a_random_instant_then_resume_is_exact(reference, tmp_path):
    """A real training process killed while it trains (after its first checkpoint, at a random point of a step or of
    a save), then resumed: the same weights, bit for bit, as the run never interrupted, and every step logged once."""
    for delay in (0.0, 0.7):
        out = tmp_path / f"run{delay}"
        p = forked(quiet_train, COMMON + ["--out", str(out)])
        while checkpoint.latest(str(out)) is None and p.is_alive():
            time.sleep(0.02)
        time.sleep(delay)
        os.kill(p.pid, signal.SIGKILL)
        p.join()
        assert p.exitcode in (-signal.SIGKILL, 0)
        quiet_train(COMMON + ["--out", str(out), "--resume"])
        w, r = weights(out), weights(reference)
        assert w.keys() == r.keys() and all(torch.equal(w[n], r[n]) for n in r)
        assert logged_steps(out) == [1, 2, 3, 4]


def test_sigterm_and_ctrl_c_save_then_resume_is_exact(reference, tmp_path, monkeypatch):
    real = train.joint_loss
    for sig in (signal.SIGTERM, signal.SIGINT):
        out = tmp_path / sig.name

        def signal_in_step_2(*a, step, **kw):
            if step == 1:
                os.kill(os.getpid(), sig)  # a real signal, through train.py's handler
            return real(*a, step=step, **kw)
        monkeypatch.setattr(train, "joint_loss", signal_in_step_2)
        with pytest.raises(SystemExit) as e:
            train.main(COMMON + ["--out", str(out), "--ckpt-every", "100"])
        assert e.value.code == 128 + sig and checkpoint.latest(str(out)).endswith("checkpoint-2")  # step 2 finished
        monkeypatch.setattr(train, "joint_loss", real)
        train.main(COMMON + ["--out", str(out), "--ckpt-every", "100", "--resume"])
        w, r = weights(out), weights(reference)
        assert all(torch.equal(w[n], r[n]) for n in r) and logged_steps(out) == [1, 2, 3, 4]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # train.main gives the handlers back


def fails_with(capsys, argv, code=2):
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == code and err[-1].startswith("error:"), err
    assert len(err) == 1 or code != 2, err  # bad input: that line alone (a diverging run has its progress bar above)
    return err[-1]


def test_one_process_per_run_no_silent_restart_no_changed_run(reference, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    with checkpoint.open_run(str(out), {}, resume=True, allow_changed=True):  # another process holds the run
        assert "is in use by another process" in fails_with(capsys, COMMON + ["--out", str(out), "--resume"])
    assert "already holds checkpoint-4; continue it with --resume" in fails_with(capsys, COMMON + ["--out", str(out)])
    err = fails_with(capsys, COMMON + ["--out", str(out), "--resume", "--seed", "3", "--lr", "0.01"])
    assert "--lr 0.001 -> 0.01; --seed 0 -> 3" in err
    train.main(COMMON + ["--out", str(out), "--resume", "--max-steps", "5", "--allow-changed-args"])
    assert checkpoint.latest(str(out)).endswith("checkpoint-5") and len(checkpoint.checkpoints(str(out))) == 2


@pytest.mark.parametrize("name, damage, why", [
    ("model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:100]), "cannot be read"),
    ("state.pt", lambda p: p.unlink(), "cannot be read"),
    ("ema.safetensors", lambda p: p.write_bytes(b"\0" * 64), "cannot be read"),
    ("config.json", lambda p: p.write_text("{"), "cannot be read")])
def test_a_damaged_checkpoint_stops_resume_with_one_line_and_deletes_nothing(reference, tmp_path, capsys, name,
                                                                             damage, why):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    damage(out / "checkpoint-4" / name)
    before = sorted(os.listdir(out / "checkpoint-4"))
    err = fails_with(capsys, COMMON + ["--out", str(out), "--resume"])
    assert str(out / "checkpoint-4" / name) in err and why in err, err
    assert sorted(os.listdir(out / "checkpoint-4")) == before and (out / "checkpoint-3").is_dir()


def test_a_checkpoint_of_another_model_is_refused_by_name(reference, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    argv = COMMON + ["--out", str(out), "--resume", "--allow-changed-args", "--conditioner", "crossattn"]
    assert "model.safetensors: not this model's" in fails_with(capsys, argv)


@pytest.mark.parametrize("argv, why", [
    (["--ema-decay", "nan"], "--ema-decay"), (["--ema-decay", "1"], "--ema-decay: 1 is outside"),
    (["--lr", "0"], "--lr: 0 is outside"), (["--batch-size", "0"], "--batch-size"), (["--fps", "9"], "--fps"),
    (["--p-uncond", "1.5"], "--p-uncond"), (["--num-clips", "x"], "'x' is not an integer"),
    (["--batch-size", "4", "--micro-batch", "3"], "--micro-batch 3 does not divide"),
    (["--seed", str(2 ** 63)], "--seed"),
    (["--num"], "unrecognized arguments: --num"), (["--device", "cuda"] if not torch.cuda.is_available() else
                                                    ["--device", "tpu"], "--device"),
    (["--size", "pretrained"], "hf download cvssp/audioldm-m-full"),
    (["--data", "greatesthits", "--root", "/nonexistent"], "--root"),
    (["--data", "greatesthits", "--root", ".", "--flist", "/nonexistent"], "--flist"),
    (["--tiny-bases", "/nonexistent"], "--tiny-bases"), (["--out", "/proc/nope"], "--out: cannot")])
def test_bad_input_one_line_exit_2_before_any_model(argv, why, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(train, "build_model", lambda *a, **k: pytest.fail("a model was built"))
    err = fails_with(capsys, ["--data", "synthetic", "--size", "tiny", "--num-clips", "2", "--batch-size", "1",
                              "--out", str(tmp_path / "run")] + argv)
    assert why in err, err


def test_a_diverging_run_stops_with_exit_3_and_keeps_its_last_checkpoint(tmp_path, capsys):
    """--lr 1e30: step 1 moves the weights to ~1e30 (finite), step 2's loss is not finite."""
    out = tmp_path / "run"
    assert "step 2: the loss is nan" in fails_with(capsys, COMMON + ["--out", str(out), "--lr", "1e30"], code=3)
    assert checkpoint.latest(str(out)).endswith("checkpoint-1")
    assert all(torch.isfinite(w).all() for w in weights(out).values())


def test_ffmpeg_dies_with_the_process_that_started_it():
    """A real SIGKILL of a process running a long ffmpeg: the ffmpeg is gone within seconds."""
    parent = forked(media.ffmpeg, ["-re", "-f", "lavfi", "-i", "testsrc=size=16x16:rate=5", "-t", "600", "-f", "null",
                                   "-"])  # 600 s in real time
    child = None
    for _ in range(300):
        child = next((int(pid) for pid in os.listdir("/proc") if pid.isdigit() and ppid(int(pid)) == parent.pid), None)
        if child:
            break
        time.sleep(0.05)
    assert child is not None, "no ffmpeg started"
    os.kill(parent.pid, signal.SIGKILL)
    parent.join()
    for _ in range(100):
        if state(child) in (None, "Z"):  # gone, or dead and not yet reaped
            break
        time.sleep(0.05)
    assert state(child) in (None, "Z"), "ffmpeg outlived its parent"


def stat_fields(pid):
    try:
        text = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, ...


def ppid(pid):
    fields = stat_fields(pid)
    return int(fields[1]) if fields else None


def state(pid):
    fields = stat_fields(pid)
    return fields[0] if fields else None


if not sys.platform.startswith("linux"):
    pytestmark = pytest.mark.skip(reason="real kills read /proc and PR_SET_PDEATHSIG: Linux")
