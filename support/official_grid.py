"""The released code's sampler (SonyResearch/SVG_baseline e8ebd06, VideoAudioGenWithSVGPipeline.__call__), not in
the paper. Unlike Algorithm 1 (App. A.1): each modality walks its own diffusers grid (video `linspace`, audio `leading`
+ steps_offset), bent by g = sqrt(gamma) (video) or 1 / sqrt(gamma) (audio); the last step ends at alphas_cumprod[0];
the CLAP negative prompt is padded. Left out: the official noise draw (one generator per batch, audio first)."""
import numpy as np

from timesteps import alpha_bar_table

NEGATIVE = "bad quality, worse quality"  # every official generation script's negative prompt, for both modalities


def base_grid(config, steps):
    """A diffusers DDIMScheduler.set_timesteps grid of `steps` U-Net indices, descending."""
    T, spacing = config["num_train_timesteps"], config.get("timestep_spacing", "leading")
    if spacing == "linspace":
        return np.linspace(0, T - 1, steps).round()[::-1].astype(np.int64)
    if spacing == "leading":
        return (np.arange(0, steps) * (T // steps)).round()[::-1].astype(np.int64) + config.get("steps_offset", 0)
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1
    raise ValueError(f"timestep_spacing {spacing!r} is not one the released schedulers use")


def adjusted_grid(config, steps, g):
    """The released DDIMSchedulerRev.set_timesteps: t <- round((t / 1000) ** g * 1000) (g = 1: unchanged, exactly)."""
    t = base_grid(config, steps).astype(np.float32)
    return np.round((t / 1000) ** np.float64(g) * 1000).astype(np.int64)  # Eq. (8) per grid


def schedule(bases, steps, gamma):
    """-> per DDIM step (t_v, t_a, alpha_bar_v, alpha_bar_v_prev, alpha_bar_a, alpha_bar_a_prev): its start and end."""
    g = (np.sqrt(gamma), 1 / np.sqrt(gamma)) if gamma is not None else (1.0, 1.0)  # None: the scripts' unset gamma
    out = []
    for m, g_m in zip("va", g):
        t = adjusted_grid(bases.scheduler_config[m], steps, g_m)
        ab = alpha_bar_table(getattr(bases, f"alphas_cumprod_{m}"))  # ab[t + 1] = alphas_cumprod[t]
        prev = np.append(t[1:], 0)  # the next grid entry; after the last one, final_alpha_cumprod = alphas_cumprod[0]
        out.append([(int(a), ab[a + 1], ab[b + 1]) for a, b in zip(t, prev)])
    return [(tv, ta, av, av_prev, aa, aa_prev) for (tv, av, av_prev), (ta, aa, aa_prev) in zip(*out)]


def defaults(grid, steps, negative):
    """Steps and negative prompt when not given: Sec. 4.1.2's (25, none), or the official scripts' (50, theirs)."""
    official = grid == "official"
    return steps or (50 if official else 25), negative if negative is not None else (NEGATIVE if official else "")


def guidance(g_v, g_a):
    """The official pipeline guides each modality with its own scale only if one exceeds 1; else scale 1 for both."""
    return (g_v, g_a) if max(g_v, g_a) > 1 else (1.0, 1.0)
