"""What sample.py and the pipeline sample with: a train.py run (its newest checkpoint-<step>/: stored config, EMA or
raw weights), a released pipe/ folder, or the base models alone. Not in the paper.
"""
import os

import torch
from safetensors import safe_open

from model import build_model, cast_frozen
from support import checkpoint
from support.cli import BUILD_ARGS, TINY_BASES
from support.released import is_pipe, load_pipe


def run_config(path, ema=True):
    """-> (weights file, config) of a train.py run folder; CheckpointError (one line) for anything else."""
    if (folder := checkpoint.latest(path)) is None:
        raise checkpoint.CheckpointError(f"{path} holds no checkpoint-<step>/ of train.py and is no released pipe/")
    cfg = checkpoint.read_config(folder)
    if not isinstance(cfg, dict) or not {"stage", "size", "conditioner", "fps", "tiny_bases", *BUILD_ARGS} <= set(cfg):
        raise checkpoint.CheckpointError(f"{folder}/config.json lacks keys that train.py writes: not one of its runs")
    weights = os.path.join(folder, "ema.safetensors" if ema else "model.safetensors")
    checkpoint.read(weights, lambda p: safe_open(p, "pt").keys())  # a cut or foreign file fails here, before a build
    return weights, cfg


def load(path=None, device="cpu", dtype=torch.float32, ema=True, size="pretrained", video_size=None):
    """path: a train.py run (stage "base": tiny base U-Nets, identity added modules), a released pipe/ folder, or None
    (the base models, identity added modules). dtype: of the frozen weights (model.cast_frozen). -> (model, bases,
    source): what was loaded, for the record."""
    where, kind = path, "released pipe/" if is_pipe(path) else f"untrained {size}"
    if is_pipe(path):
        model, bases = load_pipe(path, device=device, video_size=video_size)
    elif path is None:
        model, bases = build_model(size, device=device, tiny_bases=TINY_BASES if size == "tiny" else None)
    else:
        where, cfg = run_config(path, ema)
        tiny = where if cfg["stage"] == "base" else None if cfg["tiny_bases"] == "random" else cfg["tiny_bases"]
        model, bases = build_model(cfg["size"], cfg["conditioner"], device=device, fps=cfg["fps"], tiny_bases=tiny,
                                   **{k: cfg[k] for k in BUILD_ARGS})
        if cfg["stage"] == "joint":
            checkpoint.load_weights(model.set_trainable("joint"), where)
        kind = f"{cfg['stage']} run, step {cfg['step']}"
    cast_frozen(model, bases, dtype)  # float32: nothing changes
    return model.eval(), bases, dict(checkpoint=where and os.path.abspath(where), kind=kind)
