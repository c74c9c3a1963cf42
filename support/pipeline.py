"""A Python entry point: load a trained model, generate sounding videos with Algorithm 1, save them.

    from pipeline import SoundingVideoPipeline
    pipe = SoundingVideoPipeline.from_pretrained("runs/synthetic-tiny-cmcpe")       # or a released pipe/ folder
    out = pipe("A person is hitting a red wooden box with a stick.", gamma=1.5, generator=0)
    out["frames"].shape, out["waveforms"].shape                                      # (1, 32, 64, 64, 3), (1, 64000)
    pipe.save("out/notebook", out)                                                   # mp4 (with sound) + wav

Everything is read from the run's stored config (size, base models, conditioner, fps, time_align) or from the
released folder (support/loading.py). Algorithm 1 itself is sample.generate. Not in the paper: an engineering wrapper.
"""
import torch

from sample import generate_clips
from support.loading import load
from support.media import save_clips


class SoundingVideoPipeline:
    def __init__(self, model, bases, source):
        self.model, self.bases, self.source = model.eval(), bases, source  # source: what was loaded, for the record

    @classmethod
    def from_pretrained(cls, path=None, device="cpu", dtype=torch.float32, ema=True, size="pretrained",
                        video_size=None):
        """path: a run folder written by train.py, a released pipe/ folder, or None (support/loading.load)."""
        return cls(*load(path, device, dtype, ema, size, video_size))

    @torch.no_grad()
    def __call__(self, prompt, negative_prompt="", num_inference_steps=25, gamma=1.5, guidance_scale_video=7.5,
                 guidance_scale_audio=2.5, generator=None, num_samples=1, seconds=4, batch_size=4, amp=None,
                 progress=True):
        """prompt: a string or a list. generator: an int seed, a torch.Generator (its initial seed) or None (a fresh
        one). -> dict(frames uint8 (B, F, H, W, 3), waveforms float32 (B, N), fps, sample_rate, prompts, seeds):
        num_samples per prompt, each from its own seed (so a clip does not depend on the batch it ran in)."""
        return generate_clips(self.model, self.bases, prompt, negative_prompt, num_inference_steps, gamma,
                              guidance_scale_video, guidance_scale_audio, generator, num_samples, seconds, batch_size,
                              amp, progress)

    def save(self, out, result, names=None):
        """Write each clip as <name>.mp4 (H.264 + AAC, plays in a browser) and <name>.wav into out/."""
        return save_clips(out, result, names)
