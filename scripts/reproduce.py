"""Table 1 of the paper (Sec. 4.1.3) in miniature, with bounds: tiny models, synthetic sounding videos, 2 CPU cores.

  python scripts/reproduce.py --out runs/repro          # the full miniature (see README for the measured runtime)
  python scripts/reproduce.py --quick --out /tmp/repro  # smoke test (CI): tiny budgets, a few clips

1. The base models: the shipped tiny ones (weights/, as the paper starts from pretrained ones), or with
   --base-steps N stage "base" ONCE from random (train.py, Eq. (7)); every row shares these frozen models.
2. Stage "joint" per conditioner (cross-attention = the CoDi row of Table 1, CMC-PE) and training seed, same budget.
3. Algorithm 1 on held-out test captions; clip i starts from the same noise seed in every row and seed, so rows are
   compared PAIRED, clip by clip. gamma only changes sampling, so the gamma rows share one trained model.
4. AV-Align (IoU variant, App. A.4) per clip; quality proxies named for what they are (NOT FVD / FAD):
   FD-video-feat = Frechet distance on per-clip colour histograms + frame-difference statistics,
   FD-mel = Frechet distance on per-clip means / stds of 16 log-mel band energies; both against the real test clips.
   Real FVD / FAD only with --i3d / --vggish weight files.
Bounds: real test pairs (upper), real pairs through the tiny autoencoders + Griffin-Lim (what the codec keeps),
audio shuffled across test clips (lower), the untrained joint model (= the two base models generating independently).
Every stage is skipped when its output exists, so an interrupted run continues where it stopped.
Tuning (budgets, lr) uses `--split val` (clips that are neither train nor test), never the test split.
"""
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import scipy.stats
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the top-level modules, as a reader runs them
from support import checkpoint  # noqa: E402
from support import cli  # noqa: E402
import av_align  # noqa: E402
import metrics  # noqa: E402
import train  # noqa: E402
from data import build_dataset, log_mel, normalize_wav  # noqa: E402
from support.media import write_mp4  # noqa: E402
from support.synthetic import synthetic_clip  # noqa: E402
from model import build_model  # noqa: E402
from sample import generate  # noqa: E402

# Table 1 (GreatestHits) as (FVD, FAD, AV-Align). The row labels were lost in the text extraction; our reading (README):
# rows 1-2 cross-attention with gamma 1 and 1.5, rows 3-6 CMC-PE with gamma 1, 1.5, 2, 3.
PAPER = {("crossattn", 1.0): (379, 2.35, 0.250), ("crossattn", 1.5): (393, 1.29, 0.256),
         ("cmcpe", 1.0): (387, 1.32, 0.257), ("cmcpe", 1.5): (381, 0.60, 0.268),
         ("cmcpe", 2.0): (374, 0.61, 0.268), ("cmcpe", 3.0): (383, 1.32, 0.265)}
NAMES = {"crossattn": "Cross-attention (CoDi)", "cmcpe": "CMC-PE"}
SEEDS = {"val": 5 * 10 ** 5, "floor": 7 * 10 ** 5}  # synthetic seeds: train 0.., test 10**6.. (data.py), these apart
# The full budget: train.py's tiny defaults (the demo's 200 joint steps on the shipped base models; docs/results.md)
FULL = dict(base_steps=0, joint_steps=200, batch_size=8, num_clips=2048, seeds=[0, 1, 2], num_test=32, steps=25)
QUICK = dict(base_steps=2, joint_steps=2, batch_size=2, num_clips=4, seeds=[0, 1], num_test=3, steps=2)


def parse_args(argv=None):
    p = cli.Parser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/repro", help="folder for runs, samples and the report")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny budgets, few clips (what CI runs)")
    p.add_argument("--base-steps", type=int, help="stage 'base' steps from random base models (full: 0, the shipped)")
    p.add_argument("--joint-steps", type=int, help=f"stage 'joint' steps per run (full: {FULL['joint_steps']})")
    p.add_argument("--batch-size", type=int, help=f"training batch (full: {FULL['batch_size']})")
    p.add_argument("--lr", type=float, default=None, help="default: train.py's tiny default")
    p.add_argument("--num-clips", type=int, help="synthetic training clips")
    p.add_argument("--seeds", action=cli.Listing, item=int, help="training seeds, >= 3 for a spread (full: 0 1 2)")
    p.add_argument("--num-test", type=int, help="held-out clips per row and seed")
    p.add_argument("--split", default="test", choices=["test", "val"], help="val: for tuning, never the test split")
    p.add_argument("--steps", type=int, help="global timesteps T of Alg. 1 (paper: 25, Sec. 4.1.2)")
    p.add_argument("--gammas", action=cli.Listing, item=float, default=[1.0, 1.5, 2.0, 3.0],
                   help="CMC-PE rows (Table 1)")
    p.add_argument("--crossattn-gammas", action=cli.Listing, item=float, default=[1.0],
                   help="cross-attention rows (1.5: our "
                   "reading of Table 1's row 2)")
    p.add_argument("--guidance-video", type=float, default=7.5)  # Sec. 4.1.2
    p.add_argument("--guidance-audio", type=float, default=2.5)  # Sec. 4.1.2
    p.add_argument("--gen-batch", type=int, default=16, help="clips per Alg. 1 call")
    p.add_argument("--examples", type=int, default=2, help="mp4s written per row (seed 0) for a look")
    p.add_argument("--i3d", help="StyleGAN-V i3d_torchscript.pt: adds real FVD (16 first frames, no mirroring)")
    p.add_argument("--vggish", help="torchvggish vggish-10086976.pth: adds real FAD")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    for k, v in (QUICK if a.quick else FULL).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.quick:
        a.gen_batch, a.examples = a.num_test, 1
    return a


# ------------------------------------------------------------------------------------------------ training
def train_runs(a, out, log):
    """Stage 'base' once, then stage 'joint' for every (conditioner, seed); train.py's own CLI, resumable."""
    cache = out / "cache"
    if not (cache / "index.json").exists():  # the frozen encoders run once per clip (cache.py), not every step
        from support import cache as cache_py
        cache_py.main(["--data", "synthetic", "--size", "tiny", "--num-clips", str(a.num_clips), "--out", str(cache),
                       "--device", a.device])
    common = ["--data", "synthetic", "--size", "tiny", "--base-steps", str(a.base_steps), "--batch-size",
              str(a.batch_size), "--cache", str(cache), "--device", a.device, "--ckpt-every", "100"]
    common += (["--lr", str(a.lr)] if a.lr else []) + (["--tiny-bases", "random"] if a.base_steps else [])
    base = out / "runs" / "base-only"
    if a.base_steps and steps_done(base / "base") < a.base_steps:  # a periodic checkpoint is not the end
        t0 = time.time()
        train.main(common + ["--out", str(base), "--max-steps", "0", "--resume"])  # max-steps 0: the base stage only
        add_time(out, log, "train_base_s", t0)
    for seed in a.seeds:
        for cond in ("crossattn", "cmcpe"):
            run = out / "runs" / f"{cond}-s{seed}"
            if steps_done(run / "joint") >= a.joint_steps:
                continue
            run.mkdir(parents=True, exist_ok=True)
            if a.base_steps and not (run / "base").exists():
                shutil.rmtree(run / "base.copy", ignore_errors=True)  # a copy cut short by a kill
                shutil.copytree(base / "base", run / "base.copy")  # the SAME frozen base models (a link is refused)
                os.replace(run / "base.copy", run / "base")
            t0 = time.time()
            train.main(common + ["--out", str(run), "--conditioner", cond, "--seed", str(seed), "--max-steps",
                                 str(a.joint_steps), "--resume", "--allow-changed-args"])  # shared base stage
            add_time(out, log, f"train_{cond}-s{seed}_s", t0)
        yield seed  # this seed's models are ready: evaluate them before training the next seed


def steps_done(stage):
    """Steps of the newest complete checkpoint of a stage folder of train.py (0 if none)."""
    return checkpoint.latest(stage.parent, stage.name)[1] or 0


def add_time(out, log, key, t0):
    """Stage times add up over interrupted and resumed runs (timings.json), so the runtime can be stated."""
    log[key] = log.get(key, 0.0) + time.time() - t0
    (out / "timings.json").write_text(json.dumps(log, indent=1))


# ------------------------------------------------------------------------------------------------ evaluation
def video_features(frames):
    """(F, H, W, 3) uint8 -> 28 numbers: an 8-bin histogram per RGB channel (24) and the mean, std, max and median
    of the per-frame mean absolute grey-level change (4; motion)."""
    hist = [np.histogram(frames[..., c], bins=8, range=(0, 256))[0] / frames[..., c].size for c in range(3)]
    grey = frames.astype(np.float32).mean(-1)  # (F, H, W)
    diff = np.abs(np.diff(grey, axis=0)).mean((1, 2)) / 255  # (F-1,)
    return np.concatenate(hist + [[diff.mean(), diff.std(), diff.max(), np.median(diff)]])


def audio_features(wave):
    """waveform (N,) 16 kHz -> 32 numbers: mean and std over time of 16 band energies of the AudioLDM log-mel."""
    bands = log_mel(normalize_wav(np.asarray(wave, np.float32))).numpy().reshape(-1, 16, 4).mean(-1)  # (400, 16)
    return np.concatenate([bands.mean(0), bands.std(0)])


def score_clips(frames, waves, fps, sr, extract=None):
    """Per clip: AV-Align (IoU; = av_align.av_align, its steps spelled out to keep the counts of audio onsets and video
    peaks), the FD features, and (optionally) FVD / FAD network features."""
    res = dict(av_align=[], n_onsets=[], n_peaks=[], video_feat=[], audio_feat=[])
    for f, w in zip(frames, waves):
        A, V = av_align.audio_onsets(w, sr), av_align.video_peaks(av_align.flow_trajectory(f), fps)
        res["av_align"].append(av_align.align_score(A, V, fps, "iou"))  # App. A.4, Eq. (14)-(15)
        res["n_onsets"].append(len(A))
        res["n_peaks"].append(len(V))
        res["video_feat"].append(video_features(f).tolist())
        res["audio_feat"].append(audio_features(w).tolist())
    for name, fn in (extract or {}).items():
        res[name] = [fn(f, w) for f, w in zip(frames, waves)]
    return res


def synthesize(model, bases, prompts, seeds, gamma, a, desc="sampling"):
    frames, waves = [], []
    for i in tqdm(range(0, len(prompts), a.gen_batch), desc=desc, unit="batch"):  # a row takes minutes on a CPU
        x_v, x_a = generate(model, bases, prompts[i:i + a.gen_batch], seeds[i:i + a.gen_batch], T=a.steps, gamma=gamma,
                            guidance_v=a.guidance_video, guidance_a=a.guidance_audio, bar=False)
        frames.append(bases.decode_video(x_v).cpu().numpy())  # (b, F, H, W, 3) uint8
        waves.append(bases.decode_audio(x_a).float().cpu().numpy())  # (b, 64000)
    return np.concatenate(frames), np.concatenate(waves)


def load(a, out, conditioner, run=None):
    model, bases = build_model("tiny", conditioner, device=a.device, tiny_bases=None if a.base_steps else cli.TINY_BASES)
    folders = ([("base", out / "runs" / "base-only")] if a.base_steps else []) + (
        [("joint", out / "runs" / run)] if run is not None else [])
    for stage, folder in folders:  # the frozen, trained base models; then the added modules + motion modules
        checkpoint.load_weights(model, checkpoint.latest(folder, stage)[0], model.stage_parameters(stage))
    return model.eval(), bases


def cached_eval(path, fn):
    """Per-clip scores of one (row, seed), stored as JSON so that a restarted run skips it."""
    if path.exists():
        return json.load(open(path))
    t0 = time.time()
    res = fn()
    res["seconds"] = time.time() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res))
    return res


def network_features(a, device):
    """Real FVD / FAD features when weight files are given: {name: fn(frames, wave) -> list}."""
    extract = {}
    try:
        if a.i3d:
            i3d = metrics.load_i3d(a.i3d, device)
            extract["fvd_feat"] = lambda f, w: i3d(f[None, :16].transpose(0, 4, 1, 2, 3))[0].tolist()
        if a.vggish:
            vgg = metrics.load_vggish(a.vggish, device)
            extract["fad_feat"] = lambda f, w: vgg(w.astype(np.float64), 16000).tolist()
    except metrics.MetricError as e:
        print(f"FVD/FAD not computed: {e}")
    return extract


# ------------------------------------------------------------------------------------------------ statistics
def paired(x, y, rng, boots=2000):
    """x, y: (S, N) AV-Align per training seed and clip (a seed-free row broadcasts). -> mean of x - y, a 95%
    bootstrap CI over clips (the same clips resampled in every seed: pairing kept), the sign test over all
    (seed, clip) pairs, and the mean difference per seed."""
    d = np.broadcast_arrays(np.asarray(x, float), np.asarray(y, float))
    d = d[0] - d[1]  # (S, N)
    boot = d[:, rng.integers(0, d.shape[1], (boots, d.shape[1]))].mean((0, 2))
    pos, neg = int((d > 0).sum()), int((d < 0).sum())
    p = scipy.stats.binomtest(pos, pos + neg).pvalue if pos + neg else 1.0
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return dict(diff=float(d.mean()), ci95=[float(lo), float(hi)], wins=pos, losses=neg, sign_p=float(p),
                per_seed=d.mean(1).tolist(), significant=bool((lo > 0 or hi < 0) and p < 0.05))


def fd(feats, ref, scale):
    z, r = np.asarray(feats) / scale, np.asarray(ref) / scale
    return metrics.frechet_distance(*metrics.gaussian_stats(z, 1), *metrics.gaussian_stats(r, 1))


def feature_scale(ref):
    """Per-feature std of the real clips, floored: every feature counts about equally in the Frechet distance."""
    s = np.asarray(ref).std(0)
    return np.maximum(s, 0.1 * np.median(s) + 1e-12)


def paired_fd(rows_x, rows_y, ref, scale, rng, boots=300):
    """FD(x) - FD(y) averaged over seed-wise pairs, with a 95% bootstrap CI over clips (generated and real clips
    resampled together, so the caption pairing is kept)."""
    pairs, ref = [(np.asarray(x), np.asarray(y)) for x, y in _pairs(rows_x, rows_y)], np.asarray(ref)
    diff = lambda i: np.mean([fd(x[i], ref[i], scale) - fd(y[i], ref[i], scale) for x, y in pairs])
    boot = [diff(rng.integers(0, len(ref), len(ref))) for _ in range(boots)]
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return dict(diff=float(diff(np.arange(len(ref)))), ci95=[float(lo), float(hi)], significant=bool(lo > 0 or hi < 0))


def _pairs(rows_x, rows_y):  # seed-wise pairs; a seed-free row (one entry) pairs with every seed
    k = max(len(rows_x), len(rows_y))
    return [(rows_x[min(s, len(rows_x) - 1)], rows_y[min(s, len(rows_y) - 1)]) for s in range(k)]


# ------------------------------------------------------------------------------------------------ the table
def main(argv=None):
    a = parse_args(argv)
    out, t_start = Path(a.out), time.time()
    log = json.load(open(out / "timings.json")) if (out / "timings.json").exists() else {}  # earlier, stopped runs
    # OMP_NUM_THREADS when set (on a shared machine 1 thread is safer: OpenMP threads that wait for a busy core spin),
    # else every core this process may use
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", len(os.sched_getaffinity(0)))))
    fps, sr, N = 8, 16000, a.num_test
    if a.split == "test":  # the held-out test clips of data.py (never used for training or tuning)
        clip_seeds = list(build_dataset("synthetic", "test", num_clips=N).clips)
    else:
        clip_seeds = list(range(SEEDS["val"], SEEDS["val"] + N))
    real = [synthetic_clip(s) for s in tqdm(clip_seeds, desc=f"{a.split} clips")]
    prompts, noise = [c["caption"] for c in real], [10 ** 4 + i for i in range(N)]  # noise seed of clip i: every row
    ev = out / "eval" / f"{a.split}_j{a.joint_steps}_T{a.steps}"  # one folder per budget (and non-paper guidance)
    ev = ev.with_name(ev.name + f"_g{a.guidance_video}-{a.guidance_audio}") if (a.guidance_video, a.guidance_audio) != (
        7.5, 2.5) else ev
    extract = network_features(a, a.device)
    rows = {}  # key -> list over seeds of per-clip score dicts

    # bounds: real pairs, real pairs through the tiny codec, shuffled audio, another real set (FD noise floor)
    real_f, real_w = np.stack([c["frames"] for c in real]), np.stack([c["audio"] for c in real])
    rows["real"] = [cached_eval(ev / "real.json", lambda: score_clips(real_f, real_w, fps, sr, extract))]
    perm = np.roll(np.arange(N), 1)  # a derangement: no clip keeps its own audio
    rows["shuffled"] = [cached_eval(ev / "shuffled.json", lambda: score_clips(real_f, real_w[perm], fps, sr, extract))]
    floor = [synthetic_clip(s) for s in range(SEEDS["floor"], SEEDS["floor"] + N)]
    rows["real-other"] = [cached_eval(ev / "real-other.json", lambda: score_clips(
        np.stack([c["frames"] for c in floor]), np.stack([c["audio"] for c in floor]), fps, sr, extract))]

    def codec():
        _, bases = build_model("tiny", device=a.device)
        with torch.no_grad():
            v = torch.from_numpy(real_f).permute(0, 4, 1, 2, 3).float().to(a.device) / 127.5 - 1  # (N, 3, F, H, W)
            mel = torch.stack([log_mel(normalize_wav(w)) for w in real_w])[:, None].to(a.device)  # (N, 1, 400, 64)
            f = bases.decode_video(bases.encode_video(v)[0]).cpu().numpy()
            w = bases.decode_audio(bases.encode_audio(mel)[0]).float().cpu().numpy()
        return score_clips(f, w, fps, sr, extract)
    rows["codec"] = [cached_eval(ev / "codec.json", codec)]

    def sampled(key, model, bases, gamma, seed):
        def fn():
            f, w = synthesize(model, bases, prompts, noise, gamma, a, f"sampling {key} (seed {seed})")
            if seed == a.seeds[0]:
                (out / "examples").mkdir(parents=True, exist_ok=True)
                for i in range(min(a.examples, N)):
                    write_mp4(out / "examples" / f"{key}_{i}.mp4", f[i], fps, w[i], sr)
            return score_clips(f, w, fps, sr, extract)
        return cached_eval(ev / f"{key}-s{seed}.json", fn)

    for seed in train_runs(a, out, log):
        if seed == a.seeds[0]:  # the base models generating independently: no joint weights, no training seed
            model, bases = load(a, out, "cmcpe")
            rows["untrained"] = [sampled("untrained-g1.0", model, bases, 1.0, "-")]
        for cond, gammas in (("crossattn", a.crossattn_gammas), ("cmcpe", a.gammas)):
            model, bases = None, None
            for g in gammas:
                if model is None and not (ev / f"{cond}-g{g}-s{seed}.json").exists():
                    model, bases = load(a, out, cond, f"{cond}-s{seed}")
                rows.setdefault(f"{cond}-g{g}", []).append(sampled(f"{cond}-g{g}", model, bases, g, seed))
        report(a, out, rows, log, time.time() - t_start)  # a partial table after every seed
    if not a.quick and not (out / "fig2_tiny.png").exists():  # Fig. 2 of the same frozen base models (fig2.py)
        import fig2
        t0 = time.time()
        fig2.main((["--ckpt", str(out / "runs" / "base-only")] if a.base_steps else []) + [
            "--num-clips", "8", "--out", str(out / "fig2_tiny.png"), "--device", a.device])
        add_time(out, log, "fig2_s", t0)
    return report(a, out, rows, log, time.time() - t_start)


def report(a, out, rows, log, seconds):
    rng = np.random.default_rng(0)
    ref = rows["real"][0]
    scale_v, scale_a = feature_scale(ref["video_feat"]), feature_scale(ref["audio_feat"])
    net = [k for k in ("fvd_feat", "fad_feat") if k in ref]
    summary = {}
    for key, seeds in rows.items():
        av = np.array([s["av_align"] for s in seeds])  # (S, N)
        fdv = [fd(s["video_feat"], ref["video_feat"], scale_v) for s in seeds]
        fda = [fd(s["audio_feat"], ref["audio_feat"], scale_a) for s in seeds]
        count = lambda k: float(np.mean([s[k] for s in seeds]))  # mean audio onsets / video flow peaks per clip
        row = dict(av_align=av.mean(1).tolist(), fd_video_feat=fdv, fd_mel=fda, n_seeds=len(seeds), n_clips=av.shape[1],
                   onsets=count("n_onsets"), peaks=count("n_peaks"))
        for k in net:  # real FVD / FAD when weights were given
            row[k[:3]] = [fd(np.reshape(s[k], (-1, np.shape(s[k])[-1])), np.reshape(ref[k], (-1, np.shape(ref[k])[-1])),
                             1.0) for s in seeds]
        summary[key] = row
    tests = {}  # the paper's claims as paired comparisons (x - y)
    for name, x, y in (("CMC-PE g1 - cross-attn g1", "cmcpe-g1.0", "crossattn-g1.0"),
                       ("CMC-PE g1.5 - cross-attn g1.5", "cmcpe-g1.5", "crossattn-g1.5"),
                       ("CMC-PE g1.5 - CMC-PE g1", "cmcpe-g1.5", "cmcpe-g1.0"),
                       ("CMC-PE g2 - CMC-PE g1", "cmcpe-g2.0", "cmcpe-g1.0"),
                       ("CMC-PE g3 - CMC-PE g1.5", "cmcpe-g3.0", "cmcpe-g1.5"),
                       ("cross-attn g1.5 - cross-attn g1", "crossattn-g1.5", "crossattn-g1.0"),
                       ("cross-attn g1 - untrained", "crossattn-g1.0", "untrained"),
                       ("CMC-PE g1 - untrained", "cmcpe-g1.0", "untrained")):
        if x in rows and y in rows:
            X, Y = rows[x], rows[y]
            tests[name] = dict(av_align=paired([s["av_align"] for s in X], [s["av_align"] for s in Y], rng))
            if name.startswith("CMC-PE g3"):  # "too large a gamma degrades quality": the FD proxies, paired
                boots = 300 if not a.quick else 10
                tests[name]["fd_video_feat"] = paired_fd([s["video_feat"] for s in X], [s["video_feat"] for s in Y],
                                                         ref["video_feat"], scale_v, rng, boots)
                tests[name]["fd_mel"] = paired_fd([s["audio_feat"] for s in X], [s["audio_feat"] for s in Y],
                                                  ref["audio_feat"], scale_a, rng, boots)
    config = {k: v for k, v in vars(a).items()}
    result = dict(config=config, rows=summary, tests=tests, timings=dict(log, total_s=seconds), paper=
                  {f"{c}-g{g}": v for (c, g), v in PAPER.items()})
    out.mkdir(parents=True, exist_ok=True)
    (out / f"results_{a.split}_j{a.joint_steps}.json").write_text(json.dumps(result, indent=1))
    table = markdown(summary, tests, a, seconds)
    (out / f"table_{a.split}_j{a.joint_steps}.md").write_text(table)
    print(table)
    return result


def markdown(summary, tests, a, seconds):
    ms = lambda xs: f"{np.mean(xs):.3f} ± {np.std(xs, ddof=1):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"
    n, k = next(iter(summary.values()))["n_clips"], max(r["n_seeds"] for r in summary.values())
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
    for key, label in labels:
        if key not in summary:
            continue
        r = summary[key]
        pv = PAPER.get((key.split("-g")[0], float(key.split("-g")[1])), ("", "", "")) if "-g" in key else ("", "", "")
        fdv = "0 (reference)" if key in ("real", "shuffled") else ms(r["fd_video_feat"])  # shuffled: the same
        fda = "0 (reference)" if key in ("real", "shuffled") else ms(r["fd_mel"])  # frames and sounds, re-paired
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
        for k in ("fd_video_feat", "fd_mel"):
            if k in t:
                lines.append(f"\n{name}: Δ {k} = {t[k]['diff']:+.3f}, 95% CI [{t[k]['ci95'][0]:+.3f}, "
                             f"{t[k]['ci95'][1]:+.3f}] ({'significant' if t[k]['significant'] else 'not significant'})")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
