"""The tiny stand-ins of the frozen base models (base_models.py, size "tiny"): the same diffusers/transformers classes
and block layouts as AnimateDiff and AudioLDM at narrow widths, byte-level tokenizers that need no hub, FIXED simple
autoencoders (pooling + a fixed linear map) and a Griffin-Lim vocoder, so that a CPU demo learns in minutes. The tiny
U-Nets predict v, not eps: a tiny eps model's eps MSE at t = 1000 is ~0.01, and Eq. (6) divides the error by
sqrt(alpha_bar) = 0.012 (audio) in x0_hat. Not in the paper: an engineering stand-in.
"""
import json
import math
import os
import tempfile
from pathlib import Path

import librosa
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
from safetensors.torch import load_file
from transformers import (ClapTextConfig, ClapTextModelWithProjection, CLIPTextConfig, CLIPTextModel, CLIPTokenizer,
                          RobertaTokenizer)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from data import HOP, N_FFT, N_MELS, SR


def byte_tokenizers(max_length=77):
    """(CLIP, RoBERTa/CLAP) byte-level BPE tokenizers with no merges, written to a temp dir: no hub needed.
    CLIP: 256 bytes + 256 bytes</w> + bos/eos = 514 ids; RoBERTa: <s>,<pad>,</s>,<unk> + 256 bytes + <mask> = 261 ids.
    Built with from_pretrained(dir): transformers 5 silently ignores CLIPTokenizer(vocab_file=...), so the vocabulary
    would stay empty."""
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


def tiny_parts(motion_heads=2, motion_layers=1):
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


def load_tiny_bases(parts, path):
    """Trained tiny U-Nets into parts, strictly (every parameter present, none extra, same shapes); one-line errors.
    The file holds parameters only: buffers (the motion modules' sinusoidal tables) keep their built values."""
    try:
        sd = load_file(path)
    except Exception as e:
        raise OSError(f"tiny base models {path}: cannot be read ({type(e).__name__})") from None
    for name in ("video_unet", "audio_unet"):
        own = {k[len(name) + 1:]: v.float() for k, v in sd.items() if k.startswith(name + ".")}
        fixed = dict(parts[name].named_buffers())  # the motion modules' sinusoidal tables: built, never trained
        own.update({k: v for k, v in fixed.items() if k not in own})
        try:
            parts[name].load_state_dict(own, strict=True)
        except RuntimeError as e:
            raise OSError(f"tiny base models {path}: not this {name} ({str(e).splitlines()[1][:150]})") \
                from None
