"""Sec. 3.4's conditional case of Algorithm 1: a given video (V2A) or sound (A2V) held at t = 1 while the other modality
walks its Eq. (8) grid (sample.generate(video=, audio=), sample.py --video / --audio, the pipeline's video= / audio=).
The held latent never changes and its U-Net never runs; without them joint sampling is untouched; bad inputs exit 2
with one line before any model is built."""
import json
import pathlib

import numpy as np
import pytest
import soundfile as sf
import torch

import sample
import train
from av_align import read_video
from model import build_model
from pipeline import SoundingVideoPipeline
from scripts import foley
from support.media import write_mp4, write_wav
from test_released_pipe import need_shared
from timesteps import add_noise

OFFICIAL = pathlib.Path(__file__).resolve().parent.parent.parent / "shared" / "official_pipe" / "pipe"  # tiny, released


@pytest.fixture(scope="module")
def tiny():
    """Tiny model whose added modules are perturbed (as built they are an exact identity: no modality would listen)."""
    model, bases = build_model("tiny")
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(1)
        for module in model.added_modules():
            for p in module.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return model, bases


def counted(model):
    """Calls of each U-Net's walk (its conv_in runs once per walk)."""
    calls = {"v": 0, "a": 0}
    for m, unet in (("v", model.video_unet), ("a", model.audio_unet)):
        unet.conv_in.register_forward_hook(lambda *_, m=m: calls.__setitem__(m, calls[m] + 1))
    return calls


def test_a_held_modality_skips_its_unet_and_the_other_output_is_the_joint_one(tiny):
    model, bases = tiny
    g = torch.Generator().manual_seed(0)
    x_v, x_a = torch.randn(2, 4, 8, 8, 8, generator=g), torch.randn(2, 8, 25, 16, generator=g)
    t_v, t_a = torch.tensor([0, 500]), torch.tensor([700, 0])
    text_v, text_a = bases.encode_text(["a box", "a can"])
    with torch.no_grad():
        ctx = model.contexts(x_v, x_a, t_v, t_a, x_v.flip(0), None)
        eps_v, eps_a = model(x_v, x_a, t_v, t_a, text_v, text_a, context=ctx)
        for held, other in (("a", 0), ("v", 1)):
            calls = counted(model)
            held_ctx = model.contexts(x_v, x_a, t_v, t_a, x_v.flip(0), None, held)
            out = model(x_v, x_a, t_v, t_a, text_v, text_a, context=held_ctx, held=held)
            assert torch.equal(out[other], (eps_v, eps_a)[other]) and out[1 - other] is None
            assert held_ctx[other] is None and calls == {"v": int(held == "a"), "a": int(held == "v")}
            for unet in (model.video_unet, model.audio_unet):
                unet.conv_in._forward_hooks.clear()


@pytest.mark.parametrize("held", ["v", "a"])
def test_the_given_modality_stays_at_t_1_and_its_unet_never_runs(tiny, held):
    model, bases = tiny
    prompts, seeds, T = ["a box", "a can"], [3, 4], 3
    kw = dict(T=T, bar=False, seconds=1)
    noise_v, noise_a = sample.initial_noise(model, bases, seeds, 1)
    given = (noise_v if held == "v" else noise_a).flip(0) * 0.5  # some clean latent x_0 (another draw)
    steps, calls = [], counted(model)
    x_v, x_a = sample.generate(model, bases, prompts, seeds, trace=lambda i, t: steps.append(t), **kw,
                               **{"video" if held == "v" else "audio": given})
    ab_1 = getattr(bases, f"alphas_cumprod_{held}")[0]  # alpha_bar at t = 1, diffusers index 0
    x_1 = add_noise(given, noise_v if held == "v" else noise_a, ab_1)  # Eq. (2) with the clip's own noise
    free = "a" if held == "v" else "v"
    grid = [s[1 if free == "a" else 0] for s in sample.paper_schedule(bases, T, 1.5)]
    assert calls == {held: 0, free: T}  # CFG halves in one batch: one walk per step, of the free U-Net only
    assert torch.equal(x_v if held == "v" else x_a, x_1)
    for s in steps:
        assert (s[f"t_{held}"] == 0).all() and torch.equal(s[f"x_{held}"], x_1) and torch.equal(s[f"x0_{held}"], given)
        assert s[f"eps_{held}"] is None and s[f"out_{held}"] is None
    assert [int(s[f"t_{free}"][0]) for s in steps] == grid  # the other walks its Eq. (8) grid
    other = sample.generate(model, bases, prompts, seeds, **kw, **{"video" if held == "v" else "audio": given * 2})
    assert not torch.allclose(other[1 if held == "v" else 0], x_a if held == "v" else x_v)  # it listens to the given


def test_no_given_modality_is_joint_sampling(tiny):
    model, bases = tiny
    steps, calls = [], counted(model)
    joint = sample.generate(model, bases, ["a box"], [5], T=2, bar=False, seconds=0.5)
    given_none = sample.generate(model, bases, ["a box"], [5], T=2, bar=False, seconds=0.5, video=None, audio=None,
                                 trace=lambda i, t: steps.append(t))
    assert all(torch.equal(a, b) for a, b in zip(joint, given_none)) and calls == {"v": 4, "a": 4}
    assert [int(s["t_v"][0]) for s in steps] == [s[0] for s in sample.paper_schedule(bases, 2, 1.5)]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A 6 s source video at 30 fps, 96x72, with sound at 44.1 kHz, and a 2.5 s wav at 22.05 kHz."""
    folder = tmp_path_factory.mktemp("clip")
    t = np.arange(180)[:, None, None, None]
    frames = np.broadcast_to((t * 7 + np.arange(96)[None, None, :, None]) % 256, (180, 72, 96, 3)).astype(np.uint8)
    wave = np.sin(np.arange(int(6 * 44100)) / 44100 * 2 * np.pi * 440).astype(np.float32) * 0.3
    write_mp4(folder / "in.mp4", frames, 30, wave, 44100)
    write_wav(folder / "in.wav", wave[:int(2.5 * 22050)], 22050)
    return folder


def test_cli_v2a_keeps_the_video_and_a2v_keeps_the_sound(clip, tmp_path):
    common = ["--size", "tiny", "--prompt", "a box", "--steps", "2", "--seconds", "1"]
    sample.main(common + ["--video", str(clip / "in.mp4"), "--out", str(tmp_path / "v2a")])
    row = json.loads((tmp_path / "v2a" / "manifest.jsonl").read_text())
    assert row["video"] == str(clip / "in.mp4") and row["audio"] is None
    frames, fps = read_video(tmp_path / "v2a" / row["file"])
    assert frames.shape == (8, 64, 64, 3) and fps == 8  # cut to 1 s, at the model's 8 fps and 64x64
    for k in range(1, 5):  # frame k: source frame 30 k / 8 rounded down, its centre 72 x 72 (columns 12..83)
        assert abs(frames[k].mean() - (7 * (30 * k // 8) + np.arange(12, 84)).mean()) < 2, k  # neighbours: 7 apart
    sample.main(common + ["--audio", str(clip / "in.wav"), "--out", str(tmp_path / "a2v")])
    row = json.loads((tmp_path / "a2v" / "manifest.jsonl").read_text())
    wave, sr = sf.read(tmp_path / "a2v" / row["wav"], dtype="float32")
    source, _ = sf.read(clip / "in.wav", dtype="float32")
    assert sr == 16000 and wave.shape == (16000,) and row["audio"] == str(clip / "in.wav")
    assert np.abs(wave - source[np.arange(16000) * 22050 // 16000]).max() < 0.02  # the given sound, resampled


def test_pipeline_takes_frames_or_a_waveform_with_a_released_folder():
    need_shared(OFFICIAL)
    pipe = SoundingVideoPipeline.from_pretrained(str(OFFICIAL), video_size=128)
    video = np.random.default_rng(0).random((10, 100, 150, 3), dtype=np.float32)  # float frames in [0, 1]
    out = pipe("a person hits a metal pan", video=video, seconds=1, num_inference_steps=2, generator=0, progress=False,
               output_type="uint8")
    assert out.frames.shape == (1, 8, 128, 128, 3) and out.audios.shape == (1, 16000) and out.audios.std() > 0
    wave = np.random.default_rng(1).standard_normal(24000).astype(np.float32) * 0.1  # 0.5 s at 48 kHz
    out = pipe("a person hits a metal pan", audio=(wave, 48000), seconds=1, num_inference_steps=2, generator=0,
               progress=False)
    assert out.frames.shape == (1, 8, 128, 128, 3) and out.frames.std() > 0
    assert np.array_equal(out.audios[0, 8000:], np.zeros(8000, np.float32))  # 0.5 s given, padded with silence


def test_bad_inputs_exit_2_with_one_line_before_any_model(clip, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sample, "load", lambda *a, **k: pytest.fail("a model was built before the input was checked"))
    (tmp_path / "text.mp4").write_text("not a video")
    write_mp4(tmp_path / "short.mp4", np.zeros((3, 64, 64, 3), np.uint8), 8, np.zeros(6000, np.float32))
    write_wav(tmp_path / "short.wav", np.zeros(4000, np.float32))
    (tmp_path / "text.wav").write_text("not a sound")
    for flags, says in ((["--video", tmp_path / "text.mp4"], "text.mp4: not a readable video"),
                        (["--video", clip / "in.wav"], "in.wav: not a readable video"),
                        (["--audio", tmp_path / "text.mp4"], "text.mp4: not a readable sound"),
                        (["--audio", tmp_path / "text.wav"], "text.wav: not a readable sound"),
                        (["--video", tmp_path / "short.mp4"], "give at least 0.5 s"),
                        (["--audio", tmp_path / "short.wav"], "give at least 0.5 s"),
                        (["--video", clip / "in.mp4", "--audio", clip / "in.wav"], "not allowed with")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            sample.main(["--size", "tiny", "--prompt", "x", "--out", str(tmp_path / "o")] + [str(f) for f in flags])
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert e.value.code == 2 and len(lines) == 1 and says in lines[0], (flags, lines)
    assert not (tmp_path / "o").exists()


def test_event_f1_matches_one_to_one_within_a_frame():
    assert foley.f1([0.5, 1.0, 1.1, 3.0], [0.5, 1.05, 2.0], fps=8) == pytest.approx(dict(precision=0.5, recall=2 / 3,
                                                                                         f1=4 / 7))
    assert foley.f1([], [1.0], fps=8)["f1"] == 0 and foley.f1([1.126], [1.0], fps=8)["f1"] == 0  # 1/8 s is the edge


def test_dependence_is_zero_for_identity_added_modules_and_not_after_training(tiny):
    """As built, the added modules are an exact identity: no U-Net can hear the other modality (change 0.0); the
    perturbed ones of `tiny` can. The pooled contexts differ across clips either way."""
    clips = foley.build_dataset("synthetic", "test", num_clips=3)
    batch = torch.utils.data.default_collate([clips[i] for i in range(3)])
    untrained, bases = build_model("tiny")
    for model, listens in ((untrained, False), (tiny[0], True)):
        for change_v, change_a, spread_v, spread_a, offset in foley.dependence(model, bases, batch).values():
            assert (change_v > 1e-3 and change_a > 1e-3) == listens and change_v >= 0 and change_a >= 0
            assert spread_v > 0.01 and spread_a > 0.01 and 0 < offset < 100


def test_diagnostic_mode_scores_every_kept_checkpoint_and_samples_nothing(tmp_path):
    run = tmp_path / "run"
    train.main(["--data", "synthetic", "--size", "tiny", "--max-steps", "2", "--batch-size", "1", "--num-clips", "2",
                "--ckpt-every", "1", "--keep", "5", "--out", str(run)])
    foley.main(["--ckpt", str(run), "--out", str(tmp_path / "diag"), "--diagnostic"])
    out = json.loads((tmp_path / "diag" / "dependence.json").read_text())
    assert sorted(out["steps"]) == ["1", "2"] and not (tmp_path / "diag" / "foley.json").exists()
    assert all(len(levels) == len(foley.LEVELS) and all(len(v) == 5 for v in levels.values())
               for levels in out["steps"].values())
    foley.main(["--ckpt", "base", "--out", str(tmp_path / "base"), "--diagnostic"])  # step 0: the untrained model
    assert list(json.loads((tmp_path / "base" / "dependence.json").read_text())["steps"]) == ["0"]
