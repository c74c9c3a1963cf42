"""Sec. 3.4's conditional case in miniature: does the generated sound follow a given video (V2A), the generated video
a given sound (A2V), and does each U-Net listen to the other modality at all? Not in the paper (it samples jointly).

  python -m scripts.foley --ckpt runs/synthetic-tiny-cmcpe --out runs/foley/cmcpe  # --ckpt base: the bases alone
  python -m scripts.foley --ckpt RUN --out OUT --diagnostic  # only dependence() over every checkpoint the run kept

Test clip i (noise seed NOISE + i) is given its own video (sound) or clip i+1's (the floor); generated onsets (flow
peaks) vs clip i's true hits: F1 at +-1 frame; AV-Align with the real partner; paired 95% CIs over clips."""
import json
from pathlib import Path

import numpy as np
import torch

import av_align
from data import build_dataset
from model import time_embedding
from sample import generate_clips
from scripts.reproduce import NOISE, paired
from support import checkpoint, cli, training
from support.loading import load, run_config
from support.synthetic import TEST_SEED, synthetic_clip
from timesteps import add_noise

LEVELS = (100, 400, 700, 950)  # diffusers indices at which the dependence is measured


def f1(pred, true, fps):
    """Events matched one to one within +-1 frame (each true hit takes the nearest free prediction)."""
    free, hits = list(pred), 0
    for t in true:
        near = [p for p in free if abs(p - t) <= 1 / fps + 1e-9]
        if near:
            free.remove(min(near, key=lambda p: abs(p - t)))
            hits += 1
    p, r = hits / max(len(pred), 1), hits / max(len(true), 1)
    return dict(precision=p, recall=r, f1=2 * p * r / (p + r) if p + r else 0.0)


@torch.no_grad()
def dependence(model, bases, batch):
    """{level: (relative change of eps_v under another clip's audio, of eps_a under another clip's video, spread of
    the pooled video context across clips, of the audio context, the video connector's offset ratio: median over
    channels and clips of |temporal mean| / temporal std before the division)} on one batch of test clips."""
    text_v, text_a = bases.encode_text(batch["caption"])
    x0_v, x0_a = bases.encode_video(batch["video"])[0], bases.encode_audio(batch["mel"])[0]
    g = torch.Generator().manual_seed(0)
    out = {}
    for t in LEVELS:
        x_v = add_noise(x0_v, torch.randn(x0_v.shape, generator=g), bases.alphas_cumprod_v[t])  # Eq. (2)
        x_a = add_noise(x0_a, torch.randn(x0_a.shape, generator=g), bases.alphas_cumprod_a[t])  # Eq. (2)
        x_a = training.pad_rows(x_a, model)  # the released model's rows
        eps_v, eps_a = model(x_v, x_a, t, t, text_v, text_a)
        other_v = model(x_v, x_a.roll(1, 0), t, t, text_v, text_a)[0]  # another clip's sound
        other_a = model(x_v.roll(1, 0), x_a, t, t, text_v, text_a)[1]  # another clip's video
        t_b = torch.full((len(x_v),), t)
        spread = [((c - c.mean(0)).norm() / c.mean(0).norm() / len(c) ** 0.5).item()
                  for c in model.contexts(x_v, x_a, t_b, t_b)]
        z = model.connector_v(x_v, None, time_embedding(model.video_unet, t_b)).mean((3, 4))  # pooled: (B, C, F)
        offset = (z.mean(-1).abs() / z.std(-1)).median().item()  # what the released division by the norm flattens
        change_v = ((other_v - eps_v).norm() / eps_v.norm()).item()
        change_a = ((other_a - eps_a).norm() / eps_a.norm()).item()
        out[t] = [change_v, change_a, *spread, offset]
    return out


def foley(model, bases, clips, given, partner):
    """Clip i given clip partner[i]'s video (given "video") or sound ("audio"); scored against clip i's hits."""
    scores = []
    for i, c in enumerate(clips):
        p = clips[partner[i]]
        kw = dict(video=p["frames"]) if given == "video" else dict(audio=(p["audio"], bases.sr))
        res = generate_clips(model, bases, c["caption"], generator=NOISE + i, progress=False, **kw)
        frames, wave = res["frames"][0], res["audios"][0]
        events = av_align.audio_onsets(wave, bases.sr) if given == "video" else av_align.video_peaks(
            av_align.flow_trajectory(frames), bases.fps)
        pair = (c["frames"], wave) if given == "video" else (frames, c["audio"])  # with the real partner
        score = av_align.av_align(pair[0], bases.fps, pair[1], bases.sr, "iou")
        scores.append(dict(f1(events, c["hit_times"], bases.fps), av_align=score))
    return scores


def main(argv=None):
    p = cli.Parser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="a train.py run (tiny), or 'base' for the base models alone")
    p.add_argument("--out", required=True, help="folder for foley.json (and dependence.json)")
    p.add_argument("--num-clips", type=cli.number(int, 2, 1000), default=32, help="held-out test clips")
    p.add_argument("--diagnostic", action="store_true", help="only dependence.json, over the run's checkpoints")
    a = p.parse_args(argv)
    run = None if a.ckpt == "base" else a.ckpt
    if run:
        cli.existing(run, "--ckpt", folder=True)
    (out := Path(a.out)).mkdir(parents=True, exist_ok=True)
    model, bases, _ = load(run, size="tiny")
    batch = torch.utils.data.default_collate([build_dataset("synthetic", "test", num_clips=8)[i] for i in range(8)])
    steps = {}  # the diagnostic over the checkpoints the run kept (step 0: the untrained model of --ckpt base)
    for step, folder in checkpoint.checkpoints(run) if run else [(0, None)]:
        if folder:
            checkpoint.load_weights(model.set_trainable(), f"{folder}/ema.safetensors")
        steps[step] = dependence(model, bases, batch)
        print(f"step {step}: {json.dumps(steps[step])}", flush=True)
    (out / "dependence.json").write_text(json.dumps(dict(levels=LEVELS, steps=steps), indent=1))
    if a.diagnostic:
        return  # (the model holds the newest checkpoint again: oldest first)
    clips = [synthetic_clip(TEST_SEED + i) for i in range(a.num_clips)]
    results = dict(config=run_config(run)[1] if run else "base", dependence=dependence(model, bases, batch))
    own, other = list(range(a.num_clips)), [(i + 1) % a.num_clips for i in range(a.num_clips)]
    for given in ("video", "audio"):
        rows = {k: foley(model, bases, clips, given, partner) for k, partner in (("own", own), ("other", other))}
        f1_own, f1_other = [[r["f1"] for r in rows["own"]]], [[r["f1"] for r in rows["other"]]]
        mean = {k: {m: float(np.mean([r[m] for r in v])) for m in v[0]} for k, v in rows.items()}
        results[given] = dict(rows, mean=mean, own_vs_other_f1=paired(f1_own, f1_other, np.random.default_rng(0)))
        print(f"{given} given: {json.dumps(mean)}; own - other F1: {results[given]['own_vs_other_f1']}")
    real_v2a = [f1(av_align.audio_onsets(c["audio"], bases.sr), c["hit_times"], bases.fps)["f1"] for c in clips]
    peaks = [av_align.video_peaks(av_align.flow_trajectory(c["frames"]), bases.fps) for c in clips]
    real_a2v = [f1(v, c["hit_times"], bases.fps)["f1"] for v, c in zip(peaks, clips)]
    results["ceiling"] = dict(v2a_f1=float(np.mean(real_v2a)), a2v_f1=float(np.mean(real_a2v)))
    (out / "foley.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
