"""support/training.py, piece by piece: the global batch's split over 1, 2 and 8 processes, the resumable data order,
per-sample random streams independent of the split, the EMA against diffusers' EMAModel, the divergence check, strict
resume and the signal handling. (The whole loop: test_ddp.py, test_reliability.py.)"""
import os
import signal

import pytest
import torch
from diffusers.training_utils import EMAModel
from safetensors.torch import save_file

from support import checkpoint, training


@pytest.mark.parametrize("world, micro, want", [
    (1, None, (16, 1)), (2, None, (8, 1)), (8, None, (2, 1)),  # default: no accumulation
    (1, 4, (4, 4)), (2, 2, (2, 4)), (8, 1, (1, 2))])  # (8, 1): the official launch, 8 GPUs x 1 x accumulation 2
def test_global_batch_16_splits_over_processes(world, micro, want):
    mb, accum = training.split_batch(16, world, micro)
    assert (mb, accum) == want and world * mb * accum == 16


@pytest.mark.parametrize("batch, world, micro, why", [
    (16, 3, None, "does not split over 3 processes"), (16, 8, 4, "--micro-batch 4 does not divide the 2 clips"),
    (16, 2, 3, "--micro-batch 3"), (8, 16, None, "does not split over 16")])
def test_uneven_splits_are_refused(batch, world, micro, why):
    with pytest.raises(ValueError, match=why):
        training.split_batch(batch, world, micro)


def read(order, start, steps):
    return [(epoch, [(o, b.tolist()) for o, b in mbs]) for epoch, mbs in order.steps(start, steps)]


@pytest.mark.parametrize("world, micro", [(1, 8), (1, 2), (2, 4), (2, 1), (8, 1)])
def test_processes_and_micro_batches_read_the_one_process_global_batch(world, micro):
    clips, seed, steps = list(range(37)), 5, 6  # 37 clips: 4 batches of 8 per epoch, 5 clips dropped; 2 epochs
    whole = read(training.GlobalBatches(clips, seed, 1, 0, 8, 1), 0, steps)  # one process, one pass of 8
    accum = 8 // (world * micro)
    parts = [read(training.GlobalBatches(clips, seed, world, r, micro, accum), 0, steps) for r in range(world)]
    for s in range(steps):
        got = sorted((o + j, clip) for r in range(world) for o, mb in parts[r][s][1] for j, clip in enumerate(mb))
        assert got == [(j, clip) for j, clip in enumerate(whole[s][1][0][1])], s  # same clips at the same offsets
    assert [e for e, _ in whole] == [0] * 4 + [1] * 2 and whole[0] != whole[4]  # a new permutation per epoch


def test_data_order_resumes_at_any_step():
    order = training.GlobalBatches(list(range(10)), 3, 2, 1, 1, 2)  # global batch 4, 2 steps per epoch
    full = read(order, 0, 7)
    for start in range(7):
        assert read(order, start, 7) == full[start:]


def test_sample_streams_do_not_depend_on_the_split_and_take_any_seed():
    for seed in (0, 2 ** 63 - 1):
        whole = training.SampleStreams(seed, 7, 0, 4, "cpu")
        tail = training.SampleStreams(seed, 7, 2, 2, "cpu")  # samples 2, 3 of the same global batch
        assert torch.equal(whole.randn((4, 3, 5))[2:], tail.randn((2, 3, 5)))
        assert whole.randint(1, 1000)[2:].tolist() == tail.randint(1, 1000).tolist()
        assert whole.coin() == tail.coin()  # one self-conditioning coin per step
    other = training.SampleStreams(0, 8, 0, 4, "cpu")
    assert not torch.equal(training.SampleStreams(0, 7, 0, 4, "cpu").randn((4, 3)), other.randn((4, 3)))
    assert len({training.stream_seed(0, s, j) for s in range(100) for j in range(100)}) == 10 ** 4
    assert all(0 <= training.stream_seed(2 ** 63 - 1, 2 ** 62, j) < 2 ** 63 for j in range(10))


@pytest.mark.parametrize("decay", [0.9999, 0.995, 0.5])
def test_ema_matches_diffusers_ema_model(decay):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(6))
    ref = EMAModel([p], decay=decay)  # the official code's --use_ema
    ours = training.EMA({"p": p}, decay)
    for n in range(1, 40):
        with torch.no_grad():
            p.add_(torch.randn(6))
        ref.step([p])
        ours.update({"p": p}, n)
        assert training.ema_decay(n, decay) == ref.get_decay(n)
        torch.testing.assert_close(ours.shadow["p"], ref.shadow_params[0], rtol=1e-6, atol=1e-7)
    assert training.ema_decay(1, decay) == 0.0 and training.ema_decay(2, decay) == min(decay, 2 / 11)


def test_divergence_is_caught_on_the_loss_and_on_the_weights():
    params = {"w": torch.ones(3)}
    training.check_finite(1, 0.5, params, 1)  # finite: no error
    with pytest.raises(training.Diverged, match="step 4: the loss is nan"):
        training.check_finite(4, float("nan"), params, 1)
    with pytest.raises(training.Diverged, match="the weights are no longer finite"):
        training.check_finite(4, 0.5, {"w": torch.tensor([1.0, float("inf")])}, 1)


def make_checkpoint(tmp_path):
    model = torch.nn.Linear(3, 2)
    params = dict(model.named_parameters())
    opt = torch.optim.Adam(params.values())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    checkpoint.save(str(tmp_path), "joint", params, params, dict(opt=opt.state_dict(), scaler=scaler.state_dict(),
                    step=3), dict(step=3))
    return model, params, opt, scaler, tmp_path / "joint"


def test_resume_loads_strictly(tmp_path):
    model, params, opt, scaler, folder = make_checkpoint(tmp_path)
    ema = training.EMA(params, 0.9)
    assert training.resume(str(folder), model, params, ema, opt, scaler) == 3
    other = torch.nn.Linear(3, 4)  # another model: its own weights do not fit
    with pytest.raises(checkpoint.CheckpointError, match="model.safetensors"):
        training.resume(str(folder), other, dict(other.named_parameters()), ema, opt, scaler)
    save_file({"weight": torch.zeros(2, 3), "bias2": torch.zeros(2)}, folder / "ema.safetensors")
    with pytest.raises(checkpoint.CheckpointError, match=r"ema.safetensors: does not hold .* \(first mismatch: bias\)"):
        training.resume(str(folder), model, params, ema, opt, scaler)
    save_file({"weight": torch.zeros(2, 3), "bias": torch.zeros(3)}, folder / "ema.safetensors")
    with pytest.raises(checkpoint.CheckpointError, match=r"\(first mismatch: bias\)"):
        training.resume(str(folder), model, params, ema, opt, scaler)
    save_file({n: p.detach() for n, p in params.items()}, folder / "ema.safetensors")
    for state in ({"step": 3, "opt": opt.state_dict()}, {"step": "3", "opt": {}, "scaler": {}}, [1, 2]):
        torch.save(state, folder / "state.pt")
        with pytest.raises(checkpoint.CheckpointError, match="state.pt: not the step, optimizer"):
            training.resume(str(folder), model, params, ema, opt, scaler)


def test_signals_outside_the_loop_exit_at_once_inside_save_the_last_whole_step(capsys):
    with training.Signals() as signals:
        with pytest.raises(SystemExit) as e:
            os.kill(os.getpid(), signal.SIGTERM)
        assert e.value.code == 143 and "interrupted (SIGTERM) outside the training loop" in capsys.readouterr().err
        saved, done = [], []
        with pytest.raises(SystemExit) as e:
            with signals.loop(lambda: saved.append(len(done)), lambda: "here"):
                with signals.atomic():
                    os.kill(os.getpid(), signal.SIGINT)  # waits for the block's end
                    done.append(1)
                    done.append(2)
                done.append(3)  # never reached: the signal fires when the atomic block ends
        assert e.value.code == 130 and saved == [2] and done == [1, 2]
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN  # no second signal interrupts the save
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # given back


def test_pad_rows_and_cosine_lr():
    x_a = torch.randn(2, 8, 13, 4)  # (B, C, rows, M)
    released = type("M", (), {"audio_rows_multiple": 8})()
    wrapped = type("DDP", (), {"module": released})()  # DDP keeps the model under .module
    for model in (released, wrapped):
        y = training.pad_rows(x_a, model)
        assert y.shape == (2, 8, 16, 4) and torch.equal(y[:, :, :13], x_a) and not y[:, :, 13:].any()
    assert torch.equal(training.pad_rows(x_a, type("M", (), {"audio_rows_multiple": 1})()), x_a)  # "seconds"
    assert training.cosine_lr(1e-3, 0, 100, "cosine") == 1e-3
    assert abs(training.cosine_lr(1e-3, 50, 100, "cosine") - 5e-4) < 1e-12
    assert training.cosine_lr(1e-5, 70, 100, "constant") == 1e-5  # Sec. 4.1.2
