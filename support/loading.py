"""What sampling loads: a train.py run (its newest checkpoint), a pipe/ folder or the base models. Not in the paper."""
import os

import torch
from diffusers import UNetMotionModel
from safetensors import safe_open
from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

from base_models import assemble
from model import JointModel, build_model, cast_frozen
from support import checkpoint, released
from support.cli import BUILD_ARGS, TINY_BASES


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
    """path: a train.py run, a pipe/ folder or None (base models, identity added modules) -> (model, bases, source)."""
    where, kind = path, "released pipe/" if released.is_pipe(path) else f"untrained {size}"
    if released.is_pipe(path):
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


def load_part(folder, name, cls):
    """A pipe/ part, without the notices its format always causes: diffusers parts from their config (unet_v's without
    the 2-D U-Net's own keys), loaded strictly; the vocoder's config has transformers 4.31's model_type "hifigan"."""
    path = os.path.join(folder, name)
    try:
        if cls.__module__.startswith("diffusers"):
            drop = released.UNET2D_ONLY if cls is UNetMotionModel else ()
            model = cls.from_config({k: v for k, v in cls.load_config(path).items() if k not in drop})
            model.load_state_dict(released.read_weights(path), strict=True)
            return model
        if cls is SpeechT5HifiGan:
            config = dict(released.read_json(os.path.join(path, "config.json")), model_type="speecht5_hifigan")
            return cls.from_pretrained(path, config=SpeechT5HifiGanConfig.from_dict(config))
        return cls.from_pretrained(path)
    except (OSError, ValueError, RuntimeError) as e:
        raise released.OfficialFormatError(f"{folder}/{name}: cannot be loaded as {cls.__name__}: "
                                           f"{released.one_line(e)}") from None


def load_pipe(folder, device="cpu", dtype=torch.float32, fps=8, video_size=None):
    """A pipe/ folder -> (JointModel, BaseModels), all from it (its unet_v: the trained motion modules, App. A.2)."""
    config, sd = released.read_unet_svg(os.path.join(folder, "unet_svg"))
    parts = {name: load_part(folder, name, cls) for name, cls in released.PARTS.items()}
    schedulers = {m: released.read_json(os.path.join(folder, f"scheduler_{m}", "scheduler_config.json"))
                  for m in "va" if os.path.isdir(os.path.join(folder, f"scheduler_{m}"))}
    for m, s in schedulers.items():  # DDIMSchedulerRev's own key, null as saved: the official scripts set it later
        if s.pop("gamma", None) is not None:
            print(f"note: {folder}/scheduler_{m}: the saved gamma exponent is not used; the sampler's gamma is")
    bases = assemble(dict(video_unet=parts.pop("unet_v"), audio_unet=parts.pop("unet_a"), **parts), "pretrained",
                     device, dtype, fps, video_size or 256, schedulers)  # 256x256 frames: Sec. 4.1.2
    model = JointModel.from_official(bases.video_unet, bases.audio_unet, config, sd, fps=fps)
    model.to(device, dtype).set_trainable()
    return model, bases
