"""A Python entry point in diffusers' manner: load a trained model, generate sounding videos (Algorithm 1), save them.

    import torch
    from diffusers.utils import export_to_video
    from pipeline import SoundingVideoPipeline
    pipe = SoundingVideoPipeline.from_pretrained("runs/synthetic-tiny-cmcpe")     # or a released pipe/ folder
    out = pipe("A person is hitting a red wooden box with a stick.", gamma=1.5, generator=0)
    out.frames.shape, out.audios.shape               # (1, 32, 64, 64, 3) float in [0, 1], (1, 64000) float32 16 kHz
    export_to_video(out.frames[0], "box.mp4", fps=out.fps)                         # diffusers' writer: no sound
    pipe.save("out/notebook", out)                                                 # mp4 with sound + wav
    out.seeds                                        # [0]: generator=out.seeds[k] alone gives clip k again

Names as diffusers' pipelines: guidance_scale (video) and audio_guidance_scale (LTX-2's split), num_videos_per_prompt,
generator (an int, a torch.Generator whose state is drawn from, or one per clip), output_type, return_dict,
torch_dtype, .to(device); gamma is the paper's. Everything else is read from the run's stored config or the released
folder (support/loading.py). Algorithm 1 itself is sample.generate. Not in the paper: an engineering wrapper.
"""
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.utils import BaseOutput

from sample import generate_clips
from support.loading import load
from support.media import save_clips

OUTPUT_TYPES = ("np", "pt", "uint8", "latent")


@dataclass
class SoundingVideoPipelineOutput(BaseOutput):
    """frames: "np" (B, F, H, W, 3) float32 numpy in [0, 1] (what diffusers.utils.export_to_video takes), "uint8" the
    same in 0..255, "pt" a float tensor (B, F, 3, H, W) in [0, 1], "latent" x_v (B, 4, F, h, w). audios: (B, N)
    float32 waveforms at sample_rate (numpy, or a tensor for "pt"), or x_a for "latent". seeds[k] regenerates clip k
    alone (generator=seeds[k]). Dict access works too: out["frames"]."""
    frames: np.ndarray | torch.Tensor
    audios: np.ndarray | torch.Tensor
    fps: int | None = None
    sample_rate: int | None = None
    prompts: list | None = None
    seeds: list | None = None


class SoundingVideoPipeline:
    def __init__(self, model, bases, source):
        self.model, self.bases, self.source = model.eval(), bases, source  # source: what was loaded, for the record

    @classmethod
    def from_pretrained(cls, path=None, torch_dtype=torch.float32, device="cpu", ema=True, size="pretrained",
                        video_size=None):
        """path: a run folder written by train.py, a released pipe/ folder, or None (support/loading.load).
        torch_dtype: of the frozen weights (bf16 halves them); the call then runs under autocast in it."""
        return cls(*load(path, device, torch_dtype or torch.float32, ema, size, video_size))

    def to(self, device):
        self.model.to(device)
        self.bases.to(device)
        return self

    @property
    def device(self):
        return self.bases.device

    @property
    def dtype(self):
        """The frozen weights' dtype (from_pretrained's torch_dtype); the added modules stay float32."""
        return self.model.video_unet.conv_in.weight.dtype

    @torch.no_grad()
    def __call__(self, prompt, negative_prompt=None, num_inference_steps=None, gamma=1.5, guidance_scale=7.5,
                 audio_guidance_scale=2.5, num_videos_per_prompt=1, generator=None, latents=None, seconds=4,
                 batch_size=4, grid="paper", output_type="np", return_dict=True, progress=True):
        """prompt, negative_prompt: a string or a list (one negative per prompt). num_inference_steps: T (25 on the
        paper's grid, Sec. 4.1.2; 50 on the official one). guidance_scale 7.5 (video), audio_guidance_scale 2.5
        (Sec. 4.1.2). generator: an int s (clip k from seed s + k), a torch.Generator (seeds drawn from its state),
        a list of one per clip, or None. latents: (x_v, x_a) initial noise for all clips. grid: "paper" | "official"
        (sample.generate). -> SoundingVideoPipelineOutput, or (frames, audios) with return_dict=False."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type {output_type!r}: one of {', '.join(OUTPUT_TYPES)}")
        amp = None if self.dtype == torch.float32 else self.dtype  # bf16 / fp16 frozen weights: autocast to them
        res = generate_clips(self.model, self.bases, prompt, negative_prompt, num_inference_steps, gamma,
                             guidance_scale, audio_guidance_scale, generator, num_videos_per_prompt, seconds,
                             batch_size, amp, progress, grid, latents, decode=output_type != "latent")
        frames, audios = res["frames"], res["audios"]
        if output_type == "np":
            frames = frames.astype(np.float32) / 255
        elif output_type == "pt":  # (B, F, H, W, 3) -> (B, F, 3, H, W), as diffusers' video processor
            frames, audios = torch.from_numpy(frames).permute(0, 1, 4, 2, 3).float() / 255, torch.from_numpy(audios)
        if not return_dict:
            return frames, audios
        return SoundingVideoPipelineOutput(frames, audios, res["fps"], res["sample_rate"], res["prompts"],
                                           res["seeds"])

    def save(self, out, result, names=None):
        """Write each clip of a call's output ("np", "uint8" or "pt") as <name>.mp4 (H.264 + AAC, plays in a
        browser) and <name>.wav into out/ (diffusers' exporters write no sound). -> the mp4 paths."""
        frames, audios = result["frames"], result["audios"]
        if isinstance(frames, torch.Tensor):  # "pt": (B, F, 3, H, W) -> (B, F, H, W, 3)
            frames, audios = frames.permute(0, 1, 3, 4, 2).cpu().numpy(), audios.cpu().numpy()
        if frames.ndim != 5 or frames.shape[-1] != 3:
            raise ValueError(f"frames of shape {tuple(frames.shape)}: save takes decoded clips, not latents")
        if frames.dtype != np.uint8:  # [0, 1] -> 0..255, as diffusers' numpy_to_pil
            frames = (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)
        return save_clips(out, dict(frames=frames, audios=np.asarray(audios, np.float32), fps=result["fps"],
                                    sample_rate=result["sample_rate"]), names)
