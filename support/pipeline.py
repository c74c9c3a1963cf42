"""A Python entry point in diffusers' manner and argument names (audio_guidance_scale: LTX-2's; not in the paper):
load a trained model, generate sounding videos (Algorithm 1, or Sec. 3.4's case with video= / audio=), save them."""
import random
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.utils import BaseOutput

from sample import generate_clips
from support.loading import load
from support.media import save_clips

MAX_SEED = 2 ** 63 - 1  # what torch.Generator.manual_seed takes (sample.py --seed)


def clip_seeds(generator, n):
    """One seed per clip, so that generator=seeds[k] alone regenerates clip k: an int s gives s + k, a torch.Generator
    n draws from its state (which advances, as in diffusers), a list one draw from each, None a random start."""
    if isinstance(generator, (torch.Generator, list, tuple)):
        gens = [generator] * n if isinstance(generator, torch.Generator) else list(generator)
        if len(gens) != n:
            raise ValueError(f"a list of {len(gens)} generators for {n} clips: give one per clip")
        return [int(torch.randint(0, MAX_SEED, (), generator=g)) for g in gens]
    s = random.SystemRandom().randrange(MAX_SEED + 1) if generator is None else generator
    return [(s + k) % (MAX_SEED + 1) for k in range(n)]


@dataclass
class SoundingVideoPipelineOutput(BaseOutput):
    """frames: "np" (B, F, H, W, 3) float32 in [0, 1] (as export_to_video takes them), "uint8", "pt" (B, F, 3, H, W) or
    "latent" x_v; audios: (B, N) float32 at sample_rate, or x_a. generator=seeds[k] regenerates clip k alone."""
    frames: np.ndarray | torch.Tensor
    audios: np.ndarray | torch.Tensor
    fps: int | None = None
    sample_rate: int | None = None
    prompts: list | None = None
    seeds: list | None = None


class SoundingVideoPipeline:
    def __init__(self, model, bases, source):
        self.model, self.bases, self.source = model.eval(), bases, source  # source: what was loaded, for the record
        self.device, self.dtype = bases.device, model.video_unet.conv_in.weight.dtype  # of the frozen weights

    @classmethod
    def from_pretrained(cls, path=None, torch_dtype=torch.float32, device="cpu", ema=True, size="pretrained",
                        video_size=None):
        """path: a run, a pipe/ folder or None. torch_dtype: the frozen weights' (autocast; added modules fp32)."""
        return cls(*load(path, device, torch_dtype or torch.float32, ema, size, video_size))

    def to(self, device):
        self.model.to(device)
        self.device = self.bases.to(device).device
        return self

    @torch.no_grad()
    def __call__(self, prompt, negative_prompt=None, num_inference_steps=None, gamma=1.5, guidance_scale=7.5,
                 audio_guidance_scale=2.5, num_videos_per_prompt=1, generator=None, latents=None, seconds=4,
                 batch_size=4, grid="paper", output_type="np", return_dict=True, progress=True, video=None, audio=None):
        """prompt, negative_prompt: a string or one per prompt. num_inference_steps: T (25, Sec. 4.1.2; official grid
        50). latents: initial (x_v, x_a). Sec. 3.4: video= frames ((F, H, W, 3) uint8 / float in [0, 1], or PIL images)
        get a sound, audio=(waveform, sample_rate) a video, both cut or padded to `seconds`."""
        if output_type not in ("np", "pt", "uint8", "latent"):
            raise ValueError(f"output_type {output_type!r}: one of np, pt, uint8, latent")
        seeds = clip_seeds(generator, (1 if isinstance(prompt, str) else len(prompt)) * num_videos_per_prompt)
        res = generate_clips(self.model, self.bases, prompt, negative_prompt, num_inference_steps, gamma,
                             guidance_scale, audio_guidance_scale, seeds, num_videos_per_prompt, seconds, batch_size,
                             None if self.dtype == torch.float32 else self.dtype, progress, grid, latents,
                             output_type != "latent", video, audio)
        frames, audios = res["frames"], res["audios"]
        if output_type in ("np", "pt"):  # float in [0, 1], as diffusers' video processor gives them
            frames = frames.astype(np.float32) / 255
        if output_type == "pt":  # (B, F, H, W, 3) -> (B, F, 3, H, W)
            frames, audios = torch.from_numpy(frames).permute(0, 1, 4, 2, 3), torch.from_numpy(audios)
        if not return_dict:
            return frames, audios
        return SoundingVideoPipelineOutput(frames, audios, res["fps"], res["sample_rate"], res["prompts"], res["seeds"])

    def save(self, out, result, names=None):
        """An output's clips as <name>.mp4 (H.264 + AAC) and .wav (diffusers' exporters write no sound) -> the paths"""
        frames = result["frames"]
        frames = frames.permute(0, 1, 3, 4, 2).numpy() if isinstance(frames, torch.Tensor) else frames  # "pt"
        frames = frames if frames.dtype == np.uint8 else (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)
        return save_clips(out, dict(result, frames=frames, audios=np.asarray(result["audios"], np.float32)), names)
