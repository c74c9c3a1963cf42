"""Eq. (2), (5), (6), (8) against closed forms and against diffusers' own DDIMScheduler (the outside ground truth)."""
import json
import math
import pathlib

import pytest
import torch
from diffusers import DDIMScheduler

from timesteps import add_noise, alpha_bar_table, ddim_step, local_timesteps, predict_x0, target, to_eps

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"
SCHEDULERS = ["animatediff_ddim_scheduler.json", "audioldm_ddim_scheduler.json"]  # linear / scaled_linear


def scheduler(name, **overrides):
    cfg = {k: v for k, v in json.loads((CONFIGS / name).read_text()).items() if not k.startswith("_")}
    return DDIMScheduler.from_config({**cfg, **overrides})


def test_gamma_one_is_unadjusted():
    for t in range(26):
        m, n = local_timesteps(t, 25, 1000, 1000, 1.0)
        assert m == n == round(1000 * t / 25)
    assert local_timesteps(7, 50, 1000, 500, 1.0) == (140, 70)  # different T_v, T_a


@pytest.mark.parametrize("gamma", [0.5, 1.5, 2.0, 3.0])
def test_endpoints_monotonic_and_power_law(gamma):
    T, T_v, T_a = 25, 1000, 1000
    ms, ns = zip(*(local_timesteps(t, T, T_v, T_a, gamma) for t in range(T + 1)))
    assert (ms[0], ns[0], ms[-1], ns[-1]) == (0, 0, T_v, T_a)
    assert all(a < b for a, b in zip(ms, ms[1:])) and all(a < b for a, b in zip(ns, ns[1:]))
    for t in range(1, T + 1):  # m/T_v = (n/T_a)^gamma, up to the two roundings
        u = t / T
        assert abs(ms[t] / T_v - u ** math.sqrt(gamma)) <= 0.5 / T_v
        assert abs(ns[t] / T_a - u ** (1 / math.sqrt(gamma))) <= 0.5 / T_a
        lo, hi = (ns[t] - 0.5) / T_a, (ns[t] + 0.5) / T_a
        assert (max(lo, 0) ** gamma) - 0.5 / T_v <= ms[t] / T_v <= hi ** gamma + 0.5 / T_v
    if gamma > 1:  # video is told it is cleaner than audio at every intermediate step
        assert all(m < n for m, n in zip(ms[1:-1], ns[1:-1]))


def test_paper_grid_gamma_1_5():
    """Independent evaluation of Eq. (8) for the paper's default gamma."""
    m, n = local_timesteps(24, 25, 1000, 1000, 1.5)
    assert m == round(1000 * 0.96 ** math.sqrt(1.5)) == 951 and n == round(1000 * 0.96 ** (1 / math.sqrt(1.5))) == 967


def test_tensors_and_ints_agree():
    t = torch.arange(0, 26)
    for gamma in (1.0, 1.5, 2.0, 10.0):
        m, n = local_timesteps(t, 25, 1000, 1000, gamma)
        ints = [local_timesteps(int(i), 25, 1000, 1000, gamma) for i in t]
        assert m.tolist() == [a for a, _ in ints] and n.tolist() == [b for _, b in ints]
        assert m.dtype == torch.long and (m[1:] >= 1).all()  # extreme gamma still steps at every t >= 1


def test_bad_gamma():
    with pytest.raises(ValueError):
        local_timesteps(3, 25, 1000, 1000, 0.0)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_add_noise_matches_diffusers(name):
    s = scheduler(name)
    x0, eps = torch.randn(3, 4, 5, 6), torch.randn(3, 4, 5, 6)
    idx = torch.tensor([0, 420, 999])  # diffusers index = paper timestep - 1
    ours = add_noise(x0, eps, alpha_bar_table(s.alphas_cumprod)[idx + 1])  # per-sample alpha_bar
    assert torch.allclose(ours, s.add_noise(x0, eps, idx), atol=1e-6)
    assert torch.equal(add_noise(x0, eps, 1.0), x0)  # alpha_bar = 1 is clean data


@pytest.mark.parametrize("name", SCHEDULERS)
def test_ddim_matches_diffusers_on_even_grid(name):
    """Alg. 1 with gamma = 1 walks diffusers' 'trailing' grid; every step equals DDIMScheduler.step (eta = 0)."""
    s = scheduler(name, timestep_spacing="trailing", set_alpha_to_one=True)
    s.set_timesteps(25)
    table = alpha_bar_table(s.alphas_cumprod)
    g = torch.Generator().manual_seed(0)
    x_ours = x_ref = torch.randn(2, 4, 3, 5, generator=g)
    for t in range(25, 0, -1):
        m, m_prev = local_timesteps(t, 25, 1000, 1000, 1.0)[0], local_timesteps(t - 1, 25, 1000, 1000, 1.0)[0]
        assert s.timesteps[25 - t].item() == m - 1  # the U-Net index of our grid is diffusers' grid
        eps = torch.randn(x_ref.shape, generator=g)
        ref = s.step(eps, m - 1, x_ref)
        x_ours, x0_hat = ddim_step(x_ours, eps, table[m], table[m_prev])
        x_ref = ref.prev_sample
        assert torch.allclose(x_ours, x_ref, rtol=1e-5, atol=1e-5)
        assert torch.allclose(x0_hat, ref.pred_original_sample, rtol=1e-5, atol=1e-4)
    assert torch.allclose(x_ours, x0_hat)  # m(0) = 0: the last step returns x0_hat


def test_predict_x0_inverts_add_noise():
    x0, eps, a = torch.randn(5, 3), torch.randn(5, 3), torch.rand(5) * 0.98 + 0.01
    assert torch.allclose(predict_x0(add_noise(x0, eps, a), eps, a), x0, atol=1e-5)
    x_prev, _ = ddim_step(add_noise(x0, eps, a), eps, a, 0.5)  # with the true eps DDIM lands on Eq. (2) at 0.5
    assert torch.allclose(x_prev, add_noise(x0, eps, 0.5), atol=1e-5)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_v_prediction_matches_diffusers(name):
    """v-prediction U-Nets (our tiny ones): target() is diffusers' get_velocity, and to_eps() + Eq. (5) is exactly
    DDIMScheduler.step(prediction_type="v_prediction"); for eps U-Nets both are the identity."""
    s = scheduler(name, timestep_spacing="trailing", set_alpha_to_one=True, prediction_type="v_prediction")
    s.set_timesteps(25)
    table = alpha_bar_table(s.alphas_cumprod)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 4, 6, generator=g), torch.randn(3, 4, 6, generator=g)
    m = torch.tensor([1, 500, 1000])  # local timesteps, one per sample
    assert torch.allclose(target(x0, eps, table[m], "v_prediction"), s.get_velocity(x0, eps, m - 1), atol=1e-5)
    assert target(x0, eps, table[m], "epsilon") is eps and to_eps(x0, eps, 0.3, "epsilon") is x0
    x_t = add_noise(x0, eps, table[m])
    v = target(x0, eps, table[m], "v_prediction")
    assert torch.allclose(to_eps(v, x_t, table[m], "v_prediction"), eps, atol=1e-5)
    x = torch.randn(2, 4, 3, 5, generator=g)
    for t in range(25, 0, -1):  # gamma = 1: m(t) = 40 t
        m, m_prev = 40 * t, 40 * (t - 1)
        v = torch.randn(x.shape, generator=g)
        ref = s.step(v, m - 1, x)
        x, x0_hat = ddim_step(x, to_eps(v, x, table[m], "v_prediction"), table[m], table[m_prev])
        assert torch.allclose(x0_hat, ref.pred_original_sample, rtol=1e-5, atol=1e-4)
        assert torch.allclose(x, ref.prev_sample, rtol=1e-5, atol=1e-4)
