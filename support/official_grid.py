"""The released code's sampling procedure (SonyResearch/SVG_baseline e8ebd06, VideoAudioGenWithSVGPipeline.__call__,
src/va_core/model/svg/pipeline_svg.py:410-571 and scheduler_ddim_rev.py:73-256), for sample.generate(grid="official").

It differs from Algorithm 1 as printed (App. A.1) in four ways: no global grid (each modality walks its own diffusers
grid, video `linspace`, audio `leading` + steps_offset, and the two lists are zipped step by step); gamma bends each of
these grids as t <- round((t / 1000) ** g * 1000) with g = sqrt(gamma) for video and 1 / sqrt(gamma) for audio (the
paper's Eq. (8) applied per grid, normalised by 1000); the last step goes to alphas_cumprod[0] (set_alpha_to_one
false), not to alpha_bar = 1, so the decoders get a slightly noisy latent; and the CLAP negative prompt is padded to
the projection width. gamma = 1 leaves every grid as it is (t / 1000 * 1000 rounds back to t), which is what the
official scripts get with their gamma unset: there is no separate "no adjustment" value. Guidance runs only if a
scale exceeds 1. The rest is Algorithm 1's: per-modality guidance, x0_hat zeros at the first step, then the previous
step's, deterministic DDIM steps by timesteps.ddim_step (the official step re-derives eps from x0_hat,
use_clipped_model_output, which with clipping off is the same eps up to rounding). Left out: the official noise draw
(one generator per batch, audio first): sample.generate draws per clip or takes latents=. Not in the paper.
"""
import numpy as np
import torch
import torch.nn.functional as F

from timesteps import alpha_bar_table


def base_grid(config, steps):
    """A diffusers DDIMScheduler.set_timesteps grid (0.27, scheduling_ddim.py) of `steps` U-Net indices, descending."""
    T, spacing = config["num_train_timesteps"], config.get("timestep_spacing", "leading")
    if spacing == "linspace":
        return np.linspace(0, T - 1, steps).round()[::-1].astype(np.int64)
    if spacing == "leading":
        return (np.arange(0, steps) * (T // steps)).round()[::-1].astype(np.int64) + config.get("steps_offset", 0)
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1
    raise ValueError(f"timestep_spacing {spacing!r} is not one the released schedulers use")


def adjusted_grid(config, steps, g):
    """DDIMSchedulerRev.set_timesteps: the base grid bent by the exponent g (scheduler_ddim_rev.py:116-118)."""
    t = base_grid(config, steps)
    if g is None:
        return t
    return np.round((t.astype(np.float32) / 1000) ** np.float64(g) * 1000).astype(np.int64)  # Eq. (8) per grid


def schedule(bases, steps, gamma):
    """-> [(t_v, t_a, alpha_bar_v, alpha_bar_v_prev, alpha_bar_a, alpha_bar_a_prev)] per step: U-Net indices and the
    noise levels each DDIM step moves between; the last step of each modality ends at alphas_cumprod[0]."""
    g = (np.sqrt(gamma), 1 / np.sqrt(gamma)) if gamma is not None else (None, None)  # test_svg_with_prompt.py:30-32
    out = []
    for m, g_m in zip("va", g):
        t = adjusted_grid(bases.scheduler_config[m], steps, g_m)
        ab = alpha_bar_table(getattr(bases, f"alphas_cumprod_{m}"))  # ab[t + 1] = alphas_cumprod[t]
        prev = np.append(t[1:], 0)  # the next grid entry; after the last one, final_alpha_cumprod = alphas_cumprod[0]
        out.append([(int(a), ab[a + 1], ab[b + 1]) for a, b in zip(t, prev)])
    return [(tv, ta, av, av_prev, aa, aa_prev) for (tv, av, av_prev), (ta, aa, aa_prev) in zip(*out)]


NEGATIVE = "bad quality, worse quality"  # every official generation script's negative prompt, for both modalities


def defaults(grid, steps, negative):
    """Steps and negative prompt when not given: Sec. 4.1.2's (25, none), or the official scripts' (50, theirs)."""
    official = grid == "official"
    return steps or (50 if official else 25), negative if negative is not None else (NEGATIVE if official else "")


def guidance(g_v, g_a):
    """The official pipeline guides only if a scale exceeds 1 (pipeline_svg.py:459), and then each modality with its
    own scale; otherwise it takes the conditional prediction, i.e. scale 1 for both."""
    return (g_v, g_a) if max(g_v, g_a) > 1 else (1.0, 1.0)


@torch.no_grad()
def encode_prompts(bases, prompts, negative):
    """Text of the prompts and of the negative prompt (None means "", pipeline_svg.py:152-153), one per prompt.
    -> text_v, text_a, null_v, null_a: CLIP states (B, 77, D) and normalised CLAP text_embeds (B, D_clap)."""
    negative = [negative or ""] * len(prompts)
    out = []
    for texts, length in ((list(prompts), bases.tokenizer_a.model_max_length),
                          (negative, bases.text_encoder_a.config.projection_dim)):  # the CLAP negative: :170
        kw = dict(padding="max_length", truncation=True, return_tensors="pt")
        ids = bases.tokenizer_v(texts, max_length=bases.tokenizer_v.model_max_length, **kw).input_ids
        text_v = bases.text_encoder_v(ids.to(bases.device))[0]  # no attention mask (pipeline_svg.py:235-244)
        tok = bases.tokenizer_a(texts, max_length=length, **kw).to(bases.device)
        text_a = bases.text_encoder_a(tok.input_ids, attention_mask=tok.attention_mask).text_embeds
        out += [text_v, F.normalize(text_a, dim=-1)]  # pipeline_svg.py:182-188
    return tuple(out)
