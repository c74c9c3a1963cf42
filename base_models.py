"""The two frozen base models and their encoders/decoders (Sec. 3.1, App. A.2): AnimateDiff (SD-1.5 U-Net + motion
adapter v1-5-2 as diffusers' `UNetMotionModel`, SD VAE, CLIP ViT-L text) and AudioLDM-m-full (`UNet2DConditionModel`
with the CLAP text embedding as class label, its VAE, HiFi-GAN vocoder), with their DDIM schedules ({beta_t}, Eq. 1).
Sizes: "tiny" (support/tiny.py, a CPU demo), "full" (configs/*.json, random weights; `meta` works), "pretrained" (hub
ids or folders). Left out: fp16 weight variants, LoRA / DreamBooth, IP-adapter, FreeInit/FreeNoise, sliced/tiled VAE.
"""
import json
import logging
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
transformers.utils.logging.disable_progress_bar()  # transformers 5 draws a bar for every text encoder it loads
# diffusers warns of "modules that should be kept in float32: []" (none) at every .to(dtype), from_unet2d's own too
logging.getLogger("diffusers.models.modeling_utils").addFilter(lambda r: "kept in float32: []" not in r.getMessage())


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


def _pretrained(video_base, motion_adapter, audio_base):  # hub ids or folders (HF_HUB_OFFLINE=1: the cache only)
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

    def __init__(self, size, fps, video_size, schedulers=None, **parts):
        super().__init__()
        self.size, self.fps, self.video_size, self.sr = size, fps, video_size, SR
        for name, part in parts.items():  # the two U-Nets, VAEs, text encoders, tokenizers and the vocoder
            setattr(self, name, part)
        # {beta_t} of Eq. (1) per modality, as alphas_cumprod (1000,): AnimateDiff linear, AudioLDM scaled_linear
        self.prediction_type = {}  # "epsilon" (the real U-Nets) or "v_prediction" (tiny)
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
    def latent_size(self):  # H = W of a video latent: SD's VAE and the tiny codec downsample 8x (256 -> 32)
        vae = self.vae_v
        factor = vae.factor if isinstance(vae, PoolVideoAE) else 2 ** (len(vae.config.block_out_channels) - 1)
        return self.video_size // factor

    @torch.no_grad()
    def encode_text(self, prompts, official_negative=False):
        """-> CLIP last hidden state (B, 77, D_clip), L2-normalised CLAP text_embeds (B, D_clap), at least float32.
        official_negative: the released pipeline's negative prompt, CLAP tokens padded to the projection width."""
        kw = dict(padding="max_length", truncation=True, return_tensors="pt")
        ids = self.tokenizer_v(list(prompts), max_length=self.tokenizer_v.model_max_length, **kw).input_ids
        text_v = self.text_encoder_v(ids.to(self.device))[0]
        n = self.text_encoder_a.config.projection_dim if official_negative else self.tokenizer_a.model_max_length
        tok = self.tokenizer_a(list(prompts), max_length=n, **kw).to(self.device)
        text_a = self.text_encoder_a(tok.input_ids, attention_mask=tok.attention_mask).text_embeds
        up = lambda z: z.to(torch.promote_types(z.dtype, torch.float32))  # bf16 -> fp32; a float64 run stays float64
        return up(text_v), F.normalize(up(text_a), dim=-1)

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
    def encode_video(self, frames, chunk=16):  # (B, 3, F, H, W) in [-1, 1] -> mean, std (B, 4, F, H/8, W/8)
        B, _, n, H, W = frames.shape
        x = frames.transpose(1, 2).reshape(B * n, 3, H, W)  # (B*F, 3, H, W), b*F + f order
        mean, std = zip(*(self._encode(self.vae_v, c) for c in x.split(chunk)))
        unfold = lambda z: z.reshape(B, n, *z.shape[1:]).transpose(1, 2)  # (B*F, 4, h, w) -> (B, 4, F, h, w)
        return unfold(torch.cat(mean)), unfold(torch.cat(std))

    @torch.no_grad()
    def encode_audio(self, mel):  # mel (B, 1, 400, 64) AudioLDM log-mel -> mean, std (B, 8, 100, 16)
        return self._encode(self.vae_a, mel)

    @torch.no_grad()
    def decode_video(self, x_v, chunk=16):  # (B, 4, F, h, w) -> uint8 (B, F, H, W, 3), 16 frames at a time as diffusers
        B, C, n, h, w = x_v.shape
        z = x_v.transpose(1, 2).reshape(B * n, C, h, w)  # (B*F, 4, h, w)
        x = torch.cat([self._decode(self.vae_v, c) for c in z.split(chunk)])  # (B*F, 3, H, W) in [-1, 1]
        x = ((x.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)  # as VaeImageProcessor -> numpy uint8
        return x.reshape(B, n, *x.shape[1:]).permute(0, 1, 3, 4, 2)  # (B*F, 3, H, W) -> (B, F, H, W, 3)

    @staticmethod
    def audio_rows(seconds):  # audio latent rows for `seconds` of sound: one per 4 mel frames of 10 ms (100 for 4 s)
        return round(seconds * SR / HOP / 4)

    @torch.no_grad()
    def decode_audio(self, x_a, seconds=4.0):
        """x_a (B, 8, rows, 16) -> waveform (B, seconds*SR) float32; rows past `seconds` (padding) are cut after."""
        mel = self._decode(self.vae_a, x_a).squeeze(1)  # (B, 1, 4 rows, 64) -> (B, 4 rows, 64), as the vocoder wants
        w = next(self.vocoder.parameters(), None)  # HiFi-GAN in its dtype; Griffin-Lim (no weights) in float32
        wave = self.vocoder(mel if w is None else mel.to(w.dtype)).float()  # 4 s: HiFi-GAN 64032 samples, GL 63840
        return F.pad(wave, (0, round(seconds * SR)))[:, :round(seconds * SR)]


def load_base_models(size, device="cpu", dtype=torch.float32, fps=8, video_base=BASES["video_base"],
                     motion_adapter=BASES["motion_adapter"], audio_base=BASES["audio_base"], tiny_bases=None,
                     snr_scale_v=1.0, snr_scale_a=1.0):
    """size: "tiny" | "full" | "pretrained". tiny_bases: trained tiny U-Nets (a safetensors file; cli.TINY_BASES) or
    None. snr_scale_v / _a != 1: that base model on a schedule with s times its SNR (support/retime.py)."""
    if size == "pretrained":
        parts = _pretrained(video_base, motion_adapter, audio_base)
    elif size in ("tiny", "full"):
        with torch.random.fork_rng(), torch.device(device):  # same random weights every call
            torch.manual_seed(0)
            parts = tiny_parts() if size == "tiny" else _full()
        parts["tokenizer_v"], parts["tokenizer_a"] = byte_tokenizers()  # random text encoders need no vocabulary
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
    base = BaseModels(size, fps, video_size, schedulers=schedulers, **parts).to(device)
    for m in base.children():
        m.to(torch.float32 if isinstance(m, GriffinLim) else dtype)
    return base
