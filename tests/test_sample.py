"""Algorithm 1 and the sampling command: with gamma = 1 and untrained (identity) added modules, each modality is sampled
exactly as its base model alone with diffusers' DDIMScheduler; a run folder is loaded as its stored config says;
seeds, files, manifest and page; --overwrite removes only what the earlier manifest lists; bad input exits 2 with one
line before any model is built."""
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
from safetensors.torch import load_file

import sample
import train
from model import build_model
from pipeline import SoundingVideoPipeline

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = ["--size", "tiny", "--steps", "1", "--seconds", "0.5"]  # the shipped tiny bases: 4 frames, seconds per clip


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
    model, bases = build_model("tiny")
    prompts, seeds, T = ["a red wooden box", "a blue metal can"], [3, 4], 4
    kw = dict(T=T, bar=False, seconds=1)  # 8 frames, 25 audio latent rows
    x_v, x_a = sample.generate(model, bases, prompts, seeds, gamma=1.0, **kw)
    text_v, text_a = bases.encode_text(prompts)
    null_v, null_a = bases.encode_text(["", ""])
    gs = [torch.Generator().manual_seed(s) for s in seeds]
    F_, h = bases.fps, bases.video_size // 8
    n_v = torch.stack([torch.randn(4, F_, h, h, generator=g) for g in gs])  # the same draws as generate()
    n_a = torch.stack([torch.randn(8, 25, 16, generator=g) for g in gs])
    video = lambda u, x, t, c: u(x, t, encoder_hidden_states=c.repeat_interleave(F_, 0)).sample  # noqa: E731
    audio = lambda u, x, t, c: u(x, t, encoder_hidden_states=None, class_labels=c).sample  # noqa: E731
    with torch.no_grad():
        ref_v = base_alone(model.video_unet, n_v, text_v, null_v, 7.5, T, video, "animatediff_ddim_scheduler.json",
                           bases.prediction_type["v"])
        ref_a = base_alone(model.audio_unet, n_a, text_a, null_a, 2.5, T, audio, "audioldm_ddim_scheduler.json",
                           bases.prediction_type["a"])
    assert torch.allclose(x_v, ref_v, rtol=1e-4, atol=1e-4) and torch.allclose(x_a, ref_a, rtol=1e-4, atol=1e-4)
    x_v2, _ = sample.generate(model, bases, prompts, seeds, gamma=2.0, **kw)
    assert not torch.allclose(x_v, x_v2, atol=1e-3)  # gamma really changes the local grids
    x_v1, x_a1 = sample.generate(model, bases, prompts[1:], seeds[1:], gamma=1.0, **kw)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731 (float order differs with the batch: 1e-6)
    assert rel(x_v[1:], x_v1) < 1e-4 and rel(x_a[1:], x_a1) < 1e-4 and rel(x_v[:1], x_v1) > 0.1  # no batch effect


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny joint run of 2 steps (its trained weights matter, not their quality)."""
    out = tmp_path_factory.mktemp("run") / "tiny"
    train.main(["--data", "synthetic", "--size", "tiny", "--max-steps", "2", "--batch-size", "1", "--num-clips", "2",
                "--out", str(out)])
    return out


def test_cli_files_manifest_page_and_seeds(run, tmp_path):
    argv = ["--ckpt", str(run), "--prompt", "a red wooden box", "--prompt", "a glass bottle", "--steps", "2",
            "--gamma", "1", "1.5", "--seconds", "0.5"]
    for d, seed in (("a", 5), ("b", 5), ("c", 6)):
        sample.main(argv + ["--out", str(tmp_path / d), "--seed", str(seed)])
    sample.main(argv[:2] + argv[4:] + ["--gamma", "1", "--out", str(tmp_path / "d"), "--seed", "6"])  # clip 1 alone
    clips = sorted(f for f in os.listdir(tmp_path / "a") if f.endswith((".mp4", ".wav")))
    assert len(clips) == 8 and clips == sorted(f for f in os.listdir(tmp_path / "b") if f.endswith((".mp4", ".wav")))
    for n in clips:  # same seed, same bytes (mp4 and wav); another seed, other bytes
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes(), n
        assert (tmp_path / "a" / n).read_bytes() != (tmp_path / "c" / n).read_bytes(), n
    rows = [json.loads(line) for line in open(tmp_path / "a" / "manifest.jsonl")]
    assert sorted(r["file"] for r in rows) == [c for c in clips if c.endswith(".mp4")]
    assert {(r["gamma"], r["prompt"]) for r in rows} == {(g, p) for g in (1.0, 1.5) for p in ("a red wooden box",
                                                                                           "a glass bottle")}
    assert [r["seed"] for r in rows if r["gamma"] == 1.0] == [r["seed"] for r in rows if r["gamma"] == 1.5] == [5, 6]
    alone = json.loads((tmp_path / "d" / "manifest.jsonl").read_text())  # a row's seed regenerates its clip alone
    assert (alone["prompt"], alone["seed"]) == ("a glass bottle", 6)
    batched, single = (sf.read(tmp_path / d / r["wav"])[0] for d, r in (("a", rows[1]), ("d", alone)))
    assert np.abs(batched - single).max() < 1e-4 and np.abs(batched).max() > 1e-3  # float order in a batch: ~1e-6
    ema = os.path.abspath(run / "checkpoint-2" / "ema.safetensors")
    assert all(r["checkpoint"] == ema and r["kind"] == "joint run, step 2" and r["steps"] == 2 for r in rows)
    page = (tmp_path / "a" / "index.html").read_text()
    found = re.findall(r'<video controls preload="metadata" poster="([^"]+)" src="([^"]+)"', page)
    assert sorted(s for _, s in found) == sorted(r["file"] for r in rows)
    assert all((tmp_path / "a" / s).is_file() and (tmp_path / "a" / p).stat().st_size > 100 for p, s in found)
    assert page.count("<tr>") == 1 + 2 and page.count("<th>gamma = ") == 2  # a row per prompt and seed


def test_pipeline_equals_cli_and_loads_what_the_run_says(run, tmp_path):
    pipe = SoundingVideoPipeline.from_pretrained(str(run))
    out = pipe("a red wooden box", num_inference_steps=2, generator=5, output_type="uint8", seconds=1)
    assert out.frames.shape == (1, 8, 64, 64, 3) and out.frames.dtype == np.uint8 and out.audios.shape == (1, 16000)
    sample.main(["--ckpt", str(run), "--prompt", "a red wooden box", "--steps", "2", "--seed", "5", "--seconds", "1",
                 "--out", str(tmp_path / "cli")])
    wav, sr = sf.read(tmp_path / "cli" / "0000_a-red-wooden-box_g1.5.wav", dtype="float32")
    assert sr == 16000 and np.array_equal(wav, out.audios[0])  # the CLI is this pipeline
    ema = load_file(run / "checkpoint-2" / "ema.safetensors")
    raw = load_file(run / "checkpoint-2" / "model.safetensors")
    for weights, kw in ((ema, {}), (raw, dict(ema=False))):  # the EMA by default, the raw weights on request
        got = dict(SoundingVideoPipeline.from_pretrained(str(run), **kw).model.named_parameters())
        assert all(torch.equal(got[k], v) for k, v in weights.items())
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)


def test_a_base_stage_run_is_the_tiny_bases_with_identity_modules(tmp_path):
    train.main(["--data", "synthetic", "--size", "tiny", "--stage", "base", "--max-steps", "1", "--batch-size", "1",
                "--num-clips", "1", "--out", str(tmp_path / "base")])
    pipe = SoundingVideoPipeline.from_pretrained(str(tmp_path / "base"))
    trained = load_file(tmp_path / "base" / "checkpoint-1" / "ema.safetensors")
    got = dict(pipe.model.named_parameters())
    assert trained and all(torch.equal(got[k], v) for k, v in trained.items())
    fresh, _ = build_model("tiny")  # the added modules as built: zero-initialised outputs, an identity
    assert all(torch.equal(got[k], v) for k, v in fresh.named_parameters() if k.startswith(("blocks_", "connector_")))
    assert pipe.source["kind"] == "base run, step 1"


def damage(run, dest, what):
    shutil.copytree(run, dest)
    folder = dest / "checkpoint-2"
    if what == "weights":  # cut in half, as a full disk or a killed copy leaves it
        data = (folder / "ema.safetensors").read_bytes()
        (folder / "ema.safetensors").write_bytes(data[:len(data) // 2])
    elif what == "config":
        (folder / "config.json").write_text('{"step": 2}')  # parses, but is no train.py config
    else:
        (folder / "config.json").write_text(json.dumps(dict(json.loads((folder / "config.json").read_text()),
                                                            size="pretrained", video_base="someone/sd15-finetune")))
    return dest


@pytest.fixture
def no_model(monkeypatch):
    """sample.main may check and fail, but not build a model."""
    monkeypatch.setattr(sample, "load", lambda *a, **k: pytest.fail("a model was built before the input was checked"))


def one_line_exit_2(argv, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        sample.main([str(a) for a in argv])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_bad_input_exits_2_with_one_line_before_any_model(run, tmp_path, capsys, no_model):
    (tmp_path / "caps.txt").write_bytes(b"\xff\xfe not utf-8\n")
    out = ["--out", tmp_path / "o"]
    for argv, says in (([], "give --prompt"), (["--gamma", "0"], "outside"), (["--gamma", "nan"], "outside"),
                       (["--steps", "0"], "outside"), (["--seconds", "0"], "outside"), (["--seconds", "5"], "outside"),
                       (["--seed", 2 ** 63], "outside"), (["--num-per", "2"], "unrecognized"),
                       (["--batch-size", "x"], "not an integer"), (["--captions", tmp_path / "caps.txt"], "UTF-8"),
                       (["--ckpt", tmp_path / "nothing"], "no checkpoint-<step>/"),
                       (["--ckpt", tmp_path], "no checkpoint-<step>/"), (["--device", "cuda"], "invalid choice"),
                       (["--ckpt", damage(run, tmp_path / "w", "weights")], "ema.safetensors: cannot be read"),
                       (["--ckpt", damage(run, tmp_path / "c", "config")], "not one of its runs"),
                       (["--ckpt", damage(run, tmp_path / "p", "pretrained")], "hf download someone/sd15-finetune"),
                       (["--size", "pretrained"], "hf download")):
        prompt = [] if not argv or "--captions" in argv else ["--prompt", "x"]
        assert says in one_line_exit_2(prompt + argv + out, capsys), argv
    assert not (tmp_path / "o").exists()  # nothing written either
    (tmp_path / "file").write_text("x")
    assert "cannot create" in one_line_exit_2(TINY + ["--prompt", "x", "--out", tmp_path / "file" / "o"], capsys)


def test_a_real_process_exits_2_with_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--prompt", "x", "--steps", "0", "--out",
                        str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: argument --steps"), r.stderr[-800:]


@pytest.fixture(scope="module")
def grid_out(tmp_path_factory):
    """2 prompts x 2 gammas that print alike, from the largest seed: the next clip's seed wraps to 0."""
    out = tmp_path_factory.mktemp("grid") / "o"
    sample.main(TINY + ["--prompt", "a box", "--prompt", "a can", "--gamma", "1.0000001", "1.0000002", "--seed",
                        str(2 ** 63 - 1), "--out", str(out)])
    return out


def test_gammas_that_print_alike_keep_their_clips_and_seeds_up_to_2_63(grid_out):
    rows = [json.loads(line) for line in open(grid_out / "manifest.jsonl")]
    assert len({r["file"] for r in rows}) == 4 and all((grid_out / r["file"]).stat().st_size > 1000 for r in rows)
    assert [r["seed"] for r in rows] == [2 ** 63 - 1, 0] * 2 and {r["gamma"] for r in rows} == {1.0000001, 1.0000002}
    assert all((grid_out / r["poster"]).stat().st_size > 100 for r in rows)


@pytest.mark.skipif(not shutil.which("chromium"), reason="Chromium not installed (apt-get install chromium)")
def test_index_page_shows_posters_in_a_real_browser(grid_out, tmp_path):
    shot = tmp_path / "shot.png"
    r = subprocess.run([shutil.which("chromium"), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                        f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars", "--window-size=800,600",
                        f"--screenshot={shot}", (grid_out / "index.html").as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and shot.is_file(), r.stderr[-800:]
    from PIL import Image
    a = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert ((a.max(-1) - a.min(-1)) > 10).mean() > 0.1  # the posters render (text and empty players are grey)


def test_captions_name_clips_by_their_reference_stem(tmp_path):
    caps = tmp_path / "caps.txt"
    caps.write_text('clips/hit-001.mp4,"A person hits a box, twice."\nhit-002.mp4,"a can"\n')
    sample.main(TINY + ["--captions", str(caps), "--num-per-prompt", "2", "--out", str(tmp_path / "o")])
    rows = [json.loads(line) for line in open(tmp_path / "o" / "manifest.jsonl")]
    assert [(r["file"], r["stem"], r["prompt"]) for r in rows] == [
        ("hit-001_s0.mp4", "hit-001", "A person hits a box, twice."),
        ("hit-001_s1.mp4", "hit-001", "A person hits a box, twice."),
        ("hit-002_s2.mp4", "hit-002", "a can"), ("hit-002_s3.mp4", "hit-002", "a can")]


def test_overwrite_removes_only_the_clips_the_manifest_lists(tmp_path, capsys):
    out = tmp_path / "o[1]*"  # glob characters: the earlier-run check must still see the clips
    argv = TINY + ["--prompt", "a box", "--prompt", "a can", "--out", str(out)]
    sample.main(argv)
    assert "already holds clips" in one_line_exit_2(argv, capsys)
    keep = {"notes.txt": "mine", "precious.mp4": "mine", "0002_a-box_g1.5.mp4": "mine, named like a clip"}
    for name, text in keep.items():
        (out / name).write_text(text)
    (tmp_path / "victim.mp4").write_text("outside")
    with open(out / "manifest.jsonl", "a") as f:  # rows naming files outside --out delete nothing
        f.writelines(json.dumps(dict(file=n, wav=n, poster=n)) + "\n" for n in ("../victim.mp4", "/etc/hostname"))
    sample.main(TINY + ["--prompt", "a bottle", "--out", str(out), "--overwrite", "--seed", "1"])
    assert all((out / n).read_text() == t for n, t in keep.items()) and (tmp_path / "victim.mp4").is_file()
    assert sorted(os.listdir(out)) == sorted([*keep, "manifest.jsonl", "index.html", "0000_a-bottle_g1.5.mp4",
                                              "0000_a-bottle_g1.5.wav", "0000_a-bottle_g1.5.jpg"])
    (out / "manifest.jsonl").write_text("{not json\n")
    assert "is not sample.py's" in one_line_exit_2(argv + ["--overwrite"], capsys)
    assert (out / "0000_a-bottle_g1.5.mp4").is_file()  # nothing deleted
