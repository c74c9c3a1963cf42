"""Fig. 2 of the paper (Sec. 3.2.1-3.2.2): each base model's loss over the timestep, normalised by its value at t = 0,
(a) over the raw (local) timestep and (b) over the global timestep t after the adjustment of Eq. (8) (video loss at
m(t), audio loss at n(t)); a PNG plus the numbers as JSON.

  python scripts/fig2.py --ckpt runs/repro/runs/base-only --out fig2_tiny.png             # tiny base models, CPU
  python scripts/fig2.py --size pretrained --data greatesthits --root CLIPS --flist flist_train.txt --device cuda \
                         --out fig2_real.png                                              # the real base models

The loss is Eq. (7) of each FROZEN base model alone (no added modules), mean squared noise-prediction error per
sample (Eq. (10)), averaged over clips; every clip keeps the same noise at every timestep (less variance across t).
The tiny U-Nets predict v: their output is turned into eps first (timesteps.to_eps), so the curve is their eps error.
"t = 0" is clean data, where the loss is undefined (x_t = x_0 carries no noise to predict); as the paper's curves start
at t = 0, we normalise by the loss at the smallest timestep, 1 (diffusers index 0). The global grid of (b) uses
T = 1000 (Eq. (8) with T = T_v = T_a) so that both panels share one axis; sampling uses T = 25 of them. The plotted
points are measured; the "mean |gap|" between the curves (and its scan over gamma) interpolates log-linearly between
them over every t = 1..1000.
Left out: the paper measured the loss "in the experiment" (its training); the per-sample training log
(log_joint.jsonl: t_v, t_a, loss_v, loss_a) holds the same kind of data for the joint model.
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the top-level modules, as a reader runs them
from support import cli  # noqa: E402
from base_models import load_base_models  # noqa: E402
from data import build_dataset  # noqa: E402
from model import audio_forward, video_forward  # noqa: E402
from timesteps import add_noise, alpha_bar_table, local_timesteps, to_eps  # noqa: E402


@torch.no_grad()
def base_losses(bases, x0_v, x0_a, text_v, text_a, steps_v, steps_a, seed=0, batch=8):
    """Eq. (7) loss of each base model alone at the local timesteps steps_v (video m) and steps_a (audio n), each in
    1..1000 -> ({m: mean loss}, {n: mean loss}). x0_*: clean latents (N, ...); text_*: their captions' embeddings."""
    out = []
    for x0, text, steps, ac, walk, kind in (
            (x0_v, text_v, steps_v, bases.alphas_cumprod_v, (video_forward, bases.video_unet), bases.prediction_type["v"]),
            (x0_a, text_a, steps_a, bases.alphas_cumprod_a, (audio_forward, bases.audio_unet), bases.prediction_type["a"])):
        g = torch.Generator().manual_seed(seed)
        eps = torch.randn(x0.shape, generator=g).to(x0)  # one noise per clip, the same at every timestep
        table, losses = alpha_bar_table(ac), {}
        for k in tqdm(sorted(set(int(s) for s in steps)), desc="video" if x0.dim() == 5 else "audio", leave=False):
            per = []
            for i in range(0, len(x0), batch):
                x_t = add_noise(x0[i:i + batch], eps[i:i + batch], float(table[k]))  # Eq. (2)
                t = torch.full((len(x_t),), k - 1, device=x0.device)  # paper timestep k -> diffusers index k - 1
                pred = to_eps(walk[0](walk[1], x_t, t, text[i:i + batch]), x_t, float(table[k]), kind)  # base alone
                per.append((pred.float() - eps[i:i + batch]).pow(2).flatten(1).mean(1))  # Eq. (10), per sample
            losses[k] = torch.cat(per).mean().item()
        out.append(losses)
    return tuple(out)


def normalised(loss):
    """{timestep: loss} -> k -> loss(k) / loss(1), log-linear interpolation between the measured timesteps."""
    ks = np.array(sorted(loss))
    logs = np.log([loss[k] for k in ks])
    return lambda k: np.exp(np.interp(k, ks, logs)) / loss[1]


def gap(loss_v, loss_a, gamma, T=1000, T_v=1000, T_a=1000):
    """Mean over the global t = 1..T of |video - audio| normalised loss at m(t), n(t) (Eq. (8)): how far apart the
    two curves of Fig. 2 are (gamma = 1: panel (a), the raw timesteps)."""
    m, n = local_timesteps(torch.arange(1, T + 1), T, T_v, T_a, gamma)  # Eq. (8)
    return float(np.mean(np.abs(normalised(loss_v)(m.numpy()) - normalised(loss_a)(n.numpy()))))


def curves(loss_v, loss_a, grid, gamma, T=1000, T_v=1000, T_a=1000, scan=(1 / 3, 1 / 2, 2 / 3, 1, 1.5, 2, 3)):
    """Normalised curves on the timestep grid (measured values, no interpolation): (a) raw, L(k) / L(1); (b) at the
    adjusted local timesteps of Eq. (8), L_v(m(t)) / L_v(1) and L_a(n(t)) / L_a(1), for the global t of the grid.
    Plus the gap between the two curves for (a), (b) and a scan over gamma (which gamma brings them closest)."""
    mn = [local_timesteps(t, T, T_v, T_a, gamma) for t in grid]  # Eq. (8)
    c = dict(grid=list(grid), a_video=[loss_v[k] / loss_v[1] for k in grid],
             a_audio=[loss_a[k] / loss_a[1] for k in grid],
             b_video=[loss_v[m] / loss_v[1] for m, _ in mn], b_audio=[loss_a[n] / loss_a[1] for _, n in mn],
             m=[m for m, _ in mn], n=[n for _, n in mn], gap_a=gap(loss_v, loss_a, 1.0, T, T_v, T_a),
             gap_b=gap(loss_v, loss_a, gamma, T, T_v, T_a))
    c["gap_by_gamma"] = {f"{g:.3g}": gap(loss_v, loss_a, g, T, T_v, T_a) for g in scan}
    c["closest_gamma"] = float(min(scan, key=lambda g: c["gap_by_gamma"][f"{g:.3g}"]))
    return c


def predict_gamma(loss_v, loss_a, T=1000, T_v=1000, T_a=1000, lo=1 / 4, hi=4, points=241):
    """The gamma of Eq. (8) that brings the two normalised loss curves of Fig. 2 closest (least mean |gap| over the
    global t = 1..T), searched on a log-spaced grid of [lo, hi] (1.2 % apart by default; with lo = 1 / hi and an odd
    number of points it holds gamma = 1 itself): the prediction, from the curves alone, before any sampling."""
    grid = np.exp(np.linspace(np.log(lo), np.log(hi), points))
    gaps = [gap(loss_v, loss_a, g, T, T_v, T_a) for g in grid]
    return float(grid[int(np.argmin(gaps))])


def timestep_grid(points, T=1000):
    """`points` global timesteps from 1 to T, spaced quadratically: dense near t = 0 (taken as 1), where the
    normalised losses fall fastest."""
    return sorted(set(max(1, round(T * x * x)) for x in np.linspace(0, 1, points)))


def plot(c, gamma, path, title, logx=False):
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for axis, key, xlabel in ((ax[0], "a", "timestep (each model's own)"), (ax[1], "b", "global timestep t")):
        axis.plot(c["grid"], c[f"{key}_video"], ".-", label="video", color="tab:blue", markersize=3)
        axis.plot(c["grid"], c[f"{key}_audio"], ".-", label="audio", color="tab:orange", markersize=3)
        axis.set_xlabel(xlabel)
        axis.set_xscale("log" if logx else "linear")
        axis.grid(alpha=0.3)
        axis.legend(title=f"mean |gap| = {c[f'gap_{key}']:.3f}")
    ax[0].set_ylabel("loss / loss at t = 0 (t = 1)")
    ax[0].set_title("(a) raw timestep")
    ax[1].set_title(f"(b) adjusted, γ = {gamma:g}: video at m(t), audio at n(t)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = cli.Parser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="tiny", choices=["tiny", "full", "pretrained"])
    p.add_argument("--ckpt", default=None, help="tiny/full: a run folder whose base/ checkpoint holds trained base "
                                                "U-Nets (train.py stage 'base')")
    p.add_argument("--tiny-bases", default=cli.TINY_BASES, help="tiny without --ckpt: trained base U-Nets (default: "
                                                                "the shipped ones), or 'random'")
    cli.add_base_args(p)  # as train.py
    p.add_argument("--data", default="synthetic", choices=["synthetic", "greatesthits", "landscape", "vggsound"])
    p.add_argument("--root", default=None, help="folder of prepared clips (as train.py)")
    p.add_argument("--flist", default=None, help="file list (as train.py)")
    p.add_argument("--split", default="train", help="the paper measured its training run: train")
    p.add_argument("--fps", type=int, default=None, help="8 for GreatestHits (Sec. 4.1.2), 4 for Landscape/VGGSound")
    p.add_argument("--num-clips", type=int, default=16)
    p.add_argument("--points", type=int, default=41, help="timesteps on each axis")
    p.add_argument("--gamma", type=float, default=1.5)  # Fig. 2b
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--logx", action="store_true", help="log-scaled timestep axes (the paper's are linear)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="fig2.png", help="image file")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    if a.gamma <= 0 or a.points < 2 or a.num_clips < 1:
        p.error("need --gamma > 0, --points >= 2, --num-clips >= 1")
    return a


def main(argv=None):
    a = parse_args(argv)
    fps = a.fps or (4 if a.data in ("landscape", "vggsound") else 8)
    dtype = torch.float16 if a.size != "tiny" and a.device.startswith("cuda") else torch.float32
    try:
        shipped = a.tiny_bases if a.size == "tiny" and not a.ckpt and a.tiny_bases != "random" else None
        bases = load_base_models(a.size, device=a.device, dtype=dtype, fps=fps, video_base=a.video_base,
                                 motion_adapter=a.motion_adapter, audio_base=a.audio_base, tiny_bases=shipped,
                                 snr_scale_v=a.snr_scale_v, snr_scale_a=a.snr_scale_a)
        data = build_dataset(a.data, a.split, root=a.root, flist=a.flist, fps=fps, size=bases.video_size,
                             num_clips=a.num_clips)
    except (RuntimeError, ValueError) as e:  # weights offline, missing data: one line
        sys.exit(f"error: {e}")
    if a.ckpt:  # the trained base U-Nets, by their names in the joint model ("video_unet.*", "audio_unet.*")
        from support import checkpoint
        holder = torch.nn.Module()
        holder.video_unet, holder.audio_unet = bases.video_unet, bases.audio_unet
        folder, _ = checkpoint.latest(a.ckpt, "base")
        if folder is None:
            sys.exit(f"error: no complete base checkpoint in {a.ckpt}")
        checkpoint.load_weights(holder, folder, dict(holder.named_parameters()), ema=True)
    elif a.size == "full" or (a.size == "tiny" and not shipped):
        print("note: random base U-Nets: the curves say nothing about the paper's claim")
    g = torch.Generator().manual_seed(a.seed + 1)
    x0_v, x0_a, captions = [], [], []
    for i in tqdm(range(0, len(data), a.batch_size), desc="encoding clips"):
        batch = torch.utils.data.default_collate([data[j] for j in range(i, min(i + a.batch_size, len(data)))])
        for x0, (mu, sd) in ((x0_v, bases.encode_video(batch["video"].to(a.device, dtype))),
                             (x0_a, bases.encode_audio(batch["mel"].to(a.device, dtype)))):
            x0.append(mu + sd * torch.randn(mu.shape, generator=g).to(mu))  # a sample of the latent, as training
        captions += list(batch["caption"])
    x0_v, x0_a = torch.cat(x0_v), torch.cat(x0_a)
    text_v, text_a = zip(*(bases.encode_text(captions[i:i + a.batch_size])
                           for i in range(0, len(captions), a.batch_size)))
    grid = timestep_grid(a.points)
    T_v, T_a = len(bases.alphas_cumprod_v), len(bases.alphas_cumprod_a)
    mn = [local_timesteps(t, 1000, T_v, T_a, a.gamma) for t in grid]  # Eq. (8)
    loss_v, loss_a = base_losses(bases, x0_v, x0_a, torch.cat(text_v), torch.cat(text_a),
                                 [1] + grid + [m for m, _ in mn], [1] + grid + [n for _, n in mn], a.seed, a.batch_size)
    c = curves(loss_v, loss_a, grid, a.gamma, 1000, T_v, T_a)
    title = (f"{a.size} base models ({a.ckpt or (shipped and 'shipped') or 'no checkpoint'}), {len(data)} {a.data} "
             f"{a.split} clips; "
             f"loss at t = 1: video {loss_v[1]:.4f}, audio {loss_a[1]:.4f}")
    plot(c, a.gamma, a.out, title, a.logx)
    result = dict(c, gamma=a.gamma, loss_v=loss_v, loss_a=loss_a, size=a.size, ckpt=a.ckpt, data=a.data,
                  split=a.split, num_clips=len(data), snr_scale_v=a.snr_scale_v, snr_scale_a=a.snr_scale_a,
                  predicted_gamma=predict_gamma(loss_v, loss_a, 1000, T_v, T_a))
    Path(a.out).with_suffix(".json").write_text(json.dumps(result, indent=1))
    print(f"wrote {a.out} and {Path(a.out).with_suffix('.json')}: mean |video - audio| of the normalised losses "
          f"{c['gap_a']:.3f} raw (a), {c['gap_b']:.3f} adjusted with gamma = {a.gamma:g} (b); closest at gamma = "
          f"{c['closest_gamma']:.3g} of {list(c['gap_by_gamma'])}")
    return result


if __name__ == "__main__":
    main()
