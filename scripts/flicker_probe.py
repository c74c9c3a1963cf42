"""Why do the tiny video models flicker, and how much flicker can AV-Align's flow peaks take?

  python scripts/flicker_probe.py train --tag base                        # tiny video U-Net alone, 600 steps, ~16 min
  python scripts/flicker_probe.py train --tag x0 --pred sample --std 0    # a variant (options below)
  python scripts/flicker_probe.py denoise --bases weights/tiny_bases.safetensors   # one-shot x0 from noised real clips
  python scripts/flicker_probe.py tolerance --gen runs/flicker/base_x_v.pt          # peaks vs scaled generated jitter
  python scripts/flicker_probe.py score --gen runs/flicker/base_x_v.pt              # flicker() of saved latents

train: the tiny video U-Net of support/tiny.tiny_parts (or a variant: --std of the codec's latent distribution, motion-module
heads / transformer layers, the output parameterisation) trained alone on the synthetic train clips by Eq. (7) (Adam,
cosine lr, EMA 0.995, batch 8, caption dropout 0.1: stage "base" of train.py, without the audio U-Net), then sampled
for the first 16 held-out test captions (DDIM T = 25, guidance 7.5, noise seeds 10**4 + i as check_synthetic.py).
Prints flow peaks per clip (AV-Align's video events; real clips: 3.9), the median frame-to-frame change of the
generated latents and the median over clips of a clip's median mean flow (real clips: 0 and 0; only the stick moves). denoise: real test latents noised to level t, the U-Net's
x0 estimate in one call: how much per-frame noise it leaves in cells that are static in the real clip. tolerance:
real test latents plus k x the temporal deviations of generated latents (from their per-cell median over frames):
flow peaks as the jitter shrinks. score: the train probe's numbers for its saved latents. Not in the paper; one thread per run, so two probes can share the 2 cores.
"""
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the top-level modules, as a reader runs them
import av_align  # noqa: E402
from base_models import load_base_models  # noqa: E402
from support.tiny import PoolVideoAE, tiny_parts  # noqa: E402
from support import cli  # noqa: E402
from model import video_forward  # noqa: E402
from support.synthetic import TEST_SEED, synthetic_clip  # noqa: E402
from timesteps import add_noise, alpha_bar_table, ddim_step, local_timesteps, predict_x0, target, to_eps  # noqa: E402

FPS, SR = 8, 16000


def video_unet(heads=2, layers=1):
    """support/tiny.tiny_parts's video U-Net, seeded as load_base_models seeds it, with motion-module options."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return tiny_parts(motion_heads=heads, motion_layers=layers)["video_unet"]


def latents(seeds):
    """Synthetic clips -> codec means (N, 4, F, 8, 8) and captions."""
    ae, z, caps = PoolVideoAE(), [], []
    for s in seeds:
        c = synthetic_clip(s)
        x = torch.from_numpy(c["frames"]).permute(0, 3, 1, 2).float() / 127.5 - 1  # (F, 3, H, W) in [-1, 1]
        z.append(ae.encode(x)[0].transpose(0, 1))  # (F, 4, 8, 8) -> (4, F, 8, 8)
        caps.append(c["caption"])
    return torch.stack(z), caps


def decode(z):
    """(B, 4, F, 8, 8) -> uint8 (B, F, 64, 64, 3), as BaseModels.decode_video."""
    B, C, n, h, w = z.shape
    x = PoolVideoAE().decode(z.transpose(1, 2).reshape(B * n, C, h, w))  # (B*F, 3, 64, 64)
    x = ((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return x.reshape(B, n, 3, 8 * h, 8 * w).permute(0, 1, 3, 4, 2).numpy()


def flicker(z, clips):
    """Flow peaks per clip, AV-Align against the real clips' audio, median |frame-to-frame change| of the latents."""
    traj = [av_align.flow_trajectory(f) for f in decode(z)]
    V = [av_align.video_peaks(t, FPS) for t in traj]
    A = [av_align.audio_onsets(c["audio"], SR) for c in clips]
    return dict(peaks=float(np.mean([len(v) for v in V])),  # and with the 2025 script's threshold (mean flow >= 0.1):
                peaks_2025=float(np.mean([len(av_align.video_peaks(t, FPS, min_flow=0.1)) for t in traj])),
                av_align=float(np.mean([av_align.align_score(a, v, FPS) for a, v in zip(A, V)])),
                dz_median=float((z[:, :, 1:] - z[:, :, :-1]).abs().median()),
                flow_median=float(np.median([np.median(t) for t in traj])),  # a clip's typical frame: real 0
                flow_max=float(np.mean([t.max() for t in traj])),  # its strongest motion, and how many frames move:
                moving=float(np.mean([(t > 1).sum() for t in traj])))


def to_eps_any(out, x, ab, pred):  # "sample" = the U-Net predicts x0 itself
    return (x - ab ** 0.5 * out) / (1 - ab) ** 0.5 if pred == "sample" else to_eps(out, x, ab, pred)


def train(a, bases, test):
    unet = video_unet(a.heads, a.layers)
    z, caps = latents(range(a.num_clips))
    emb = dict(zip(sorted(set(caps)), bases.encode_text(sorted(set(caps)))[0]))
    text, null = torch.stack([emb[c] for c in caps]), bases.encode_text([""])[0][0]  # (N, 77, 32), (77, 32)
    ab, params = alpha_bar_table(bases.alphas_cumprod_v), list(unet.parameters())
    opt, ema, g = torch.optim.Adam(params, lr=a.lr), [p.detach().clone() for p in params], torch.Generator().manual_seed(1)
    t0, losses = time.time(), []
    for step in range(a.train_steps):
        i = torch.randint(0, a.num_clips, (8,), generator=g)
        x0 = z[i] + a.std * torch.randn(z[i].shape, generator=g)  # sample the codec's latent distribution
        t = torch.randint(1, 1001, (8,), generator=g)  # Eq. (7): t ~ U(1, T)
        eps = torch.randn(x0.shape, generator=g)
        tx = torch.where((torch.rand(8, generator=g) < 0.1)[:, None, None], null, text[i])  # caption dropout
        for group in opt.param_groups:
            group["lr"] = a.lr * (0.5 + 0.5 * math.cos(math.pi * step / a.train_steps))
        out = video_forward(unet, add_noise(x0, eps, ab[t]), t - 1, tx)  # Eq. (2), then the U-Net
        loss = F.mse_loss(out, x0 if a.pred == "sample" else target(x0, eps, ab[t], a.pred))  # Eq. (7)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p, 1 - min(0.995, (1 + step) / (10 + step)))
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            print(f"step {step + 1}: loss {np.mean(losses[-100:]):.4f}, {(time.time() - t0) / (step + 1):.2f} s/step")
    seconds = time.time() - t0
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
        text_t, x_v = bases.encode_text([c["caption"] for c in test])[0], []
        for k in range(0, len(test), 8):  # Alg. 1 for the video alone: DDIM, guidance 7.5
            B = len(test[k:k + 8])
            x = torch.stack([torch.randn(4, 32, 8, 8, generator=torch.Generator().manual_seed(10 ** 4 + k + j))
                             for j in range(B)])
            cond = torch.cat([null.expand(B, -1, -1), text_t[k:k + B]])
            for step in range(25, 0, -1):
                m, m_prev = local_timesteps(step, 25, 1000, 1000, 1.0)[0], local_timesteps(step - 1, 25, 1000, 1000, 1.0)[0]
                u, c = video_forward(unet.eval(), torch.cat([x, x]), torch.full((2 * B,), m - 1), cond).chunk(2)
                x, _ = ddim_step(x, to_eps_any(u + 7.5 * (c - u), x, ab[m], a.pred).float(), ab[m], ab[m_prev])  # Eq. (5)
            x_v.append(x)
    x_v = torch.cat(x_v)
    os.makedirs(a.out, exist_ok=True)
    torch.save(x_v, os.path.join(a.out, f"{a.tag}_x_v.pt"))
    return dict(flicker(x_v, test), loss_last100=float(np.mean(losses[-100:])), s_per_step=seconds / a.train_steps)


def denoise(a, test):
    """One-shot x0 estimates from real latents noised to t: per-frame noise left in statically real cells."""
    from model import build_model
    _, bases = build_model("tiny", tiny_bases=a.bases)
    x0, caps = latents(c["seed"] for c in test)
    text, ab = bases.encode_text(caps)[0], alpha_bar_table(bases.alphas_cumprod_v)
    static = (x0[:, :, 1:] == x0[:, :, :-1]).all(1)  # (N, F-1, 8, 8): the cell does not change in the real clip
    g, rows = torch.Generator().manual_seed(0), {}
    for t in (10, 40, 160, 320, 500, 700, 1000):
        x_t = add_noise(x0, torch.randn(x0.shape, generator=g), ab[t])  # Eq. (2)
        out = video_forward(bases.video_unet, x_t, torch.full((len(test),), t - 1), text)
        x0_hat = predict_x0(x_t, to_eps(out, x_t, ab[t], "v_prediction"), ab[t])  # Eq. (6)
        rows[t] = dict(sigma=float((1 - ab[t]) ** 0.5), err=float((x0_hat - x0).abs().mean()),
                       jitter=float((x0_hat[:, :, 1:] - x0_hat[:, :, :-1]).abs().mean(1)[static].mean()))
    return rows


def tolerance(a, test):
    real, _ = latents(c["seed"] for c in test)
    gen = torch.load(a.gen)[:len(test)]
    jit = gen - gen.median(2, keepdim=True).values  # each cell's deviation from its median over the frames
    return {k: dict(jitter_std=float(k * jit.std()), **flicker(real + k * jit, test)) for k in a.scales}


def main(argv=None):
    p = cli.Parser(description=__doc__.split("\n")[0])
    p.add_argument("probe", choices=["train", "denoise", "tolerance", "score"])
    p.add_argument("--tag", default="probe")
    # the flicker had settled by 700 steps (docs/results.md sec. 2)
    p.add_argument("--train-steps", type=int, default=600, help="training steps of the probe")
    p.add_argument("--num-clips", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-3)  # train.py's tiny default
    p.add_argument("--std", type=float, default=0.01)  # PoolVideoAE.std
    p.add_argument("--heads", type=int, default=2)  # support/tiny.tiny_parts: motion_num_attention_heads
    p.add_argument("--layers", type=int, default=1)  # transformer layers per motion module
    p.add_argument("--pred", default="v_prediction", choices=["v_prediction", "epsilon", "sample"])
    p.add_argument("--num-test", type=int, default=16)
    p.add_argument("--bases", default=cli.TINY_BASES, help="denoise: tiny base models (default: the shipped ones)")
    p.add_argument("--gen", help="tolerance, score: generated latents (B, 4, F, 8, 8) saved by `train`")
    p.add_argument("--scales", action=cli.Listing, item=float, default=[0, 0.05, 0.1, 0.2, 0.5, 1.0])
    p.add_argument("--out", default="runs/flicker", help="folder for the probes' results")
    a = p.parse_args(argv)
    if a.probe in ("tolerance", "score") and not (a.gen and os.path.isfile(a.gen)):
        cli.fail(f"{a.probe} needs --gen, latents saved by `train` (got {a.gen})")  # one line, exit code 2
    torch.set_num_threads(1)
    test = [dict(synthetic_clip(s), seed=s) for s in range(TEST_SEED, TEST_SEED + a.num_test)]
    with torch.no_grad() if a.probe != "train" else torch.enable_grad():
        if a.probe == "train":
            res = train(a, load_base_models("tiny"), test)
        elif a.probe == "score":
            gen = torch.load(a.gen)
            res = flicker(gen, test[:len(gen)])
        else:
            res = denoise(a, test) if a.probe == "denoise" else tolerance(a, test)
    print(json.dumps(dict(probe=a.probe, tag=a.tag, args=vars(a), result=res)))


if __name__ == "__main__":
    main()
