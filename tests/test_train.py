"""Eq. (9) training on the tiny model (train.py): timesteps, text dropout, the loss going down; and the engineering
around it (support/training.py): the global batch's split over processes and micro-batches, the resumable data order,
per-sample random streams independent of the split. (Exact resume: test_reliability.py; DDP: test_ddp.py.)"""
import pytest
import torch

import train
from data import build_dataset
from model import build_model
from support import training

SETTINGS = dict(seed=0, p_uncond=0.1, p_self_cond=0.5, shared_t=False, precision="fp32")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, bases = build_model("tiny")
    ds = build_dataset("synthetic", "train", size=bases.video_size, num_clips=8)
    batch = torch.utils.data.default_collate([ds[i] for i in range(4)])
    return model, bases, batch


def test_timesteps_are_independent_unless_shared_and_captions_drop_at_batch_one(tiny):
    model, bases, batch = tiny
    with torch.no_grad():
        _, info = train.joint_loss(model, bases, batch, step=1, **dict(SETTINGS, p_self_cond=0))
        assert info["t_v"] != info["t_a"] and all(1 <= t <= 1000 for t in info["t_v"] + info["t_a"])  # Eq. (7)
        _, info = train.joint_loss(model, bases, batch, step=1, **dict(SETTINGS, p_self_cond=0, shared_t=True))
    assert info["t_v"] == info["t_a"]
    drawn = [training.SampleStreams(0, step, 0, 1, "cpu").uniform()[0] for step in range(1000)]  # batch 1
    assert 60 <= sum(u < 0.1 for u in drawn) <= 140  # p_uncond 0.1: Binomial(1000, 0.1), mean 100, sd 9.5


def test_a_few_steps_lower_the_loss(tiny):
    model, bases, batch = tiny
    batch = {k: v[:2] for k, v in batch.items()}
    params = model.set_trainable()
    saved = {n: p.detach().clone() for n, p in params.items()}

    def eval_loss():  # the same noise, timesteps and self-conditioning draws every time
        with torch.no_grad():
            return sum(train.joint_loss(model, bases, batch, step=10 ** 6 + s, **dict(SETTINGS, p_uncond=0))[0].item()
                       for s in range(3))
    before = eval_loss()
    opt = torch.optim.Adam(params.values(), lr=2e-3)
    for step in range(12):
        loss, _ = train.joint_loss(model, bases, batch, step=step, **dict(SETTINGS, p_uncond=0))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n])
    assert after < 0.95 * before, (before, after)


def test_per_dataset_paper_defaults(capsys):
    for data, fps, batch, epochs in (("greatesthits", 8, 16, 1000), ("landscape", 4, 16, 100),
                                     ("vggsound", 4, 128, 30)):
        a = train.parse_args(["--data", data, "--size", "full"])  # Sec. 4.1.2, 4.2.1-4.2.2
        assert (a.fps, a.batch_size, a.epochs, a.lr, a.lr_schedule) == (fps, batch, epochs, 1e-5, "constant")
    with pytest.raises(SystemExit):
        train.parse_args(["--data", "vggsound", "--help"])
    assert "(default: 128)" in " ".join(capsys.readouterr().out.split())  # the help shows VGGSound's


@pytest.mark.parametrize("world, micro, want", [
    (1, None, (16, 1)), (2, None, (8, 1)), (8, None, (2, 1)), (1, 4, (4, 4)), (8, 1, (1, 2))])  # official: 8 x 1 x 2
def test_global_batch_16_splits_over_processes(world, micro, want):
    assert training.split_batch(16, world, micro) == want
    with pytest.raises(ValueError, match="does not split over 3 processes"):
        training.split_batch(16, 3)
    with pytest.raises(ValueError, match="--micro-batch 3 does not divide"):
        training.split_batch(16, 2, 3)


def read(clips, seed, world, rank, micro, accum, start, steps):
    return [(epoch, [(o, b.tolist()) for o, b in mbs])
            for epoch, mbs in training.global_batches(clips, seed, world, rank, micro, accum, start, steps)]


@pytest.mark.parametrize("world, micro", [(1, 2), (2, 4), (2, 1), (8, 1)])
def test_processes_and_micro_batches_read_the_one_process_global_batch(world, micro):
    clips, seed, steps = list(range(37)), 5, 6  # 37 clips: 4 batches of 8 per epoch, 5 clips dropped; 2 epochs
    whole = read(clips, seed, 1, 0, 8, 1, 0, steps)
    parts = [read(clips, seed, world, r, micro, 8 // (world * micro), 0, steps) for r in range(world)]
    for s in range(steps):
        got = sorted((o + j, clip) for r in range(world) for o, mb in parts[r][s][1] for j, clip in enumerate(mb))
        assert got == [(j, clip) for j, clip in enumerate(whole[s][1][0][1])], s  # same clips at the same offsets
    assert [e for e, _ in whole] == [0] * 4 + [1] * 2 and whole[0] != whole[4]  # a new permutation per epoch
    assert all(read(clips, seed, 1, 0, 8, 1, start, steps) == whole[start:] for start in range(steps))  # resumable


def test_sample_streams_do_not_depend_on_the_split_and_take_any_seed():
    for seed in (0, 2 ** 63 - 1):
        whole = training.SampleStreams(seed, 7, 0, 4, "cpu")
        tail = training.SampleStreams(seed, 7, 2, 2, "cpu")  # samples 2, 3 of the same global batch
        assert torch.equal(whole.randn((4, 3, 5))[2:], tail.randn((2, 3, 5)))
        assert whole.randint(1, 1000)[2:].tolist() == tail.randint(1, 1000).tolist()
        assert whole.coin() == tail.coin()  # one self-conditioning coin per step
    assert training.SampleStreams(0, 7, 0, 1, "cpu").randn((1, 3)).tolist() != whole.randn((1, 3)).tolist()


def test_cosine_learning_rate_ends_at_zero():
    assert training.learning_rate(1e-3, 0, 200, "cosine") == 1e-3
    assert training.learning_rate(1e-3, 200, 200, "cosine") < 1e-18
    assert training.learning_rate(1e-5, 150, 200, "constant") == 1e-5  # Sec. 4.1.2
