"""The two frozen base models and their encoders/decoders (Sec. 3.1, App. A.2).

Video: AnimateDiff = SD-1.5 U-Net + motion adapter v1-5-2 (diffusers `UNetMotionModel`), SD VAE, CLIP ViT-L text.
Audio: AudioLDM-m-full (`UNet2DConditionModel`, CLAP text embedding as class label), its VAE, HiFi-GAN vocoder.
Both DDIM noise schedules (the paper's {beta_t} of Eq. 1, one per modality).

Three sizes:
  "tiny"       random U-Nets / text encoders with the real classes and block layout but narrow channels, and FIXED
               simple autoencoders (pooling + a fixed linear map) and a Griffin-Lim vocoder: a CPU demo learns in
               minutes (issue 3). The tiny U-Nets predict v, not eps (README, deviations): a tiny eps model's eps
               MSE at t = 1000 is ~0.01, and Eq. (6) divides the error by sqrt(alpha_bar) = 0.012 (audio) in x0_hat;
  "full"       the real architectures from configs/*.json with random weights (parameter counts, GPU benchmarks);
               buildable on the `meta` device;
  "pretrained" real weights by hub id or local folder (offline without them: `WeightsNotFound`, one line).
Left out: fp16 weight variants, LoRA / DreamBooth checkpoints, IP-adapter, FreeInit/FreeNoise, sliced/tiled VAE.
"""
import json
import logging
import math
import os
import tempfile
import warnings
from pathlib import Path

import librosa
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from diffusers import AutoencoderKL, DDIMScheduler, MotionAdapter, UNet2DConditionModel, UNetMotionModel
from transformers import (ClapTextConfig, ClapTextModelWithProjection, CLIPTextConfig, CLIPTextModel, CLIPTokenizer,
                          RobertaTokenizer, SpeechT5HifiGan, SpeechT5HifiGanConfig)
from safetensors.torch import load_file
from transformers.convert_slow_tokenizer import bytes_to_unicode

from cli import BASES, hub_reachable

CONFIGS = Path(__file__).resolve().parent / "configs"
# diffusers notes "modules that should be kept in float32: []" at every .to(dtype) of a model that has none, and
# transformers 5 draws a "Loading weights" bar for every text encoder: neither says anything to a user
logging.getLogger("diffusers.models.modeling_utils").addFilter(
    lambda record: "should be kept in float32" not in record.getMessage())
transformers.utils.logging.disable_progress_bar()
SR, N_FFT, HOP, N_MELS, SECONDS = 16000, 1024, 160, 64, 4.0  # AudioLDM's mel settings (HIFIGAN_16K_64)


class WeightsNotFound(RuntimeError):
    """Pretrained weights are not available (offline); str(e) is one line that CLIs print as is."""


def _cfg(name):
    return json.loads((CONFIGS / name).read_text())


def byte_tokenizers(max_length=77):
    """(CLIP, RoBERTa/CLAP) byte-level BPE tokenizers with no merges, written to a temp dir: no hub needed.
    CLIP: 256 bytes + 256 bytes</w> + bos/eos = 514 ids; RoBERTa: <s>,<pad>,</s>,<unk> + 256 bytes + <mask> = 261 ids.
    Built with from_pretrained(dir): transformers 5 silently ignores CLIPTokenizer(vocab_file=...) (notes §1)."""
    b = list(bytes_to_unicode().values())
    vocabs = {"clip": b + [s + "</w>" for s in b] + ["<|startoftext|>", "<|endoftext|>"],
              "clap": ["<s>", "<pad>", "</s>", "<unk>"] + b + ["<mask>"]}
    with tempfile.TemporaryDirectory(prefix="svg_tok_") as root:  # read at load time, then removed
        for name, vocab in vocabs.items():
            os.makedirs(f"{root}/{name}")
            Path(f"{root}/{name}/vocab.json").write_text(json.dumps({s: i for i, s in enumerate(vocab)}))
            Path(f"{root}/{name}/merges.txt").write_text("#version: 0.2\n")
        return (CLIPTokenizer.from_pretrained(f"{root}/clip", model_max_length=max_length),
                RobertaTokenizer.from_pretrained(f"{root}/clap", model_max_length=max_length))


class PoolVideoAE(nn.Module):
    """Tiny fixed video 'VAE': 8x8 average pool, RGB -> 4 channels by SCALE * A (A 4x3 with orthonormal columns,
    A^T A = I); decoded by A^T / SCALE (the pseudo-inverse) and nearest 8x upsampling. Exact on frames constant over
    8x8 blocks. SCALE plays SD's scaling_factor: pooled frames in [-1, 1] have std ~0.3-0.5, latents ~unit scale."""
    SCALE = 2.0

    def __init__(self, factor=8, std=0.01):
        super().__init__()
        self.factor, self.std = factor, std
        self.register_buffer("A", torch.tensor([[1., 1, 1], [1, -1, 1], [1, 1, -1], [1, -1, -1]]) / 2)  # Hadamard cols

    def encode(self, x):  # x (N, 3, H, W) in [-1, 1] -> mean, std (N, 4, H/8, W/8), already 'scaled'
        z = self.SCALE * torch.einsum("oc,nchw->nohw", self.A.to(x.dtype), F.avg_pool2d(x, self.factor))
        return z, torch.full_like(z, self.std)

    def decode(self, z):  # (N, 4, h, w) -> (N, 3, 8h, 8w)
        x = torch.einsum("oc,nohw->nchw", self.A.to(z.dtype), z / self.SCALE)  # A^T: least-squares inverse
        return F.interpolate(x, scale_factor=self.factor)


class MelAE(nn.Module):
    """Tiny fixed audio 'VAE': log-mel (N,1,400,64) -> (N,8,100,16) by averaging time pairs, then space-to-depth of
    2 time x 4 mel bins = 8 channels, then (x - MU) / SIGMA. Exact on mels constant over time pairs."""
    # AudioLDM log-mel spans [-11.5 (the log(1e-5) floor), ~2]; mostly-silent clips average ~-10.5, busy ones ~-6:
    # latents of roughly unit scale either way (synthetic clips: mean -0.7, std 0.7)
    MU, SIGMA = -8.0, 3.5

    def __init__(self, std=0.01):
        super().__init__()
        self.std = std

    def encode(self, mel):
        n, _, T, M = mel.shape
        x = F.avg_pool2d(mel, (2, 1))  # (N, 1, T/2, M)
        z = x.reshape(n, 1, T // 4, 2, M // 4, 4).permute(0, 1, 3, 5, 2, 4).reshape(n, 8, T // 4, M // 4)
        z = (z - self.MU) / self.SIGMA
        return z, torch.full_like(z, self.std)

    def decode(self, z):  # (N, 8, T', M') -> (N, 1, 4T', 4M')
        n, _, T, M = z.shape
        x = (z * self.SIGMA + self.MU).reshape(n, 1, 2, 4, T, M).permute(0, 1, 4, 2, 5, 3).reshape(n, 1, 2 * T, 4 * M)
        return x.repeat_interleave(2, dim=2)


class GriffinLim(nn.Module):
    """Tiny vocoder: log-mel (B, T, 64) time-major (like SpeechT5HifiGan) -> waveform (B, (T-1)*160) in [-1, 1].
    Magnitude by the pseudo-inverse of librosa's slaney mel filterbank, phase by fast Griffin-Lim (momentum 0.99,
    as librosa.griffinlim) from a fixed random phase, so decoding is deterministic."""

    def __init__(self, n_iter=32, momentum=0.99):
        super().__init__()
        self.n_iter, self.momentum = n_iter, momentum
        fb = librosa.filters.mel(sr=SR, n_fft=N_FFT, n_mels=N_MELS, fmin=0, fmax=SR / 2)  # (64, 513)
        self.register_buffer("mel_pinv", torch.linalg.pinv(torch.tensor(fb, dtype=torch.float32)))  # (513, 64)
        self.register_buffer("window", torch.hann_window(N_FFT))

    def forward(self, mel):
        # |STFT| of a signal in [-1, 1] is at most sum(hann) = n_fft / 2: the clamp keeps exp() of a wild sample finite
        mel = mel.float().clamp(max=math.log(N_FFT / 2)).exp()
        mag = (self.mel_pinv @ mel.transpose(1, 2)).clamp(min=0)  # (B, 513, T) linear magnitude
        n = (mel.shape[1] - 1) * HOP  # center=True STFT of n samples has exactly T frames
        stft = lambda w: torch.stft(w, N_FFT, HOP, window=self.window, return_complex=True)
        istft = lambda s: torch.istft(s, N_FFT, HOP, window=self.window, length=n)
        g = torch.Generator().manual_seed(0)
        angles = torch.exp(2j * torch.pi * torch.rand(mag.shape[1:], generator=g)).to(mag.device)  # same per clip
        angles = angles.expand_as(mag)  # (B, 513, T): a clip decodes the same whatever the batch
        prev = torch.zeros_like(angles)
        for _ in range(self.n_iter):
            rebuilt = stft(istft(mag * angles))
            angles = rebuilt - self.momentum / (1 + self.momentum) * prev
            angles, prev = angles / (angles.abs() + 1e-16), rebuilt
        return istft(mag * angles).clamp(-1, 1)  # HiFi-GAN's output is tanh-bounded too


def _tiny(motion_heads=2, motion_layers=1):
    """Same classes and block layout as the real models (4 levels, same block types, motion modules incl. the mid
    block, AudioLDM's concatenated class embedding), but 1 layer per block (real: 2) and narrow channels (32/64
    instead of 320-1280 / 192-960), so that the CPU demo trains both stages in minutes. The motion-module options
    are for scripts/flicker_probe.py's variants."""
    ch_v, ch_a = (32, 32, 64, 64), (32, 32, 64, 64)
    unet2d = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=ch_v, layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8)
    adapter = MotionAdapter(block_out_channels=ch_v, motion_layers_per_block=1, motion_norm_num_groups=8,
                            motion_transformer_layers_per_block=motion_layers, motion_num_attention_heads=motion_heads,
                            motion_max_seq_length=32, use_motion_mid_block=True)
    audio_unet = UNet2DConditionModel(
        sample_size=(100, 16), in_channels=8, out_channels=8, block_out_channels=ch_a, layers_per_block=1,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",),
        cross_attention_dim=ch_a, attention_head_dim=2, norm_num_groups=8,
        class_embed_type="simple_projection", projection_class_embeddings_input_dim=16, class_embeddings_concat=True)
    text_v = CLIPTextModel(CLIPTextConfig(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, max_position_embeddings=77, bos_token_id=512,
                                          eos_token_id=513, pad_token_id=513))
    text_a = ClapTextModelWithProjection(ClapTextConfig(
        vocab_size=261, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=80, type_vocab_size=1, projection_dim=16, pad_token_id=1))
    return dict(video_unet=UNetMotionModel.from_unet2d(unet2d, adapter), audio_unet=audio_unet, vae_v=PoolVideoAE(),
                vae_a=MelAE(), vocoder=GriffinLim(), text_encoder_v=text_v, text_encoder_a=text_a)


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
    """The real base models by hub id or local folder: from the local cache first (no network); downloaded only
    when the hub answers, so that offline the error comes at once, without the hub client's retries."""
    def load(local):
        kw = dict(local_files_only=local)
        d = dict(kw, low_cpu_mem_usage=False)  # diffusers: no "install accelerate" notice
        unet2d = UNet2DConditionModel.from_pretrained(video_base, subfolder="unet", **d)
        adapter = MotionAdapter.from_pretrained(motion_adapter, **d)
        return dict(video_unet=UNetMotionModel.from_unet2d(unet2d, adapter),
                    vae_v=AutoencoderKL.from_pretrained(video_base, subfolder="vae", **d),
                    text_encoder_v=CLIPTextModel.from_pretrained(video_base, subfolder="text_encoder", **kw),
                    tokenizer_v=CLIPTokenizer.from_pretrained(video_base, subfolder="tokenizer", **kw),
                    audio_unet=UNet2DConditionModel.from_pretrained(audio_base, subfolder="unet", **d),
                    vae_a=AutoencoderKL.from_pretrained(audio_base, subfolder="vae", **d),
                    text_encoder_a=ClapTextModelWithProjection.from_pretrained(audio_base, subfolder="text_encoder",
                                                                               **kw),
                    tokenizer_a=RobertaTokenizer.from_pretrained(audio_base, subfolder="tokenizer", **kw),
                    vocoder=SpeechT5HifiGan.from_pretrained(audio_base, subfolder="vocoder", **kw))
    ids = [i for i in (video_base, motion_adapter, audio_base) if not os.path.isdir(i)]
    why = "not in the local cache and the hub is unreachable"
    for local in (True, False):
        if not local and not hub_reachable():
            break
        try:
            with warnings.catch_warnings():  # diffusers passes huggingface_hub a deprecated argument
                warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks")
                return load(local)
        except (OSError, ValueError) as e:  # hub/offline/missing-folder errors are OSError or ValueError subclasses
            why = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}" if not local else why
    raise WeightsNotFound(f"pretrained weights {why}; get them with " + ", ".join(f"`hf download {i}`" for i in ids) +
                          " (or pass local folders: --video-base, --motion-adapter, --audio-base)")


class BaseModels(nn.Module):
    """Frozen base models (requires_grad False, eval mode) and their data <-> latent maps (notes §4)."""

    def __init__(self, size, fps, video_size, tokenizer_v, tokenizer_a, schedulers=None, **modules):
        super().__init__()
        self.size, self.fps, self.video_size, self.sr = size, fps, video_size, SR
        self.tokenizer_v, self.tokenizer_a = tokenizer_v, tokenizer_a
        for name in ("video_unet", "audio_unet", "vae_v", "vae_a", "vocoder", "text_encoder_v", "text_encoder_a"):
            setattr(self, name, modules[name])
        # {beta_t} of Eq. (1) per modality, as alphas_cumprod (1000,): AnimateDiff linear, AudioLDM scaled_linear
        self.prediction_type = {}  # what each U-Net outputs: "epsilon" (the real ones) or "v_prediction" (tiny)
        for m, name in (("v", "animatediff_ddim_scheduler.json"), ("a", "audioldm_ddim_scheduler.json")):
            sched = DDIMScheduler.from_config((schedulers or {}).get(m) or _cfg(name))  # a pipe/'s own, if it has them
            self.register_buffer(f"alphas_cumprod_{m}", sched.alphas_cumprod.clone())
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
    def decode_audio(self, x_a, seconds=SECONDS):
        """x_a (B, 8, rows, 16) -> VAE -> log-mel (B, 1, 4 rows, 64) -> vocoder -> waveform float32 (B, seconds*SR),
        cut after decoding (rows past `seconds`, the released model's padding, are decoded and dropped)."""
        mel = self._decode(self.vae_a, x_a).squeeze(1)  # (B, 4 rows, 64) time-major, as the vocoder wants
        w = next(self.vocoder.parameters(), None)  # HiFi-GAN in its dtype; Griffin-Lim (no weights) in float32
        wave = self.vocoder(mel if w is None else mel.to(w.dtype)).float()  # 4 s: HiFi-GAN 64032 samples, GL 63840
        n = round(seconds * SR)
        return F.pad(wave, (0, max(0, n - wave.shape[-1])))[:, :n]


def load_base_models(size, device="cpu", dtype=torch.float32, fps=8, video_base=BASES["video_base"],
                     motion_adapter=BASES["motion_adapter"], audio_base=BASES["audio_base"], tiny_bases=None):
    """Build the frozen base models. size: "tiny" | "full" | "pretrained" (see module docstring). tiny_bases: a
    safetensors file of trained tiny U-Nets ("video_unet.*", "audio_unet.*"; cli.TINY_BASES is the shipped one),
    or None for random ones."""
    device = torch.device(device)
    if size == "pretrained":
        parts = _pretrained(video_base, motion_adapter, audio_base)
    elif size in ("tiny", "full"):
        with torch.random.fork_rng(), torch.device(device):  # same random weights every call
            torch.manual_seed(0)
            parts = _tiny() if size == "tiny" else _full()
        # "full" reuses the byte-level tokenizers: random text encoders need no real vocabulary
        parts["tokenizer_v"], parts["tokenizer_a"] = byte_tokenizers()
        if size == "tiny" and tiny_bases:
            load_tiny_bases(parts, tiny_bases)
    else:
        raise ValueError(f"size must be 'tiny', 'full' or 'pretrained', not {size!r}")
    return assemble(parts, size, device, dtype, fps, 64 if size == "tiny" else 256)  # paper: 256x256 frames


def load_tiny_bases(parts, path):
    """Trained tiny U-Nets into parts, strictly (every parameter present, none extra, same shapes); one-line errors.
    The file holds parameters only: buffers (the motion modules' sinusoidal tables) keep their built values."""
    try:
        sd = load_file(path)
    except Exception as e:
        raise WeightsNotFound(f"tiny base models {path}: cannot be read ({type(e).__name__})") from None
    for name in ("video_unet", "audio_unet"):
        own = {k[len(name) + 1:]: v.float() for k, v in sd.items() if k.startswith(name + ".")}
        fixed = dict(parts[name].named_buffers())  # the motion modules' sinusoidal tables: built, never trained
        own.update({k: v for k, v in fixed.items() if k not in own})
        try:
            parts[name].load_state_dict(own, strict=True)
        except RuntimeError as e:
            raise WeightsNotFound(f"tiny base models {path}: not this {name} ({str(e).splitlines()[1][:150]})") \
                from None


def assemble(parts, size, device, dtype, fps, video_size, schedulers=None):
    """BaseModels from its parts, on device; weights in dtype except the Griffin-Lim vocoder (torch.stft: fp32)."""
    base = BaseModels(size, fps, video_size, schedulers=schedulers, **parts)
    for m in base.children():
        want = torch.float32 if isinstance(m, GriffinLim) else dtype
        same = all(p.dtype == want for p in m.parameters())  # diffusers warns on every .to(dtype), even a no-op one
        m.to(device) if same else m.to(device, want)
    return base.to(device)
