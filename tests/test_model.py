"""model.py: the joint forward against diffusers' own U-Net forwards, freezing (App. A.2), the cross-modal
path, gradient checkpointing, and full-size parameter counts / shapes on the meta device."""
import pytest
import torch

from model import build_model

OFFICIAL_ADDED = 467_744_079  # the released unet_svg (tests/data/official/manifest_full.json); paper: "about 468M"


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
        for m in model.added_modules():
            for p in m.parameters():
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
    assert eps_v.shape == x_v.shape and eps_a.shape == x_a.shape
    assert torch.equal(eps_v, ref_v) and torch.equal(eps_a, ref_a)
    assert not torch.allclose(swapped_v, ref_v)  # per-sample timesteps really reach the U-Net
    assert torch.equal(scalar_v, full_v) and torch.equal(scalar_a, full_a)


def test_only_added_and_motion_modules_get_grads(joint):
    model, base = joint
    model.zero_grad(set_to_none=True)
    eps_v, eps_a = model(*inputs(base, frames=8))
    (eps_v.square().mean() + eps_a.square().mean()).backward()
    added = {id(p) for m in model.added_modules() for p in m.parameters()}
    trainable = {n for n, _ in model.trainable_parameters()}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    expected = {n for n, p in model.named_parameters() if id(p) in added or "motion_modules" in n}
    assert trainable == expected and with_grad == expected
    assert all(n.startswith("video_unet.") for n in expected if "motion_modules" in n)
    assert not any(n.startswith("audio_unet.") for n in with_grad)
    assert not any(p.requires_grad for p in base.vae_v.parameters()) and not base.text_encoder_v.training
    grads = dict(model.named_parameters())
    assert any(grads[n].grad.abs().sum() > 0 for n in expected if "motion_modules" in n)
    assert all(grads[n].grad.abs().sum() > 0 for n in expected if n.endswith("proj_out.weight"))


@pytest.mark.parametrize("conditioner", ["cmcpe", "crossattn"])
def test_cross_modal_path(conditioner):
    model, base = build_model("tiny", conditioner)
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


def test_full_size_counts_and_shapes_on_meta():
    model, _ = build_model("full", device="meta")
    count = lambda mods: sum(p.numel() for m in mods for p in m.parameters())
    n_v, n_a, added = count([model.video_unet]), count([model.audio_unet]), count(model.added_modules())
    motion = sum(p.numel() for n, p in model.video_unet.named_parameters() if "motion_modules" in n)
    trainable = sum(p.numel() for _, p in model.trainable_parameters())
    print(f"\nvideo U-Net {n_v / 1e6:.2f}M + audio U-Net {n_a / 1e6:.2f}M = {(n_v + n_a) / 1e9:.3f}B (paper: > 1.7B)")
    for name in ("connector_v", "connector_a", "blocks_v", "blocks_a"):
        print(f"  {name}: {count([getattr(model, name)]) / 1e6:.2f}M")
    print(f"added {added / 1e6:.2f}M (paper ~468M, official 467.74M); motion modules {motion / 1e6:.2f}M; "
          f"trainable {trainable / 1e6:.2f}M (official ~921M)")
    assert n_v + n_a > 1.7e9  # App. A.2, with AudioLDM-m (notes diffusers.md §2)
    assert trainable == added + motion
    assert added == OFFICIAL_ADDED  # key by key in test_official.py

    seen = []
    for blocks in (model.blocks_v, model.blocks_a):
        for b in blocks:
            b.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    x_v, x_a = torch.empty(1, 4, 32, 32, 32, device="meta"), torch.empty(1, 8, 100, 16, device="meta")
    t = torch.tensor([500], device="meta")
    with torch.no_grad():
        eps_v, eps_a = model(x_v, x_a, t, t, torch.empty(1, 77, 768, device="meta"), torch.empty(1, 512, device="meta"))
    assert eps_v.shape == x_v.shape and eps_a.shape == x_a.shape
    # insertion-point features, in call order: the video U-Net's (down2, down3, up0, up1), then the audio U-Net's;
    # notes diffusers.md §3.4 and official_code.md §1.3 (AudioLDM-m widths 576/960; 100 latent rows -> 13, 13, 25, 50)
    assert seen[:4] == [(32, 1280, 4, 4), (32, 1280, 4, 4), (32, 1280, 8, 8), (32, 1280, 16, 16)]
    assert seen[4:] == [(1, 576, 13, 2), (1, 960, 13, 2), (1, 960, 25, 4), (1, 576, 50, 8)]
