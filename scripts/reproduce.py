"""Table 1 (Sec. 4.1.3) in miniature, with bounds: tiny models, synthetic sounding videos, 2 CPU cores.

  python -m scripts.reproduce --out runs/repro          # the full miniature (README: the measured runtime)
  python -m scripts.reproduce --quick --out /tmp/repro  # smoke test (CI): tiny budgets, a few clips

Base models: the shipped tiny ones, or with --base-steps N one `train.py --stage base` run from random (Eq. (7)), shared
by every row. `train.py` stage joint (Eq. (9)) per conditioner (cross-attention = Table 1's CoDi row; CMC-PE) and
training seed. Alg. 1 on held-out test captions, clip i from the same noise seed in every row and seed: rows are
compared PAIRED, clip by clip (gamma only changes sampling: the gamma rows share one trained model). Scores: AV-Align
(IoU variant, App. A.4) and two Frechet-distance proxies against the real clips (NOT FVD / FAD): FD-video-feat (colour
histograms + frame-difference statistics), FD-mel (16 log-mel band energies). Bounds: real pairs (upper), real pairs
through the tiny codecs, audio shuffled across clips (lower), the untrained joint model (the two base models alone).
Every stage is skipped when its output exists: an interrupted run continues. Tune on --split val, never on test.
Left out: the real data and base models (the paper's numbers are printed beside ours, not reproduced)."""
import contextlib
import json
import time
from pathlib import Path

import numpy as np
import scipy.stats
import torch

import av_align
import metrics
import train
from data import log_mel, normalize_wav
from model import build_model
from sample import generate_clips
from scripts import fig2
from support import checkpoint, cli
from support.loading import load
from support.media import SR, write_mp4
from support.synthetic import TEST_SEED, synthetic_clip

# Table 1 (GreatestHits) as (FVD, FAD, AV-Align). The row labels were lost in the text extraction; our reading (README):
# rows 1-2 cross-attention with gamma 1 and 1.5, rows 3-6 CMC-PE with gamma 1, 1.5, 2, 3.
PAPER = {("crossattn", 1.0): (379, 2.35, 0.250), ("crossattn", 1.5): (393, 1.29, 0.256),
         ("cmcpe", 1.0): (387, 1.32, 0.257), ("cmcpe", 1.5): (381, 0.60, 0.268),
         ("cmcpe", 2.0): (374, 0.61, 0.268), ("cmcpe", 3.0): (383, 1.32, 0.265)}
NAMES = {"crossattn": "Cross-attention (CoDi)", "cmcpe": "CMC-PE"}
COMPARISONS = [("cmcpe-g1.0", "crossattn-g1.0"), ("cmcpe-g1.5", "crossattn-g1.5"), ("cmcpe-g1.5", "cmcpe-g1.0"),
               ("cmcpe-g2.0", "cmcpe-g1.0"), ("cmcpe-g3.0", "cmcpe-g1.5"), ("crossattn-g1.5", "crossattn-g1.0"),
               ("crossattn-g1.0", "untrained"), ("cmcpe-g1.0", "untrained")]
NOISE = 10 ** 4  # clip i of every row starts from the noise of seed NOISE + i (sample.generate_clips)
FPS = 8  # GreatestHits (Sec. 4.1.2), the synthetic clips' rate
SEEDS = {"test": TEST_SEED, "val": 5 * 10 ** 5, "floor": 7 * 10 ** 5}  # synthetic clips: train seeds 0.. (data.py)
# the full budget: train.py's tiny defaults (the demo's 200 joint steps on the shipped base models)
FULL = dict(base_steps=0, joint_steps=200, batch_size=8, num_clips=2048, seeds=[0, 1, 2], num_test=32, steps=25)
QUICK = dict(base_steps=1, joint_steps=1, batch_size=2, num_clips=2, seeds=[0], num_test=2, steps=1)


def parse_args(argv=None):
    p, pos = cli.Parser(description=__doc__.split("\n")[0]), cli.number(int, 1, 10 ** 6)
    gamma = cli.number(float, 0, 100, open_lo=True)
    p.add_argument("--out", default="runs/repro", help="folder for runs, samples and the report")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny budgets, few clips (what CI runs)")
    p.add_argument("--base-steps", type=cli.number(int, 0), help="stage base steps from random (full: 0, the shipped)")
    p.add_argument("--joint-steps", type=pos, help=f"stage joint steps per run (full: {FULL['joint_steps']})")
    p.add_argument("--batch-size", type=pos, help=f"training batch (full: {FULL['batch_size']})")
    p.add_argument("--lr", type=cli.number(float, 0, open_lo=True), help="default: train.py's tiny default")
    p.add_argument("--num-clips", type=pos, help="synthetic training clips")
    p.add_argument("--seeds", type=cli.number(int, 0, 10 ** 6), nargs="+", help="training seeds (full: 0 1 2)")
    p.add_argument("--num-test", type=cli.number(int, 2, 1024), help="held-out clips per row and seed")
    p.add_argument("--split", default="test", choices=["test", "val"], help="val: for tuning, never the test split")
    p.add_argument("--steps", type=cli.number(int, 1, 1000), help="global timesteps T of Alg. 1 (paper: 25)")
    p.add_argument("--gammas", type=gamma, nargs="+", default=[1.0, 1.5, 2.0, 3.0], help="CMC-PE rows (Table 1)")
    p.add_argument("--crossattn-gammas", type=gamma, nargs="*", default=[1.0], help="cross-attention rows (bare: none)")
    p.add_argument("--guidance-video", type=cli.number(float, 0, 100), default=7.5)  # Sec. 4.1.2
    p.add_argument("--guidance-audio", type=cli.number(float, 0, 100), default=2.5)  # Sec. 4.1.2
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    for k, v in (QUICK if a.quick else FULL).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


@contextlib.contextmanager
def timed(out, log, key):
    """Stage times add up over interrupted and resumed invocations (timings.json): the runtime can be stated."""
    t0 = time.time()
    yield
    log[key] = log.get(key, 0.0) + time.time() - t0
    (out / "timings.json").write_text(json.dumps(log, indent=1))


def train_run(out, log, run, steps, args):
    """train.py's own CLI up to `steps` in the run folder `run`: resumed, skipped once done, timed."""
    if max([step for step, _ in checkpoint.checkpoints(str(run))], default=0) < steps:  # a periodic one is not the end
        with timed(out, log, f"train_{run.name}_s"):
            train.main(args + ["--max-steps", str(steps), "--out", str(run), "--resume"])


def train_runs(a, out, log):
    """The base models (a file), then stage joint for every (conditioner, seed). Yields (seed, base models file) once
    that seed's runs are trained."""
    common = ["--data", "synthetic", "--size", "tiny", "--batch-size", str(a.batch_size), "--num-clips",
              str(a.num_clips), "--device", a.device, "--ckpt-every", "100"] + (["--lr", str(a.lr)] if a.lr else [])
    tiny_bases = cli.TINY_BASES
    if a.base_steps:
        train_run(out, log, out / "runs" / "base", a.base_steps, common + ["--stage", "base", "--tiny-bases", "random"])
        tiny_bases = str((out / "runs" / "base" / f"checkpoint-{a.base_steps}" / "ema.safetensors").resolve())
    for seed in a.seeds:
        for cond in ("crossattn", "cmcpe"):
            train_run(out, log, out / "runs" / f"{cond}-s{seed}", a.joint_steps, common + [
                "--conditioner", cond, "--seed", str(seed), "--tiny-bases", tiny_bases])
        yield seed, tiny_bases


def video_features(frames):
    """(F, H, W, 3) uint8 -> 28 numbers: an 8-bin histogram per RGB channel (24), and the mean, std, max and median
    of the per-frame mean absolute grey-level change (4: motion)."""
    hist = [np.histogram(frames[..., c], bins=8, range=(0, 256))[0] / frames[..., c].size for c in range(3)]
    grey = frames.astype(np.float32).mean(-1)  # (F, H, W)
    diff = np.abs(np.diff(grey, axis=0)).mean((1, 2)) / 255  # (F-1,)
    return np.concatenate(hist + [[diff.mean(), diff.std(), diff.max(), np.median(diff)]])


def audio_features(wave):
    """Waveform (N,) at SR -> 32 numbers: mean and std over time of 16 band energies of the AudioLDM log-mel."""
    bands = log_mel(normalize_wav(np.asarray(wave, np.float32))).numpy().reshape(-1, 16, 4).mean(-1)  # (400, 16)
    return np.concatenate([bands.mean(0), bands.std(0)])


def score_clips(frames, waves):
    """Per clip: AV-Align (av_align.av_align's steps, keeping the counts of audio onsets and video peaks) and the FD
    features."""
    res = dict(av_align=[], n_onsets=[], n_peaks=[], video_feat=[], audio_feat=[])
    for f, w in zip(frames, waves):
        A, V = av_align.audio_onsets(w, SR), av_align.video_peaks(av_align.flow_trajectory(f), FPS)
        res["av_align"].append(av_align.align_score(A, V, FPS, "iou"))  # App. A.4, Eq. (14)-(15)
        res["n_onsets"].append(len(A))
        res["n_peaks"].append(len(V))
        res["video_feat"].append(video_features(f).tolist())
        res["audio_feat"].append(audio_features(w).tolist())
    return res


def sample_scores(model, bases, prompts, gamma, a, example=None):
    """Alg. 1 for every prompt, clip i from noise seed NOISE + i, scored (score_clips); clip 0 also as an mp4."""
    res = generate_clips(model, bases, prompts, T=a.steps, gamma=gamma, guidance_v=a.guidance_video,
                         guidance_a=a.guidance_audio, generator=NOISE, batch_size=16)
    if example:  # a clip to look at
        example.parent.mkdir(exist_ok=True)
        write_mp4(example, res["frames"][0], FPS, res["audios"][0], SR)
    return score_clips(res["frames"], res["audios"])


def cached_eval(path, fn):
    """Per-clip scores of one (row, seed), stored as JSON so that a restarted run skips them."""
    if path.exists():
        return json.load(open(path))
    t0 = time.time()
    res = dict(fn(), seconds=time.time() - t0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res))
    return res


def paired(x, y, rng, boots=2000):
    """x, y: (S, N) AV-Align per training seed and clip (a seed-free row broadcasts). -> mean of x - y, a 95%
    bootstrap CI over clips (the same clips resampled in every seed: pairing kept), the sign test over all
    (seed, clip) pairs, and the mean difference per seed."""
    d = np.subtract(*np.broadcast_arrays(np.asarray(x, float), np.asarray(y, float)))  # (S, N)
    boot = d[:, rng.integers(0, d.shape[1], (boots, d.shape[1]))].mean((0, 2))
    pos, neg = int((d > 0).sum()), int((d < 0).sum())
    p = scipy.stats.binomtest(pos, pos + neg).pvalue if pos + neg else 1.0
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return dict(diff=float(d.mean()), ci95=[float(lo), float(hi)], wins=pos, losses=neg, sign_p=float(p),
                per_seed=d.mean(1).tolist(), significant=bool((lo > 0 or hi < 0) and p < 0.05))


def feature_scale(ref):
    """Per-feature std of the real clips, floored: every feature counts about equally in the Frechet distance."""
    s = np.asarray(ref).std(0)
    return np.maximum(s, 0.1 * np.median(s) + 1e-12)


def fd(feats, ref, scale):
    z, r = np.asarray(feats) / scale, np.asarray(ref) / scale
    return metrics.frechet_distance(*metrics.gaussian_stats(z, 1), *metrics.gaussian_stats(r, 1))


def paired_fd(rows_x, rows_y, ref, scale, rng, boots=300):
    """FD(x) - FD(y) averaged over seed-wise pairs (a seed-free row pairs with every seed), with a 95% bootstrap CI
    over clips (generated and real clips resampled together: the caption pairing is kept)."""
    ref, pick = np.asarray(ref), lambda rows, s: np.asarray(rows[min(s, len(rows) - 1)])  # noqa: E731
    pairs = [(pick(rows_x, s), pick(rows_y, s)) for s in range(max(len(rows_x), len(rows_y)))]
    diff = lambda i: np.mean([fd(x[i], ref[i], scale) - fd(y[i], ref[i], scale) for x, y in pairs])  # noqa: E731
    boot = [diff(rng.integers(0, len(ref), len(ref))) for _ in range(boots)]
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return dict(diff=float(diff(np.arange(len(ref)))), ci95=[float(lo), float(hi)], significant=bool(lo > 0 or hi < 0))


def main(argv=None):
    a = parse_args(argv)
    out, t_start = Path(a.out), time.time()
    out.mkdir(parents=True, exist_ok=True)
    log = json.load(open(out / "timings.json")) if (out / "timings.json").exists() else {}  # earlier invocations
    N = a.num_test
    real = [synthetic_clip(s) for s in range(SEEDS[a.split], SEEDS[a.split] + N)]  # never trained or tuned on
    prompts = [c["caption"] for c in real]
    ev = out / "eval" / f"{a.split}_j{a.joint_steps}_T{a.steps}"  # one folder per budget (and non-paper guidance)
    if (a.guidance_video, a.guidance_audio) != (7.5, 2.5):
        ev = ev.with_name(ev.name + f"_g{a.guidance_video}-{a.guidance_audio}")
    rows = {}  # key -> list over seeds of per-clip score dicts
    real_f, real_w = np.stack([c["frames"] for c in real]), np.stack([c["audio"] for c in real])
    rows["real"] = [cached_eval(ev / "real.json", lambda: score_clips(real_f, real_w))]
    perm = np.roll(np.arange(N), 1)  # a derangement: no clip keeps its own audio
    rows["shuffled"] = [cached_eval(ev / "shuffled.json", lambda: score_clips(real_f, real_w[perm]))]
    other = [synthetic_clip(s) for s in range(SEEDS["floor"], SEEDS["floor"] + N)]  # the FD noise floor
    rows["real-other"] = [cached_eval(ev / "real-other.json", lambda: score_clips(
        np.stack([c["frames"] for c in other]), np.stack([c["audio"] for c in other])))]

    def codec():
        _, bases = build_model("tiny", device=a.device)  # the codecs are fixed: no weights
        with torch.no_grad():
            v = torch.from_numpy(real_f).permute(0, 4, 1, 2, 3).float().to(a.device) / 127.5 - 1  # (N, 3, F, H, W)
            mel = torch.stack([log_mel(normalize_wav(w)) for w in real_w])[:, None].to(a.device)  # (N, 1, 400, 64)
            f = bases.decode_video(bases.encode_video(v)[0]).cpu().numpy()
            w = bases.decode_audio(bases.encode_audio(mel)[0]).float().cpu().numpy()
        return score_clips(f, w)
    rows["codec"] = [cached_eval(ev / "codec.json", codec)]

    def sampled(key, model, bases, gamma, seed):
        example = out / "examples" / f"{key}.mp4" if seed == a.seeds[0] else None  # first training seed
        return cached_eval(ev / f"{key}-s{seed}.json", lambda: sample_scores(model, bases, prompts, gamma, a, example))

    for seed, tiny_bases in train_runs(a, out, log):
        if "untrained" not in rows:  # the base models generating independently: no joint weights, no training seed
            model, bases = build_model("tiny", "cmcpe", device=a.device, tiny_bases=tiny_bases)
            rows["untrained"] = [sampled("untrained-g1.0", model.eval(), bases, 1.0, "-")]
        for cond, gammas in (("crossattn", a.crossattn_gammas), ("cmcpe", a.gammas)):
            model = None
            for g in gammas:
                if model is None and not (ev / f"{cond}-g{g}-s{seed}.json").exists():
                    model, bases, _ = load(str(out / "runs" / f"{cond}-s{seed}"), a.device)
                rows.setdefault(f"{cond}-g{g}", []).append(sampled(f"{cond}-g{g}", model, bases, g, seed))
        report(a, out, rows, log, time.time() - t_start)  # a partial table after every seed
    if not a.quick and not (out / "fig2_tiny.png").exists():  # Fig. 2 of the same frozen base models
        with timed(out, log, "fig2_s"):
            fig2.main(["--tiny-bases", tiny_bases, "--num-clips", "8", "--out", str(out / "fig2_tiny.png"),
                       "--device", a.device])
    return report(a, out, rows, log, time.time() - t_start)


def report(a, out, rows, log, seconds):
    rng, ref = np.random.default_rng(0), rows["real"][0]
    scale_v, scale_a = feature_scale(ref["video_feat"]), feature_scale(ref["audio_feat"])
    summary = {}
    for key, seeds in rows.items():
        count = lambda k: float(np.mean([s[k] for s in seeds]))  # noqa: E731  (audio onsets / video peaks per clip)
        summary[key] = dict(av_align=[float(np.mean(s["av_align"])) for s in seeds], n_seeds=len(seeds),
                            n_clips=len(seeds[0]["av_align"]), onsets=count("n_onsets"), peaks=count("n_peaks"),
                            fd_video_feat=[fd(s["video_feat"], ref["video_feat"], scale_v) for s in seeds],
                            fd_mel=[fd(s["audio_feat"], ref["audio_feat"], scale_a) for s in seeds])
    tests = {}  # the paper's claims as paired comparisons (x - y), named as "CMC-PE g1.5 - cross-attn g1.5"
    label = lambda k: k.replace("cmcpe", "CMC-PE").replace("crossattn", "cross-attn").replace("-g", " g")  # noqa: E731
    for x, y in [(x, y) for x, y in COMPARISONS if x in rows and y in rows]:
        X, Y, name = rows[x], rows[y], f"{label(x)} - {label(y)}".replace(".0", "")
        tests[name] = dict(av_align=paired([s["av_align"] for s in X], [s["av_align"] for s in Y], rng))
        if name.startswith("CMC-PE g3"):  # "too large a gamma degrades quality": the FD proxies, paired
            for k, s, feat in (("fd_video_feat", scale_v, "video_feat"), ("fd_mel", scale_a, "audio_feat")):
                tests[name][k] = paired_fd([r[feat] for r in X], [r[feat] for r in Y], ref[feat], s, rng,
                                           10 if a.quick else 300)
    result = dict(config=vars(a), rows=summary, tests=tests, timings=dict(log, total_s=seconds),
                  paper={f"{c}-g{g}": v for (c, g), v in PAPER.items()})
    (out / f"results_{a.split}_j{a.joint_steps}.json").write_text(json.dumps(result, indent=1))
    table = markdown(summary, tests, a, seconds)
    (out / f"table_{a.split}_j{a.joint_steps}.md").write_text(table)
    print(table)
    return result


def markdown(summary, tests, a, seconds):
    ms = lambda xs: f"{np.mean(xs):.3f} ± {np.std(xs, ddof=1):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"  # noqa: E731
    n, k = summary["real"]["n_clips"], max(r["n_seeds"] for r in summary.values())
    lines = [f"Miniature Table 1 ({a.split} split, {n} clips per row; mean ± sd over {k} of {len(a.seeds)} training "
             f"seeds; T = {a.steps}; base {a.base_steps} / joint {a.joint_steps} steps, batch {a.batch_size}; "
             f"this invocation {seconds / 60:.1f} min)", "",
             "| row | paper FVD | paper FAD | paper AV-Align | AV-Align (IoU) ↑ | FD-video-feat ↓ | FD-mel ↓ "
             "| onsets / flow peaks per clip |", "|---|---|---|---|---|---|---|---|"]
    labels = [("real", f"Real {a.split} pairs (upper bound)"),
              ("codec", "Real pairs through the tiny autoencoders + Griffin-Lim"),
              ("real-other", f"Another {n} real clips (FD noise floor)"),
              ("shuffled", "Real, audio shuffled across clips (lower bound)"),
              ("untrained", "Untrained joint model = base models independently, γ = 1")]
    labels += [(f"{c}-g{g}", f"{NAMES[c]}, γ = {g:g}")
               for c, gs in (("crossattn", a.crossattn_gammas), ("cmcpe", a.gammas)) for g in gs]
    for key, label in [(k, lab) for k, lab in labels if k in summary]:
        r = summary[key]
        pv = PAPER.get((key.split("-g")[0], float(key.split("-g")[1])), ("",) * 3) if "-g" in key else ("",) * 3
        same = key in ("real", "shuffled")  # shuffled: the same frames and sounds, re-paired
        fdv, fda = ("0 (reference)",) * 2 if same else (ms(r["fd_video_feat"]), ms(r["fd_mel"]))
        lines.append(f"| {label} | {pv[0]} | {pv[1]} | {pv[2]} | {ms(r['av_align'])} | {fdv} | {fda} | "
                     f"{r['onsets']:.1f} / {r['peaks']:.1f} |")
    lines += ["", "Paired AV-Align differences (same test clips and noise seeds; 95% bootstrap CI over clips; sign "
              "test over (seed, clip) pairs; per-seed mean differences):", "",
              "| comparison | Δ AV-Align | 95% CI | wins / losses | sign-test p | per seed | significant |",
              "|---|---|---|---|---|---|---|"]
    for name, t in tests.items():
        d = t["av_align"]
        lines.append(f"| {name} | {d['diff']:+.3f} | [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] | {d['wins']} / "
                     f"{d['losses']} | {d['sign_p']:.2g} | {', '.join(f'{x:+.3f}' for x in d['per_seed'])} | "
                     f"{'yes' if d['significant'] else 'no'} |")
    for name, t in tests.items():
        for k in [k for k in ("fd_video_feat", "fd_mel") if k in t]:
            lines.append(f"\n{name}: Δ {k} = {t[k]['diff']:+.3f}, 95% CI [{t[k]['ci95'][0]:+.3f}, "
                         f"{t[k]['ci95'][1]:+.3f}] ({'significant' if t[k]['significant'] else 'not significant'})")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
