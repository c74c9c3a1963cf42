"""A Python entry point: load a trained model, generate sounding videos with Algorithm 1, save them.

    from pipeline import SoundingVideoPipeline
    pipe = SoundingVideoPipeline.from_pretrained("runs/synthetic-tiny-cmcpe")       # or a released pipe/ folder
    out = pipe("A person is hitting a red wooden box with a stick.", gamma=1.5, generator=0)
    out["frames"].shape, out["waveforms"].shape                                      # (1, 32, 64, 64, 3), (1, 64000)
    pipe.save("out/notebook", out)                                                   # mp4 (with sound) + wav

Everything is read from the run's stored config (size, base models, conditioner, fps, time_align) or from the
released folder (official.py). Algorithm 1 itself is sample.generate. Not in the paper: an engineering wrapper.
"""
import json
import os
import random

import numpy as np
import torch

import checkpoint
from cli import TINY_BASES


class SoundingVideoPipeline:
    def __init__(self, model, bases, source):
        self.model, self.bases, self.source = model.eval(), bases, source  # source: what was loaded, for the record

    @classmethod
    def from_pretrained(cls, path=None, device="cpu", dtype=torch.float32, ema=True, size="pretrained",
                        video_size=None):
        """path: a run folder written by train.py, a released pipe/ folder, or None (the base models with untrained,
        i.e. identity, added modules: video and audio then come from the two base models independently).
        dtype: of the frozen weights (bf16 halves them on a GPU, model.cast_frozen); the added modules stay fp32."""
        from model import build_model, cast_frozen
        from official import is_pipe
        if path is not None and is_pipe(path):
            model, bases = build_model("pretrained", device=device, ckpt=path, video_size=video_size)
            source = dict(checkpoint=os.path.abspath(path), kind="released pipe/")
        elif path is None:  # the base models alone (tiny: the shipped ones)
            shipped = TINY_BASES if size == "tiny" and os.path.isfile(TINY_BASES) else None
            model, bases = build_model(size, device=device, tiny_bases=shipped)
            source = dict(checkpoint=None, kind=f"untrained {size}")
        else:
            model, bases, source = cls._run(path, device, ema)
        if dtype != torch.float32:
            cast_frozen(model, bases, dtype)
        return cls(model, bases, source)

    @staticmethod
    def _run(path, device, ema):
        from model import build_model
        cfg = read_run_config(path)
        model, bases = build_model(cfg["size"], cfg["conditioner"], device=device, fps=cfg["fps"],
                                   time_align=cfg.get("time_align", "seconds"), video_base=cfg["video_base"],
                                   motion_adapter=cfg["motion_adapter"], audio_base=cfg["audio_base"],
                                   tiny_bases=checkpoint.resolve_stored(cfg.get("tiny_bases")))
        steps = {}
        for stage in ("base", "joint") if cfg.get("base_steps", 0) > 0 else ("joint",):
            folder, steps[stage] = checkpoint.latest(path, stage)
            if folder is None:
                raise checkpoint.CheckpointError(f"{path}: no complete {stage} checkpoint (the run's config has "
                                                 f"base_steps={cfg.get('base_steps', 0)})")
            checkpoint.load_weights(model, folder, model.stage_parameters(stage), ema=ema)
        return model, bases, dict(checkpoint=os.path.abspath(path), kind="run", steps=steps, ema=ema)

    @torch.no_grad()
    def __call__(self, prompt, negative_prompt="", num_inference_steps=25, gamma=1.5, guidance_scale_video=7.5,
                 guidance_scale_audio=2.5, generator=None, num_samples=1, seconds=4, batch_size=4, amp=None,
                 progress=True):
        """prompt: a string or a list. generator: an int seed, a torch.Generator (its initial seed) or None (a fresh
        one). -> dict(frames uint8 (B, F, H, W, 3), waveforms float32 (B, N), fps, sample_rate, prompts, seeds):
        num_samples per prompt, each from its own seed (so a clip does not depend on the batch it ran in)."""
        from sample import generate
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        seed = generator.initial_seed() if isinstance(generator, torch.Generator) else (
            random.randrange(2 ** 31) if generator is None else int(generator))
        jobs = [p for p in prompts for _ in range(num_samples)]
        seeds = [seed * 1000003 + k for k in range(len(jobs))]  # one seed per clip (Alg. 1's initial noise)
        frames, waves = [], []
        for b in range(0, len(jobs), batch_size):
            x_v, x_a = generate(self.model, self.bases, jobs[b: b + batch_size], seeds[b: b + batch_size],
                                num_inference_steps, gamma, guidance_scale_video, guidance_scale_audio,
                                negative_prompt, bar=progress and len(jobs) == 1, amp=amp, seconds=seconds)
            frames.append(self.bases.decode_video(x_v).cpu().numpy())
            waves.append(self.bases.decode_audio(x_a, seconds).float().cpu().numpy())
        return dict(frames=np.concatenate(frames), waveforms=np.concatenate(waves), fps=self.bases.fps,
                    sample_rate=self.bases.sr, prompts=jobs, seeds=seeds)

    def save(self, out, result, names=None):
        """Write each clip as <name>.mp4 (H.264 + AAC, plays in a browser) and <name>.wav into out/, each through a
        temporary file renamed into place (never through a file or link already there). -> the mp4 paths."""
        from data import write_mp4, write_wav
        os.makedirs(out, exist_ok=True)
        names = names or [f"{k:04d}" for k in range(len(result["frames"]))]
        paths = []
        for name, frames, wave in zip(names, result["frames"], result["waveforms"]):
            base = os.path.join(os.path.abspath(out), name)
            write_wav(base + ".wav", wave, result["sample_rate"])
            write_mp4(base + ".mp4", frames, result["fps"], wave, result["sample_rate"])
            paths.append(base + ".mp4")
        return paths


def read_run_config(run):
    """A run folder's stored training config (its newest complete checkpoint's), checked for what sampling needs."""
    for stage in checkpoint.STAGES:
        folder, _ = checkpoint.latest(run, stage)
        if folder is not None:
            break
    else:
        raise checkpoint.CheckpointError(f"no checkpoint in {run} (expected {run}/joint/ with COMPLETE, written by "
                                         "train.py, or a released pipe/ folder)")
    try:
        cfg = json.load(open(os.path.join(folder, "config.json")))
        missing = [k for k in ("size", "conditioner", "fps", "video_base", "motion_adapter", "audio_base")
                   if k not in cfg]
    except (OSError, ValueError, TypeError) as e:
        raise checkpoint.CheckpointError(f"{folder}/config.json: {type(e).__name__}") from None
    if missing:
        raise checkpoint.CheckpointError(f"{folder}/config.json lacks {missing}: not written by this train.py")
    return cfg
