"""Joint generation of a video and its sound: Algorithm 1 (App. A.1) with the timestep adjustment of Eq. (8).

One global grid t = T, ..., 1 (T = 25, Sec. 4.1.2) drives both modalities; at each step the local timesteps m(t), n(t)
(Eq. 8, knob gamma) set each base model's noise level, the joint model predicts (eps_v, eps_a) with classifier-free
guidance per modality (7.5 video, 2.5 audio, Sec. 4.1.2), and each latent takes its own deterministic DDIM step
(Eq. 5) from m(t) to m(t-1) and from n(t) to n(t-1). The connectors see the previous step's x0_hat (self-conditioning).
The CLI writes <name>.mp4 (H.264 + AAC), .wav and .jpg (poster) per clip, manifest.jsonl and index.html.
Left out: stochastic samplers (eta > 0) and other solvers (the paper: "any sampler" works). --grid official runs the
released code's sampler instead (support/official_grid.py: its own grid per modality, 50 steps, final alpha_bar < 1).
"""
import json
import math
import os
import time

import numpy as np
import torch
from tqdm import tqdm

from support import cli, official_grid, outputs, sample_cli
from support.loading import load
from support.files import DiskFull
from support.media import save_clips
from support.seeds import MAX_SEED, clip_seeds
from timesteps import alpha_bar_table, ddim_step, local_timesteps, to_eps


def paper_schedule(bases, T, gamma):
    """Alg. 1's grid: for t = T, ..., 1 the step from (m(t), n(t)) to (m(t-1), n(t-1)). -> [(m - 1, n - 1,
    alpha_bar_m(t), alpha_bar_m(t-1), alpha_bar_n(t), alpha_bar_n(t-1))]: the U-Nets' diffusers indices (timesteps.py)
    and the noise levels each DDIM step moves between; the last step reaches m(0) = n(0) = 0, alpha_bar = 1."""
    ab_v = alpha_bar_table(bases.alphas_cumprod_v)
    ab_a = alpha_bar_table(bases.alphas_cumprod_a)
    T_v, T_a = len(ab_v) - 1, len(ab_a) - 1  # the base models' 1000 timesteps
    steps = []
    for t in range(T, 0, -1):  # Alg. 1
        m, n = local_timesteps(t, T, T_v, T_a, gamma)  # Eq. (8)
        m_prev, n_prev = local_timesteps(t - 1, T, T_v, T_a, gamma)  # Eq. (8)
        steps.append((m - 1, n - 1, ab_v[m], ab_v[m_prev], ab_a[n], ab_a[n_prev]))
    return steps


def initial_noise(model, bases, seeds, seconds):
    """x_{m(T)}, x_{n(T)}: each clip's noise from its own seed, so a clip does not depend on its batch."""
    F, h = round(seconds * bases.fps), bases.latent_size  # frames of a 4-s clip (Sec. 4.1.2); latent H = W
    multiple = model.audio_rows_multiple  # released model: padded to a multiple of 8 rows as in its training
    rows = math.ceil(bases.audio_rows(seconds) / multiple) * multiple  # 100 latent rows (4 mel frames each) for 4 s
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    x_v = torch.stack([torch.randn(4, F, h, h, generator=g) for g in gens])  # (B, 4, F, h, w)
    x_a = torch.stack([torch.randn(8, rows, 16, generator=g) for g in gens])  # (B, 8, rows, 16)
    return x_v.to(bases.device), x_a.to(bases.device)


@torch.no_grad()
def generate(model, bases, prompts, seeds, T=None, gamma=1.5, guidance_v=7.5, guidance_a=2.5, negative="", bar=True,
             amp=None, seconds=4, grid="paper", latents=None, trace=None):
    """Algorithm 1 for a batch of prompts, from noise seeded by seeds[i] or latents=(x_v, x_a) as given. grid "paper":
    as printed (T = 25); "official": the released sampler (support/official_grid.py, T = 50). bar: True, False or a
    tqdm to advance; trace(i, tensors): after each step. -> (x_v (B, 4, F, h, w), x_a (B, 8, rows, 16)): x_0."""
    if grid not in ("paper", "official"):
        raise ValueError(f"grid must be 'paper' or 'official', not {grid!r}")
    B, pred = len(prompts), bases.prediction_type
    if grid == "paper":
        steps = paper_schedule(bases, T or 25, gamma)  # T = 25 (Sec. 4.1.2)
        text_v, text_a = bases.encode_text(list(prompts))
        null_v, null_a = bases.encode_text([negative] * B)
    else:
        steps = official_grid.schedule(bases, T or 50, gamma)  # the official scripts' 50 steps
        text_v, text_a, null_v, null_a = official_grid.encode_prompts(bases, prompts, negative)
        guidance_v, guidance_a = official_grid.guidance(guidance_v, guidance_a)
    x_v, x_a = latents if latents is not None else initial_noise(model, bases, seeds, seconds)
    x0_v = x0_a = None  # self-conditioning input: zeros at the first step
    two = lambda x: torch.cat([x, x])  # [uncond; cond] in one batch
    text_v = torch.cat([null_v, text_v])  # (2B, 77, D)
    text_a = torch.cat([null_a, text_a])  # (2B, D_clap)
    own_bar = bar is None or isinstance(bar, bool)
    progress = tqdm(total=len(steps) * B, desc="Alg. 1", disable=not bar) if own_bar else bar
    for i, (m, n, a_m, a_m_prev, a_n, a_n_prev) in enumerate(steps):  # Alg. 1: t = T, ..., 1
        t_v = torch.full((B,), m, device=x_v.device)  # the U-Nets' diffusers indices of m(t), n(t)
        t_a = torch.full((B,), n, device=x_a.device)
        with torch.autocast(x_v.device.type, dtype=amp, enabled=amp is not None):
            ctx = model.contexts(x_v, x_a, t_v, t_a, x0_v, x0_a)  # no text in the connectors: once for both halves
            e_v, e_a = model(two(x_v), two(x_a), two(t_v), two(t_a), text_v, text_a, context=tuple(map(two, ctx)))
        u_v, c_v = e_v.to(x_v.dtype).chunk(2)  # fp32 again after autocast
        u_a, c_a = e_a.to(x_a.dtype).chunk(2)
        eps_v = to_eps(u_v + guidance_v * (c_v - u_v), x_v, a_m, pred["v"])  # classifier-free guidance
        eps_a = to_eps(u_a + guidance_a * (c_a - u_a), x_a, a_n, pred["a"])  # (on v for the tiny U-Nets: linear)
        x_v, x0_v = ddim_step(x_v, eps_v, a_m, a_m_prev)  # Eq. (5): x_{m(t-1)}; x0_hat of Eq. (6)
        x_a, x0_a = ddim_step(x_a, eps_a, a_n, a_n_prev)  # Eq. (5): x_{n(t-1)}
        if trace:
            trace(i, dict(t_v=t_v, t_a=t_a, out_v=e_v, out_a=e_a, eps_v=eps_v, eps_a=eps_a, x0_v=x0_v, x0_a=x0_a,
                          x_v=x_v, x_a=x_a))
        progress.update(B)
    if own_bar:
        progress.close()
    return x_v, x_a  # x_0^(v), x_0^(a) (official grid: at alphas_cumprod[0])


def generate_clips(model, bases, prompt, negative="", T=None, gamma=1.5, guidance_v=7.5, guidance_a=2.5,
                   generator=None, num_per_prompt=1, seconds=4, batch_size=4, amp=None, progress=True, grid="paper",
                   latents=None, decode=True):
    """Algorithm 1 over many prompts in batches. prompt, negative: a string or a list (one per prompt). generator:
    support/seeds.clip_seeds (clip k's noise from seeds[k] alone), or latents=(x_v, x_a) for all clips. progress: a
    bar over all clips x steps, or a tqdm to advance. -> dict(frames uint8 (B, F, H, W, 3), audios float32 (B, N)
    (decode=False: the latents x_v, x_a), fps, sample_rate, prompts, seeds), num_per_prompt clips per prompt."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    negatives = [negative or ""] * len(prompts) if negative is None or isinstance(negative, str) else list(negative)
    if len(negatives) != len(prompts):
        raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts: give one per prompt")
    jobs = [(p, q) for p, q in zip(prompts, negatives) for _ in range(num_per_prompt)]
    seeds = clip_seeds(generator, len(jobs))  # one seed per clip (Alg. 1's initial noise)
    bar = progress if isinstance(progress, tqdm) else tqdm(
        total=len(jobs) * (T or (50 if grid == "official" else 25)), desc=f"{len(jobs)} clips x steps", unit="step",
        disable=not progress)
    start, frames, audios = time.time(), [], []
    cuts = [k for k in range(len(jobs)) if k % batch_size == 0 or jobs[k][1] != jobs[k - 1][1]] + [len(jobs)]
    for a, b in zip(cuts, cuts[1:]):  # batches of one negative prompt
        noise = None if latents is None else (latents[0][a:b], latents[1][a:b])
        x_v, x_a = generate(model, bases, [p for p, _ in jobs[a:b]], seeds[a:b], T, gamma, guidance_v, guidance_a,
                            jobs[a][1], bar, amp, seconds, grid, noise)
        frames.append(bases.decode_video(x_v).cpu().numpy() if decode else x_v)
        audios.append(bases.decode_audio(x_a, seconds).float().cpu().numpy() if decode else x_a)
    if bar is not progress:
        bar.set_postfix_str(f"{(time.time() - start) / max(len(jobs), 1):.2f} s/clip")
        bar.close()
    join = np.concatenate if decode else torch.cat
    return dict(frames=join(frames), audios=join(audios), fps=bases.fps, sample_rate=bases.sr,
                prompts=[p for p, _ in jobs], seeds=seeds)


def parse_args(argv=None):
    p, pos = cli.Parser(description=__doc__.split("\n")[0]), cli.number(int, 1)
    p.add_argument("--prompt", action="append", default=[], help="repeatable")
    p.add_argument("--captions", default=None, help="<clip>,\"<caption>\" lines (the official lists; clips are then "
                   "named by the reference clip's stem) or one caption per line")
    p.add_argument("--num-per-prompt", type=pos, default=1, help="clips per prompt, each from its own seed")
    p.add_argument("--batch-size", type=pos, default=4)
    p.add_argument("--seed", type=cli.number(int, 0, MAX_SEED), default=0, help="clip k of a run uses seed + k")
    p.add_argument("--steps", type=pos, default=None, help="sampling steps T; default 25 (Sec. 4.1.2), official 50")
    p.add_argument("--grid", default="paper", choices=["paper", "official"],  # official: the released sampler
                   help="paper: Alg. 1 as printed; official: the released pipeline's (gamma 1: its grids unadjusted)")
    p.add_argument("--gamma", action=cli.Listing, item=cli.number(float, 0, 100, lo_open=True), default=[1.5],
                   help="Sec. 3.2.2; several (spaces or commas: 1,1.5 2) sample the same seeds at each")
    p.add_argument("--guidance-video", type=cli.number(float, 0, 100), default=7.5)  # Sec. 4.1.2, AnimateDiff's
    p.add_argument("--guidance-audio", type=cli.number(float, 0, 100), default=2.5)  # Sec. 4.1.2, AudioLDM's
    p.add_argument("--negative-prompt", default=None, help="default: none (paper); --grid official: the official's")
    p.add_argument("--seconds", type=cli.number(float, 0, 4, lo_open=True), default=4.0)  # 4-s clips (Sec. 4.1.2)
    p.add_argument("--ckpt", default=None, help="run folder written by train.py, or a released pipe/ folder")
    p.add_argument("--no-ema", action="store_true", help="use the raw trained weights instead of the EMA")
    p.add_argument("--size", default="pretrained", choices=["tiny", "full", "pretrained"], help="without --ckpt")
    p.add_argument("--video-size", type=cli.number(int, 8), default=256, help="released pipe/: 256 (Sec. 4.1.2)")
    p.add_argument("--out", default="out", help="folder for the clips, manifest.jsonl and index.html")
    p.add_argument("--overwrite", action="store_true", help="replace the clips of an earlier run in --out")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default=None, choices=["bf16", "fp16", "fp32"], help="bf16 on CUDA, fp32 on CPU")
    return sample_cli.check(p.parse_args(argv))  # one line and exit 2 before any model, if wrong


def main(argv=None):
    args = parse_args(argv)
    print(json.dumps({k: v for k, v in vars(args).items() if k not in ("trained", "hint", "lock", "stale")}, indent=1))
    if not args.ckpt:
        print("note: no --ckpt: the added modules are untrained, i.e. an exact identity, so video and audio come from "
              "the two base models independently" + args.hint)
    try:
        frozen = torch.bfloat16 if args.precision == "bf16" and args.device.startswith("cuda") else torch.float32
        model, bases, source = load(args.ckpt, args.device, frozen, ema=not args.no_ema, size=args.size,
                                    video_size=args.video_size)
    except (RuntimeError, ValueError) as e:  # weights offline, a damaged or foreign checkpoint: one line
        cli.fail(str(e) + args.hint)
    for f in args.stale:  # --overwrite: the earlier run's files go, so that the folder holds one run only
        os.remove(f)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.precision]
    stems = [s for s in args.stems for _ in range(args.num_per_prompt)]
    num_clips, rows, start = len(args.gamma) * len(stems), [], time.time()
    bar = tqdm(total=num_clips * args.steps, desc=f"{num_clips} clips x steps", unit="step")  # all clips x steps
    for gamma, tag in zip(args.gamma, outputs.gamma_tags(args.gamma)):
        res = generate_clips(model, bases, args.prompt, args.negative_prompt, args.steps, gamma, args.guidance_video,
                             args.guidance_audio, args.seed, args.num_per_prompt, args.seconds, args.batch_size, amp,
                             bar, args.grid)
        names = outputs.clip_names(res["prompts"], stems, res["seeds"], tag, len(args.gamma) > 1,
                                   args.num_per_prompt > 1)
        try:
            save_clips(args.out, res, names)
            outputs.write_posters(args.out, names, res["frames"])
            rows += outputs.rows(names, res, stems, gamma, args, source)
            outputs.write_manifest(args.out, rows)  # after every gamma: what is on disk is always listed
            outputs.write_index(args.out, rows)
        except DiskFull as e:  # one line; the clips of earlier gammas stay listed
            cli.fail(str(e))
    bar.set_postfix_str(f"{(time.time() - start) / num_clips:.2f} s/clip")
    bar.close()
    print(f"wrote {len(rows)} clips (.mp4 with sound, .wav, .jpg), manifest.jsonl and index.html to {args.out}/")


if __name__ == "__main__":
    main()
