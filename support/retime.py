"""A base model on another noise schedule, no retraining, to test Eq. (8)'s premise (Sec. 3.2.2; not in the paper): a
model sees its latent only through SNR = alpha_bar / (1 - alpha_bar), so s times it is the U-Net at that SNR's index."""
import numpy as np
import torch
import torch.nn as nn


def retimed_schedule(alphas_cumprod, s):
    """(T,) alphas_cumprod, scale s > 0 -> (tau (T,): the U-Net's own index per new index, new alphas_cumprod (T,))."""
    if not s > 0:
        raise ValueError(f"the SNR scale must be > 0, got {s}")
    a = np.asarray(alphas_cumprod, dtype=np.float64)
    own = np.log(a) - np.log1p(-a)  # log SNR, decreasing in the index
    index = np.arange(len(own), dtype=np.float64)
    tau = np.interp(-(own + np.log(s)), -own, index)  # np.interp wants increasing x: -log SNR; clamps at the ends
    return tau, 1 / (1 + np.exp(-np.interp(tau, index, own)))  # sigmoid(log SNR) where the U-Net is called: they agree


class RetimedProj(nn.Module):
    """time_proj at tau(t), linear between integer indices; tau float64, not a buffer: dtype casts must not round it."""

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
    """In place, for s != 1: unet.time_proj -> RetimedProj, alphas_cumprod (a BaseModels buffer) -> the new schedule."""
    if s != 1:
        tau, new = retimed_schedule(alphas_cumprod.cpu(), s)
        unet.time_proj = RetimedProj(unet.time_proj, tau)
        alphas_cumprod.copy_(torch.from_numpy(new))
