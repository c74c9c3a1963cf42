"""Joint generation of a video and its sound: Algorithm 1 (App. A.1) with the timestep adjustment of Eq. (8).

One global grid t = T, ..., 1 (T = 25, Sec. 4.1.2) drives both modalities; at each step the local timesteps m(t), n(t)
(Eq. 8, knob gamma) set each base model's noise level, the joint model predicts (eps_v, eps_a) with classifier-free
guidance per modality (7.5 video, 2.5 audio, Sec. 4.1.2), and each latent takes its own deterministic DDIM step
(Eq. 5) from m(t) to m(t-1) and from n(t) to n(t-1). The connectors see the previous step's x0_hat (self-conditioning).
Left out: stochastic samplers (eta > 0) and other solvers (the paper: "any sampler" works).
"""
import argparse
import json
import os
import re
import sys

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

from data import read_flist, write_mp4
from timesteps import alpha_bar_table, ddim_step, local_timesteps, to_eps


@torch.no_grad()
def generate(model, bases, prompts, seeds, T=25, gamma=1.5, guidance_v=7.5, guidance_a=2.5, negative="", bar=True,
             amp=None, seconds=4):
    """Algorithm 1 for a batch of prompts; sample i starts from noise seeded by seeds[i] (batch-size independent)."""
    dev, B, P = bases.alphas_cumprod_v.device, len(prompts), bases.prediction_type
    text_v, text_a = bases.encode_text(list(prompts))
    null_v, null_a = bases.encode_text([negative] * B)
    F_, h = seconds * bases.fps, bases.video_size // 8  # 4-s clips (Sec. 4.1.2); both video autoencoders shrink 8x
    noise = [torch.Generator().manual_seed(s) for s in seeds]
    x_v = torch.stack([torch.randn(4, F_, h, h, generator=g) for g in noise]).to(dev)  # x_{m(T)}, (B, 4, F, h, w)
    x_a = torch.stack([torch.randn(8, 100, 16, generator=g) for g in noise]).to(dev)  # x_{n(T)}, (B, 8, T, 16)
    ab_v, ab_a = alpha_bar_table(bases.alphas_cumprod_v), alpha_bar_table(bases.alphas_cumprod_a)
    T_v, T_a = len(ab_v) - 1, len(ab_a) - 1  # the base models' maximum timestep (1000)
    x0_v = x0_a = None  # self-conditioning input: zeros at the first step
    two = lambda x: None if x is None else torch.cat([x, x])  # [uncond; cond] in one batch
    for t in tqdm(range(T, 0, -1), desc="Alg. 1", disable=not bar):  # Alg. 1
        m, n = local_timesteps(t, T, T_v, T_a, gamma)  # Eq. (8)
        m_prev, n_prev = local_timesteps(t - 1, T, T_v, T_a, gamma)  # Eq. (8)
        tv, ta = torch.full((2 * B,), m - 1, device=dev), torch.full((2 * B,), n - 1, device=dev)  # diffusers index
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            e_v, e_a = model(two(x_v), two(x_a), tv, ta, torch.cat([null_v, text_v]), torch.cat([null_a, text_a]),
                             two(x0_v), two(x0_a))
        (u_v, c_v), (u_a, c_a) = e_v.float().chunk(2), e_a.float().chunk(2)
        eps_v = to_eps(u_v + guidance_v * (c_v - u_v), x_v, ab_v[m], P["v"])  # classifier-free guidance
        eps_a = to_eps(u_a + guidance_a * (c_a - u_a), x_a, ab_a[n], P["a"])  # (on v for the tiny U-Nets: linear)
        x_v, x0_v = ddim_step(x_v, eps_v, ab_v[m], ab_v[m_prev])  # Eq. (5): x_{m(t-1)}
        x_a, x0_a = ddim_step(x_a, eps_a, ab_a[n], ab_a[n_prev])  # Eq. (5): x_{n(t-1)}
    return x_v, x_a  # x_0^(v), x_0^(a)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompt", action="append", default=[], help="repeatable")
    p.add_argument("--captions", default=None, help="file list <clip>,\"<caption>\" (the official format) or one per line")
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=25)  # T = 25 (Sec. 4.1.2); the official scripts use 50
    p.add_argument("--gamma", type=float, default=1.5)  # Sec. 3.2.2: "we set gamma to 1.5"
    p.add_argument("--guidance-video", type=float, default=7.5)  # Sec. 4.1.2, AnimateDiff's default
    p.add_argument("--guidance-audio", type=float, default=2.5)  # Sec. 4.1.2, AudioLDM's default
    p.add_argument("--negative-prompt", default="")  # paper: none; official: "bad quality, worse quality"
    p.add_argument("--ckpt", default=None, help="run folder written by train.py")
    p.add_argument("--no-ema", action="store_true", help="use the raw trained weights instead of the EMA")
    p.add_argument("--size", default=None, choices=["tiny", "full", "pretrained"], help="default: the checkpoint's")
    p.add_argument("--conditioner", default=None, choices=["cmcpe", "crossattn"], help="default: the checkpoint's")
    p.add_argument("--fps", type=int, default=None, help="default: the checkpoint's, else 8")
    p.add_argument("--out", default="out")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default=None, choices=["bf16", "fp16", "fp32"], help="bf16 on CUDA, fp32 on CPU")
    args = p.parse_args(argv)
    if args.gamma <= 0:
        p.exit(2, f"error: --gamma must be > 0 (got {args.gamma})\n")
    if args.steps < 1 or args.num_samples < 1 or args.batch_size < 1:
        p.exit(2, "error: --steps, --num-samples and --batch-size must be >= 1\n")
    if args.captions:
        if not os.path.isfile(args.captions):
            p.exit(2, f"error: no captions file {args.captions}\n")
        args.prompt += [c or s for s, c in read_flist(args.captions)]  # `<clip>,"<caption>"` lines (or bare captions)
    if not args.prompt:
        p.exit(2, "error: give --prompt TEXT (repeatable) or --captions FILE\n")
    trained = {}
    if args.ckpt:
        cfg = os.path.join(args.ckpt, "joint", "config.json")
        if not os.path.isfile(cfg):
            p.exit(2, f"error: no checkpoint at {args.ckpt} (expected {cfg}, written by train.py)\n")
        trained = json.load(open(cfg))
    for k, default in (("size", "pretrained"), ("conditioner", "cmcpe"), ("fps", 8)):
        if getattr(args, k) is None:
            setattr(args, k, trained.get(k, default))
    args.precision = args.precision or ("bf16" if args.device.startswith("cuda") else "fp32")
    return args


def main(argv=None):
    args = parse_args(argv)
    print(json.dumps(vars(args), indent=1))
    from model import build_model  # after argument checks: bad input fails fast, before torch loads models
    from train import load_weights
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.precision]
    try:
        model, bases = build_model(args.size, args.conditioner, device=args.device, fps=args.fps)
    except RuntimeError as e:  # e.g. weights not available offline
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if args.ckpt:
        if os.path.isfile(os.path.join(args.ckpt, "base", "ema.safetensors")):
            load_weights(model, os.path.join(args.ckpt, "base"), ema=not args.no_ema)  # tiny: the trained base models
        load_weights(model, os.path.join(args.ckpt, "joint"), ema=not args.no_ema)
    else:
        print("note: no --ckpt: the added modules are untrained, i.e. an exact identity, so video and audio are "
              "generated by the two base models independently (no cross-modal alignment)")
    model.eval()
    os.makedirs(args.out, exist_ok=True)
    jobs = [(p, i) for p in args.prompt for i in range(args.num_samples)]
    for b in tqdm(range(0, len(jobs), args.batch_size), desc="batches"):
        chunk = jobs[b: b + args.batch_size]
        seeds = [args.seed * 1000003 + b + j for j in range(len(chunk))]  # one seed per sample, not per batch
        x_v, x_a = generate(model, bases, [p for p, _ in chunk], seeds, args.steps, args.gamma,
                            args.guidance_video, args.guidance_audio, args.negative_prompt, bar=len(jobs) == 1, amp=amp)
        frames, wave = bases.decode_video(x_v), bases.decode_audio(x_a).float().cpu().numpy()
        for j, (prompt, i) in enumerate(chunk):
            name = f"{b + j:04d}_{re.sub(r'[^A-Za-z0-9]+', '-', prompt)[:60].strip('-')}_{i}"
            sf.write(os.path.join(args.out, name + ".wav"), wave[j], bases.sr)
            write_mp4(os.path.join(args.out, name + ".mp4"), np.asarray(frames[j].cpu()), args.fps, wave[j], bases.sr)
    print(f"wrote {len(jobs)} clips (.mp4 with sound + .wav) to {args.out}/")


if __name__ == "__main__":
    main()
