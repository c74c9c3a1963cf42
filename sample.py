"""Joint generation of a video and its sound: Algorithm 1 (App. A.1) with the timestep adjustment of Eq. (8).

One global grid t = T, ..., 1 (T = 25, Sec. 4.1.2) drives both modalities; at each step the local timesteps m(t), n(t)
(Eq. 8, knob gamma) set each base model's noise level, the joint model predicts (eps_v, eps_a) with classifier-free
guidance per modality (7.5 video, 2.5 audio, Sec. 4.1.2), and each latent takes its own deterministic DDIM step
(Eq. 5) from m(t) to m(t-1) and from n(t) to n(t-1). The connectors see the previous step's x0_hat (self-conditioning).
The CLI writes <name>.mp4 (H.264 + AAC) + <name>.wav per clip, manifest.jsonl and index.html (a page that plays them).
Left out: stochastic samplers (eta > 0) and other solvers (the paper: "any sampler" works).
"""
import glob
import html
import json
import math
import os
import random
import re
import time

import numpy as np
import torch
from tqdm import tqdm

from data import read_captions
from support import checkpoint, cli
from support.loading import load, read_run_config
from support.media import save_clips
from support.released_folder import is_pipe
from timesteps import alpha_bar_table, ddim_step, local_timesteps, to_eps


@torch.no_grad()
def generate(model, bases, prompts, seeds, T=25, gamma=1.5, guidance_v=7.5, guidance_a=2.5, negative="", bar=True,
             amp=None, seconds=4):
    """Algorithm 1 for a batch of prompts; sample i starts from noise seeded by seeds[i] (batch-size independent).
    -> (x_v (B, 4, F, h, w), x_a (B, 8, rows, 16)) clean latents of `seconds` s (rows may include the padding)."""
    dev, B, P = bases.alphas_cumprod_v.device, len(prompts), bases.prediction_type
    text_v, text_a = bases.encode_text(list(prompts))
    null_v, null_a = bases.encode_text([negative] * B)
    F_, h = round(seconds * bases.fps), bases.latent_size  # 4-s clips (Sec. 4.1.2); latent H = W
    k = model.audio_rows_multiple  # released model: padded to a multiple of 8 rows as in its training, noise in it
    rows = math.ceil(bases.audio_rows(seconds) / k) * k  # 100 latent rows (4 mel frames of 10 ms each) for 4 s
    noise = [torch.Generator().manual_seed(s) for s in seeds]
    x_v = torch.stack([torch.randn(4, F_, h, h, generator=g) for g in noise]).to(dev)  # x_{m(T)}, (B, 4, F, h, w)
    x_a = torch.stack([torch.randn(8, rows, 16, generator=g) for g in noise]).to(dev)  # x_{n(T)}, (B, 8, rows, 16)
    ab_v, ab_a = alpha_bar_table(bases.alphas_cumprod_v), alpha_bar_table(bases.alphas_cumprod_a)
    T_v, T_a = len(ab_v) - 1, len(ab_a) - 1  # the base models' maximum timestep (1000)
    x0_v = x0_a = None  # self-conditioning input: zeros at the first step
    two = lambda x: torch.cat([x, x])  # [uncond; cond] in one batch
    for t in tqdm(range(T, 0, -1), desc="Alg. 1", disable=not bar):  # Alg. 1
        m, n = local_timesteps(t, T, T_v, T_a, gamma)  # Eq. (8)
        m_prev, n_prev = local_timesteps(t - 1, T, T_v, T_a, gamma)  # Eq. (8)
        tv, ta = torch.full((B,), m - 1, device=dev), torch.full((B,), n - 1, device=dev)  # diffusers indices
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            ctx = model.contexts(x_v, x_a, tv, ta, x0_v, x0_a)  # no text in the connectors: once for both halves
            e_v, e_a = model(two(x_v), two(x_a), two(tv), two(ta), torch.cat([null_v, text_v]),
                             torch.cat([null_a, text_a]), context=tuple(map(two, ctx)))
        (u_v, c_v), (u_a, c_a) = e_v.float().chunk(2), e_a.float().chunk(2)
        eps_v = to_eps(u_v + guidance_v * (c_v - u_v), x_v, ab_v[m], P["v"])  # classifier-free guidance
        eps_a = to_eps(u_a + guidance_a * (c_a - u_a), x_a, ab_a[n], P["a"])  # (on v for the tiny U-Nets: linear)
        x_v, x0_v = ddim_step(x_v, eps_v, ab_v[m], ab_v[m_prev])  # Eq. (5): x_{m(t-1)}
        x_a, x0_a = ddim_step(x_a, eps_a, ab_a[n], ab_a[n_prev])  # Eq. (5): x_{n(t-1)}
    return x_v, x_a  # x_0^(v), x_0^(a)


def generate_clips(model, bases, prompt, negative="", T=25, gamma=1.5, guidance_v=7.5, guidance_a=2.5, generator=None,
                   num_samples=1, seconds=4, batch_size=4, amp=None, progress=True):
    """Algorithm 1 over many prompts in batches, decoded. prompt: a string or a list. generator: an int seed, a
    torch.Generator (its initial seed) or None (a fresh one). -> dict(frames uint8 (B, F, H, W, 3), waveforms
    float32 (B, N), fps, sample_rate, prompts, seeds): num_samples per prompt, each from its own seed."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    seed = generator.initial_seed() if isinstance(generator, torch.Generator) else (
        random.randrange(2 ** 31) if generator is None else int(generator))
    jobs = [p for p in prompts for _ in range(num_samples)]
    seeds = [seed * 1000003 + k for k in range(len(jobs))]  # one seed per clip (Alg. 1's initial noise)
    frames, waves = [], []
    for b in range(0, len(jobs), batch_size):
        x_v, x_a = generate(model, bases, jobs[b: b + batch_size], seeds[b: b + batch_size], T, gamma, guidance_v,
                            guidance_a, negative, bar=progress and len(jobs) == 1, amp=amp, seconds=seconds)
        frames.append(bases.decode_video(x_v).cpu().numpy())
        waves.append(bases.decode_audio(x_a, seconds).float().cpu().numpy())
    return dict(frames=np.concatenate(frames), waveforms=np.concatenate(waves), fps=bases.fps, sample_rate=bases.sr,
                prompts=jobs, seeds=seeds)


def parse_args(argv=None):
    p, pos = cli.Parser(description=__doc__.split("\n")[0]), cli.number(int, 1)
    p.add_argument("--prompt", action="append", default=[], help="repeatable")
    p.add_argument("--captions", default=None, help="<clip>,\"<caption>\" lines (the official lists) or one per line")
    p.add_argument("--num-samples", type=pos, default=1, help="samples per prompt")
    p.add_argument("--batch-size", type=pos, default=4)
    p.add_argument("--seed", type=cli.number(int, 0), default=0)
    p.add_argument("--steps", type=pos, default=25)  # T = 25 (Sec. 4.1.2); the official scripts use 50
    p.add_argument("--gamma", type=cli.number(float, 0, 100, lo_open=True), nargs="+", default=[1.5],
                   help="Sec. 3.2.2: 1.5; several values generate the same seeds at each")
    p.add_argument("--guidance-video", type=cli.number(float, 0, 100), default=7.5)  # Sec. 4.1.2, AnimateDiff's
    p.add_argument("--guidance-audio", type=cli.number(float, 0, 100), default=2.5)  # Sec. 4.1.2, AudioLDM's
    p.add_argument("--negative-prompt", default="")  # paper: none; official: "bad quality, worse quality"
    p.add_argument("--seconds", type=cli.number(float, 0, 4, lo_open=True), default=4.0)  # 4-s clips (Sec. 4.1.2)
    p.add_argument("--ckpt", default=None, help="run folder written by train.py, or a released pipe/ folder")
    p.add_argument("--no-ema", action="store_true", help="use the raw trained weights instead of the EMA")
    p.add_argument("--size", default="pretrained", choices=["tiny", "full", "pretrained"], help="without --ckpt")
    p.add_argument("--video-size", type=cli.number(int, 8), default=256, help="released pipe/: 256 (Sec. 4.1.2)")
    p.add_argument("--out", default="out")
    p.add_argument("--overwrite", action="store_true", help="replace the clips of an earlier run in --out")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default=None, choices=["bf16", "fp16", "fp32"], help="bf16 on CUDA, fp32 on CPU")
    args = p.parse_args(argv)
    if args.captions:
        try:
            args.prompt += [c for _, c in read_captions(args.captions, clips=False)]
        except ValueError as e:
            cli.fail(str(e))
    if not args.prompt:
        cli.fail("give --prompt TEXT (repeatable) or --captions FILE")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        cli.fail(f"--device {args.device}: no CUDA device here (use --device cpu)")
    if args.ckpt:
        cli.existing(args.ckpt, "--ckpt", "dir")
        try:
            args.trained = {} if is_pipe(args.ckpt) else read_run_config(args.ckpt)
        except checkpoint.CheckpointError as e:
            cli.fail(str(e))
    bases = args.trained if args.ckpt else dict(cli.BASES, size=args.size)
    runs = sorted(os.path.dirname(os.path.dirname(p)) for p in glob.glob("runs/*/joint/COMPLETE"))
    args.hint = f"; a trained run is at {runs[0]}: --ckpt {runs[0]}" if runs and not args.ckpt else ""
    if bases and bases["size"] == "pretrained":
        cli.check_weights(bases["video_base"], bases["motion_adapter"], bases["audio_base"], args.hint)
    args.precision = args.precision or ("bf16" if args.device.startswith("cuda") else "fp32")
    cli.writable_dir(args.out, "--out")
    old = os.path.join(args.out, "manifest.jsonl")
    if (os.path.exists(old) or glob.glob(os.path.join(args.out, "*.mp4"))) and not args.overwrite:
        cli.fail(f"{args.out} already holds clips of an earlier run; choose another --out or pass --overwrite")
    return args


def write_index(out, rows):
    """index.html: one row per clip, its video playing with its sound, then prompt, seed, gamma and checkpoint."""
    cells = "".join(f'<tr><td><video controls preload="auto" src="{html.escape(r["file"])}"></video></td>'
                    f'<td>{html.escape(r["prompt"])}</td><td>{r["seed"]}</td><td>{r["gamma"]}</td>'
                    f'<td>{html.escape(str(r["checkpoint"]))} {html.escape(json.dumps(r["trained_steps"]))}</td></tr>\n'
                    for r in rows)
    page = ('<!doctype html><meta charset="utf-8"><title>sounding videos</title><style>td{padding:4px 8px}'
            'video{width:256px}</style><table><tr><th>clip</th><th>prompt</th><th>seed</th><th>gamma</th>'
            f'<th>checkpoint (steps)</th></tr>\n{cells}</table>\n')
    with open(os.path.join(out, ".index.tmp"), "w") as f:
        f.write(page)
    os.replace(os.path.join(out, ".index.tmp"), os.path.join(out, "index.html"))


def main(argv=None):
    args = parse_args(argv)
    print(json.dumps({k: v for k, v in vars(args).items() if k not in ("trained", "hint")}, indent=1))
    if not args.ckpt:
        print("note: no --ckpt: the added modules are untrained, i.e. an exact identity, so video and audio come from "
              "the two base models independently" + args.hint)
    try:
        frozen = torch.bfloat16 if args.precision == "bf16" and args.device.startswith("cuda") else torch.float32
        model, bases, source = load(args.ckpt, args.device, frozen, ema=not args.no_ema, size=args.size,
                                    video_size=args.video_size)
    except (RuntimeError, ValueError) as e:  # weights offline, a damaged or foreign checkpoint: one line
        cli.fail(str(e) + args.hint)
    manifest = os.path.join(args.out, "manifest.jsonl")
    if os.path.exists(manifest):  # --overwrite: the earlier run's clips go, so the folder holds one run only
        for row in map(json.loads, open(manifest)):
            for f in (row.get("file"), row.get("wav")):
                if f and os.path.lexists(os.path.join(args.out, os.path.basename(f))):
                    os.remove(os.path.join(args.out, os.path.basename(f)))
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.precision]
    rows = []
    for gamma in tqdm(args.gamma, desc="gamma", disable=len(args.gamma) == 1):
        res = generate_clips(model, bases, args.prompt, args.negative_prompt, args.steps, gamma, args.guidance_video,
                             args.guidance_audio, args.seed, args.num_samples, args.seconds, args.batch_size, amp)
        names = [f"{k:04d}_{re.sub(r'[^A-Za-z0-9]+', '-', p)[:60].strip('-')}_g{gamma:g}"
                 for k, p in enumerate(res["prompts"])]
        save_clips(args.out, res, names)
        rows += [dict(file=n + ".mp4", wav=n + ".wav", prompt=p, seed=s, gamma=gamma, steps=args.steps,
                      guidance_video=args.guidance_video, guidance_audio=args.guidance_audio,
                      negative_prompt=args.negative_prompt, seconds=args.seconds, checkpoint=source["checkpoint"],
                      kind=source["kind"], trained_steps=source.get("steps"), ema=not args.no_ema,
                      created=time.strftime("%Y-%m-%dT%H:%M:%S"))
                 for n, p, s in zip(names, res["prompts"], res["seeds"])]
        with open(manifest + ".tmp", "w") as f:  # after every gamma: what is on disk is always listed
            f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(manifest + ".tmp", manifest)
        write_index(args.out, rows)
    print(f"wrote {len(rows)} clips (.mp4 with sound + .wav), manifest.jsonl and index.html to {args.out}/")


if __name__ == "__main__":
    main()
