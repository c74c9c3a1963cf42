"""One seed per clip: Algorithm 1's initial noise of clip k is drawn from its own seed alone (sample.generate), so the
seed a manifest records regenerates exactly that clip, in any batch and without its neighbours. Not in the paper.
"""
import numbers
import random

import torch

MAX_SEED = 2 ** 63 - 1  # what torch.Generator.manual_seed takes and `--seed` accepts


def clip_seeds(generator, n):
    """-> n seeds in [0, MAX_SEED]. generator: an int s (clip k gets s + k, so that `generator=s + k` alone gives clip
    k again), a torch.Generator (n seeds drawn from its state, which advances, as in diffusers), a list of n
    generators (one seed drawn from each), or None (a fresh random int)."""
    if generator is None:
        generator = random.SystemRandom().randrange(MAX_SEED + 1)
    if isinstance(generator, numbers.Integral) and not isinstance(generator, bool):
        return [(int(generator) + k) % (MAX_SEED + 1) for k in range(n)]
    if isinstance(generator, torch.Generator):
        generator = [generator] * n
    if not isinstance(generator, (list, tuple)) or not all(isinstance(g, torch.Generator) for g in generator):
        raise TypeError(f"generator: an int, a torch.Generator, a list of them or None, not {type(generator).__name__}")
    if len(generator) != n:
        raise ValueError(f"a list of {len(generator)} generators for {n} clips: give one per clip")
    return [int(torch.randint(0, MAX_SEED, (), generator=g)) for g in generator]
