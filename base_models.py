"""The two frozen base models and their encoders/decoders (Sec. 3.1, App. A.2).

Video: AnimateDiff = SD-1.5 U-Net + motion adapter v1-5-2 (diffusers `UNetMotionModel`), SD VAE, CLIP ViT-L text.
Audio: AudioLDM-m-full (`UNet2DConditionModel`, CLAP text embedding as class label), its VAE, HiFi-GAN vocoder.
Both DDIM noise schedules (the paper's {beta_t} of Eq. 1, one per modality).

Three sizes:
  "tiny"       random U-Nets / text encoders with the real classes and block layout but narrow channels, FIXED
               simple autoencoders and a Griffin-Lim vocoder (support/tiny.py): a CPU demo learns in minutes. They
               predict v, not eps (README, deviations);
  "full"       the real architectures from configs/*.json with random weights (parameter counts, GPU benchmarks);
               buildable on the `meta` device;
  "pretrained" real weights by hub id or local folder (missing: huggingface_hub's OSError, one line).
Left out: fp16 weight variants, LoRA / DreamBooth checkpoints, IP-adapter, FreeInit/FreeNoise, sliced/tiled VAE.
"""
import json
import logging
import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from diffusers import AutoencoderKL, DDIMScheduler, MotionAdapter, UNet2DConditionModel, UNetMotionModel
from transformers import (ClapTextConfig, ClapTextModelWithProjection, CLIPTextConfig, CLIPTextModel, CLIPTokenizer,
                          RobertaTokenizer, SpeechT5HifiGan, SpeechT5HifiGanConfig)

from data import HOP, SR
from support.cli import BASES
from support.retime import retime
from support.tiny import GriffinLim, PoolVideoAE, byte_tokenizers, load_tiny_bases, tiny_parts

CONFIGS = Path(__file__).resolve().parent / "configs"
# diffusers notes "modules that should be kept in float32: []" at every .to(dtype) of a model that has none, and
# transformers 5 draws a "Loading weights" bar for every text encoder: neither says anything to a user
logging.getLogger("diffusers.models.modeling_utils").addFilter(
    lambda record: "should be kept in float32" not in record.getMessage())
transformers.utils.logging.disable_progress_bar()


def _cfg(name):
    return json.loads((CONFIGS / name).read_text())


def _full():
    unet2d = UNet2DConditionModel.from_config(_cfg("sd15_unet.json"))
    adapter = MotionAdapter.from_config(_cfg("animatediff_motion_adapter_v1_5_2.json"))
    return dict(video_unet=UNetMotionModel.from_unet2d(unet2d, adapter),
                audio_unet=UNet2DConditionModel.from_config(_cfg("audioldm_m_full_unet.json")),
                vae_v=AutoencoderKL.from_config(_cfg("sd15_vae.json")),
                vae_a=AutoencoderKL.from_config(_cfg("audioldm_vae.json")),
                vocoder=SpeechT5HifiGan(SpeechT5HifiGanConfig(**_cfg("audioldm_vocoder_hifigan.json"))),
                text_encoder_v=CLIPTextModel(CLIPTextConfig(**_cfg("sd15_text_encoder_clip.json"))),
                text_encoder_a=ClapTextModelWithProjection(ClapTextConfig(**_cfg("audioldm_text_encoder_clap.json"))))


def _pretrained(video_base, motion_adapter, audio_base):
    """The real base models by hub id or local folder (huggingface_hub's cache, else a download; HF_HUB_OFFLINE=1:
    the cache only). A missing model raises huggingface_hub's own OSError, one line in the CLIs."""
    d = dict(low_cpu_mem_usage=False)  # diffusers: no "install accelerate" notice
    unet2d = UNet2DConditionModel.from_pretrained(video_base, subfolder="unet", **d)
    adapter = MotionAdapter.from_pretrained(motion_adapter, **d)
    return dict(video_unet=UNetMotionModel.from_unet2d(unet2d, adapter),
                vae_v=AutoencoderKL.from_pretrained(video_base, subfolder="vae", **d),
                text_encoder_v=CLIPTextModel.from_pretrained(video_base, subfolder="text_encoder"),
                tokenizer_v=CLIPTokenizer.from_pretrained(video_base, subfolder="tokenizer"),
                audio_unet=UNet2DConditionModel.from_pretrained(audio_base, subfolder="unet", **d),
                vae_a=AutoencoderKL.from_pretrained(audio_base, subfolder="vae", **d),
                text_encoder_a=ClapTextModelWithProjection.from_pretrained(audio_base, subfolder="text_encoder"),
                tokenizer_a=RobertaTokenizer.from_pretrained(audio_base, subfolder="tokenizer"),
                vocoder=SpeechT5HifiGan.from_pretrained(audio_base, subfolder="vocoder"))


class BaseModels(nn.Module):
    """Frozen base models (requires_grad False, eval mode) and their data <-> latent maps, as in diffusers pipelines."""

    def __init__(self, size, fps, video_size, tokenizer_v, tokenizer_a, schedulers=None, **modules):
        super().__init__()
        self.size, self.fps, self.video_size, self.sr = size, fps, video_size, SR
        self.tokenizer_v, self.tokenizer_a = tokenizer_v, tokenizer_a
        for name in ("video_unet", "audio_unet", "vae_v", "vae_a", "vocoder", "text_encoder_v", "text_encoder_a"):
            setattr(self, name, modules[name])
        # {beta_t} of Eq. (1) per modality, as alphas_cumprod (1000,): AnimateDiff linear, AudioLDM scaled_linear
        self.prediction_type = {}  # what each U-Net outputs: "epsilon" (the real ones) or "v_prediction" (tiny)
        self.scheduler_config = {}  # each modality's DDIM config: its timestep grid (support/official_grid.py)
        for m, name in (("v", "animatediff_ddim_scheduler.json"), ("a", "audioldm_ddim_scheduler.json")):
            sched = DDIMScheduler.from_config((schedulers or {}).get(m) or _cfg(name))  # a pipe/'s own, if it has them
            self.register_buffer(f"alphas_cumprod_{m}", sched.alphas_cumprod.clone())
            self.scheduler_config[m] = dict(sched.config)
            self.prediction_type[m] = "v_prediction" if size == "tiny" else sched.config.prediction_type
        self.requires_grad_(False).eval()

    @property
    def device(self):
        return self.alphas_cumprod_v.device

    @property
    def latent_size(self):
        """H = W of a video latent: SD's VAE and the tiny codec downsample 8x (32 for 256x256 frames)."""
        vae = self.vae_v
        factor = vae.factor if isinstance(vae, PoolVideoAE) else 2 ** (len(vae.config.block_out_channels) - 1)
        return self.video_size // factor

    @torch.no_grad()
    def encode_text(self, prompts):
        """-> text_v (B, 77, D_clip) CLIP last hidden state; text_a (B, D_clap) L2-normalised CLAP text_embeds."""
        kw = dict(padding="max_length", truncation=True, return_tensors="pt")
        ids = self.tokenizer_v(list(prompts), max_length=self.tokenizer_v.model_max_length, **kw).input_ids
        text_v = self.text_encoder_v(ids.to(self.device))[0]
        tok = self.tokenizer_a(list(prompts), max_length=self.tokenizer_a.model_max_length, **kw).to(self.device)
        text_a = self.text_encoder_a(tok.input_ids, attention_mask=tok.attention_mask).text_embeds
        return text_v.float(), F.normalize(text_a.float(), dim=-1)  # as AudioLDMPipeline._encode_prompt

    @staticmethod
    def _encode(vae, x):  # -> mean, std of the latent distribution, times the VAE's scaling_factor
        if isinstance(vae, AutoencoderKL):  # in the VAE's dtype (bf16 when frozen weights are cast), out in float32
            dist, s = vae.encode(x.to(vae.dtype)).latent_dist, vae.config.scaling_factor
            return dist.mean.float() * s, dist.std.float() * s
        return vae.encode(x)  # tiny fixed maps are already unit-scale

    @staticmethod
    def _decode(vae, z):
        if isinstance(vae, AutoencoderKL):
            return vae.decode((z / vae.config.scaling_factor).to(vae.dtype)).sample.float()
        return vae.decode(z)

    @torch.no_grad()
    def encode_video(self, frames, chunk=16):
        """frames (B, 3, F, H, W) in [-1, 1] -> mean, std (B, 4, F, H/8, W/8), per frame in chunks of 16 frames."""
        B, _, n, H, W = frames.shape
        x = frames.transpose(1, 2).reshape(B * n, 3, H, W)  # (B*F, 3, H, W), b*F + f order
        mean, std = zip(*(self._encode(self.vae_v, c) for c in x.split(chunk)))
        unfold = lambda z: z.reshape(B, n, *z.shape[1:]).transpose(1, 2)  # (B*F, 4, h, w) -> (B, 4, F, h, w)
        return unfold(torch.cat(mean)), unfold(torch.cat(std))

    @torch.no_grad()
    def encode_audio(self, mel):
        """mel (B, 1, 400, 64) AudioLDM log-mel -> mean, std (B, 8, 100, 16)."""
        return self._encode(self.vae_a, mel)

    @torch.no_grad()
    def decode_video(self, x_v, chunk=16):
        """x_v (B, 4, F, h, w) -> uint8 frames (B, F, H, W, 3), decoded 16 frames at a time (as AnimateDiffPipeline)."""
        B, C, n, h, w = x_v.shape
        z = x_v.transpose(1, 2).reshape(B * n, C, h, w)  # (B*F, 4, h, w)
        x = torch.cat([self._decode(self.vae_v, c) for c in z.split(chunk)])  # (B*F, 3, H, W) in [-1, 1]
        x = ((x.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)  # as VaeImageProcessor -> numpy uint8
        return x.reshape(B, n, *x.shape[1:]).permute(0, 1, 3, 4, 2)  # (B, F, H, W, 3)

    @staticmethod
    def audio_rows(seconds):
        """Audio latent rows for `seconds` of sound: the VAE keeps one row per 4 mel frames of 10 ms (100 for 4 s)."""
        return round(seconds * SR / HOP / 4)

    @torch.no_grad()
    def decode_audio(self, x_a, seconds=4.0):
        """x_a (B, 8, rows, 16) -> VAE -> log-mel (B, 1, 4 rows, 64) -> vocoder -> waveform float32 (B, seconds*SR),
        cut after decoding (rows past `seconds`, the released model's padding, are decoded and dropped)."""
        mel = self._decode(self.vae_a, x_a).squeeze(1)  # (B, 4 rows, 64) time-major, as the vocoder wants
        w = next(self.vocoder.parameters(), None)  # HiFi-GAN in its dtype; Griffin-Lim (no weights) in float32
        wave = self.vocoder(mel if w is None else mel.to(w.dtype)).float()  # 4 s: HiFi-GAN 64032 samples, GL 63840
        n = round(seconds * SR)
        return F.pad(wave, (0, max(0, n - wave.shape[-1])))[:, :n]


def load_base_models(size, device="cpu", dtype=torch.float32, fps=8, video_base=BASES["video_base"],
                     motion_adapter=BASES["motion_adapter"], audio_base=BASES["audio_base"], tiny_bases=None,
                     snr_scale_v=1.0, snr_scale_a=1.0):
    """Build the frozen base models. size: "tiny" | "full" | "pretrained" (see module docstring). tiny_bases: a
    safetensors file of trained tiny U-Nets ("video_unet.*", "audio_unet.*"; cli.TINY_BASES is the shipped one),
    or None for random ones. snr_scale_v / snr_scale_a != 1: that base model on another noise schedule, its SNR
    times that factor at every timestep (support/retime.py; the controlled experiment of scripts/gamma_mismatch.py)."""
    device = torch.device(device)
    if size == "pretrained":
        parts = _pretrained(video_base, motion_adapter, audio_base)
    elif size in ("tiny", "full"):
        with torch.random.fork_rng(), torch.device(device):  # same random weights every call
            torch.manual_seed(0)
            parts = tiny_parts() if size == "tiny" else _full()
        # "full" reuses the byte-level tokenizers: random text encoders need no real vocabulary
        parts["tokenizer_v"], parts["tokenizer_a"] = byte_tokenizers()
        if size == "tiny" and tiny_bases:
            load_tiny_bases(parts, tiny_bases)
    else:
        raise ValueError(f"size must be 'tiny', 'full' or 'pretrained', not {size!r}")
    base = assemble(parts, size, device, dtype, fps, 64 if size == "tiny" else 256)  # paper: 256x256 frames
    retime(base.video_unet, base.alphas_cumprod_v, snr_scale_v)
    retime(base.audio_unet, base.alphas_cumprod_a, snr_scale_a)
    return base


def assemble(parts, size, device, dtype, fps, video_size, schedulers=None):
    """BaseModels from its parts, on device; weights in dtype except the Griffin-Lim vocoder (torch.stft: fp32)."""
    base = BaseModels(size, fps, video_size, schedulers=schedulers, **parts)
    for m in base.children():
        want = torch.float32 if isinstance(m, GriffinLim) else dtype
        same = all(p.dtype == want for p in m.parameters())  # diffusers warns on every .to(dtype), even a no-op one
        m.to(device) if same else m.to(device, want)
    return base.to(device)
