"""What train.py's loop needs besides the paper (Sec. 4.1.2: Adam, lr, batch, epochs): sample j of a step draws
(caption dropout, VAE latent, t_v, t_a, eps) from a generator seeded by (seed, step, j in the GLOBAL batch), epoch e's
order from (seed, e): a step depends on its number alone (exact resume), the same on 1 or 8 GPUs, accumulated or not."""
import contextlib
import hashlib
import math

import torch


def stream_seed(*key):
    """A generator seed in [0, 2**63) from a key of ints and strings (distinct keys: independent streams)."""
    return int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), "little") >> 1


class SampleStreams:
    """The random streams of samples offset .. offset + B - 1 of a step's global batch: one value per sample."""

    def __init__(self, seed, step, offset, batch, device):
        self.seed, self.step, self.device = seed, step, device
        self.gens = [torch.Generator().manual_seed(stream_seed(seed, step, offset + j)) for j in range(batch)]

    def uniform(self):  # [B floats in [0, 1)]
        return [torch.rand((), generator=g).item() for g in self.gens]

    def randint(self, lo, hi):  # (B,) long on {lo .. hi}, on the CPU (it indexes the alpha_bar table)
        return torch.cat([torch.randint(lo, hi + 1, (1,), generator=g) for g in self.gens])

    def randn(self, shape):  # shape = (B, ...): sample j's slice from stream j
        return torch.stack([torch.randn(shape[1:], generator=g) for g in self.gens]).to(self.device)

    def coin(self):  # one draw per STEP, the same on every process and micro-batch (the self-conditioning coin)
        return torch.rand((), generator=torch.Generator().manual_seed(stream_seed(self.seed, self.step, "coin"))).item()


def encode(bases, batch, captions, rng):
    """The frozen encoders (no_grad): -> text_v, text_a and one draw x_v, x_a from the VAE latent distributions."""
    text_v, text_a = bases.encode_text(captions)
    mu_v, sd_v = bases.encode_video(batch["video"].to(bases.device))
    mu_a, sd_a = bases.encode_audio(batch["mel"].to(bases.device))
    return text_v, text_a, mu_v + sd_v * rng.randn(mu_v.shape), mu_a + sd_a * rng.randn(mu_a.shape)


def pad_rows(x_a, model):
    """(B, C, rows, M) -> zero rows up to the model's audio_rows_multiple (8 for time_align "index", as released)."""
    multiple = getattr(model, "module", model).audio_rows_multiple  # DDP wraps the model
    return torch.nn.functional.pad(x_a, (0, 0, 0, -x_a.shape[2] % multiple))


def autocast(device, precision):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None)


def split_batch(batch, world, micro=None):
    """The global batch over `world` processes -> (micro-batch, accumulation steps); micro None: no accumulation."""
    if batch % world:
        raise ValueError(f"--batch-size {batch} (the global batch) does not split over {world} processes")
    micro = micro or batch // world
    if (batch // world) % micro:
        raise ValueError(f"--micro-batch {micro} does not divide the {batch // world} clips per process")
    return micro, batch // (world * micro)


def global_batches(dataset, seed, world, rank, micro, accum, step, steps, num_workers=0):
    """-> (epoch, [(offset, micro-batch)] x accum) per step; an epoch's partial last global batch is dropped."""
    size = world * micro * accum
    per_epoch = len(dataset) // size
    offsets = [(a * world + rank) * micro for a in range(accum)]
    while step < steps:
        epoch, first = divmod(step, per_epoch)
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(stream_seed(seed, epoch)))
        mine = [order[s * size + o + j].item() for s in range(first, per_epoch) for o in offsets for j in range(micro)]
        loader = iter(torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, mine), micro,
                                                  num_workers=num_workers))
        for _ in range(first, min(per_epoch, first + steps - step)):
            yield epoch, [(o, next(loader)) for o in offsets]
            step += 1


def no_sync_unless_last(net, a, accum):
    """DDP averages gradients over processes once per step: in the last of its `accum` backward passes."""
    ddp = isinstance(net, torch.nn.parallel.DistributedDataParallel)
    return net.no_sync() if ddp and a < accum - 1 else contextlib.nullcontext()


def learning_rate(lr, step, steps, schedule):
    """Constant (Sec. 4.1.2) or a cosine from lr to 0 over `steps` (tiny runs: a few hundred steps must settle)."""
    return lr * (0.5 + 0.5 * math.cos(math.pi * step / steps)) if schedule == "cosine" else lr
