"""Runs that survive any kill (checkpoint.py, train.py): a real SIGKILL at every file operation of a checkpoint save,
and in the middle of a file, then --resume gives bit-identical weights and a log with every step exactly once;
SIGTERM and Ctrl-C checkpoint and exit; one process per run folder; no silent restart or changed trajectory."""
import contextlib
import json
import multiprocessing
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import base_models  # noqa: F401  (imported here: the forked training processes then need not import diffusers)
from support import cache  # noqa: F401
from support import checkpoint
import data  # noqa: F401
import model  # noqa: F401
import train

ROOT = pathlib.Path(__file__).resolve().parent.parent
COMMON = ["--data", "synthetic", "--size", "tiny", "--base-steps", "0", "--batch-size", "1", "--num-clips", "3",
          "--ckpt-every", "2", "--max-steps", "4"]  # saves at steps 2 and 4; 3 steps per epoch, so resume crosses one
KILL = COMMON + ["--ckpt-every", "1", "--max-steps", "2"]  # two saves, at steps 1 and 2
OPS = ("makedirs", "save_file", "torch.save", "_fsync", "replace", "rmtree")  # the file operations of a save

def in_children(fn, *calls):
    """Run fn(*args) for each args in forked processes, two at a time (real processes, which a SIGKILL really kills;
    forked from this one, which has imported torch and diffusers already); -> their exit codes."""
    codes = []
    for i in range(0, len(calls), 2):
        ps = [multiprocessing.get_context("fork").Process(target=fn, args=a) for a in calls[i: i + 2]]
        for p in ps:
            p.start()
        for p in ps:
            p.join(600)
        codes += [p.exitcode for p in ps]
    return codes


def train_killed_at(k, how, argv, record=None):
    """train.main(argv), SIGKILLed at the k-th file operation inside checkpoint.save (how="before": just before it;
    "mid": a save_file leaves half a file behind first). k=0 never kills and writes the operations to `record`."""
    torch.set_num_threads(1)
    seen, inside = [], [False]

    def hook(owner, attr, name):
        fn = getattr(owner, attr)

        def run(*a, **kw):
            if inside[0]:
                seen.append(name)
                if len(seen) == k:
                    if how == "mid" and name == "save_file":
                        open(a[1], "wb").write(b"half a file")
                    os.kill(os.getpid(), signal.SIGKILL)
            return fn(*a, **kw)
        setattr(owner, attr, run)
    for owner, attr, name in ((checkpoint, "save_file", "save_file"), (checkpoint, "_fsync", "_fsync"),
                              (torch, "save", "torch.save"), (os, "makedirs", "makedirs"), (os, "replace", "replace"),
                              (shutil, "rmtree", "rmtree")):
        hook(owner, attr, name)
    save = checkpoint.save

    def counted(*a, **kw):
        inside[0] = True
        try:
            return save(*a, **kw)
        finally:
            inside[0] = False
    checkpoint.save = counted
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        train.main(argv)
    if record:
        open(record, "w").write(",".join(seen))


def run(args):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))


def weights(out):
    return {f"{f}:{k}": v for f in ("model", "ema") for k, v in load_file(out / "joint" / f"{f}.safetensors").items()}


def logged_steps(out):
    return [json.loads(line)["step"] for line in open(out / "log_joint.jsonl")]


def test_sigkill_at_every_point_of_a_save_then_resume_is_exact(tmp_path):
    ref = tmp_path / "ref"
    assert in_children(train_killed_at, (0, "", KILL + ["--out", str(ref)], tmp_path / "ops")) == [0]  # no kill
    ops = (tmp_path / "ops").read_text().split(",")
    assert logged_steps(ref) == [1, 2] and set(ops) == set(OPS), ops
    first = ops.index("rmtree") + 1  # the ops of the first save (step 1); the rest: the second's (step 2)
    points = [(k, "before") for k in range(1, len(ops) + 1)] + [
        (k, "mid") for k, op in enumerate(ops, 1) if op == "save_file"]
    outs = [str(tmp_path / f"k{k}{how}") for k, how in points]
    killed = in_children(train_killed_at, *[(k, how, KILL + ["--out", o]) for (k, how), o in zip(points, outs)])
    assert killed == [-signal.SIGKILL] * len(points), list(zip(points, killed))
    resumed = in_children(train_killed_at, *[(-1, "", KILL + ["--out", o, "--resume"]) for o in outs])
    assert resumed == [0] * len(points), list(zip(points, resumed))
    r = weights(ref)
    for point, out in zip(points, map(pathlib.Path, outs)):
        w = weights(out)
        assert w.keys() == r.keys() and all(torch.equal(w[n], r[n]) for n in r), point
        assert logged_steps(out) == [1, 2], (point, logged_steps(out))  # every step exactly once
        assert sorted(os.listdir(out)) == [".lock", "joint", "log_joint.jsonl"], (point, os.listdir(out))
    print(f"\n{len(points)} kill points ({first} in the first save, {len(ops) - first} in the second, "
          f"{len(points) - len(ops)} of them in the middle of a file): all resumed to identical weights")
    assert len(points) >= 25 and 10 < first < len(ops) - 10


def test_sigterm_and_ctrl_c_checkpoint_then_resume_is_exact(tmp_path, monkeypatch):
    train.main(COMMON + ["--out", str(tmp_path / "ref")])
    real = train.joint_loss
    for sig in (signal.SIGTERM, signal.SIGINT):
        out = tmp_path / sig.name

        def signal_in_step_3(*a, step, **kw):
            if step == 2:
                os.kill(os.getpid(), sig)  # a real signal, through train.py's handler
            return real(*a, step=step, **kw)
        monkeypatch.setattr(train, "joint_loss", signal_in_step_3)
        with pytest.raises(SystemExit) as e:
            train.main(COMMON + ["--out", str(out)])
        assert e.value.code == 128 + sig
        assert checkpoint.latest(out, "joint")[1] == 2  # saved at the step it stopped
        monkeypatch.setattr(train, "joint_loss", real)
        train.main(COMMON + ["--out", str(out), "--resume"])
        assert logged_steps(out) == [1, 2, 3, 4]
        w, ref = weights(out), weights(tmp_path / "ref")
        assert all(torch.equal(w[n], ref[n]) for n in ref)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # train.main gives the handlers back


def test_one_process_per_run_and_no_silent_restart(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    held = checkpoint.lock(str(out))  # another process is training here
    r = run(COMMON + ["--out", str(out)])
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: {out} is in use by another process (pid {os.getpid()}); wait for it to finish or choose another --out"]
    held.close()
    train.main(COMMON + ["--out", str(out)])
    for argv, why in ((COMMON, "already holds checkpoints (joint at step 4); continue it with --resume"),
                      (COMMON + ["--resume", "--seed", "3", "--lr", "0.01"], "--lr 0.001 -> 0.01; --seed 0 -> 3")):
        with pytest.raises(SystemExit) as e:
            train.main(argv + ["--out", str(out)])
        assert e.value.code == 2 and why in capsys.readouterr().err
    train.main(COMMON + ["--out", str(out), "--resume", "--max-steps", "5", "--allow-changed-args"])  # accepted
    assert checkpoint.latest(str(out), "joint")[1] == 5


def test_run_config_stores_the_shipped_bases_relative_to_the_repository(tmp_path):
    """A moved clone still samples its runs; a run written before (absolute path) still resumes."""
    from support import cli
    assert checkpoint.stored_path(cli.TINY_BASES) == os.path.join("weights", "tiny_bases.safetensors")
    assert checkpoint.resolve_stored(checkpoint.stored_path(cli.TINY_BASES)) == cli.TINY_BASES
    outside = str(tmp_path / "b.safetensors")
    assert checkpoint.stored_path(outside) == outside and checkpoint.resolve_stored(outside) == outside
    out = tmp_path / "run"
    train.main(COMMON + ["--out", str(out), "--max-steps", "2"])
    cfg = out / "joint" / "config.json"
    assert json.loads(cfg.read_text())["tiny_bases"] == os.path.join("weights", "tiny_bases.safetensors")
    resave(out, lambda parts: parts["config"].update(tiny_bases=cli.TINY_BASES))  # as runs before this change
    train.main(COMMON + ["--out", str(out), "--resume", "--max-steps", "2"])  # same file: not a changed argument
    resave(out, lambda parts: [parts["config"].pop(k) for k in ("snr_scale_v", "snr_scale_a")])  # runs before them
    train.main(COMMON + ["--out", str(out), "--resume", "--max-steps", "2"])  # absent = 1: not a changed argument
    with pytest.raises(checkpoint.CheckpointError, match="--snr-scale-a 1.0 -> 4.0"):
        argv = COMMON + ["--out", str(out), "--max-steps", "2", "--snr-scale-a", "4"]
        checkpoint.check_resume(str(out), vars(train.parse_args(argv)), True, False)
    resave(out, lambda parts: parts["config"].update(tiny_bases=outside))
    with pytest.raises(checkpoint.CheckpointError, match="--tiny-bases"):
        checkpoint.check_resume(str(out), vars(train.parse_args(COMMON + ["--out", str(out)])), True, False)


def test_weights_load_strictly_both_ways(tmp_path):
    joint_model, _ = model.build_model("tiny")
    names = joint_model.stage_parameters("joint")
    good = {n: p.detach() for n, p in names.items()}
    for bad, why in (({}, "tensors missing"), ({**good, "extra.weight": torch.zeros(1)}, "1 unexpected"),
                     ({**good, "blocks_v.0.proj_out.weight": torch.zeros(3)}, "blocks_v.0.proj_out.weight has shape")):
        save_file(bad, tmp_path / "ema.safetensors")
        with pytest.raises(checkpoint.CheckpointError, match=why) as e:
            checkpoint.load_weights(joint_model, tmp_path, names)
        assert str(tmp_path / "ema.safetensors") in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "ema.safetensors").write_bytes(b"\0" * 100)  # damaged
    with pytest.raises(checkpoint.CheckpointError, match="cannot be read"):
        checkpoint.load_weights(joint_model, tmp_path, names)


@pytest.mark.parametrize("argv, why", [
    (["--ema-decay", "nan"], "--ema-decay: nan is outside"), (["--ema-decay", "1"], "--ema-decay: 1 is outside"),
    (["--lr", "nan"], "--lr: nan"), (["--lr", "0"], "--lr: 0 is outside"), (["--batch-size", "0"], "--batch-size"),
    (["--ckpt-every", "0"], "--ckpt-every"), (["--fps", "0"], "--fps"), (["--p-uncond", "1.5"], "--p-uncond"),
    (["--max-steps", "0", "--base-steps", "0"], "nothing to train"), (["--micro-batch", "0"], "--micro-batch"),
    (["--batch-size", "4", "--micro-batch", "3"], "--micro-batch 3 does not divide"),
    (["--seed", str(2 ** 63)], "--seed"), (["--fps", "1"], "--fps: 1 is outside"), (["--fps", "9"], "--fps"),
    (["--device", "meta"], "--device meta: use cpu, cuda"), (["--device", "cuda:99"], "CUDA devices here"),
    (["--num-workers", "65"], "--num-workers"), (["--size", "pretrained"], "add --size tiny"),
    (["--data", "greatesthits", "--size", "tiny", "--root", "/nonexistent"], "--root"),
    (["--data", "greatesthits", "--size", "tiny", "--root", ".", "--flist", "/nonexistent"], "--flist"),
    (["--cache", "/nonexistent"], "--cache"), (["--size", "pretrained"], "hf download cvssp/audioldm-m-full"),
    (["--data", "greatesthits", "--size", "pretrained", "--root", "/nonexistent"], "--root"),  # before the weights
    (["--out", "/proc/nope"], "--out: cannot write")])
def test_bad_input_one_line_exit_2_before_any_model(argv, why, monkeypatch, capsys):
    monkeypatch.setattr(train, "build_model", lambda *a, **k: pytest.fail("a model was built"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as e:
        train.main(["--data", "synthetic", "--size", "tiny", "--num-clips", "2", "--batch-size", "1",
                    "--out", str(pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / "svg-bad-input")] + argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error:") and why in err[0], err


def test_divergence_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    """--lr 1e30: step 1 moves the weights to ~1e30 (finite), step 2's loss is nan: exit 3, the step-1 checkpoint
    stays, nothing non-finite is saved (the EMA included)."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train.main(COMMON + ["--out", str(out), "--lr", "1e30", "--ckpt-every", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 3 and err[-1].startswith("error: step 2: the loss is nan; the run diverged"), err
    assert checkpoint.latest(str(out), "joint")[1] == 1
    assert all(torch.isfinite(w).all() for w in weights(out).values())


@pytest.fixture(scope="module")
def one_step_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    train.main(COMMON + ["--out", str(out), "--max-steps", "1"])
    return out


def resave(out, edit):
    """Rewrite a run's joint checkpoint through checkpoint.save after edit({model, ema, state, config}) changed its
    parts: a consistent save (its files match their marker) of content that does not fit this train.py."""
    folder = out / "joint"
    parts = dict(model=load_file(folder / "model.safetensors"), ema=load_file(folder / "ema.safetensors"),
                 state=torch.load(folder / "state.pt", weights_only=True),
                 config=json.loads((folder / "config.json").read_text()))
    edit(parts)
    checkpoint.save(str(out), "joint", parts["model"], parts["ema"], parts["state"], parts["config"])


def rename_a_tensor(parts):
    first = sorted(parts["ema"])[0]
    parts["ema"]["renamed." + first] = parts["ema"].pop(first)


@pytest.mark.parametrize("name, edit, why", [
    ("ema.safetensors", rename_a_tensor, "does not hold the"),
    ("state.pt", lambda parts: parts["state"].pop("scaler"), "not the step, optimizer and loss-scaler state"),
    ("state.pt", lambda parts: parts.update(state=[1, 2]), "not the step, optimizer"),
    ("config.json", lambda parts: parts["config"].update(tiny_bases=7), '"tiny_bases" is 7, not str'),
    ("config.json", lambda parts: parts["config"].update(fps="8"), '"fps" is \'8\', not int')])
def test_resume_refuses_a_checkpoint_that_does_not_fit_with_one_line(one_step_run, tmp_path, capsys, name, edit, why):
    """A checkpoint whose files are whole (checkpoint.py checks that) but whose content is not this run's: a renamed
    EMA tensor, a state.pt without the loss scaler or not a dict, a config value of the wrong type."""
    out = tmp_path / "run"
    shutil.copytree(one_step_run, out)
    resave(out, edit)
    with pytest.raises(SystemExit) as e:
        train.main(COMMON + ["--out", str(out), "--max-steps", "1", "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and why in err[0] and str(out / "joint" / name) in err[0], err


def test_sigterm_or_ctrl_c_while_the_model_is_built_exit_at_once(tmp_path, monkeypatch, capsys):
    """Before the training loop a signal exits with 128 + signal and one line: no traceback, no checkpoint."""
    out = tmp_path / "term"
    p = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *COMMON, "--out", str(out)], cwd=ROOT, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    for line in p.stdout:
        if line.startswith("building the model"):
            break
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 143 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("interrupted (SIGTERM) outside the training loop"), err
    assert not [n for n in os.listdir(out) if n.startswith("joint")]
    real = train.build_model

    def ctrl_c_while_building(*a, **kw):
        os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **kw)
    monkeypatch.setattr(train, "build_model", ctrl_c_while_building)
    with pytest.raises(SystemExit) as e:
        train.main(COMMON + ["--out", str(tmp_path / "int")])
    assert e.value.code == 130 and "interrupted (SIGINT)" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "int")) == [".lock"]
