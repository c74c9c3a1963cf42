"""Load a trained model for sampling: a run folder written by train.py (its stored config and newest complete
checkpoint), a released `pipe/` folder (support/released_folder.py), or the base models alone. Not in the paper.
"""
import json
import os

import torch

from model import build_model, cast_frozen
from support import checkpoint
from support.cli import BUILD_ARGS, TINY_BASES
from support.released_folder import is_pipe, load_pipe


def load(path=None, device="cpu", dtype=torch.float32, ema=True, size="pretrained", video_size=None):
    """path: a run folder written by train.py, a released pipe/ folder, or None (the base models with untrained,
    i.e. identity, added modules: video and audio then come from the two base models independently).
    dtype: of the frozen weights (bf16 halves them on a GPU, model.cast_frozen); the added modules stay fp32.
    -> (model, bases, source): source says what was loaded, for the record."""
    if path is not None and is_pipe(path):
        model, bases = load_pipe(path, device=device, video_size=video_size)
        source = dict(checkpoint=os.path.abspath(path), kind="released pipe/")
    elif path is None:  # the base models alone (tiny: the shipped ones)
        shipped = TINY_BASES if size == "tiny" and os.path.isfile(TINY_BASES) else None
        model, bases = build_model(size, device=device, tiny_bases=shipped)
        source = dict(checkpoint=None, kind=f"untrained {size}")
    else:
        model, bases, source = load_run(path, device, ema)
    if dtype != torch.float32:
        cast_frozen(model, bases, dtype)
    return model.eval(), bases, source


def load_run(path, device, ema):
    cfg = read_run_config(path)
    kw = {k: cfg[k] for k in BUILD_ARGS if k in cfg}  # older runs lack some: build_model's defaults, as then
    model, bases = build_model(cfg["size"], cfg["conditioner"], device=device, fps=cfg["fps"],
                               tiny_bases=checkpoint.resolve_stored(cfg.get("tiny_bases")), **kw)
    steps = {}
    for stage in ("base", "joint") if cfg.get("base_steps", 0) > 0 else ("joint",):
        folder, steps[stage] = checkpoint.latest(path, stage)
        if folder is None:
            raise checkpoint.CheckpointError(f"{path}: no complete {stage} checkpoint (the run's config has "
                                             f"base_steps={cfg.get('base_steps', 0)})")
        checkpoint.load_weights(model, folder, model.stage_parameters(stage), ema=ema)
    return model, bases, dict(checkpoint=os.path.abspath(path), kind="run", steps=steps, ema=ema)


def read_run_config(run):
    """A run folder's stored training config (its newest complete checkpoint's), checked for what sampling needs."""
    for stage in checkpoint.STAGES:
        folder, _ = checkpoint.latest(run, stage)
        if folder is not None:
            break
    else:
        raise checkpoint.CheckpointError(f"no checkpoint in {run} (expected {run}/joint/ with COMPLETE, written by "
                                         "train.py, or a released pipe/ folder)")
    try:
        cfg = json.load(open(os.path.join(folder, "config.json")))
        missing = [k for k in ("size", "conditioner", "fps", "video_base", "motion_adapter", "audio_base")
                   if k not in cfg]
    except (OSError, ValueError, TypeError) as e:
        raise checkpoint.CheckpointError(f"{folder}/config.json: {type(e).__name__}") from None
    if missing:
        raise checkpoint.CheckpointError(f"{folder}/config.json lacks {missing}: not written by this train.py")
    return cfg
