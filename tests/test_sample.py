"""Algorithm 1: with gamma = 1 and untrained (identity) added modules, each modality is sampled exactly as its base
model would sample alone with diffusers' DDIMScheduler; same seed, same files; bad input exits 2 without a traceback."""
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from diffusers import DDIMScheduler

import sample
from model import build_model

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


def test_same_seed_same_files(tmp_path):
    run = lambda d, seed: sample.main(["--size", "tiny", "--prompt", "a red wooden box", "--prompt", "a glass bottle",
                                       "--steps", "2", "--out", str(tmp_path / d), "--seed", str(seed)])
    run("a", 5), run("b", 5), run("c", 6)
    names = sorted(os.listdir(tmp_path / "a"))
    assert len(names) == 4 and names == sorted(os.listdir(tmp_path / "b")) == sorted(os.listdir(tmp_path / "c"))
    for n in names:  # same seed, same bytes (mp4 and wav); another seed, other bytes
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes(), n
        assert (tmp_path / "a" / n).read_bytes() != (tmp_path / "c" / n).read_bytes(), n


def test_samples_do_not_depend_on_batch_size():
    torch.manual_seed(0)
    model, bases = build_model("tiny")
    kw = dict(T=3, gamma=1.5, bar=False)
    x_v, x_a = sample.generate(model, bases, ["a red wooden box", "a glass bottle"], [11, 12], **kw)
    x_v1, x_a1 = sample.generate(model, bases, ["a glass bottle"], [12], **kw)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # float order differs with the batch: 1e-6, not 0
    assert rel(x_v[1:], x_v1) < 1e-4 and rel(x_a[1:], x_a1) < 1e-4 and rel(x_v[:1], x_v1) > 0.1


@pytest.mark.parametrize("argv", [["--prompt", "x", "--gamma", "0"], ["--prompt", "x", "--steps", "0"], [],
                                  ["--prompt", "x", "--ckpt", "/nonexistent/run"],
                                  ["--prompt", "x", "--size", "pretrained", "--steps", "1"]])
def test_bad_input_exits_2_with_one_line(argv):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), *argv], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error:")
