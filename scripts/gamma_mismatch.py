"""When does gamma help? The premise of Eq. (8) (Sec. 3.2.2, Fig. 2) tested in miniature, under a mismatch of the two
base models' paces made on purpose, in a known direction; 2 CPU cores.

  python -m scripts.gamma_mismatch --out runs/gamma          # the full experiment (docs/results.md sec. 6)
  python -m scripts.gamma_mismatch --quick --out /tmp/gamma  # smoke test (CI): tiny budgets, two clips

Pairs of frozen base models: matched (the shipped pair, the control); audio-ahead (the audio base model on a schedule
with scale^2 times its SNR, support/retime.py); video-ahead (the same for video). Per pair: Fig. 2 (scripts/fig2.py)
and the gamma predicted from its curves alone (fig2.predict_gamma), all written to prediction.json BEFORE any joint
training or sampling and never rewritten; `train.py` stage joint (CMC-PE, the demo's 200 steps at batch 8; Eq. (9));
Alg. 1 on the held-out test captions at each gamma of the sweep and the predicted one, clip i from the same noise in
every row, scored as scripts/reproduce.py and paired against gamma = 1. Every stage is skipped when its output exists
(timings.json adds up). Left out: other conditioners and training seeds, gamma in training (Sec. 3.4).
"""
import json
import time
from pathlib import Path

import numpy as np
import torch

from scripts import fig2, reproduce
from support import cli
from support.loading import load
from support.synthetic import TEST_SEED, synthetic_clip
from timesteps import local_timesteps

PAIRS = {"matched": "", "audio-ahead": "a", "video-ahead": "v"}  # which base model runs ahead (v: video, a: audio)
FULL = dict(gammas=[1 / 2.5, 1 / 1.5, 1.0, 1.5, 2.5], joint_steps=200, batch_size=8, num_clips=2048, num_test=32,
            steps=25, fig2_clips=16, points=41)
TABLE = ("| gamma | AV-Align (95% CI) | Δ vs γ=1 [95% CI], wins/losses, p | FD-video-feat (Δ vs γ=1 [CI]) "
         "| FD-mel (Δ vs γ=1 [CI]) | onsets / flow peaks |\n|---|---|---|---|---|---|")
QUICK = dict(gammas=[1.0], joint_steps=1, batch_size=2, num_clips=2, num_test=2, steps=1, fig2_clips=2, points=3)


def parse_args(argv=None):
    p = cli.Parser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/gamma", help="folder for runs, samples and the report")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny budgets, two clips (what CI runs)")
    p.add_argument("--scale", type=cli.number(float, 1, 100, open_lo=True), default=4.0,
                   help="latent scale of the model that runs ahead (SNR x scale^2)")
    p.add_argument("--gammas", type=cli.number(float, 0, 100, open_lo=True), nargs="+", help="the sweep, with 1")
    p.add_argument("--joint-steps", type=cli.number(int, 1), help=f"stage joint steps (full: {FULL['joint_steps']})")
    p.add_argument("--num-test", type=cli.number(int, 2, 256), help=f"test clips per row (full: {FULL['num_test']})")
    p.add_argument("--steps", type=cli.number(int, 1, 1000), help="global timesteps T of Alg. 1 (paper: 25)")
    p.add_argument("--guidance-video", type=cli.number(float, 0, 100), default=7.5)  # Sec. 4.1.2
    p.add_argument("--guidance-audio", type=cli.number(float, 0, 100), default=2.5)  # Sec. 4.1.2
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    for k, v in (QUICK if a.quick else FULL).items():
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    if 1.0 not in a.gammas:
        cli.fail("--gammas must include 1 (the reference of every paired comparison)")
    return a


def scale_args(a, pair):
    """--snr-scale-v / -a of a pair: the latent scale squared on the SNR of the model that runs ahead."""
    return [arg for m in "va" for arg in (f"--snr-scale-{m}", repr(a.scale ** 2 if m in PAIRS[pair] else 1.0))]


def predict(a, out, log):
    """Fig. 2 of every pair and the gamma predicted from its curves; prediction.json is written once, first."""
    path = out / "prediction.json"
    if path.exists():
        return json.load(open(path))["gamma"]
    if any((out / "eval").glob("*/*.json")):
        cli.fail(f"{out}/eval holds samples but no prediction.json: the prediction must come before any sampling")
    for pair in PAIRS:
        png = out / f"fig2_{pair}.png"
        if not png.with_suffix(".json").exists():
            with reproduce.timed(out, log, f"fig2_{pair}_s"):
                fig2.main(scale_args(a, pair) + ["--num-clips", str(a.fig2_clips), "--points", str(a.points),
                                                 "--out", str(png), "--device", a.device])
    gamma = {pair: json.load(open(out / f"fig2_{pair}.json"))["predicted_gamma"] for pair in PAIRS}
    written = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    path.write_text(json.dumps(dict(gamma=gamma, written=written, rule="fig2.predict_gamma"), indent=1))
    return gamma


def evaluate(a, out, pair, run, gammas, prompts):
    """Per gamma: per-clip scores, cached as JSON; the run's stored config rebuilds the pair's schedule."""
    rows, model = {}, None
    for g in gammas:
        path = out / "eval" / pair / f"g{g:.4g}.json"
        if model is None and not path.exists():
            model, bases, _ = load(str(run), a.device)
        example = out / "examples" / f"{pair}_g{g:.4g}.mp4"
        rows[g] = reproduce.cached_eval(path, lambda: reproduce.sample_scores(model, bases, prompts, g, a, example))
    return rows


def summarise(rows, ref, predicted, rng, boots):
    """One pair: per gamma AV-Align (mean, 95% CI of the mean), FD proxies, and paired differences against gamma 1."""
    scale_v, scale_a = reproduce.feature_scale(ref["video_feat"]), reproduce.feature_scale(ref["audio_feat"])
    out = {}
    for g, r in sorted(rows.items()):
        mean = reproduce.paired([r["av_align"]], [0.0], rng)  # x - 0: the bootstrap CI of the mean
        row = dict(av_align=mean["diff"], av_align_ci95=mean["ci95"], onsets=float(np.mean(r["n_onsets"])),
                   peaks=float(np.mean(r["n_peaks"])),
                   fd_video_feat=float(reproduce.fd(r["video_feat"], ref["video_feat"], scale_v)),
                   fd_mel=float(reproduce.fd(r["audio_feat"], ref["audio_feat"], scale_a)))
        if g != 1.0:  # paired against gamma = 1: the same clips and noise seeds
            one = rows[1.0]
            row["vs_gamma1"] = dict(av_align=reproduce.paired([r["av_align"]], [one["av_align"]], rng))
            for k, scale, feat in (("fd_video_feat", scale_v, "video_feat"), ("fd_mel", scale_a, "audio_feat")):
                row["vs_gamma1"][k] = reproduce.paired_fd([r[feat]], [one[feat]], ref[feat], scale, rng, boots)
        out[f"{g:.4g}"] = row
    best = max(out, key=lambda k: out[k]["av_align"])
    return dict(rows=out, predicted_gamma=predicted, best_gamma=float(best),
                predicted_vs_gamma1=out[f"{predicted:.4g}"].get("vs_gamma1"))


def report(a, fig, summary, seconds):
    lines = [f"Gamma under a controlled mismatch ({a.num_test} test clips per row, one training seed, T = {a.steps}, "
             f"joint {a.joint_steps} steps at batch {a.batch_size}; latent scale {a.scale:g} = SNR x "
             f"{a.scale ** 2:g}; this invocation {seconds / 60:.1f} min)", ""]
    ci = lambda t: f"{t['diff']:+.3f} [{t['ci95'][0]:+.3f}, {t['ci95'][1]:+.3f}]"  # noqa: E731
    for pair, s in summary.items():
        f, g_hat = fig[pair], f"{s['predicted_gamma']:.4g}"
        lines += [f"**{pair}** (SNR scale video {f['snr_scale_v']:g}, audio {f['snr_scale_a']:g}): Fig. 2 gap "
                  f"{f['gap_a']:.3f} raw; predicted gamma {float(g_hat):.3g}; best AV-Align at {s['best_gamma']:.3g}",
                  "", TABLE]
        for g, r in s["rows"].items():
            d, (lo, hi) = r.get("vs_gamma1"), r["av_align_ci95"]
            av = f"{ci(d['av_align'])}, {d['av_align']['wins']}/{d['av_align']['losses']}" if d else "reference"
            p = f", p = {d['av_align']['sign_p']:.2g}" if d else ""
            fdv, fdm = (f" ({ci(d[k])})" if d else "" for k in ("fd_video_feat", "fd_mel"))
            lines.append(f"| {float(g):.3g}{' (predicted)' * (g == g_hat)} | {r['av_align']:.3f} ({lo:.3f}, {hi:.3f})"
                         f" | {av}{p} | {r['fd_video_feat']:.1f}{fdv} | {r['fd_mel']:.1f}{fdm} | "
                         f"{r['onsets']:.1f} / {r['peaks']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def plot(fig, summary, path):
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    plt.rcParams.update({"axes.titlesize": 9, "legend.fontsize": 7})
    f, ax = plt.subplots(3, len(summary), figsize=(4.2 * len(summary), 10), squeeze=False)
    for j, (pair, s) in enumerate(summary.items()):
        c, g_hat = fig[pair], s["predicted_gamma"]
        lv, la = ({int(k): v for k, v in c[key].items()} for key in ("loss_v", "loss_a"))  # JSON keys are strings
        ax[0, j].plot(c["grid"], c["a_video"], ".-", ms=3, label="video")
        ax[0, j].plot(c["grid"], c["a_audio"], ".-", ms=3, label="audio")
        ax[0, j].set(title=f"{pair}: Fig. 2(a), gap {c['gap_a']:.3f}", xlabel="timestep (each model's own)")
        t = np.arange(1, fig2.T + 1)
        m, n = local_timesteps(torch.from_numpy(t), fig2.T, fig2.T, fig2.T, g_hat)  # Eq. (8)
        ax[1, j].plot(t, fig2.normalised(lv)(m.numpy()), label="video at m(t)")
        ax[1, j].plot(t, fig2.normalised(la)(n.numpy()), label="audio at n(t)")
        ax[1, j].set(title=f"(b) at the predicted γ = {g_hat:.3g}, gap {fig2.gap(lv, la, g_hat):.3f} (interpolated)",
                     xlabel="global timestep t")
        gs = sorted(float(g) for g in s["rows"])
        lo, hi = zip(*(s["rows"][f"{g:.4g}"]["av_align_ci95"] for g in gs))
        ax[2, j].fill_between(gs, lo, hi, alpha=0.25, label="95% CI of the mean")
        ax[2, j].plot(gs, [s["rows"][f"{g:.4g}"]["av_align"] for g in gs], "o-", ms=4, label="AV-Align (IoU)")
        ax[2, j].axvline(g_hat, color="k", ls="--", lw=1, label=f"predicted γ = {g_hat:.3g}")
        ax[2, j].set(xscale="log", xlabel="γ (sampling)")
        for i in range(3):
            ax[i, j].grid(alpha=0.3)
            ax[i, j].legend()
    for i, label in enumerate(("loss / loss at t = 1", "loss / loss at t = 1", "AV-Align on test captions")):
        ax[i, 0].set_ylabel(label)
    f.tight_layout()
    f.savefig(path, dpi=110)
    plt.close(f)


def main(argv=None):
    a = parse_args(argv)
    out, t_start = Path(a.out), time.time()
    out.mkdir(parents=True, exist_ok=True)
    log = json.load(open(out / "timings.json")) if (out / "timings.json").exists() else {}  # earlier invocations
    real = [synthetic_clip(s) for s in range(TEST_SEED, TEST_SEED + a.num_test)]  # held out: never trained on
    frames, waves = np.stack([c["frames"] for c in real]), np.stack([c["audio"] for c in real])
    ref = reproduce.cached_eval(out / "eval" / "real.json", lambda: reproduce.score_clips(frames, waves))
    with reproduce.timed(out, log, "invocations_s"):
        predicted = {pair: float(f"{g:.4g}") for pair, g in predict(a, out, log).items()}
        rows = {}
        for pair in PAIRS:  # the demo's recipe (train.py's tiny defaults), on the pair's base models
            reproduce.train_run(out, log, out / "runs" / pair, a.joint_steps, scale_args(a, pair) + [
                "--data", "synthetic", "--size", "tiny", "--batch-size", str(a.batch_size), "--num-clips",
                str(a.num_clips), "--device", a.device, "--ckpt-every", "100", "--conditioner", "cmcpe", "--seed", "0"])
            gammas = sorted(set(a.gammas) | {predicted[pair]})
            rows[pair] = evaluate(a, out, pair, out / "runs" / pair, gammas, [c["caption"] for c in real])
    rng = np.random.default_rng(0)
    summary = {pair: summarise(rows[pair], ref, predicted[pair], rng, 10 if a.quick else 300) for pair in PAIRS}
    fig = {pair: json.load(open(out / f"fig2_{pair}.json")) for pair in PAIRS}
    result = dict(config=vars(a), pairs=summary, prediction=json.load(open(out / "prediction.json")), timings=log)
    (out / "gamma_mismatch.json").write_text(json.dumps(result, indent=1))
    table = report(a, fig, summary, time.time() - t_start)
    (out / "gamma_mismatch.md").write_text(table)
    plot(fig, summary, out / "gamma_mismatch.png")
    print(table)
    return result


if __name__ == "__main__":
    main()
