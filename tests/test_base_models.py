"""base_models.py: the tiny fixed autoencoders (closed form), the Griffin-Lim vocoder (against librosa), text encoders,
noise schedules (against the notes' table), full-size data <-> latent shapes on meta, the offline error and the
strict load of the shipped tiny base models."""
import re

import librosa
import numpy as np
import pytest
import torch

from base_models import load_base_models
from test_model import full_meta

SR = 16000


@pytest.fixture(scope="module")
def tiny():
    return load_base_models("tiny")


def test_tiny_video_autoencoder_roundtrip(tiny):
    # frames constant over 8x8 blocks survive avg-pool -> A -> A^T -> nearest upsampling exactly (A^T A = I)
    u8 = torch.randint(0, 256, (2, 3, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    u8 = u8.repeat_interleave(8, -1).repeat_interleave(8, -2)  # (B, 3, F, 64, 64)
    mean, std = tiny.encode_video(u8 / 127.5 - 1)
    assert mean.shape == std.shape == (2, 4, 4, 8, 8) and (std < 0.05).all()
    assert torch.equal(tiny.decode_video(mean), u8.permute(0, 2, 3, 4, 1).to(torch.uint8))  # (B, F, H, W, 3)
    # any frame decodes to its 8x8 block means (the least-squares reconstruction)
    x = torch.rand(1, 3, 2, 64, 64) * 2 - 1
    rec = tiny.vae_v.decode(tiny.encode_video(x)[0][:, :, 0])
    blocks = x[:, :, 0].unfold(2, 8, 8).unfold(3, 8, 8).mean((-1, -2))  # (1, 3, 8, 8)
    assert torch.allclose(rec, blocks.repeat_interleave(8, 2).repeat_interleave(8, 3), atol=1e-5)


def test_tiny_audio_autoencoder_roundtrip(tiny):
    mel = (torch.randn(2, 1, 200, 64) * 3 - 8).repeat_interleave(2, dim=2)  # constant over time pairs: (B, 1, 400, 64)
    mean, std = tiny.encode_audio(mel)
    assert mean.shape == std.shape == (2, 8, 100, 16) and (std < 0.05).all()
    assert 0.5 < mean.std() < 2 and mean.mean().abs() < 0.5  # roughly unit scale
    assert torch.allclose(tiny.vae_a.decode(mean), mel, atol=1e-5)
    # latent channel (i*4 + j) at (t, f) holds mel bin 4f + j of time pair p = 2t + i (mel frames 2p, 2p + 1)
    z = mean[0, 1 * 4 + 3, 5, 7] * tiny.vae_a.SIGMA + tiny.vae_a.MU
    assert torch.allclose(z, mel[0, 0, 2 * (2 * 5 + 1), 4 * 7 + 3], atol=1e-5)


def test_decode_audio_griffin_lim_recovers_a_sine(tiny):
    y = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(4 * SR) / SR)
    mel = librosa.feature.melspectrogram(y=y, sr=SR, n_fft=1024, hop_length=160, n_mels=64, fmin=0, fmax=8000,
                                         power=1.0)  # AudioLDM's mel (slaney, magnitude), center=True: 401 frames
    logmel = torch.tensor(np.log(np.maximum(mel, 1e-5)).T[:400], dtype=torch.float32)[None, None]
    wave = tiny.decode_audio(tiny.encode_audio(logmel)[0])
    assert wave.shape == (1, 64000) and wave.dtype == torch.float32
    spec = np.abs(np.fft.rfft(wave[0].numpy()))
    assert abs(np.fft.rfftfreq(64000, 1 / SR)[spec.argmax()] - 1000) < 30  # the pitch survives mel -> GL
    assert 0.5 < wave.std() / y.std() < 1.5  # and so does the loudness
    silence = tiny.decode_audio(tiny.encode_audio(torch.full((2, 1, 400, 64), np.log(1e-5)))[0])
    assert silence.shape == (2, 64000) and silence.abs().max() < 1e-2


def test_encode_text(tiny):
    text_v, text_a = tiny.encode_text(["a cat hits a glass bowl", "a dog", ""])
    assert text_v.shape == (3, 77, tiny.text_encoder_v.config.hidden_size)
    assert text_a.shape == (3, tiny.text_encoder_a.config.projection_dim)
    assert torch.allclose(text_a.norm(dim=-1), torch.ones(3), atol=1e-5)
    # the offline tokenizers really tokenize (transformers 5 pitfall: a 3-token vocab maps every word to one id)
    assert not torch.allclose(text_v[0], text_v[1]) and not torch.allclose(text_a[0], text_a[1])
    long = ["a cat hits a glass bowl with a wooden spoon, twice"]  # 51 byte tokens
    (v1, a1), (v2, a2) = tiny.encode_text(long), tiny.encode_text(long, official_negative=True)
    assert torch.equal(v1, v2) and not torch.allclose(a1, a2)  # only the CLAP tokens end at the projection width (16)


def test_frozen_and_schedules(tiny):
    assert not any(p.requires_grad for p in tiny.parameters()) and not tiny.training
    # alphas_cumprod at t = 0, 100, 250, 500, 750, 999
    t = [0, 100, 250, 500, 750, 999]
    v = torch.tensor([.9991, .8673, .5688, .1608, .0225, .0016])
    a = torch.tensor([.9985, .8231, .5084, .1149, .0083, .0001])
    assert tiny.alphas_cumprod_v.shape == tiny.alphas_cumprod_a.shape == (1000,)
    assert torch.allclose(tiny.alphas_cumprod_v[t], v, atol=1e-4)
    assert torch.allclose(tiny.alphas_cumprod_a[t], a, atol=1e-4)


def test_full_size_data_latent_shapes_on_meta():
    full = full_meta()[1]
    assert full.vae_v.config.scaling_factor == 0.18215 and abs(full.vae_a.config.scaling_factor - 0.9393) < 1e-4
    meta = lambda *s: torch.empty(*s, device="meta")
    assert full.encode_video(meta(1, 3, 2, 256, 256))[0].shape == (1, 4, 2, 32, 32)
    assert full.decode_video(meta(1, 4, 2, 32, 32)).shape == (1, 2, 256, 256, 3)
    assert full.encode_audio(meta(1, 1, 400, 64))[0].shape == (1, 8, 100, 16)
    assert full.decode_audio(meta(1, 8, 100, 16)).shape == (1, 64000)  # HiFi-GAN's 64032 samples cropped


def test_pretrained_offline_error_names_the_model(tmp_path):
    """HF_HUB_OFFLINE=1 (conftest) and no such folder: huggingface_hub's own OSError, naming what is missing."""
    with pytest.raises(OSError, match=re.escape(str(tmp_path / "sd15"))):
        load_base_models("pretrained", video_base=str(tmp_path / "sd15"), motion_adapter=str(tmp_path / "adapter"),
                         audio_base=str(tmp_path / "audioldm"))
    with pytest.raises(ValueError):
        load_base_models("huge")


def test_shipped_tiny_base_models_load_strictly(tiny, tmp_path):
    from support import cli
    from safetensors.torch import load_file, save_file
    random, shipped = tiny, load_base_models("tiny", tiny_bases=cli.TINY_BASES)
    sd = load_file(cli.TINY_BASES)
    assert {k.split(".")[0] for k in sd} == {"video_unet", "audio_unet"}
    for name in ("video_unet", "audio_unet"):  # every tensor of both U-Nets comes from the file
        own = getattr(shipped, name).state_dict()
        assert all(torch.equal(own[k[len(name) + 1:]], v.float()) for k, v in sd.items() if k.startswith(name))
        assert not torch.equal(getattr(random, name).conv_in.weight, own["conv_in.weight"])
    del sd["audio_unet.conv_out.bias"]
    save_file(sd, tmp_path / "bad.safetensors")
    with pytest.raises(OSError, match='Missing key.*"conv_out.bias"') as e:  # load_state_dict's message, one line
        load_base_models("tiny", tiny_bases=tmp_path / "bad.safetensors")
    assert "\n" not in str(e.value) and "UNet2DConditionModel" in str(e.value)
