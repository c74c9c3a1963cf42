"""model.py: the joint forward against diffusers' own U-Net forwards, freezing (App. A.2), the cross-modal
path, gradient checkpointing, the loss of Eq. (9)-(10) in closed form, and full-size parameter counts / shapes on the
meta device."""
import copy
import functools
import json
import pathlib
import types

import pytest
import torch
from diffusers import DDIMScheduler

import train
from model import build_model
from timesteps import alpha_bar_table, target

OFFICIAL_ADDED = 467_744_079  # the released unet_svg (tests/data/official/manifest_full.json); paper: "about 468M"


@functools.cache
def full_meta(conditioner="cmcpe"):
    """The full-size model on the meta device, built once per conditioner (test_official, test_base_models use it)."""
    return build_model("full", conditioner, device="meta")


def inputs(base, frames=32, seed=0):
    """Tiny-size inputs with DIFFERENT per-sample timesteps for the two modalities (diffusers indices)."""
    g = torch.Generator().manual_seed(seed)
    x_v, x_a = torch.randn(2, 4, frames, 8, 8, generator=g), torch.randn(2, 8, 100, 16, generator=g)
    text_v, text_a = base.encode_text(["a red ball hit with a stick", "a wooden box"])
    return x_v, x_a, torch.tensor([17, 923]), torch.tensor([601, 4]), text_v, text_a


def perturb(model, seed=0):
    """Give every zero-initialised tensor of the added modules (output projections) small random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.added_modules():
            for p in module.parameters():
                if not p.any():
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module", params=["cmcpe", "crossattn"])
def joint(request):
    return build_model("tiny", request.param)


def test_zero_init_parity_with_diffusers(joint):
    model, base = joint
    x_v, x_a, t_v, t_a, text_v, text_a = inputs(base)
    with torch.no_grad():
        eps_v, eps_a = model(x_v, x_a, t_v, t_a, text_v, text_a, x0_v=x_v.flip(0), x0_a=x_a.flip(0))
        ref_v = model.video_unet(x_v, t_v, encoder_hidden_states=text_v.repeat_interleave(32, 0)).sample
        ref_a = model.audio_unet(x_a, t_a, encoder_hidden_states=None, class_labels=text_a).sample
        swapped_v, _ = model(x_v, x_a, t_v.flip(0), t_a, text_v, text_a)
        scalar_v, scalar_a = model(x_v, x_a, 17, 601, text_v, text_a)  # a scalar t is broadcast over the batch
        full_v, full_a = model(x_v, x_a, torch.tensor([17, 17]), torch.tensor([601, 601]), text_v, text_a)
    assert torch.equal(eps_v, ref_v) and torch.equal(eps_a, ref_a)
    assert not torch.allclose(swapped_v, ref_v)  # per-sample timesteps really reach the U-Net
    assert torch.equal(scalar_v, full_v) and torch.equal(scalar_a, full_a)


def test_only_added_and_motion_modules_get_grads(joint):
    model, base = joint
    model.zero_grad(set_to_none=True)
    eps_v, eps_a = model(*inputs(base, frames=8))
    (eps_v.square().mean() + eps_a.square().mean()).backward()
    added = {id(p) for module in model.added_modules() for p in module.parameters()}
    trainable = {name for name, _ in model.trainable_parameters()}
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    expected = {name for name, p in model.named_parameters() if id(p) in added or "motion_modules" in name}
    assert trainable == expected and with_grad == expected  # the audio U-Net has no motion modules: no grads at all
    assert not any(p.requires_grad for p in base.vae_v.parameters()) and not base.text_encoder_v.training
    grads = dict(model.named_parameters())
    assert any(grads[name].grad.abs().sum() > 0 for name in expected if "motion_modules" in name)
    assert all(grads[name].grad.abs().sum() > 0 for name in expected if name.endswith("proj_out.weight"))


def test_cross_modal_path(joint):
    model, base = copy.deepcopy(joint)  # perturbed below
    x_v, x_a, t_v, t_a, text_v, text_a = inputs(base, frames=8)
    other_v, other_a = x_v + torch.randn_like(x_v), x_a + torch.randn_like(x_a)
    run = lambda xv, xa: model(xv, xa, t_v, t_a, text_v, text_a)
    with torch.no_grad():
        (v0, a0), (v1, _), (_, a1) = run(x_v, x_a), run(x_v, other_a), run(other_v, x_a)
        assert torch.equal(v0, v1) and torch.equal(a0, a1)  # identity at init: no cross-modal influence yet
        perturb(model)
        (v0, a0), (v1, _), (_, a1) = run(x_v, x_a), run(x_v, other_a), run(other_v, x_a)
    assert (v0 - v1).abs().max() > 1e-4  # eps_v now depends on the audio latent
    assert (a0 - a1).abs().max() > 1e-4  # and eps_a on the video latent


def test_gradient_checkpointing_gives_same_grads():
    model, base = build_model("tiny")
    perturb(model)
    grads = []
    for ckpt in (False, True):
        if ckpt:
            model.enable_gradient_checkpointing()
        model.zero_grad(set_to_none=True)
        eps_v, eps_a = model(*inputs(base, frames=8))
        (eps_v.square().mean() + eps_a.square().mean()).backward()
        grads.append(torch.cat([p.grad.flatten() for _, p in model.trainable_parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


class KnowsTheNoise:
    """Called like JointModel inside train.joint_loss: told the clean latents, it recovers the noise eps of Eq. (2)
    from the noisy latents and returns the exact regression target of Eq. (10) (exact=True) or zeros; it records
    the targets of its last call and counts its calls."""
    audio_rows_multiple = 1

    def __init__(self, x0_v, x0_a, bases, exact):
        self.x0 = {"v": x0_v, "a": x0_a}
        self.tables = {"v": alpha_bar_table(bases.alphas_cumprod_v), "a": alpha_bar_table(bases.alphas_cumprod_a)}
        self.kinds = bases.prediction_type
        self.exact = exact
        self.calls = 0

    def target(self, s, x_t, t):  # t: diffusers index, the paper's timestep - 1
        a = self.tables[s][t + 1].view(-1, *[1] * (x_t.dim() - 1))  # (B, 1, ...)
        eps = (x_t.double() - a.sqrt() * self.x0[s].double()) / (1 - a).sqrt()  # Eq. (2) solved for eps
        return target(self.x0[s], eps.float(), a, self.kinds[s])

    def __call__(self, x_v, x_a, t_v, t_a, text_v, text_a, x0_v=None, x0_a=None, joint=True):
        self.calls += 1
        self.targets = (self.target("v", x_v, t_v), self.target("a", x_a, t_a))
        return self.targets if self.exact else (torch.zeros_like(x_v), torch.zeros_like(x_a))


@pytest.mark.parametrize("exact", [True, False])
def test_loss_is_eq_9_10_in_closed_form(exact):
    """train.joint_loss is Eq. (9)-(10): a model that returns the exact target (eps, or v for the tiny U-Nets) has loss
    0; one that returns zeros has the mean square of the targets, per modality, summed over the two modalities."""
    configs = pathlib.Path(__file__).resolve().parent.parent / "configs"
    schedule = lambda name: DDIMScheduler.from_config(json.loads((configs / name).read_text())).alphas_cumprod
    bases = types.SimpleNamespace(alphas_cumprod_v=schedule("animatediff_ddim_scheduler.json"),
                                  alphas_cumprod_a=schedule("audioldm_ddim_scheduler.json"),
                                  prediction_type={"v": "v_prediction", "a": "epsilon"}, device="cpu")  # both targets
    g = torch.Generator().manual_seed(0)
    x0_v, x0_a = torch.randn(3, 4, 2, 4, 4, generator=g), torch.randn(3, 8, 12, 4, generator=g)
    text_v, text_a = torch.randn(3, 77, 8, generator=g), torch.randn(3, 8, generator=g)
    bases.encode_text = lambda captions: (text_v, text_a)  # the encoders: latent distributions with std 0, x = x0
    bases.encode_video = lambda video: (x0_v, torch.zeros_like(x0_v))
    bases.encode_audio = lambda mel: (x0_a, torch.zeros_like(x0_a))
    batch = dict(caption=["a", "b", "c"], video=torch.zeros(3), mel=torch.zeros(3))
    settings = dict(seed=0, p_uncond=0.1, p_self_cond=0.5, shared_t=False, precision="fp32")  # train.py's CPU defaults
    model = KnowsTheNoise(x0_v, x0_a, bases, exact)
    for step in range(4):  # different t_v, t_a per sample, with and without the self-conditioning pass
        loss, part = train.joint_loss(model, bases, batch, step=step, **settings)
        if exact:
            assert loss.item() < 1e-8 and max(part["loss_v"] + part["loss_a"]) < 1e-8
            continue
        mean_square = [z.double().square().flatten(1).mean(1) for z in model.targets]  # Eq. (10) per sample, (B,)
        assert torch.allclose(torch.tensor(part["loss_v"] + part["loss_a"], dtype=torch.float64),
                              torch.cat(mean_square), rtol=1e-5)
        assert abs(loss.item() - sum(m.mean().item() for m in mean_square)) < 1e-5  # Eq. (9)
        assert loss.item() > 1  # E|target|^2 = 1 per modality: the zero model is far from the oracle
    assert model.calls > 4  # some steps ran the self-conditioning pass first


def test_full_size_counts_and_shapes_on_meta():
    model, _ = full_meta()
    count = lambda mods: sum(p.numel() for m in mods for p in m.parameters())
    size_v, size_a, added = count([model.video_unet]), count([model.audio_unet]), count(model.added_modules())
    motion = sum(p.numel() for name, p in model.video_unet.named_parameters() if "motion_modules" in name)
    trainable = sum(p.numel() for _, p in model.trainable_parameters())
    print(f"\nvideo U-Net {size_v / 1e6:.2f}M + audio U-Net {size_a / 1e6:.2f}M = "
          f"{(size_v + size_a) / 1e9:.3f}B (paper: > 1.7B)")
    for name in ("connector_v", "connector_a", "blocks_v", "blocks_a"):
        print(f"  {name}: {count([getattr(model, name)]) / 1e6:.2f}M")
    print(f"added {added / 1e6:.2f}M (paper ~468M, official 467.74M); motion modules {motion / 1e6:.2f}M; "
          f"trainable {trainable / 1e6:.2f}M (official ~921M)")
    assert size_v + size_a > 1.7e9  # App. A.2, with AudioLDM-m
    assert added == OFFICIAL_ADDED  # key by key in test_official.py

    seen = []
    hooks = [b.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
             for blocks in (model.blocks_v, model.blocks_a) for b in blocks]
    x_v, x_a = torch.empty(1, 4, 32, 32, 32, device="meta"), torch.empty(1, 8, 100, 16, device="meta")
    t = torch.tensor([500], device="meta")
    with torch.no_grad():
        eps_v, eps_a = model(x_v, x_a, t, t, torch.empty(1, 77, 768, device="meta"), torch.empty(1, 512, device="meta"))
    for h in hooks:
        h.remove()
    assert eps_v.shape == x_v.shape and eps_a.shape == x_a.shape
    # insertion-point features, in call order: the video U-Net's (down2, down3, up0, up1), then the audio U-Net's
    # (AudioLDM-m widths 576/960; 100 latent rows -> 13, 13, 25, 50)
    assert seen[:4] == [(32, 1280, 4, 4), (32, 1280, 4, 4), (32, 1280, 8, 8), (32, 1280, 16, 16)]
    assert seen[4:] == [(1, 576, 13, 2), (1, 960, 13, 2), (1, 960, 25, 4), (1, 576, 50, 8)]
