"""The engineering around train.py's loss of Eq. (9)-(10): random streams, the global batch's split and data order, the
EMA, strict resume, divergence and signal handling. Not in the paper; Sec. 4.1.2 gives only Adam, lr, batch and epochs.

- Random streams: every draw of sample j of a step (caption dropout, VAE latent, t_v, t_a, eps) comes from its own
  generator, seeded by a hash of (seed, step, j) with j its index in the step's GLOBAL batch. So a run is reproducible
  from the step alone (exact resume) and the same on 1 or 8 GPUs, with or without accumulation.
- The global batch (--batch-size, 16 in Sec. 4.1.2) = processes x micro-batch x accumulation; its data order is a
  seeded permutation per epoch, so it is resumable at any step too.
- The EMA follows diffusers' EMAModel (the official code's --use_ema), warm-up included.
Left out: DeepSpeed / ZeRO (the official launch) and EMA warm-up by power (use_ema_warmup).
"""
import contextlib
import hashlib
import json
import math
import os
import signal
import sys

import torch
from torch.nn.functional import pad
from safetensors.torch import load_file

from support import checkpoint
from support.cache import cached_inputs

# run-config values that may be None (argument not given); every other value has the type its argument gives it
OPTIONAL = dict(root=str, flist=str, cache=str, num_clips=int, max_steps=int, tiny_bases=str)
EXIT_DIVERGED = 3  # 2 is bad input; 128 + signal an interruption


def stream_seed(*key):
    """A generator seed in [0, 2**63) from a key of ints and strings: distinct keys give independent streams, for any
    --seed up to 2**63 - 1 and any step (a hash, where bit shifts of the seed would overflow 64 bits)."""
    return int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), "little") >> 1


class SampleStreams:
    """The per-sample random streams of one (micro-)batch: samples offset .. offset + B - 1 of step `step`'s global
    batch. Each method draws one value (or tensor) per sample and stacks them; tensors go to `device`."""

    def __init__(self, seed, step, offset, batch, device):
        self.seed, self.step, self.device = seed, step, device
        self.gens = [torch.Generator().manual_seed(stream_seed(seed, step, offset + j)) for j in range(batch)]

    def uniform(self):  # (B,) floats in [0, 1)
        return [torch.rand((), generator=g).item() for g in self.gens]

    def randint(self, lo, hi):  # (B,) long, uniform on {lo .. hi}, on the CPU (it indexes the alpha_bar table)
        return torch.cat([torch.randint(lo, hi + 1, (1,), generator=g) for g in self.gens])

    def randn(self, shape):  # shape = (B, ...): sample j's slice from stream j
        return torch.stack([torch.randn(shape[1:], generator=g) for g in self.gens]).to(self.device)

    def coin(self):
        """One uniform draw per STEP, the same on every process and micro-batch (the self-conditioning coin)."""
        return torch.rand((), generator=torch.Generator().manual_seed(stream_seed(self.seed, self.step, "coin"))).item()


def drop_captions(captions, p, rng):
    """Classifier-free guidance: each caption independently becomes "" with probability p (at batch 1 too, unlike
    the official code)."""
    return [c if u >= p else "" for c, u in zip(captions, rng.uniform())]


def encode(bases, batch, captions, rng):
    """The frozen encoders (or their cached outputs, support/cache.py): -> text_v, text_a and one draw x_v, x_a from
    the VAE latent distributions."""
    dev = bases.device
    with torch.no_grad():
        if "video_mean" in batch:  # --cache: the encoders ran once per clip
            text_v, text_a, mu_v, sd_v, mu_a, sd_a = cached_inputs(batch, captions, dev)
        else:
            text_v, text_a = bases.encode_text(captions)
            mu_v, sd_v = bases.encode_video(batch["video"].to(dev))
            mu_a, sd_a = bases.encode_audio(batch["mel"].to(dev))
    return text_v, text_a, mu_v + sd_v * rng.randn(mu_v.shape), mu_a + sd_a * rng.randn(mu_a.shape)


def pad_rows(x_a, model):
    """(B, C, rows, M) -> zero rows appended up to the model's audio_rows_multiple (8 for time_align "index", as the
    released model walks its U-Net; 1 otherwise: unchanged)."""
    multiple = getattr(model, "module", model).audio_rows_multiple  # DDP wraps the model
    return pad(x_a, (0, 0, 0, -x_a.shape[2] % multiple))


def autocast(device, precision):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None)


def split_batch(batch, world, micro=None):
    """Global batch over `world` processes -> (micro-batch per process, accumulation steps), with
    batch = world * micro * accumulation. micro None: batch / world (no accumulation). ValueError if it cannot split."""
    if batch % world:
        raise ValueError(f"--batch-size {batch} (the global batch) does not split over {world} processes")
    micro = batch // world if micro is None else micro
    if (batch // world) % micro:
        raise ValueError(f"--micro-batch {micro} does not divide the {batch // world} clips per process of "
                         f"--batch-size {batch} over {world} processes (choose a divisor of {batch // world})")
    return micro, batch // (world * micro)


class GlobalBatches:
    """The data order: epoch e is a permutation of the clips seeded by (seed, e), cut into global batches of
    world * micro * accum clips (a last partial batch is dropped). Micro-batch a of process r in a step holds the
    global batch's clips offset .. offset + micro - 1, offset = (a * world + r) * micro."""

    def __init__(self, dataset, seed, world, rank, micro, accum, num_workers=0):
        self.dataset, self.seed, self.micro, self.num_workers = dataset, seed, micro, num_workers
        self.size = world * micro * accum
        self.per_epoch = len(dataset) // self.size
        self.offsets = [(a * world + rank) * micro for a in range(accum)]

    def indices(self, epoch, first):
        """This process's clips of an epoch from step `first` on, in reading order."""
        seeded = torch.Generator().manual_seed(stream_seed(self.seed, epoch))
        order = torch.randperm(len(self.dataset), generator=seeded)
        return [order[s * self.size + o + j].item() for s in range(first, self.per_epoch) for o in self.offsets
                for j in range(self.micro)]

    def steps(self, step, steps):
        """-> (epoch, [(offset, micro-batch) for each accumulation step]) for steps step .. steps - 1."""
        while step < steps:
            epoch, first = divmod(step, self.per_epoch)
            subset = torch.utils.data.Subset(self.dataset, self.indices(epoch, first))
            loader = iter(torch.utils.data.DataLoader(subset, self.micro, num_workers=self.num_workers))
            for _ in range(first, min(self.per_epoch, first + steps - step)):
                yield epoch, [(o, next(loader)) for o in self.offsets]
                step += 1


def no_sync_unless_last(net, a, accum):
    """DDP averages gradients over processes once per step: at the last of its `accum` backward passes."""
    return net.no_sync() if isinstance(net, torch.nn.parallel.DistributedDataParallel) and a < accum - 1 \
        else contextlib.nullcontext()


def cosine_lr(lr, step, steps, schedule):
    """The learning rate of a step: constant (Sec. 4.1.2) or a cosine from lr to 0 over `steps` (a function of the
    step alone, so resume stays exact)."""
    return lr * (0.5 + 0.5 * math.cos(math.pi * step / steps)) if schedule == "cosine" else lr


def ema_decay(update, decay):
    """The decay of the EMA's update number `update` (1, 2, ...: the optimizer step just taken) exactly as diffusers'
    EMAModel.get_decay with its defaults (update_after_step 0, use_ema_warmup False, min_decay 0): 0 at update 1 (the
    EMA becomes the weights), then min(decay, update / (update + 9)), i.e. diffusers' (1 + s) / (10 + s) with
    s = update - 1."""
    return 0.0 if update <= 1 else min(decay, update / (update + 9))


class EMA:
    """A float32 exponential moving average of the trained parameters {name: tensor}."""

    def __init__(self, params, decay):
        self.decay = decay
        self.shadow = {name: p.detach().float().clone() for name, p in params.items()}

    def update(self, params, step):
        d = ema_decay(step, self.decay)
        with torch.no_grad():
            for name, p in params.items():
                self.shadow[name].lerp_(p.detach().float(), 1 - d)  # shadow = d * shadow + (1 - d) * p


class Diverged(RuntimeError):
    """A non-finite loss or weights: the run stops before the step reaches the EMA or a checkpoint."""


def check_finite(step, loss, params, world):
    """Raise Diverged unless the step's loss and the updated weights are finite on every process (all agree: DDP)."""
    weights_ok = bool(torch.stack([torch.isfinite(p).all() for p in params.values()]).all())
    device = next(iter(params.values())).device
    bad = torch.tensor([float(not math.isfinite(loss)), float(not weights_ok)], device=device)
    if world > 1:
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    if bad.any():
        what = f"the loss is {loss}" if bad[0] else "the weights are no longer finite"
        raise Diverged(f"step {step}: {what}; the run diverged (try a lower --lr)")


def resume(folder, model, params, ema, opt, scaler):
    """Load a stage checkpoint strictly into the weights, EMA, optimizer and loss scaler; -> its step.
    checkpoint.CheckpointError (one line naming the file) for anything that does not fit."""
    checkpoint.load_weights(model, folder, params, ema=False)
    path = os.path.join(folder, "ema.safetensors")
    try:
        stored = load_file(path)
    except Exception as e:  # missing or damaged
        raise checkpoint.CheckpointError(f"{path}: cannot be read ({type(e).__name__})") from None
    bad = sorted(set(stored) ^ set(params)) + [name for name, p in params.items() if name in stored and
                                               stored[name].shape != p.shape]
    if bad:
        raise checkpoint.CheckpointError(f"{path}: does not hold the {len(params)} trained tensors with their shapes "
                                         f"(first mismatch: {bad[0]})")
    path = os.path.join(folder, "state.pt")
    try:
        state = torch.load(path, weights_only=True)
        fits = isinstance(state, dict) and type(state.get("step")) is int and state["step"] >= 0
        if fits:
            opt.load_state_dict(state["opt"])
            scaler.load_state_dict(state["scaler"])
            moments = opt.state_dict()["state"]  # Adam's per-parameter state, keyed by the parameter's position
            fits = all(v.shape == p.shape for i, p in enumerate(params.values()) for v in moments.get(i, {}).values()
                       if v.dim() > 0)
    except Exception as e:  # unreadable, or another optimizer's state
        fits = type(e).__name__
    if fits is not True:
        raise checkpoint.CheckpointError(f"{path}: not the step, optimizer and loss-scaler state of these parameters"
                                         + (f" ({fits})" if fits else ""))
    device = next(iter(params.values())).device
    ema.shadow = {name: stored[name].to(device) for name in params}
    return state["step"]


def check_stored_configs(out, current):
    """Before --resume compares a run's stored config with the current arguments: each stored value must have the
    type its argument gives it (or be None where allowed); checkpoint.CheckpointError naming the file otherwise."""
    for stage in checkpoint.STAGES:
        try:
            folder, _ = checkpoint.latest(out, stage)
        except checkpoint.CheckpointError:  # a damaged save: open_run reports it or falls back to an earlier one
            continue
        if folder is None:
            continue
        path = os.path.join(folder, "config.json")
        stored = json.load(open(path))
        for key, now in current.items():
            old, kind = stored.get(key), OPTIONAL.get(key, type(now))
            if key in stored and not (old is None and (key in OPTIONAL or now is None) or type(old) is kind
                                      or kind is float and type(old) is int):
                raise checkpoint.CheckpointError(f"{path}: \"{key}\" is {old!r}, not {kind.__name__}: a damaged or "
                                                 "foreign run config")


class Interrupted(Exception):
    """SIGINT / SIGTERM inside a training loop: the loop saves its last completed step, then exits 128 + signal."""


class Signals:
    """SIGINT / SIGTERM (Ctrl-C; what cluster schedulers send). Outside a training loop: exit at once with
    128 + signal (nothing is half-written there: checkpoints are written inside the loop only). Inside `loop()`:
    Interrupted, so the loop saves its last COMPLETED step and exits 128 + signal; inside `atomic()`
    (optimizer step, step count, EMA, periodic save) the signal waits for the block's end, so a step is saved
    whole or not at all."""

    def __init__(self):
        self.in_loop = self.in_atomic = False
        self.pending = None

    def __enter__(self):
        self.saved = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, h in self.saved.items():  # a library caller gets its handlers back
            signal.signal(s, h)

    def handle(self, signum, frame):
        if self.in_atomic:
            self.pending = signum
        elif self.in_loop:
            raise Interrupted(signum)
        else:
            print(f"interrupted ({signal.Signals(signum).name}) outside the training loop: no checkpoint was being "
                  "written; start again (with --resume if the run has checkpoints)", file=sys.stderr)
            raise SystemExit(128 + signum)  # not an Exception: no library wraps it on the way out

    @contextlib.contextmanager
    def atomic(self):
        self.in_atomic = True
        try:
            yield
        finally:
            self.in_atomic = False
        if self.pending is not None:
            raise Interrupted(self.pending)

    @contextlib.contextmanager
    def loop(self, save, where):
        """save(): a checkpoint of the last completed step; where(): its description for the message."""
        self.in_loop, self.pending = True, None
        try:
            yield
        except Interrupted as e:
            for s in self.saved:
                signal.signal(s, signal.SIG_IGN)  # the save must finish now
            save()
            print(f"\ninterrupted ({signal.Signals(e.args[0]).name}): checkpoint saved to {where()}; continue with "
                  "--resume", file=sys.stderr)
            sys.exit(128 + e.args[0])
        finally:
            self.in_loop = False
