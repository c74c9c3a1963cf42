"""Fig. 2 (Sec. 3.2.1-3.2.2): each frozen base model's loss over the timestep, normalised by its value at t = 0,
(a) over the raw (local) timestep and (b) over the global t after Eq. (8) (video at m(t), audio at n(t)); PNG + JSON.

  python -m scripts.fig2 --out fig2_tiny.png                                        # the shipped tiny base models
  python -m scripts.fig2 --size pretrained --data greatesthits --root CLIPS --device cuda --out fig2_real.png

The loss is Eq. (7) of each base model alone (per-sample Eq. (10), averaged over clips that keep their noise at every
t); the tiny U-Nets' v is turned into eps. The loss at t = 0 is undefined, so "t = 0" is t = 1. Panel (b) uses
T = 1000; the "mean |gap|" interpolates log-linearly between measured points. Left out: the paper measured the loss
during its training (train.py's log.jsonl holds the same kind of data).
"""
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from base_models import load_base_models
from data import build_dataset
from model import audio_forward, video_forward
from support import cli
from timesteps import add_noise, alpha_bar_table, local_timesteps, to_eps

T = 1000  # T_v = T_a of the base models, and the global grid of panel (b)


@torch.no_grad()
def base_losses(bases, x0_v, x0_a, text_v, text_a, steps_v, steps_a, seed=0, batch=8):
    """Eq. (7) loss of each base model alone at local timesteps steps_v (m) and steps_a (n), each in 1..1000 ->
    ({m: mean loss}, {n: mean loss}). x0_*: clean latents (N, ...); text_*: their captions' embeddings."""
    out = []
    for x0, text, steps, m in ((x0_v, text_v, steps_v, "v"), (x0_a, text_a, steps_a, "a")):
        forward, unet = (video_forward, bases.video_unet) if m == "v" else (audio_forward, bases.audio_unet)
        eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(x0)  # one noise per clip
        table, losses = alpha_bar_table(getattr(bases, f"alphas_cumprod_{m}")), {}
        for k in tqdm(sorted(set(int(s) for s in steps)), desc=m, leave=False):
            per = []
            for i in range(0, len(x0), batch):
                x_t = add_noise(x0[i:i + batch], eps[i:i + batch], float(table[k]))  # Eq. (2)
                t = torch.full((len(x_t),), k - 1, device=x0.device)  # paper timestep k -> diffusers index k - 1
                pred = to_eps(forward(unet, x_t, t, text[i:i + batch]), x_t, float(table[k]), bases.prediction_type[m])
                per.append((pred.float() - eps[i:i + batch]).pow(2).flatten(1).mean(1))  # Eq. (10), per sample
            losses[k] = torch.cat(per).mean().item()
        out.append(losses)
    return tuple(out)


def normalised(loss):
    """{timestep: loss} -> k -> loss(k) / loss(1), log-linear between the measured timesteps."""
    ks = np.array(sorted(loss))
    logs = np.log([loss[k] for k in ks])
    return lambda k: np.exp(np.interp(k, ks, logs)) / loss[1]


def gap(loss_v, loss_a, gamma):
    """Mean over the global t = 1..T of |video - audio| normalised loss at m(t), n(t) (gamma = 1: panel (a))."""
    m, n = local_timesteps(torch.arange(1, T + 1), T, T, T, gamma)  # Eq. (8)
    return float(np.mean(np.abs(normalised(loss_v)(m.numpy()) - normalised(loss_a)(n.numpy()))))


def curves(loss_v, loss_a, grid, gamma, scan=(1 / 3, 1 / 2, 2 / 3, 1, 1.5, 2, 3)):
    """Both panels on the grid (measured values): (a) L(k) / L(1); (b) L_v(m(t)) / L_v(1) and L_a(n(t)) / L_a(1);
    the gap of (a), of (b) and over a scan of gamma."""
    m, n = zip(*(local_timesteps(t, T, T, T, gamma) for t in grid))  # Eq. (8)
    c = dict(grid=list(grid), m=list(m), n=list(n), a_video=[loss_v[k] / loss_v[1] for k in grid],
             a_audio=[loss_a[k] / loss_a[1] for k in grid], b_video=[loss_v[k] / loss_v[1] for k in m],
             b_audio=[loss_a[k] / loss_a[1] for k in n], gap_a=gap(loss_v, loss_a, 1), gap_b=gap(loss_v, loss_a, gamma))
    c["gap_by_gamma"] = {f"{g:.3g}": gap(loss_v, loss_a, g) for g in scan}
    return c


def predict_gamma(loss_v, loss_a, lo=1 / 4, hi=4, points=241):
    """The gamma of Eq. (8) with the least gap between the two normalised curves, on a log-spaced grid of [lo, hi]
    (odd points with lo = 1 / hi hold gamma = 1): a prediction from the curves alone, before any sampling."""
    grid = np.exp(np.linspace(np.log(lo), np.log(hi), points))
    return float(grid[int(np.argmin([gap(loss_v, loss_a, g) for g in grid]))])


def timestep_grid(points):
    """`points` timesteps from 1 to T, spaced quadratically: dense near t = 0, where the normalised losses fall."""
    return sorted(set(max(1, round(T * x * x)) for x in np.linspace(0, 1, points)))


def plot(c, gamma, path, title):
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for axis, key, xlabel, name in ((ax[0], "a", "timestep (each model's own)", "(a) raw timestep"), (
            ax[1], "b", "global timestep t", f"(b) adjusted, γ = {gamma:g}: video at m(t), audio at n(t)")):
        axis.plot(c["grid"], c[f"{key}_video"], ".-", label="video", color="tab:blue", markersize=3)
        axis.plot(c["grid"], c[f"{key}_audio"], ".-", label="audio", color="tab:orange", markersize=3)
        axis.set(xlabel=xlabel, title=name)
        axis.grid(alpha=0.3)
        axis.legend(title=f"mean |gap| = {c[f'gap_{key}']:.3f}")
    ax[0].set_ylabel("loss / loss at t = 0 (t = 1)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p, pos = cli.Parser(description=__doc__.split("\n")[0]), cli.number(int, 1, 4096)
    p.add_argument("--size", default="tiny", choices=["tiny", "full", "pretrained"])
    p.add_argument("--tiny-bases", default=cli.TINY_BASES, help="a --stage base ema file, or random")
    cli.add_base_args(p)
    p.add_argument("--data", default="synthetic", choices=["synthetic", "greatesthits", "landscape", "vggsound"])
    p.add_argument("--root", help="folder of prepared clips (as train.py)")
    p.add_argument("--flist", help="file list (as train.py)")
    p.add_argument("--fps", type=cli.number(int, 2, 8), help="default: 8 for GreatestHits (Sec. 4.1.2), else 4")
    p.add_argument("--num-clips", type=pos, default=16)
    p.add_argument("--points", type=cli.number(int, 2, 1000), default=41, help="timesteps on each axis")
    p.add_argument("--gamma", type=cli.number(float, 0, 100, open_lo=True), default=1.5)  # Fig. 2b
    p.add_argument("--batch-size", type=pos, default=8)
    p.add_argument("--seed", type=cli.number(int, 0, 2 ** 63 - 1), default=0)
    p.add_argument("--out", default="fig2.png", help="image file; the numbers go to the same name .json")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    if a.size == "tiny" and a.tiny_bases != "random":
        cli.existing(a.tiny_bases, "--tiny-bases")
    if a.size == "pretrained":
        cli.check_weights(a.video_base, a.motion_adapter, a.audio_base)
    a.fps = a.fps or (4 if a.data in ("landscape", "vggsound") else 8)
    return a


def main(argv=None):
    a = parse_args(argv)
    dtype = torch.float16 if a.size != "tiny" and a.device.startswith("cuda") else torch.float32
    tiny_bases = a.tiny_bases if a.size == "tiny" and a.tiny_bases != "random" else None
    try:  # the data before the weights: a bad --root fails in seconds
        data = build_dataset(a.data, "train", root=a.root, flist=a.flist, fps=a.fps,
                             size=64 if a.size == "tiny" else 256, num_clips=a.num_clips)
        bases = load_base_models(a.size, device=a.device, dtype=dtype, fps=a.fps, video_base=a.video_base,
                                 motion_adapter=a.motion_adapter, audio_base=a.audio_base, tiny_bases=tiny_bases,
                                 snr_scale_v=a.snr_scale_v, snr_scale_a=a.snr_scale_a)
    except (OSError, ValueError) as e:  # missing data or weights: one line
        cli.fail(str(e).splitlines()[0])
    g = torch.Generator().manual_seed(a.seed + 1)
    x0_v, x0_a, text_v, text_a = [], [], [], []
    for batch in tqdm(torch.utils.data.DataLoader(data, batch_size=a.batch_size), desc="encoding training clips"):
        for x0, (mu, sd) in ((x0_v, bases.encode_video(batch["video"].to(a.device, dtype))),
                             (x0_a, bases.encode_audio(batch["mel"].to(a.device, dtype)))):
            x0.append(mu + sd * torch.randn(mu.shape, generator=g).to(mu))  # a sample of the latent, as training
        for text, e in zip((text_v, text_a), bases.encode_text(list(batch["caption"]))):
            text.append(e)
    grid = timestep_grid(a.points)
    mn = [local_timesteps(t, T, T, T, a.gamma) for t in grid]  # Eq. (8)
    loss_v, loss_a = base_losses(bases, torch.cat(x0_v), torch.cat(x0_a), torch.cat(text_v), torch.cat(text_a),
                                 [1] + grid + [m for m, _ in mn], [1] + grid + [n for _, n in mn], a.seed, a.batch_size)
    c = curves(loss_v, loss_a, grid, a.gamma)
    title = (f"{a.size} base models ({tiny_bases or 'random' if a.size == 'tiny' else a.size}), {len(data)} {a.data} "
             f"training clips; loss at t = 1: video {loss_v[1]:.4f}, audio {loss_a[1]:.4f}")
    plot(c, a.gamma, a.out, title)
    result = dict(c, gamma=a.gamma, loss_v=loss_v, loss_a=loss_a, size=a.size, tiny_bases=tiny_bases, data=a.data,
                  num_clips=len(data), snr_scale_v=a.snr_scale_v, snr_scale_a=a.snr_scale_a,
                  predicted_gamma=predict_gamma(loss_v, loss_a))
    Path(a.out).with_suffix(".json").write_text(json.dumps(result, indent=1))
    print(f"wrote {a.out} and its .json: mean |video - audio| gap {c['gap_a']:.3f} raw (a), {c['gap_b']:.3f} at "
          f"gamma = {a.gamma:g} (b); least at gamma = {result['predicted_gamma']:.3g} (predict_gamma)")
    return result


if __name__ == "__main__":
    main()
