"""Algorithm 1 and the sampling CLI / pipeline: with gamma = 1 and untrained (identity) added modules, each modality is
sampled exactly as its base model would be alone with diffusers' DDIMScheduler; seeds, files, manifest and page;
the pipeline object over a trained run; what a run's config says is what is sampled; bad input exits 2."""
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from diffusers import DDIMScheduler

import sample
import train
from model import build_model
from pipeline import SoundingVideoPipeline

ROOT = pathlib.Path(__file__).resolve().parent.parent


def base_alone(unet, x, text, null, scale, T, call, sched_json, prediction_type):
    """The base model on its own: diffusers' DDIM ('trailing' grid, final alpha 1) with classifier-free guidance."""
    cfg = {k: v for k, v in json.loads((ROOT / "configs" / sched_json).read_text()).items() if not k.startswith("_")}
    s = DDIMScheduler.from_config({**cfg, "timestep_spacing": "trailing", "set_alpha_to_one": True,
                                   "prediction_type": prediction_type})  # tiny U-Nets predict v (base_models.py)
    s.set_timesteps(T)
    for t in s.timesteps:
        u, c = call(unet, torch.cat([x, x]), t, torch.cat([null, text])).chunk(2)
        x = s.step(u + scale * (c - u), t, x).prev_sample
    return x


def test_gamma_one_identity_modules_equal_base_models():
    torch.manual_seed(0)
    model, bases = build_model("tiny")
    prompts, seeds, T = ["a red wooden box", "a blue metal can"], [3, 4], 4
    x_v, x_a = sample.generate(model, bases, prompts, seeds, T=T, gamma=1.0, bar=False)
    text_v, text_a = bases.encode_text(prompts)
    null_v, null_a = bases.encode_text(["", ""])
    gs = [torch.Generator().manual_seed(s) for s in seeds]
    F_, h = 4 * bases.fps, bases.video_size // 8
    n_v = torch.stack([torch.randn(4, F_, h, h, generator=g) for g in gs])  # the same draws as generate()
    n_a = torch.stack([torch.randn(8, 100, 16, generator=g) for g in gs])
    video = lambda u, x, t, c: u(x, t, encoder_hidden_states=c.repeat_interleave(F_, 0)).sample
    audio = lambda u, x, t, c: u(x, t, encoder_hidden_states=None, class_labels=c).sample
    with torch.no_grad():
        ref_v = base_alone(model.video_unet, n_v, text_v, null_v, 7.5, T, video, "animatediff_ddim_scheduler.json",
                           bases.prediction_type["v"])
        ref_a = base_alone(model.audio_unet, n_a, text_a, null_a, 2.5, T, audio, "audioldm_ddim_scheduler.json",
                           bases.prediction_type["a"])
    assert torch.allclose(x_v, ref_v, rtol=1e-4, atol=1e-4) and torch.allclose(x_a, ref_a, rtol=1e-4, atol=1e-4)
    x_v2, _ = sample.generate(model, bases, prompts, seeds, T=T, gamma=2.0, bar=False)
    assert not torch.allclose(x_v, x_v2, atol=1e-3)  # gamma really changes the local grids


def test_samples_do_not_depend_on_batch_size():
    torch.manual_seed(0)
    model, bases = build_model("tiny")
    kw = dict(T=3, gamma=1.5, bar=False)
    x_v, x_a = sample.generate(model, bases, ["a red wooden box", "a glass bottle"], [11, 12], **kw)
    x_v1, x_a1 = sample.generate(model, bases, ["a glass bottle"], [12], **kw)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # float order differs with the batch: 1e-6, not 0
    assert rel(x_v[1:], x_v1) < 1e-4 and rel(x_a[1:], x_a1) < 1e-4 and rel(x_v[:1], x_v1) > 0.1


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny trained run folder (both stages, a few steps; the trained weights are what matters, not quality)."""
    out = tmp_path_factory.mktemp("run") / "tiny"
    train.main(["--data", "synthetic", "--size", "tiny", "--base-steps", "2", "--max-steps", "2", "--batch-size", "2",
                "--num-clips", "4", "--out", str(out)])
    return out


def test_cli_files_manifest_page_and_seeds(run, tmp_path):
    argv = ["--ckpt", str(run), "--prompt", "a red wooden box", "--prompt", "a glass bottle", "--steps", "2",
            "--gamma", "1", "1.5"]
    for d, seed in (("a", 5), ("b", 5), ("c", 6)):
        sample.main(argv + ["--out", str(tmp_path / d), "--seed", str(seed)])
    clips = sorted(f for f in os.listdir(tmp_path / "a") if f.endswith((".mp4", ".wav")))
    assert len(clips) == 8 and clips == sorted(f for f in os.listdir(tmp_path / "b") if f.endswith((".mp4", ".wav")))
    for n in clips:  # same seed, same bytes (mp4 and wav); another seed, other bytes
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes(), n
        assert (tmp_path / "a" / n).read_bytes() != (tmp_path / "c" / n).read_bytes(), n
    rows = [json.loads(line) for line in open(tmp_path / "a" / "manifest.jsonl")]
    assert sorted(r["file"] for r in rows) == [c for c in clips if c.endswith(".mp4")]
    assert {(r["gamma"], r["prompt"]) for r in rows} == {(g, p) for g in (1.0, 1.5) for p in ("a red wooden box",
                                                                                           "a glass bottle")}
    seeds = {g: [r["seed"] for r in rows if r["gamma"] == g] for g in (1.0, 1.5)}
    assert seeds[1.0] == seeds[1.5]  # the same noise at each gamma: the rows compare the knob
    assert all(r["checkpoint"] == os.path.abspath(run) and r["trained_steps"] == {"base": 2, "joint": 2} for r in rows)
    page = (tmp_path / "a" / "index.html").read_text()
    found = re.findall(r'<video controls preload="metadata" poster="([^"]+)" src="([^"]+)"', page)
    assert sorted(s for _, s in found) == sorted(r["file"] for r in rows)
    assert all((tmp_path / "a" / s).is_file() and (tmp_path / "a" / p).is_file() for p, s in found)
    assert page.count("<tr>") == 1 + 2 and "T = 2 steps" in page  # a row per prompt and seed, a column per gamma


def test_pipeline_equals_cli_and_honours_seconds(run, tmp_path):
    pipe = SoundingVideoPipeline.from_pretrained(str(run))
    out = pipe("a red wooden box", num_inference_steps=2, gamma=1.5, generator=5, output_type="uint8")
    assert out.frames.shape == (1, 32, 64, 64, 3) and out.frames.dtype == np.uint8
    assert out.audios.shape == (1, 64000) and out.audios.dtype == np.float32
    assert (out["fps"], out["sample_rate"]) == (8, 16000)
    sample.main(["--ckpt", str(run), "--prompt", "a red wooden box", "--steps", "2", "--seed", "5", "--out",
                 str(tmp_path / "cli")])
    wav, sr = sf.read(tmp_path / "cli" / "0000_a-red-wooden-box_g1.5.wav", dtype="float32")
    assert sr == 16000 and np.array_equal(wav, out.audios[0])  # the CLI is this pipeline
    short = pipe(["a", "b"], num_inference_steps=1, generator=1, seconds=2)  # both modalities follow `seconds`
    assert short.frames.shape[:2] == (2, 16) and short.audios.shape == (2, 32000)


def test_run_config_is_honoured(run, tmp_path, monkeypatch, capsys):
    from support import checkpoint
    cfg = json.load(open(run / "joint" / "config.json"))
    other = copy_run(run, tmp_path / "other")  # the same run, as if trained on other (pretrained) base models
    reseal(other, json.dumps(dict(cfg, size="pretrained", video_base="someone/sd15-finetune")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(other), "--prompt", "x", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "hf download someone/sd15-finetune" in err[0]
    copy_run(run, tmp_path / "nobase")  # a tiny run whose base stage is missing
    with pytest.raises(checkpoint.CheckpointError, match="no complete base checkpoint"):
        SoundingVideoPipeline.from_pretrained(str(tmp_path / "nobase"))


def copy_run(run, dest):
    """dest/joint/ with a copy of the run's joint checkpoint (checkpoints follow no symlinks), for a test to change."""
    shutil.copytree(run / "joint", dest / "joint")
    return dest


def reseal(run, config):
    """Replace a run's joint config.json and seal the checkpoint again (else it counts as damaged)."""
    from support import checkpoint
    (run / "joint" / "config.json").write_text(config)
    checkpoint.seal(str(run / "joint"), json.loads((run / "joint" / "COMPLETE").read_text())["step"])


def test_outputs_never_mix_or_follow_links(run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    argv = ["--ckpt", str(run), "--prompt", "a box", "--steps", "1", "--out", str(out)]
    sample.main(argv)
    with pytest.raises(SystemExit) as e:  # a reused --out is refused ...
        sample.main(argv + ["--seed", "1"])
    assert e.value.code == 2 and "already holds clips" in capsys.readouterr().err
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.remove(out / "0000_a-box_g1.5.wav")
    os.symlink(victim, out / "0000_a-box_g1.5.wav")  # a planted link with the predictable name
    sample.main(argv + ["--seed", "1", "--overwrite"])  # ... unless asked: then only the new run's clips remain
    assert victim.read_text() == "precious" and not (out / "0000_a-box_g1.5.wav").is_symlink()
    assert [json.loads(line)["seed"] for line in open(out / "manifest.jsonl")] == [1]
    monkeypatch.chdir(tmp_path)  # an --out starting with "-" never reaches ffmpeg as an option
    sample.main(["--ckpt", str(run), "--prompt", "a box", "--steps", "1", "--out=-dash"])
    assert (tmp_path / "-dash" / "0000_a-box_g1.5.mp4").stat().st_size > 1000


@pytest.mark.parametrize("argv", [["--prompt", "x", "--gamma", "0"], ["--prompt", "x", "--gamma", "inf"],
                                  ["--prompt", "x", "--gamma", "nan"], ["--prompt", "x", "--steps", "0"], [],
                                  ["--prompt", "x", "--seconds", "0"], ["--prompt", "x", "--ckpt", "/nonexistent/run"],
                                  ["--prompt", "x", "--size", "pretrained", "--steps", "1"],
                                  ["--prompt", "x", "--out", "/proc/nope"]])
def test_bad_input_exits_2_with_one_line(argv, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--out", str(tmp_path / "o"), *argv],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error:"), r.stderr[-800:]
    assert len([line for line in r.stderr.strip().splitlines() if line.strip()]) == 1, r.stderr[-800:]
    assert not list(tmp_path.glob("svg_tok_*"))  # no temporary folder left behind


def test_damaged_run_config_exits_2(run, tmp_path, capsys):
    bad = copy_run(run, tmp_path / "bad")
    reseal(bad, '{"step": 2}')  # parses, but is no train.py config
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(bad), "--prompt", "x", "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "lacks" in capsys.readouterr().err


TINY = ["--size", "tiny", "--steps", "1", "--seconds", "0.5"]  # the shipped tiny bases: 4 frames, seconds per clip


@pytest.fixture(scope="module")
def grid_out(tmp_path_factory):
    """2 prompts x 2 gammas that print alike, from the largest seed: the next clip's seed wraps to 0."""
    out = tmp_path_factory.mktemp("grid") / "o"
    out.mkdir()
    (out.parent / "victim.txt").write_text("precious")
    for name in ("index.html", "0000_a-box_g1.0000001.jpg"):  # planted links at names this run writes
        os.symlink(out.parent / "victim.txt", out / name)
    sample.main(TINY + ["--prompt", "a box", "--prompt", "a can", "--gamma", "1.0000001,1.0000002", "--seed",
                        str(2 ** 63 - 1), "--out", str(out)])
    return out


def test_gammas_that_print_alike_keep_their_clips_and_seeds_up_to_2_63(grid_out, capsys):
    rows = [json.loads(line) for line in open(grid_out / "manifest.jsonl")]
    assert len({r["file"] for r in rows}) == 4 and all((grid_out / r["file"]).is_file() for r in rows)
    assert [r["seed"] for r in rows] == [2 ** 63 - 1, 0] * 2 and {r["gamma"] for r in rows} == {1.0000001, 1.0000002}
    assert all((grid_out / r["poster"]).stat().st_size > 100 for r in rows)
    assert (grid_out.parent / "victim.txt").read_text() == "precious"  # replaced, never written through
    assert not (grid_out / "index.html").is_symlink() and not (grid_out / rows[0]["poster"]).is_symlink()


@pytest.mark.skipif(not os.path.exists("/usr/bin/chromium"), reason="Chromium not installed (apt-get install chromium)")
def test_index_page_shows_posters_in_a_real_browser(grid_out, tmp_path):
    shot = tmp_path / "shot.png"
    r = subprocess.run(["/usr/bin/chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                        "--no-first-run", "--disable-background-networking", "--disable-component-update",
                        "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars",
                        "--window-size=800,600", f"--screenshot={shot}", (grid_out / "index.html").as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and shot.is_file(), r.stderr[-800:]
    from PIL import Image
    a = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert ((a.max(-1) - a.min(-1)) > 10).mean() > 0.1  # the posters render (text and empty players are grey)


def test_seed_of_a_manifest_row_regenerates_its_clip(tmp_path):
    sample.main(TINY + ["--prompt", "a box", "--prompt", "a can", "--prompt", "a bottle", "--seed", "3", "--out",
                        str(tmp_path / "all"), "--batch-size", "1"])
    row = [json.loads(line) for line in open(tmp_path / "all" / "manifest.jsonl")][2]
    sample.main(TINY + ["--prompt", row["prompt"], "--seed", str(row["seed"]), "--out", str(tmp_path / "one")])
    alone = json.loads((tmp_path / "one" / "manifest.jsonl").read_text())
    assert row["seed"] == 5 and alone["seed"] == 5
    for f in ("wav", "file"):  # the same samples and frames: the same bytes
        assert (tmp_path / "all" / row[f]).read_bytes() == (tmp_path / "one" / alone[f]).read_bytes()


def test_captions_name_clips_by_their_reference_stem(tmp_path):
    caps = tmp_path / "caps.txt"
    caps.write_text('clips/hit-001.mp4,"A person hits a box, twice."\nhit-002.mp4,"a can"\n')
    sample.main(TINY + ["--captions", str(caps), "--out", str(tmp_path / "o")])
    rows = [json.loads(line) for line in open(tmp_path / "o" / "manifest.jsonl")]
    assert [(r["file"], r["stem"], r["prompt"], r["caption"]) for r in rows] == [
        ("hit-001.mp4", "hit-001", "A person hits a box, twice.", "A person hits a box, twice."),
        ("hit-002.mp4", "hit-002", "a can", "a can")]
    from support.outputs import clip_names
    assert clip_names(["a", "a"], ["hit-001", "hit-001"], [0, 1], "1.5", True, True) == ["hit-001_s0_g1.5",
                                                                                       "hit-001_s1_g1.5"]


def test_overwrite_deletes_only_this_programs_files(tmp_path, capsys):
    out = tmp_path / "o[1]*"  # glob characters: the earlier-run check must still see the clips
    argv = TINY + ["--prompt", "a box", "--out", str(out)]
    sample.main(argv)
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    assert e.value.code == 2 and "already holds clips" in capsys.readouterr().err
    keep = {"notes.txt": "mine", "precious.mp4": "mine", "0001-not-ours.mp4": "mine"}
    for name, text in keep.items():
        (out / name).write_text(text)
    (tmp_path / "victim.mp4").write_text("outside")
    crafted = [{"file": "notes.txt"}, {"file": "../victim.mp4"}, {"file": "precious.mp4"}, {"file": ".lock"},
               {"file": "/etc/hostname.mp4"}]
    with open(out / "manifest.jsonl", "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in crafted)
    killed = [".tmp-k1ll3d.mp4", ".tmp-x.wav", "0003_a-box_g2.mp4", "0003_a-box_g2.jpg"]  # a killed run's leftovers
    for name in killed:
        (out / name).write_text("half")
    for name in ("manifest.jsonl.tmp", ".index.tmp"):  # planted links at the names the old code used
        os.symlink(tmp_path / "victim.mp4", out / name)
    sample.main(argv + ["--overwrite", "--seed", "1"])
    assert all((out / n).read_text() == t for n, t in keep.items())
    assert (tmp_path / "victim.mp4").read_text() == "outside"
    assert not any((out / n).exists() for n in killed)
    assert [json.loads(line)["seed"] for line in open(out / "manifest.jsonl")] == [1]
    (out / "manifest.jsonl").write_text("{not json\n")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        sample.main(argv + ["--overwrite"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "line 1 is not JSON" in err[0]
    assert (out / "0000_a-box_g1.5.mp4").is_file()  # nothing deleted
    from support import checkpoint
    held = checkpoint.lock(str(out))  # another sample.py writing there
    try:
        with pytest.raises(SystemExit) as e:
            sample.main(argv + ["--overwrite"])
        assert e.value.code == 2 and "in use by another process" in capsys.readouterr().err
    finally:
        held.close()
