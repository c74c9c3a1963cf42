"""scripts/reproduce.py (Table 1 in miniature) and scripts/fig2.py (Fig. 2): the `--quick` smoke test that CI runs,
checked against outside computations (av_align.av_align on the raw synthetic clips, diffusers' own U-Net forwards and
DDPMScheduler.add_noise, scipy's binomial test), plus resume-without-retraining."""
import json
import pathlib

import numpy as np
import pytest
import scipy.stats
import torch
from diffusers import DDPMScheduler

import av_align
from scripts import fig2, reproduce
from support.synthetic import synthetic_clip

ROOT = pathlib.Path(__file__).resolve().parent.parent

QUICK = ["--quick", "--gammas", "1", "3", "--crossattn-gammas", "1"]  # fewer rows than the default: CI time


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("repro")
    return out, reproduce.main(QUICK + ["--out", str(out)])


def test_quick_run_writes_every_row(quick):
    out, res = quick
    want = {"real", "codec", "real-other", "shuffled", "untrained", "crossattn-g1.0", "cmcpe-g1.0", "cmcpe-g3.0"}
    assert set(res["rows"]) == want
    for key in want - {"real", "codec", "real-other", "shuffled", "untrained"}:
        assert res["rows"][key]["n_seeds"] == 1 and res["rows"][key]["n_clips"] == 2  # the --quick budget
    table = (out / "table_test_j1.md").read_text()
    assert "| CMC-PE, γ = 3 | 383 | 1.32 | 0.265 |" in table and "Cross-attention (CoDi), γ = 1 | 379" in table
    assert set(res["tests"]) == {"CMC-PE g1 - cross-attn g1", "cross-attn g1 - untrained", "CMC-PE g1 - untrained"}
    assert json.loads((out / "results_test_j1.json").read_text())["tests"].keys() == res["tests"].keys()
    base = (out / "runs" / "base" / "checkpoint-1" / "ema.safetensors").resolve()  # stage base, from random
    for run in ("crossattn-s0", "cmcpe-s0"):  # every row trains on the SAME base models
        config = json.loads((out / "runs" / run / "checkpoint-1" / "config.json").read_text())
        assert config["stage"] == "joint" and config["tiny_bases"] == str(base)
    assert json.loads((base.parent / "config.json").read_text())["tiny_bases"] == "random"
    assert sorted(p.name for p in (out / "examples").iterdir()) == ["cmcpe-g1.0.mp4", "cmcpe-g3.0.mp4",
                                                                    "crossattn-g1.0.mp4"]


def test_bounds_match_metrics_on_the_raw_clips(quick):
    """Real pairs: AV-Align of data.py's test clips themselves; shuffled: each clip with its neighbour's audio."""
    out, res = quick
    clips = [synthetic_clip(10 ** 6 + i) for i in range(2)]  # data.py's test split
    real = [av_align.av_align(c["frames"], 8, c["audio"], 16000) for c in clips]
    shuffled = [av_align.av_align(clips[i]["frames"], 8, clips[i - 1]["audio"], 16000) for i in range(2)]
    assert res["rows"]["real"]["av_align"] == pytest.approx([np.mean(real)])
    assert res["rows"]["shuffled"]["av_align"] == pytest.approx([np.mean(shuffled)])
    assert np.mean(real) > np.mean(shuffled)  # hits are heard at their frames; a neighbour's hits are not


def test_resume_skips_finished_work(quick):
    out, res = quick
    steps = lambda: [json.loads(line)["step"] for line in open(out / "runs" / "cmcpe-s0" / "log.jsonl")]
    before = steps()
    again = reproduce.main(QUICK + ["--out", str(out)])
    assert steps() == before == [1]  # no joint step was run again
    assert again["rows"] == res["rows"]  # and the stored per-clip scores were reused


def test_paired_statistics():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(3, 40))
    r = reproduce.paired(x + 0.1, x, rng)
    assert r["diff"] == pytest.approx(0.1) and r["ci95"] == pytest.approx([0.1, 0.1]) and r["wins"] == 120
    assert r["significant"] and r["sign_p"] == pytest.approx(scipy.stats.binomtest(120, 120).pvalue)
    y = x + rng.normal(0, 0.3, x.shape)
    r = reproduce.paired(y, x[:1], rng)  # a seed-free row (1, N) pairs with every seed
    d = y - x[:1]
    assert r["diff"] == pytest.approx(d.mean()) and r["wins"] == (d > 0).sum()
    assert r["ci95"][0] < d.mean() < r["ci95"][1] and r["per_seed"] == pytest.approx(d.mean(1))


def test_frechet_proxy_against_the_closed_form():
    """Two Gaussians with one covariance are sum((mu1 - mu2)^2) apart: a shifted copy of the real features, in the
    per-feature scale; paired_fd is the difference of two such distances (a seed-free row pairs with every seed)."""
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(40, 5)) * [1, 2, 3, 4, 5]
    scale = reproduce.feature_scale(ref)
    assert scale == pytest.approx(ref.std(0))  # no feature is near constant: the floor does not act
    shift = np.array([0.5, 0, 1, 0, 2])
    assert reproduce.fd(ref + shift, ref, scale) == pytest.approx(((shift / scale) ** 2).sum(), rel=1e-4)
    r = reproduce.paired_fd([ref + shift, ref], [ref], ref, scale, rng, boots=20)
    assert r["diff"] == pytest.approx(((shift / scale) ** 2).sum() / 2, rel=1e-4) and r["significant"]


def test_features():
    still = np.full((32, 64, 64, 3), 100, np.uint8)
    f = reproduce.video_features(still)
    assert f.shape == (28,) and f[:24].reshape(3, 8).sum(1) == pytest.approx(1) and not f[24:].any()
    moving = still.copy()
    moving[5, :32] = 200  # one frame half brighter: two changes of 50 grey levels over half the picture
    assert reproduce.video_features(moving)[26] == pytest.approx(50 / 255)  # the largest mean change
    a = reproduce.audio_features(synthetic_clip(0)["audio"])
    assert a.shape == (32,) and np.all(a[16:] > 0)  # every band changes over time (hits)


def test_fig2_loss_equals_diffusers_forward():
    """The loss of fig2.base_losses at one timestep equals the base models' own diffusers forwards on inputs noised
    by diffusers' DDPMScheduler.add_noise (the index k - 1 convention of timesteps.py)."""
    from base_models import load_base_models
    bases, k = load_base_models("tiny"), 300
    assert bases.prediction_type == {"v": "v_prediction", "a": "v_prediction"}
    g = torch.Generator().manual_seed(1)
    x0_v, x0_a = torch.randn(2, 4, 32, 8, 8, generator=g), torch.randn(2, 8, 100, 16, generator=g)
    text_v, text_a = bases.encode_text(["a red wooden box", "a blue glass bowl"])
    loss_v, loss_a = fig2.base_losses(bases, x0_v, x0_a, text_v, text_a, [k], [k], seed=5)
    want = []
    video = lambda x, t: bases.video_unet(x, t, text_v.repeat_interleave(32, 0)).sample  # (B*F, 77, D) as diffusers
    audio = lambda x, t: bases.audio_unet(x, t, encoder_hidden_states=None, class_labels=text_a).sample
    for x0, cfg, call in ((x0_v, "animatediff_ddim_scheduler.json", video),
                          (x0_a, "audioldm_ddim_scheduler.json", audio)):
        eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
        cfg = {n: v for n, v in json.loads((ROOT / "configs" / cfg).read_text()).items() if not n.startswith("_")}
        t, sched = torch.tensor([k - 1] * 2), DDPMScheduler.from_config(cfg)
        x_t, a = sched.add_noise(x0, eps, t), sched.alphas_cumprod[k - 1]
        with torch.no_grad():
            eps_hat = a.sqrt() * call(x_t, t) + (1 - a).sqrt() * x_t  # the tiny U-Nets predict v (base_models.py)
            want.append((eps_hat - eps).pow(2).mean().item())
    assert loss_v[k] == pytest.approx(want[0], rel=1e-4) and loss_a[k] == pytest.approx(want[1], rel=1e-4)


def test_fig2_curves():
    loss_v = {k: 1.0 / k for k in range(1, 1001)}  # closed forms: video falls like 1/k, audio like 1/sqrt(k)
    loss_a = {k: k ** -0.5 for k in range(1, 1001)}
    grid = fig2.timestep_grid(9)
    c = fig2.curves(loss_v, loss_a, grid, gamma=1.0)
    assert grid[0] == 1 and grid[-1] == 1000 and c["a_video"][0] == c["a_audio"][0] == 1.0
    assert c["b_video"] == c["a_video"] and c["b_audio"] == c["a_audio"] and c["gap_a"] == pytest.approx(c["gap_b"])
    # video falls faster, so gamma > 1 (video at m(t) < t, audio at n(t) > t) must bring the curves together
    assert c["gap_by_gamma"]["1.5"] < c["gap_by_gamma"]["1"] and fig2.predict_gamma(loss_v, loss_a) > 1


def test_other_guidance_is_scored_apart(quick):
    """Scores are cached per (split, budget, T, guidance): a new guidance must not reuse the paper-guidance scores."""
    out, res = quick
    argv = ["--quick", "--gammas", "1", "--crossattn-gammas", "--guidance-video", "1"]  # no cross-attention rows
    other = reproduce.main(argv + ["--out", str(out)])
    paper, changed = out / "eval" / "test_j1_T1", out / "eval" / "test_j1_T1_g1.0-2.5"
    assert other["rows"]["real"] == res["rows"]["real"]  # the bounds do not depend on guidance
    feats = lambda ev: json.loads((ev / "cmcpe-g1.0-s0.json").read_text())["video_feat"]  # noqa: E731
    assert feats(changed) != feats(paper)  # generated clips do
