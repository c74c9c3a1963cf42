"""A base model with another noise schedule, without retraining: the controlled mismatch of scripts/gamma_mismatch.py,
which tests the premise of Eq. (8) (Sec. 3.2.2) by making one modality clean at another pace on purpose.

A diffusion model sees its noisy latent only through the signal-to-noise ratio SNR(k) = alpha_bar_k / (1 - alpha_bar_k)
of its timestep (Kingma et al., 2021, "Variational Diffusion Models"), and scaling the latents by c multiplies the SNR
by c^2. `retime(unet, alphas_cumprod, s)` turns a frozen U-Net into the model of the schedule whose SNR is s times
its own at every timestep: alpha_bar'_k with log SNR'(k) = log SNR(k) + ln s, and the U-Net called at the
(continuous) index tau(k) where its own schedule has that SNR. s > 1: cleaner at every timestep than before (its
Fig. 2 curve falls earlier); s < 1: noisier. s = 16 is what latents scaled by 4 give. Where tau would leave the
U-Net's trained range [0, T - 1] it is clamped, and alpha_bar' there is the clamped level's, so that schedule and
network always agree.
Not in the paper: an experimental control. A network really trained on the new schedule would also differ by its
training (its noise draws, and how often each noise level is drawn); this one differs only by the relabelled timestep.
"""
import numpy as np
import torch
import torch.nn as nn


def log_snr(alphas_cumprod):
    a = np.asarray(alphas_cumprod, dtype=np.float64)
    return np.log(a) - np.log1p(-a)


def retimed_schedule(alphas_cumprod, s):
    """(T,) alphas_cumprod of a U-Net, scale s > 0 -> (tau (T,) float64: the U-Net's own index for each new index,
    new alphas_cumprod (T,) float64)."""
    if not s > 0:
        raise ValueError(f"the SNR scale must be > 0, got {s}")
    own = log_snr(alphas_cumprod)  # decreasing in the index
    index = np.arange(len(own), dtype=np.float64)
    tau = np.interp(-(own + np.log(s)), -own, index)  # np.interp wants increasing x: -log SNR; clamps at the ends
    snr = np.interp(tau, index, own)  # the level the U-Net is really called at (differs only where clamped)
    return tau, 1 / (1 + np.exp(-snr))  # alpha_bar = sigmoid(log SNR)


class RetimedProj(nn.Module):
    """A U-Net's time_proj (sinusoidal timestep features) called at tau(t) instead of t: linear interpolation of tau
    between integer indices, so any float index works. tau is a plain float64 attribute, not a buffer: a dtype cast
    of the U-Net (fp16 / bf16) must not round the timesteps."""

    def __init__(self, proj, tau):
        super().__init__()
        self.proj = proj
        self.tau = torch.as_tensor(tau, dtype=torch.float64)

    def forward(self, t):
        tau = self.tau.to(t.device)
        i = t.double().clamp(0, len(tau) - 1)
        lo = i.floor().long().clamp(max=len(tau) - 2)
        return self.proj(torch.lerp(tau[lo], tau[lo + 1], i - lo).float())


def retime(unet, alphas_cumprod, s):
    """In place: unet.time_proj -> RetimedProj and alphas_cumprod (the BaseModels buffer) -> the new schedule."""
    if s == 1:
        return
    tau, new = retimed_schedule(alphas_cumprod.cpu(), s)
    unet.time_proj = RetimedProj(unet.time_proj, tau)
    alphas_cumprod.copy_(torch.from_numpy(new))
