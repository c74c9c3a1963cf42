"""Timesteps and DDIM algebra: Eq. (2), (5), (6) of Sec. 2.1 and the timestep adjustment of Eq. (8), Sec. 3.2.2.

Conventions (the paper's, mapped onto diffusers):
- A local timestep m (video) or n (audio) lives in {0, 1, ..., T_v} with T_v = T_a = 1000, the base models'
  num_train_timesteps. m = 0 is clean data (alpha_bar = 1); m >= 1 has alpha_bar_m = prod_{i=1..m} (1 - beta_i),
  which diffusers stores as alphas_cumprod[m - 1]. So a U-Net is called with the diffusers index m - 1 (0..999).
- Algorithm 1 walks ONE global grid t = T, T-1, ..., 1 (T = 25 steps) shared by both modalities and steps video from
  m(t) to m(t-1) and audio from n(t) to n(t-1). The last step reaches m(0) = n(0) = 0 and so returns x0_hat itself,
  the paper's "Return x_0" (the official code stops at diffusers' alphas_cumprod[0] = 0.9991 instead).
- With gamma = 1 and T = 25 the grid is m = 1000, 960, ..., 40, 0, i.e. U-Net indices 999, 959, ..., 39: exactly
  diffusers' DDIMScheduler with timestep_spacing="trailing" and set_alpha_to_one=True (tests check this).
- A base U-Net outputs eps (AnimateDiff, AudioLDM: the paper) or v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho,
  2022; our tiny CPU stand-ins, see base_models.py): `to_eps` turns either into eps, exactly, for Eq. (5)-(6).
Left out: stochastic DDIM (eta > 0) and any learned or automatic choice of gamma.
"""
import math

import torch


def local_timesteps(t, T, T_v, T_a, gamma):
    """Global timestep t in {0..T} -> local timesteps (m, n); ints in, ints out; tensors in, long tensors out."""
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    root = math.sqrt(gamma)
    if isinstance(t, torch.Tensor):
        u = t.double() / T
        m = torch.round(T_v * u ** root).long()  # Eq. (8)
        n = torch.round(T_a * u ** (1 / root)).long()  # Eq. (8)
        # a real denoising step for t >= 1 even for extreme gamma (m would round to 0 and call the U-Net at -1)
        return torch.where(t > 0, m.clamp(min=1), m), torch.where(t > 0, n.clamp(min=1), n)
    m = round(T_v * (t / T) ** root)  # Eq. (8)
    n = round(T_a * (t / T) ** (1 / root))  # Eq. (8)
    return (max(m, 1), max(n, 1)) if t > 0 else (m, n)


def alpha_bar_table(alphas_cumprod):
    """(T_v,) diffusers alphas_cumprod (or T_a) -> (T_v + 1,) table indexed by the paper's timestep m (or n):
    [1, alpha_bar_1, ...]."""
    return torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod.detach().double().cpu()])


def _bcast(alpha_bar, x):
    """A float or a per-sample (B,) tensor -> a tensor that broadcasts against x (B, ...)."""
    a = torch.as_tensor(alpha_bar, dtype=torch.float64, device=x.device)
    return a.reshape(-1, *([1] * (x.dim() - 1))) if a.dim() == 1 else a  # (B,) -> (B, 1, ..., 1)


def add_noise(x0, eps, alpha_bar):
    a = _bcast(alpha_bar, x0)
    return (a.sqrt() * x0.double() + (1 - a).sqrt() * eps.double()).to(x0.dtype)  # Eq. (2)


def predict_x0(x_t, eps, alpha_bar):
    a = _bcast(alpha_bar, x_t)
    return ((x_t.double() - (1 - a).sqrt() * eps.double()) / a.sqrt()).to(x_t.dtype)  # Eq. (6)


def ddim_step(x_t, eps, alpha_bar_t, alpha_bar_prev):
    """Deterministic DDIM (eta = 0) from noise level alpha_bar_t to alpha_bar_prev; returns (x_prev, x0_hat)."""
    x0_hat = predict_x0(x_t, eps, alpha_bar_t)  # Eq. (6)
    a = _bcast(alpha_bar_prev, x_t)
    x_prev = a.sqrt() * x0_hat.double() + (1 - a).sqrt() * eps.double()  # Eq. (5)
    return x_prev.to(x_t.dtype), x0_hat


def target(x0, eps, alpha_bar, prediction_type):
    """What a U-Net of this prediction_type regresses on: eps (Eq. 10 as printed) or v (App. of Salimans & Ho)."""
    if prediction_type == "epsilon":
        return eps
    a = _bcast(alpha_bar, x0)
    return (a.sqrt() * eps.double() - (1 - a).sqrt() * x0.double()).to(x0.dtype)  # v


def to_eps(out, x_t, alpha_bar, prediction_type):
    """A U-Net's output -> its noise prediction eps_hat; exact for v since x_t = sqrt(a) x0 + sqrt(1 - a) eps."""
    if prediction_type == "epsilon":
        return out
    a = _bcast(alpha_bar, x_t)
    return (a.sqrt() * out.double() + (1 - a).sqrt() * x_t.double()).to(out.dtype)
