"""Eq. (9) training on the tiny model: timesteps, text dropout, the loss going down (exact resume: test_reliability)."""

import pytest
import torch

import train
from support import training
from data import build_dataset
from model import build_model


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, bases = build_model("tiny")
    ds = build_dataset("synthetic", "train", size=bases.video_size, num_clips=8)
    batch = torch.utils.data.default_collate([ds[i] for i in range(4)])
    return model, bases, batch


def test_text_dropout_fires_at_batch_one():
    streams = [training.SampleStreams(0, step, 0, 1, "cpu") for step in range(1000)]  # batch 1, as the official run
    dropped = sum(training.drop_captions(["a red box"], 0.1, rng) == [""] for rng in streams)
    assert 60 <= dropped <= 140  # Binomial(1000, 0.1): mean 100, sd 9.5
    rng = training.SampleStreams(0, 0, 0, 2, "cpu")
    assert training.drop_captions(["a", "b"], 0.0, rng) == ["a", "b"]
    assert training.drop_captions(["a", "b"], 1.0, rng) == ["", ""]


def test_timesteps_independent_unless_shared(tiny):
    model, bases, batch = tiny
    args = train.parse_args(["--data", "synthetic", "--size", "tiny", "--p-self-cond", "0"])
    _, info = train.joint_loss(model, bases, batch, step=1, **train.loss_settings(args))
    assert info["t_v"] != info["t_a"] and all(1 <= t <= 1000 for t in info["t_v"] + info["t_a"])
    args.shared_t = True
    _, info = train.joint_loss(model, bases, batch, step=1, **train.loss_settings(args))
    assert info["t_v"] == info["t_a"]


def test_a_few_steps_lower_the_loss(tiny):
    model, bases, batch = tiny
    args = train.parse_args(["--data", "synthetic", "--size", "tiny", "--p-uncond", "0"])
    params = dict(model.trainable_parameters())
    saved = {n: p.detach().clone() for n, p in params.items()}

    def eval_loss():  # the same noise, timesteps and self-conditioning draws every time
        with torch.no_grad():
            return sum(train.joint_loss(model, bases, batch, step=10**6 + s, **train.loss_settings(args))[0].item()
                       for s in range(3))

    before = eval_loss()
    opt = torch.optim.Adam(params.values(), lr=1e-3)
    for p in params.values():
        p.requires_grad_(True)
    for step in range(25):
        loss, _ = train.joint_loss(model, bases, batch, step=step, **train.loss_settings(args))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n])
    assert after < 0.95 * before, (before, after)


def test_any_seed_up_to_2_63_works(tiny):
    """Seeds >= 2**24 used to overflow the generator seeding ((seed << 40) > 2**64); now any seed of --seed's range
    draws its own timesteps and noise, and one past the range is refused."""
    model, bases, batch = tiny
    args = train.parse_args(["--data", "synthetic", "--size", "tiny", "--seed", str(2 ** 63 - 1)])
    with torch.no_grad():
        big = train.joint_loss(model, bases, batch, step=2 ** 40, **train.loss_settings(args))
        args.seed = 0
        zero = train.joint_loss(model, bases, batch, step=2 ** 40, **train.loss_settings(args))
    assert torch.isfinite(big[0]) and big[1]["t_v"] != zero[1]["t_v"]
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--data", "synthetic", "--size", "tiny", "--seed", str(2 ** 63)])
    assert e.value.code == 2
