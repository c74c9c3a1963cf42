"""Joint generation of a video and its sound: Algorithm 1 (App. A.1) with the timestep adjustment of Eq. (8).

One global grid t = T, ..., 1 (T = 25, Sec. 4.1.2) drives both modalities: the local timesteps m(t), n(t) (Eq. 8, knob
gamma) set each base model's noise level, the joint model predicts (eps_v, eps_a) with classifier-free guidance per
modality (7.5 video, 2.5 audio, Sec. 4.1.2) and each latent takes its own DDIM step (Eq. 5), from m(t) to m(t-1) and
from n(t) to n(t-1); the connectors see the previous x0_hat. Sec. 3.4 trains on "all combinations of the local
timesteps", so a given video or sound can be held at t = 1 while the other walks the grid (not used in the paper).
Left out: stochastic samplers (eta > 0), other solvers; --grid official: the released sampler (official_grid.py).
"""
import json
import math
import os
import time

import librosa
import numpy as np
import torch
from diffusers.video_processor import VideoProcessor
from torch.nn.functional import pad
from tqdm import tqdm

from data import log_mel, normalize_wav
from support import cli, official_grid, outputs
from support.loading import load
from timesteps import add_noise, alpha_bar_table, ddim_step, local_timesteps, to_eps


def paper_schedule(bases, T, gamma):
    """Alg. 1's grid, t = T..1: [(m - 1, n - 1, alpha_bar_m(t), alpha_bar_m(t-1), alpha_bar_n(t), alpha_bar_n(t-1))]"""
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
             amp=None, seconds=4, grid="paper", latents=None, trace=None, video=None, audio=None):
    """Algorithm 1 from noise seeded by seeds[i] (or latents=(x_v, x_a)); bar: True, False or a tqdm; trace(i, tensors)
    after each step. video=x0_v (B, 4, F, h, w) or audio=x0_a (B, 8, rows, 16): held at t = 1. -> (x_v, x_a)"""
    if grid not in ("paper", "official") or video is not None and audio is not None:
        raise ValueError(f"grid must be 'paper' or 'official' (not {grid!r}), and only one of video=, audio= given")
    B, pred = len(prompts), bases.prediction_type
    held = "v" if video is not None else "a" if audio is not None else None  # a given modality, held at t = 1
    steps = paper_schedule(bases, T or 25, gamma) if grid == "paper" else official_grid.schedule(bases, T or 50, gamma)
    if grid == "official":  # its scripts' 50 steps (T = 25: Sec. 4.1.2); it guides only if a scale exceeds 1
        guidance_v, guidance_a = official_grid.guidance(guidance_v, guidance_a)
    text_v, text_a = bases.encode_text(list(prompts))
    null_v, null_a = bases.encode_text([negative or ""] * B, official_negative=grid == "official")
    x_v, x_a = latents if latents is not None else initial_noise(model, bases, seeds, seconds)
    x0_v = None if video is None else video.expand_as(x_v)  # self-conditioning: zeros at the first step; held: x_0
    x0_a = None if audio is None else pad(audio, (0, 0, 0, x_a.shape[2] - audio.shape[2])).expand_as(x_a)  # noise rows
    if held == "v":  # Sec. 3.4, "all combinations of the local timesteps": t = 1 (index 0), the clip's own noise
        x_v = add_noise(x0_v, x_v, bases.alphas_cumprod_v[0])  # Eq. (2)
    if held == "a":
        x_a = add_noise(x0_a, x_a, bases.alphas_cumprod_a[0])  # Eq. (2)
    two = lambda x: torch.cat([x, x])  # noqa: E731 ([uncond; cond] in one batch)
    text_v, text_a = torch.cat([null_v, text_v]), torch.cat([null_a, text_a])  # (2B, 77, D), (2B, D_clap)
    progress = bar if isinstance(bar, tqdm) else tqdm(total=len(steps) * B, desc="Alg. 1", disable=not bar)
    for i, (m, n, a_m, a_m_prev, a_n, a_n_prev) in enumerate(steps):  # Alg. 1: t = T, ..., 1
        t_v = torch.full((B,), 0 if held == "v" else m, device=x_v.device)  # the U-Nets' indices of m(t), n(t)
        t_a = torch.full((B,), 0 if held == "a" else n, device=x_a.device)  # (held: 0, i.e. t = 1)
        with torch.autocast(x_v.device.type, dtype=amp, enabled=amp is not None):
            ctx = model.contexts(x_v, x_a, t_v, t_a, x0_v, x0_a, held)  # no text in them: once for both CFG halves
            ctx = tuple(None if c is None else two(c) for c in ctx)
            e_v, e_a = model(two(x_v), two(x_a), two(t_v), two(t_a), text_v, text_a, context=ctx, held=held)
        eps_v = eps_a = None  # a held modality takes no step
        if held != "v":
            u_v, c_v = e_v.to(x_v.dtype).chunk(2)  # fp32 again after autocast
            eps_v = to_eps(u_v + guidance_v * (c_v - u_v), x_v, a_m, pred["v"])  # classifier-free guidance
            x_v, x0_v = ddim_step(x_v, eps_v, a_m, a_m_prev)  # Eq. (5): x_{m(t-1)}; x0_hat of Eq. (6)
        if held != "a":
            u_a, c_a = e_a.to(x_a.dtype).chunk(2)
            eps_a = to_eps(u_a + guidance_a * (c_a - u_a), x_a, a_n, pred["a"])  # (on v for the tiny U-Nets: linear)
            x_a, x0_a = ddim_step(x_a, eps_a, a_n, a_n_prev)  # Eq. (5): x_{n(t-1)}
        if trace:
            trace(i, dict(t_v=t_v, t_a=t_a, out_v=e_v, out_a=e_a, eps_v=eps_v, eps_a=eps_a, x0_v=x0_v, x0_a=x0_a,
                          x_v=x_v, x_a=x_a))
        progress.update(B)
    if progress is not bar:
        progress.close()
    return x_v, x_a  # x_0^(v), x_0^(a); a held modality: x_t at t = 1


def generate_clips(model, bases, prompt, negative="", T=None, gamma=1.5, guidance_v=7.5, guidance_a=2.5, generator=0,
                   num_per_prompt=1, seconds=4, batch_size=4, amp=None, progress=True, grid="paper", latents=None,
                   decode=True, video=None, audio=None):
    """Algorithm 1 in batches over prompts (a string or a list, as negative), clip k from seed generator + k (or the
    list's k-th); progress: True, False or a tqdm; video: frames ((F, H, W, 3) uint8 / float in [0, 1], or PIL) or
    audio: (waveform, rate) for every clip. -> dict(frames (B, F, H, W, 3) uint8, audios (B, N), fps, sample_rate,
    prompts, seeds); decode=False: x_v, x_a."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    negatives = [negative] * len(prompts) if negative is None or isinstance(negative, str) else list(negative)
    if len(negatives) != len(prompts):
        raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts: give one per prompt")
    jobs, n = [(p, q) for p, q in zip(prompts, negatives) for _ in range(num_per_prompt)], len(prompts) * num_per_prompt
    seeds = list(generator) if isinstance(generator, (list, tuple)) else [(generator + k) % 2 ** 63 for k in range(n)]
    F, N, size = round(seconds * bases.fps), round(seconds * bases.sr), bases.video_size  # the model's clip
    if video is not None:  # cut (or the last frame repeated), short side scaled and centre-cropped, as data.py's clips
        x = np.asarray(list(video)[:F] + [video[-1]] * (F - len(video)))  # (F, H, W, 3), uint8 or float in [0, 1]
        pils = VideoProcessor.numpy_to_pil(x / 255 if x.dtype == np.uint8 else x)
        pixels = VideoProcessor().preprocess_video(pils, size, size, resize_mode="crop")  # (1, 3, F, H, W) in [-1, 1]
        given_frames = ((pixels[0].permute(1, 2, 3, 0) + 1) * 127.5).round().byte().numpy()  # (F, H, W, 3) uint8
        video = bases.encode_video(pixels.to(bases.device))[0]  # x0_v: the VAE's mean, (1, 4, F, h, w)
    if audio is not None:  # at 16 kHz, cut or padded with silence
        wave = librosa.resample(np.asarray(audio[0], np.float32), orig_sr=audio[1], target_sr=bases.sr)
        wave = np.pad(wave, (0, max(0, N - len(wave))))[:N]
        mel = log_mel(normalize_wav(np.pad(wave, (0, -N % 640))))  # (N / 160, 64): whole latent rows of 4 mel frames
        audio = bases.encode_audio(mel[None, None].to(bases.device))[0]  # x0_a: the VAE's mean, (1, 8, rows, 16)
    T = T or (50 if grid == "official" else 25)  # Sec. 4.1.2; the official scripts'
    bar = progress if isinstance(progress, tqdm) else tqdm(total=n * T, desc=f"{n} clips x steps", disable=not progress)
    frames, audios = [], []
    cuts = [k for k in range(n) if k % batch_size == 0 or jobs[k][1] != jobs[k - 1][1]] + [n]
    for a, b in zip(cuts, cuts[1:]):  # batches of one negative prompt
        noise = None if latents is None else (latents[0][a:b], latents[1][a:b])
        x_v, x_a = generate(model, bases, [p for p, _ in jobs[a:b]], seeds[a:b], T, gamma, guidance_v, guidance_a,
                            jobs[a][1], bar, amp, seconds, grid, noise, None, video, audio)
        if decode:  # a given modality is returned as it was given, not through the VAE
            x_v = np.stack([given_frames] * (b - a)) if video is not None else bases.decode_video(x_v).cpu().numpy()
            x_a = np.stack([wave] * (b - a)) if audio is not None else bases.decode_audio(x_a, seconds).cpu().numpy()
        frames.append(x_v)
        audios.append(x_a)
    if bar is not progress:
        bar.close()
    join = np.concatenate if decode else torch.cat
    return dict(frames=join(frames), audios=join(audios), fps=bases.fps, sample_rate=bases.sr,
                prompts=[p for p, _ in jobs], seeds=seeds)


def parse_args(argv=None):
    p, pos = cli.Parser(description=__doc__.split("\n")[0]), cli.number(int, 1)
    p.add_argument("--prompt", action="append", default=[], help="repeatable")
    p.add_argument("--captions", help="<clip>,\"<caption>\" lines (clips named by the stem) or a caption a line")
    given = p.add_mutually_exclusive_group()  # Sec. 3.4's conditional case: one modality given, held at t = 1
    given.add_argument("--video", help="a video file: generate its sound (frames cut or padded, resampled, resized)")
    given.add_argument("--audio", help="a sound file or a video's track: generate a video for it")
    p.add_argument("--num-per-prompt", type=pos, default=1, help="clips per prompt, each from its own seed")
    p.add_argument("--batch-size", type=pos, default=4)
    p.add_argument("--seed", type=cli.number(int, 0, 2 ** 63 - 1), default=0, help="clip k of a run uses seed + k")
    p.add_argument("--steps", type=pos, help="sampling steps T; default 25 (Sec. 4.1.2), official 50")
    p.add_argument("--grid", default="paper", choices=["paper", "official"], help="official: the released sampler")
    p.add_argument("--gamma", nargs="+", type=cli.number(float, 0, 100, open_lo=True), default=[1.5])  # Sec. 3.2.2
    p.add_argument("--guidance-video", type=cli.number(float, 0, 100), default=7.5)  # Sec. 4.1.2, AnimateDiff's
    p.add_argument("--guidance-audio", type=cli.number(float, 0, 100), default=2.5)  # Sec. 4.1.2, AudioLDM's
    p.add_argument("--negative-prompt", help="default: none (paper); --grid official: the official's")
    p.add_argument("--seconds", type=cli.number(float, 0.5, 4), default=4.0)  # 4-s clips (Sec. 4.1.2)
    p.add_argument("--ckpt", help="run folder written by train.py, or a released pipe/ folder")
    p.add_argument("--no-ema", action="store_true", help="use the raw trained weights instead of the EMA")
    p.add_argument("--size", default="pretrained", choices=["tiny", "full", "pretrained"], help="without --ckpt")
    p.add_argument("--video-size", type=cli.number(int, 8, 1024), default=256, help="released pipe/: 256 (Sec. 4.1.2)")
    p.add_argument("--out", default="out", help="folder for the clips, manifest.jsonl and index.html")
    p.add_argument("--overwrite", action="store_true", help="replace the clips of an earlier run in --out")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   choices=["cpu", "cuda"][:1 + torch.cuda.is_available()])  # cuda only where there is one
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], help="default: bf16 on CUDA, fp32 on CPU")
    return outputs.check(p.parse_args(argv))  # one line and exit 2 before any model, if wrong


def main(argv=None):
    args = parse_args(argv)
    print(json.dumps({k: v for k, v in vars(args).items() if k not in ("stale", "given")}, indent=1))
    amp = dict(bf16=torch.bfloat16, fp16=torch.float16).get(args.precision or ("bf16" if args.device == "cuda" else ""))
    try:  # bf16 on CUDA: the frozen weights stored in it too (model.cast_frozen)
        frozen = torch.bfloat16 if amp == torch.bfloat16 and args.device == "cuda" else torch.float32
        model, bases, source = load(args.ckpt, args.device, frozen, not args.no_ema, args.size, args.video_size)
    except (OSError, ValueError) as e:  # weights offline, a damaged or foreign checkpoint: one line
        cli.fail(str(e).splitlines()[0])
    for f in args.stale:  # --overwrite: the earlier run's listed files go, so that the folder holds one run only
        os.remove(f)
    num_clips, rows, start = len(args.gamma) * len(args.prompt) * args.num_per_prompt, [], time.time()
    bar = tqdm(total=num_clips * args.steps, desc=f"{num_clips} clips x steps", unit="step")  # all clips x steps
    for gamma in args.gamma:
        res = generate_clips(model, bases, args.prompt, args.negative_prompt, args.steps, gamma, args.guidance_video,
                             args.guidance_audio, args.seed, args.num_per_prompt, args.seconds, args.batch_size, amp,
                             bar, args.grid, **{k: args.given for k in ("video", "audio") if getattr(args, k)})
        rows = outputs.save(args, res, gamma, rows, source)  # after every gamma: what is on disk is always listed
    bar.set_postfix_str(f"{(time.time() - start) / num_clips:.2f} s/clip")
    bar.close()
    print(f"wrote {len(rows)} clips (.mp4 with sound, .wav, .jpg), manifest.jsonl and index.html to {args.out}/")


if __name__ == "__main__":
    main()
