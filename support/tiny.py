"""The tiny stand-ins of the frozen base models (base_models.py, size "tiny"; not in the paper): the real classes and
block layouts at narrow widths, byte-level tokenizers, FIXED autoencoders and a Griffin-Lim vocoder, for a CPU demo.
Its U-Nets predict v, not eps: Eq. (6) divides eps's error (~0.01 at t = 1000) by sqrt(alpha_bar) = 0.012."""
import math

import librosa
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import (ClapTextConfig, ClapTextModelWithProjection, CLIPTextConfig, CLIPTextModel, CLIPTokenizer,
                          RobertaTokenizer)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from data import HOP, N_FFT, N_MELS, SR


def byte_tokenizers(max_length=77):
    """Byte-level BPE, no merges: CLIP 514 ids (bytes, bytes</w>, bos, eos), RoBERTa 261 (4 specials, bytes, mask)."""
    b = list(bytes_to_unicode().values())
    clip = {s: i for i, s in enumerate(b + [s + "</w>" for s in b] + ["<|startoftext|>", "<|endoftext|>"])}
    clap = {s: i for i, s in enumerate(["<s>", "<pad>", "</s>", "<unk>"] + b + ["<mask>"])}
    return (CLIPTokenizer(vocab=clip, merges=[], model_max_length=max_length),
            RobertaTokenizer(vocab=clap, merges=[], model_max_length=max_length))


class PoolVideoAE(nn.Module):
    """Fixed video 'VAE', exact on frames constant over 8x8 blocks: pooled RGB -> 4 channels by SCALE * A, A^T A = I."""
    factor, SCALE, STD = 8, 2.0, 0.01  # SCALE: as SD's scaling_factor, for unit-scale latents
    A = torch.tensor([[1., 1, 1], [1, -1, 1], [1, 1, -1], [1, -1, -1]]) / 2  # (4, 3): Hadamard columns

    def encode(self, x):  # (N, 3, H, W) in [-1, 1] -> mean, std (N, 4, H/8, W/8)
        z = self.SCALE * torch.einsum("oc,nchw->nohw", self.A.to(x), F.avg_pool2d(x, self.factor))
        return z, torch.full_like(z, self.STD)

    def decode(self, z):  # (N, 4, h, w) -> (N, 3, 8h, 8w)
        x = torch.einsum("oc,nohw->nchw", self.A.to(z), z / self.SCALE)  # A^T: least-squares inverse
        return F.interpolate(x, scale_factor=self.factor)


class MelAE(nn.Module):
    """Fixed audio 'VAE', exact on mels constant over time pairs: their mean, 2 x 4 space-to-depth, (x - MU) / SIGMA."""
    MU, SIGMA, STD = -8.0, 3.5, 0.01  # log-mel spans [-11.5 (the 1e-5 floor), ~2]: latents of roughly unit scale

    def encode(self, mel):
        n, _, T, M = mel.shape
        x = F.avg_pool2d(mel, (2, 1))  # (N, 1, T/2, M)
        z = x.reshape(n, 1, T // 4, 2, M // 4, 4).permute(0, 1, 3, 5, 2, 4).reshape(n, 8, T // 4, M // 4)
        return (z - self.MU) / self.SIGMA, torch.full_like(z, self.STD)

    def decode(self, z):  # (N, 8, T', M') -> (N, 1, 4T', 4M')
        n, _, T, M = z.shape
        x = (z * self.SIGMA + self.MU).reshape(n, 1, 2, 4, T, M).permute(0, 1, 4, 2, 5, 3).reshape(n, 1, 2 * T, 4 * M)
        return x.repeat_interleave(2, dim=2)


class GriffinLim(nn.Module):
    """Vocoder: log-mel (B, T, 64) -> waveform (B, (T-1)*160) by mel pseudo-inverse and fast Griffin-Lim (librosa's)."""

    def __init__(self, n_iter=32, momentum=0.99):
        super().__init__()
        self.n_iter, self.momentum = n_iter, momentum
        fb = librosa.filters.mel(sr=SR, n_fft=N_FFT, n_mels=N_MELS, fmin=0, fmax=SR / 2)  # (64, 513)
        self.register_buffer("mel_pinv", torch.linalg.pinv(torch.tensor(fb, dtype=torch.float32)))  # (513, 64)
        self.register_buffer("window", torch.hann_window(N_FFT))

    def forward(self, mel):
        mel = mel.float().clamp(max=math.log(N_FFT / 2)).exp()  # |STFT| of a [-1, 1] signal <= n_fft / 2: finite
        mag = (self.mel_pinv @ mel.transpose(1, 2)).clamp(min=0)  # (B, 513, T) linear magnitude
        n = (mel.shape[1] - 1) * HOP  # center=True STFT of n samples has exactly T frames
        stft = lambda w: torch.stft(w, N_FFT, HOP, window=self.window, return_complex=True)
        istft = lambda s: torch.istft(s, N_FFT, HOP, window=self.window, length=n)
        phase = torch.rand(mag.shape[1:], generator=torch.Generator().manual_seed(0))  # (513, T): the same every call
        angles = torch.exp(2j * torch.pi * phase).to(mag.device).expand_as(mag)  # (B, 513, T): the same whatever B
        prev = torch.zeros_like(angles)
        for _ in range(self.n_iter):
            rebuilt = stft(istft(mag * angles))
            angles = rebuilt - self.momentum / (1 + self.momentum) * prev
            angles, prev = angles / (angles.abs() + 1e-16), rebuilt
        return istft(mag * angles).clamp(-1, 1)  # HiFi-GAN's output is tanh-bounded too


def tiny_parts():
    """The real models' classes and block layouts, 1 layer per block (real: 2), 32/64 channels (real: 320-1280)."""
    ch = (32, 32, 64, 64)
    unet = dict(block_out_channels=ch, layers_per_block=1, attention_head_dim=2, norm_num_groups=8)
    unet2d = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, cross_attention_dim=32, **unet,
                                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    adapter = MotionAdapter(block_out_channels=ch, motion_layers_per_block=1, motion_norm_num_groups=8,
                            motion_num_attention_heads=2, motion_max_seq_length=32, use_motion_mid_block=True)
    audio_unet = UNet2DConditionModel(sample_size=(100, 16), in_channels=8, out_channels=8, cross_attention_dim=ch,
                                      down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
                                      up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",),
                                      class_embed_type="simple_projection", projection_class_embeddings_input_dim=16,
                                      class_embeddings_concat=True, **unet)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    text_v = CLIPTextModel(CLIPTextConfig(vocab_size=514, max_position_embeddings=77, bos_token_id=512,
                                          eos_token_id=513, pad_token_id=513, **text))
    text_a = ClapTextModelWithProjection(ClapTextConfig(vocab_size=261, max_position_embeddings=80, type_vocab_size=1,
                                                        projection_dim=16, pad_token_id=1, **text))
    return dict(video_unet=UNetMotionModel.from_unet2d(unet2d, adapter), audio_unet=audio_unet, vae_v=PoolVideoAE(),
                vae_a=MelAE(), vocoder=GriffinLim(), text_encoder_v=text_v, text_encoder_a=text_a)


def load_tiny_bases(parts, path):
    """Trained tiny U-Nets into parts, strictly; the file holds parameters only (buffers keep their built values)."""
    try:
        sd = load_file(path)
        for name in ("video_unet", "audio_unet"):
            own = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")}
            parts[name].load_state_dict({**dict(parts[name].named_buffers()), **own}, strict=True)
    except (OSError, SafetensorError, RuntimeError) as e:
        raise OSError(f"tiny base models {path}: {' '.join(str(e).split())}") from None
