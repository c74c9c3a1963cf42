"""When does the gamma knob help? The premise of Eq. (8) (Sec. 3.2.2, Fig. 2) tested in miniature, under a controlled
mismatch of the two base models' paces; 2 CPU cores.

  python scripts/gamma_mismatch.py --out runs/gamma          # the full experiment (docs/results.md sec. 6)
  python scripts/gamma_mismatch.py --quick --out /tmp/gamma  # smoke test (CI): tiny budgets, two clips

Eq. (8) assumes that video and audio become clean at different paces along the same timestep, and that gamma moves
one ahead of the other until their Fig. 2 loss curves coincide. The shipped tiny base models have no such mismatch
(their curves overlap), so here it is made on purpose, in a known direction, with three pairs of frozen base models:
  matched      the shipped pair (the control);
  audio-ahead  the audio base model on a schedule with 16x its SNR at every timestep (what latents scaled by 4 give;
               support/retime.py): audio is cleaner than video at the same timestep;
  video-ahead  the same for the video base model: the mismatch of opposite sign.
Per pair:
1. Fig. 2 of the pair (scripts/fig2.py: each base model's loss over the timestep) and, from those curves alone, the
   gamma that closes their gap (fig2.predict_gamma). Every pair's prediction is written to prediction.json BEFORE any
   joint training or sampling, and never rewritten.
2. Stage "joint" on the pair (train.py, the demo's recipe: CMC-PE, 200 steps at batch 8, seed 0; Eq. (9)).
3. Alg. 1 on the held-out test captions at each gamma of the sweep and at the predicted one; clip i starts from the
   same noise seed in every row, so rows are compared PAIRED, clip by clip, against gamma = 1:
   - AV-Align (IoU variant, App. A.4), with a 95 % bootstrap CI over clips and the sign test;
   - per modality, the Frechet-distance proxies of scripts/reproduce.py against the real test clips: FD-video-feat
     (colour histograms + frame-difference statistics) and FD-mel (16 log-mel band energies), with paired bootstrap
     CIs. Why these: FVD / FAD need I3D / VGGish weights that this offline setting lacks, and these two respond to
     what a badly placed denoising schedule does to the tiny clips (docs/results.md sec. 4: the untrained model sits
     at 75 / 39, the codec ceiling at 47 / 28).
4. The report (gamma_mismatch.md / .json / .png): measured best gamma against the prediction, per pair.
Every stage is skipped when its output exists, so a killed run continues where it stopped (timings.json adds up).
Left out: other conditioners and training seeds (one seed: the CIs are over test clips), gamma during training (the
paper's training draws t_v and t_a independently, Sec. 3.4, so gamma only changes sampling).
"""
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the top-level modules, as a reader runs them
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling scripts
import fig2  # noqa: E402
import reproduce  # noqa: E402
import train  # noqa: E402
from data import build_dataset  # noqa: E402
from support import cache as cache_py  # noqa: E402
from support import cli  # noqa: E402
from support.loading import load  # noqa: E402
from support.media import write_mp4  # noqa: E402
from support.synthetic import synthetic_clip  # noqa: E402
from timesteps import local_timesteps  # noqa: E402

PAIRS = {"matched": "", "audio-ahead": "a", "video-ahead": "v"}  # which base model runs ahead (v: video, a: audio)
FULL = dict(joint_steps=200, batch_size=8, num_clips=2048, num_test=32, steps=25, fig2_clips=16, points=41)
QUICK = dict(joint_steps=2, batch_size=2, num_clips=4, num_test=2, steps=2, fig2_clips=2, points=5)
FPS, SR = 8, 16000


def parse_args(argv=None):
    p = cli.Parser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/gamma", help="folder for runs, samples and the report")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny budgets, two clips (what CI runs)")
    p.add_argument("--scale", type=cli.number(float, 1, lo_open=True), default=4.0,
                   help="latent scale of the mismatched model (SNR x scale^2)")
    p.add_argument("--gammas", action=cli.Listing, item=float, default=[1 / 2.5, 1 / 1.5, 1.0, 1.5, 2.5],
                   help="the sweep (the issue's); the predicted gamma is added per pair")
    p.add_argument("--joint-steps", type=cli.number(int, 1), help=f"stage 'joint' steps (full: {FULL['joint_steps']})")
    p.add_argument("--num-test", type=cli.number(int, 1, 256), help=f"test clips per row (full: {FULL['num_test']})")
    p.add_argument("--steps", type=cli.number(int, 1, 1000), help="global timesteps T of Alg. 1 (paper: 25)")
    p.add_argument("--guidance-video", type=float, default=7.5)  # Sec. 4.1.2
    p.add_argument("--guidance-audio", type=float, default=2.5)  # Sec. 4.1.2
    p.add_argument("--gen-batch", type=cli.number(int, 1, 256), default=16, help="clips per Alg. 1 call")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    if any(g <= 0 for g in a.gammas) or 1.0 not in a.gammas:
        p.error("--gammas must be > 0 and include 1 (the reference of every paired comparison)")
    for k, v in (QUICK if a.quick else FULL).items():
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    return a


def scales(a, pair):
    """(snr_scale_v, snr_scale_a) of a pair: the latent scale squared on the SNR of the model that runs ahead."""
    return tuple(a.scale ** 2 if m in PAIRS[pair] else 1.0 for m in "va")


def scale_args(a, pair):
    v, s = scales(a, pair)
    return ["--snr-scale-v", repr(v), "--snr-scale-a", repr(s)]


# ------------------------------------------------------------------------------------------------ 1. Fig. 2, predict
def predict(a, out, log, bar):
    """Fig. 2 of every pair and the gamma predicted from its curves; prediction.json is written once, first."""
    path = out / "prediction.json"
    if path.exists():
        return json.load(open(path))["gamma"]
    if any((out / "eval").glob("*/*.json")):
        cli.fail(f"{out}/eval holds samples but no prediction.json: the prediction must come before any sampling")
    for pair in PAIRS:
        png = out / f"fig2_{pair}.png"
        if not png.with_suffix(".json").exists():
            t0 = time.time()
            fig2.main(scale_args(a, pair) + ["--num-clips", str(a.fig2_clips), "--points", str(a.points),
                                             "--out", str(png), "--device", a.device])
            reproduce.add_time(out, log, f"fig2_{pair}_s", t0)
        bar.update()
    gamma = {pair: json.load(open(out / f"fig2_{pair}.json"))["predicted_gamma"] for pair in PAIRS}
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    path.write_text(json.dumps(dict(gamma=gamma, written=stamp, rule="fig2.predict_gamma"), indent=1))
    return gamma


# ------------------------------------------------------------------------------------------------ 2. joint training
def train_pair(a, out, log, pair):
    cache = out / "cache"  # the frozen encoders' outputs do not depend on the schedule: one cache for every pair
    if not (cache / "index.json").exists():
        cache_py.main(["--data", "synthetic", "--size", "tiny", "--num-clips", str(a.num_clips), "--out", str(cache),
                       "--device", a.device])
    run = out / "runs" / pair
    if reproduce.steps_done(run / "joint") >= a.joint_steps:
        return run
    t0 = time.time()
    train.main(["--data", "synthetic", "--size", "tiny", "--batch-size", str(a.batch_size), "--cache", str(cache),
                "--device", a.device, "--ckpt-every", "100", "--out", str(run), "--conditioner", "cmcpe", "--seed",
                "0", "--max-steps", str(a.joint_steps), "--resume"] + scale_args(a, pair))
    reproduce.add_time(out, log, f"train_{pair}_s", t0)
    return run


# ------------------------------------------------------------------------------------------------ 3. the gamma sweep
def evaluate(a, out, pair, run, gammas, prompts, noise, bar):
    """Per gamma: per-clip scores (reproduce.score_clips), cached as JSON. The model is built from the run's stored
    config (support/loading.py), so its base models carry the pair's schedule."""
    rows, model = {}, None
    for g in gammas:
        path = out / "eval" / pair / f"g{g:.4g}.json"
        if model is None and not path.exists():
            model, bases, _ = load(str(run), device=a.device)

        def fn():
            f, w = reproduce.synthesize(model, bases, prompts, noise, g, a, f"sampling {pair}, gamma {g:.3g}")
            (out / "examples").mkdir(parents=True, exist_ok=True)
            write_mp4(out / "examples" / f"{pair}_g{g:.4g}.mp4", f[0], FPS, w[0], SR)  # one clip per row, to look at
            return reproduce.score_clips(f, w, FPS, SR)
        rows[g] = reproduce.cached_eval(path, fn)
        bar.update()
    return rows


# ------------------------------------------------------------------------------------------------ 4. the report
def summarise(rows, ref, predicted, rng, boots):
    """One pair: per gamma AV-Align (mean, 95 % CI of the mean), FD proxies, and paired differences against gamma 1."""
    scale_v, scale_a = reproduce.feature_scale(ref["video_feat"]), reproduce.feature_scale(ref["audio_feat"])
    out = {}
    for g, r in sorted(rows.items()):
        av = np.asarray(r["av_align"])
        mean_ci = np.percentile(av[rng.integers(0, len(av), (2000, len(av)))].mean(1), [2.5, 97.5])
        row = dict(av_align=float(av.mean()), av_align_ci95=mean_ci.tolist(), onsets=float(np.mean(r["n_onsets"])),
                   peaks=float(np.mean(r["n_peaks"])),
                   fd_video_feat=float(reproduce.fd(r["video_feat"], ref["video_feat"], scale_v)),
                   fd_mel=float(reproduce.fd(r["audio_feat"], ref["audio_feat"], scale_a)))
        if g != 1.0:  # paired against gamma = 1: the same clips and noise seeds
            one = rows[1.0]
            row["vs_gamma1"] = dict(
                av_align=reproduce.paired([r["av_align"]], [one["av_align"]], rng),
                fd_video_feat=reproduce.paired_fd([r["video_feat"]], [one["video_feat"]], ref["video_feat"], scale_v,
                                                  rng, boots),
                fd_mel=reproduce.paired_fd([r["audio_feat"]], [one["audio_feat"]], ref["audio_feat"], scale_a, rng,
                                           boots))
        out[f"{g:.4g}"] = row
    best = max(out, key=lambda k: out[k]["av_align"])
    return dict(rows=out, predicted_gamma=predicted, best_gamma=float(best),
                predicted_vs_gamma1=out[f"{predicted:.4g}"].get("vs_gamma1"))


def report(a, fig, summary, seconds):
    lines = [f"Gamma under a controlled mismatch ({a.num_test} test clips per row, one training seed, T = {a.steps}, "
             f"joint {a.joint_steps} steps at batch {a.batch_size}; latent scale {a.scale:g} = SNR x "
             f"{a.scale ** 2:g}; this invocation {seconds / 60:.1f} min)", ""]
    for pair, s in summary.items():
        f = fig[pair]
        lines += [f"**{pair}** (SNR scale video {scales(a, pair)[0]:g}, audio {scales(a, pair)[1]:g}): Fig. 2 gap "
                  f"{f['gap_a']:.3f} raw; predicted gamma {s['predicted_gamma']:.3g}; best measured AV-Align at "
                  f"gamma {s['best_gamma']:.3g}", "",
                  "| gamma | AV-Align (95% CI) | Δ vs γ=1 [95% CI], wins/losses, p | FD-video-feat (Δ vs γ=1 [CI]) "
                  "| FD-mel (Δ vs γ=1 [CI]) | onsets / flow peaks |", "|---|---|---|---|---|---|"]
        for g, r in s["rows"].items():
            mark = " (predicted)" if g == f"{s['predicted_gamma']:.4g}" else ""
            d = r.get("vs_gamma1")
            ci = lambda t: f"{t['diff']:+.3f} [{t['ci95'][0]:+.3f}, {t['ci95'][1]:+.3f}]"  # noqa: E731
            lines.append(
                f"| {float(g):.3g}{mark} | {r['av_align']:.3f} ({r['av_align_ci95'][0]:.3f}, "
                f"{r['av_align_ci95'][1]:.3f}) | "
                + (f"{ci(d['av_align'])}, {d['av_align']['wins']}/{d['av_align']['losses']}, "
                   f"p = {d['av_align']['sign_p']:.2g}" if d else "reference")
                + f" | {r['fd_video_feat']:.1f}" + (f" ({ci(d['fd_video_feat'])})" if d else "")
                + f" | {r['fd_mel']:.1f}" + (f" ({ci(d['fd_mel'])})" if d else "")
                + f" | {r['onsets']:.1f} / {r['peaks']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def plot(fig, summary, path):
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    pairs = list(summary)
    f, ax = plt.subplots(3, len(pairs), figsize=(4.2 * len(pairs), 10), squeeze=False)
    for j, pair in enumerate(pairs):
        c, s = fig[pair], summary[pair]
        g_hat = s["predicted_gamma"]
        lv = {int(k): v for k, v in c["loss_v"].items()}
        la = {int(k): v for k, v in c["loss_a"].items()}
        ax[0, j].plot(c["grid"], c["a_video"], ".-", ms=3, label="video")
        ax[0, j].plot(c["grid"], c["a_audio"], ".-", ms=3, label="audio")
        ax[0, j].set_title(f"{pair}: Fig. 2(a), gap {c['gap_a']:.3f}", fontsize=9)
        ax[0, j].set_xlabel("timestep (each model's own)")
        t = np.arange(1, 1001)
        m, n = local_timesteps(torch.from_numpy(t), 1000, 1000, 1000, g_hat)  # Eq. (8)
        ax[1, j].plot(t, fig2.normalised(lv)(m.numpy()), label="video at m(t)")
        ax[1, j].plot(t, fig2.normalised(la)(n.numpy()), label="audio at n(t)")
        ax[1, j].set_title(f"(b) at the predicted γ = {g_hat:.3g}, gap {fig2.gap(lv, la, g_hat):.3f} (interpolated)",
                           fontsize=9)
        ax[1, j].set_xlabel("global timestep t")
        gs = sorted(float(g) for g in s["rows"])
        mean = [s["rows"][f"{g:.4g}"]["av_align"] for g in gs]
        lo, hi = zip(*(s["rows"][f"{g:.4g}"]["av_align_ci95"] for g in gs))
        ax[2, j].fill_between(gs, lo, hi, alpha=0.25, label="95% CI of the mean")
        ax[2, j].plot(gs, mean, "o-", ms=4, label="AV-Align (IoU)")
        ax[2, j].axvline(g_hat, color="k", ls="--", lw=1, label=f"predicted γ = {g_hat:.3g}")
        ax[2, j].set_xscale("log")
        ax[2, j].set_xticks(gs, [f"{g:.2g}" for g in gs], fontsize=7)
        ax[2, j].minorticks_off()
        ax[2, j].set_xlabel("γ (sampling)")
        for i in range(3):
            ax[i, j].grid(alpha=0.3)
            ax[i, j].legend(fontsize=7)
    ax[0, 0].set_ylabel("loss / loss at t = 1")
    ax[1, 0].set_ylabel("loss / loss at t = 1")
    ax[2, 0].set_ylabel("AV-Align on test captions")
    f.tight_layout()
    f.savefig(path, dpi=110)
    plt.close(f)


def main(argv=None):
    a = parse_args(argv)
    out, t_start = Path(a.out), time.time()
    out.mkdir(parents=True, exist_ok=True)
    log = json.load(open(out / "timings.json")) if (out / "timings.json").exists() else {}  # earlier, stopped runs
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", len(os.sched_getaffinity(0)))))
    test = list(build_dataset("synthetic", "test", num_clips=a.num_test).clips)  # held out: never trained or tuned on
    real = [synthetic_clip(s) for s in test]
    prompts = [c["caption"] for c in real]
    noise = [10 ** 4 + i for i in range(a.num_test)]  # clip i starts from the same noise in every row
    frames, waves = np.stack([c["frames"] for c in real]), np.stack([c["audio"] for c in real])
    ref = reproduce.cached_eval(out / "eval" / "real.json", lambda: reproduce.score_clips(frames, waves, FPS, SR))
    with tqdm(total=len(PAIRS) * (2 + len(a.gammas) + 1), desc="experiment", unit="stage") as bar:
        predicted = predict(a, out, log, bar)
        rows = {}
        for pair in PAIRS:
            run = train_pair(a, out, log, pair)
            bar.update()
            gammas = sorted(set(a.gammas) | {float(f"{predicted[pair]:.4g}")})
            bar.total += len(gammas) - len(a.gammas) - 1
            rows[pair] = evaluate(a, out, pair, run, gammas, prompts, noise, bar)
    rng = np.random.default_rng(0)
    boots = 10 if a.quick else 300
    summary = {pair: summarise(rows[pair], ref, float(f"{predicted[pair]:.4g}"), rng, boots) for pair in PAIRS}
    fig = {pair: json.load(open(out / f"fig2_{pair}.json")) for pair in PAIRS}
    seconds = time.time() - t_start
    reproduce.add_time(out, log, "invocations_s", t_start)
    config = vars(a)
    result = dict(config=config, pairs=summary, prediction=json.load(open(out / "prediction.json")),
                  timings=log)
    (out / "gamma_mismatch.json").write_text(json.dumps(result, indent=1))
    table = report(a, fig, summary, seconds)
    (out / "gamma_mismatch.md").write_text(table)
    plot(fig, summary, out / "gamma_mismatch.png")
    print(table)
    return result


if __name__ == "__main__":
    main()
