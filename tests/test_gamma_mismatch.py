"""The controlled gamma experiment (scripts/gamma_mismatch.py): the prediction step (fig2.predict_gamma) against
hand-computed cases, the retimed base model (support/retime.py) against diffusers' own U-Net forward and the
log-SNR algebra, and the `--quick` run end to end, with its resume."""
import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from base_models import _cfg, load_base_models
from scripts import fig2, gamma_mismatch
from support.loading import load
from support.retime import retimed_schedule

T = 1000


def power_curves(p_v, p_a):
    """Losses 1 + (k / T)^p per timestep k = 1..T: normalised by their value at k = 1 they are 1 + u^p, u = k / T."""
    return ({k: 1 + (k / T) ** p_v for k in range(1, T + 1)}, {k: 1 + (k / T) ** p_a for k in range(1, T + 1)})


def test_predicted_gamma_closes_a_hand_computed_gap():
    """Video 1 + u^1.5 at m = T u^r and audio 1 + u^2.25 at n = T u^(1/r) coincide where 1.5 r = 2.25 / r, i.e.
    r = sqrt(1.5) and gamma = r^2 = 1.5; swapping the curves mirrors it to 1 / 1.5; equal curves give gamma = 1."""
    loss_v, loss_a = power_curves(1.5, 2.25)
    step = np.exp(np.log(16) / 240)  # the search grid's ratio: 1/4..4 in 241 points
    assert abs(np.log(fig2.predict_gamma(loss_v, loss_a) / 1.5)) <= np.log(step) / 2 + 1e-9
    assert abs(np.log(fig2.predict_gamma(loss_a, loss_v) * 1.5)) <= np.log(step) / 2 + 1e-9
    assert fig2.predict_gamma(loss_v, loss_v) == pytest.approx(1.0, abs=1e-12)
    # the gap itself, by hand: gamma = 1 leaves mean |u^1.5 - u^2.25| over u = t / T, minus the normalisation by the
    # value at t = 1 (1 + T^-1.5 and 1 + T^-2.25); the integral of u^1.5 - u^2.25 over [0, 1] is 1/2.5 - 1/3.25
    u = np.arange(1, T + 1) / T
    by_hand = np.mean(np.abs((1 + u ** 1.5) / (1 + T ** -1.5) - (1 + u ** 2.25) / (1 + T ** -2.25)))
    assert fig2.gap(loss_v, loss_a, 1.0) == pytest.approx(by_hand, rel=1e-9)
    assert by_hand == pytest.approx(1 / 2.5 - 1 / 3.25, abs=2e-3)
    assert fig2.gap(loss_v, loss_a, 1.5) < 2e-3 < by_hand / 40  # closed up to the rounding of m and n


def test_retimed_schedule_multiplies_the_snr():
    ac = DDIMScheduler.from_config(_cfg("audioldm_ddim_scheduler.json")).alphas_cumprod.double().numpy()
    snr = ac / (1 - ac)
    for s in (16.0, 1 / 16):
        tau, new = retimed_schedule(ac, s)
        inside = (tau > 0) & (tau < len(ac) - 1)
        assert inside.sum() > 700  # most of the schedule is not clamped at s = 16 or 1/16
        assert np.allclose((new / (1 - new))[inside], s * snr[inside], rtol=1e-3)  # log-linear interpolation
        assert np.all(np.diff(tau) >= 0) and np.all(np.diff(new) <= 0)  # still a schedule: noisier with k
        assert (np.all(tau <= np.arange(len(ac))) if s > 1 else np.all(tau >= np.arange(len(ac))))
        ends = ~inside
        assert np.allclose(new[ends], np.interp(tau[ends], np.arange(len(ac)), ac), rtol=1e-6)  # clamped level
    tau, new = retimed_schedule(ac, 1.0)
    assert np.allclose(tau, np.arange(len(ac))) and np.allclose(new, ac)
    with pytest.raises(ValueError, match="> 0"):
        retimed_schedule(ac, 0.0)


def test_retimed_unet_is_the_original_called_at_tau():
    """The retimed audio U-Net at index k equals diffusers' own forward of the unchanged U-Net at the float timestep
    tau(k); the video U-Net and schedule stay as they were."""
    plain = load_base_models("tiny")
    ahead = load_base_models("tiny", snr_scale_a=16.0)
    tau, new = retimed_schedule(plain.alphas_cumprod_a, 16.0)
    assert torch.allclose(ahead.alphas_cumprod_a.double(), torch.from_numpy(new), rtol=1e-6)
    assert torch.equal(ahead.alphas_cumprod_v, plain.alphas_cumprod_v)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 100, 16, generator=g)
    text = plain.encode_text(["a stick hits", "a stick scrapes"])[1]  # (2, D_clap)
    k = torch.tensor([999, 123])
    with torch.no_grad():
        got = ahead.audio_unet(x, k, encoder_hidden_states=None, class_labels=text).sample
        want = plain.audio_unet(x, torch.from_numpy(tau[k.numpy()]).float(), encoder_hidden_states=None,
                                class_labels=text).sample
        moved = plain.audio_unet(x, k, encoder_hidden_states=None, class_labels=text).sample
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, moved, atol=1e-3)  # the retiming does change the output


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("gamma")
    return out, gamma_mismatch.main(["--quick", "--out", str(out)])


def test_quick_run_predicts_first_then_sweeps_every_pair(quick):
    out, res = quick
    predicted = json.loads((out / "prediction.json").read_text())["gamma"]
    first_sample = min(p.stat().st_mtime for p in (out / "eval").glob("*/g*.json"))
    assert (out / "prediction.json").stat().st_mtime < first_sample  # written before any sampling
    assert predicted["audio-ahead"] > 1 > predicted["video-ahead"]  # the mismatch's known direction
    for pair, s in res["pairs"].items():
        assert set(s["rows"]) == {f"{g:.4g}" for g in [1.0, predicted[pair]]}  # the --quick sweep: gamma 1 only
        assert s["predicted_gamma"] == float(f"{predicted[pair]:.4g}")
        for g, row in s["rows"].items():
            assert 0 <= row["av_align"] <= 1 and ("vs_gamma1" in row) == (g != "1")
    # the run's stored config rebuilds the pair's schedule when the model is loaded for sampling
    _, bases, _ = load(str(out / "runs" / "audio-ahead"))
    assert torch.allclose(bases.alphas_cumprod_a.double(), torch.from_numpy(
        retimed_schedule(load_base_models("tiny").alphas_cumprod_a, 16.0)[1]), rtol=1e-6)
    assert (out / "gamma_mismatch.png").stat().st_size > 10_000 and (out / "fig2_matched.png").stat().st_size > 1000
    fig = json.loads((out / "fig2_audio-ahead.json").read_text())  # fig2.main's numbers: both curves start at 1
    assert fig["a_video"][0] == fig["a_audio"][0] == 1.0 and fig["predicted_gamma"] == predicted["audio-ahead"]
    assert "(predicted)" in (out / "gamma_mismatch.md").read_text()


def test_quick_run_resumes_without_redoing_anything(quick):
    out, res = quick
    rewritten = {out / "timings.json", out / "gamma_mismatch.json"}  # the report and the summed stage times
    stamps = {p: p.stat().st_mtime for p in out.rglob("*.json") if p not in rewritten}
    again = gamma_mismatch.main(["--quick", "--out", str(out)])
    assert again["pairs"] == res["pairs"]
    assert all(p.stat().st_mtime == t for p, t in stamps.items())  # no Fig. 2, training or sampling redone
