"""The authors' released folders (SonyResearch/SVG_baseline, commit e8ebd06): read a `pipe/` folder (every part of
the model, as its training script saves it) and read / write a `unet_svg/` folder (the added modules). The names and
the config of the added modules are support/released.py's. Not in the paper: file formats.
"""
import ast
import contextlib
import glob
import inspect
import json
import logging
import os
import pathlib

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel, UNetMotionModel
from safetensors.torch import load_file, save_file
from transformers import (ClapTextModelWithProjection, CLIPTextModel, CLIPTokenizer, RobertaTokenizer, SpeechT5HifiGan,
                          SpeechT5HifiGanConfig)

from base_models import assemble
from model import JointModel
from support.released import OfficialFormatError, added_state, official_config

# diffusers 0.27's UNetMotionModel.from_unet2d saved the whole 2-D config (unet_motion_model.py:397-430): these keys
# of UNet2DConditionModel mean nothing to UNetMotionModel, and diffusers ignores them on load
UNET2D_ONLY = set(inspect.signature(UNet2DConditionModel.__init__).parameters) - set(
    inspect.signature(UNetMotionModel.__init__).parameters)
PIPE_PARTS = ("unet_svg", "unet_v", "unet_a", "vae_v", "vae_a", "text_encoder_v", "text_encoder_a", "tokenizer_v",
              "tokenizer_a", "vocoder")  # the subfolders of the released pipe/ (VideoAudioGenWithSVGPipeline)


def export_official(model, folder):
    """Write our added modules as a released-format unet_svg/ folder (config.json + safetensors), atomically."""
    os.makedirs(folder, exist_ok=True)
    if model.config["time_align"] != "index":
        print(f"note: {folder}: this model resamples by seconds; the official code resamples by index, so it will "
              "compute a slightly different function there (ours reads '_time_align' back)")
    tensors = {k: v.detach().cpu().contiguous() for k, v in added_state(model).items()}
    config = json.dumps(official_config(model), indent=2)
    for name, write in (("diffusion_pytorch_model.safetensors", lambda p: save_file(tensors, p)),
                        ("config.json", lambda p: pathlib.Path(p).write_text(config))):
        write(os.path.join(folder, name + ".tmp"))
        os.replace(os.path.join(folder, name + ".tmp"), os.path.join(folder, name))


def read_unet_svg(folder):
    """-> (config dict, state_dict) of a unet_svg/ folder: .safetensors, or the training script's .bin (loaded
    with weights_only=True: tensors only, never arbitrary pickled objects)."""
    try:
        config = json.loads(pathlib.Path(os.path.join(folder, "config.json")).read_text())
    except (OSError, ValueError) as e:
        raise OfficialFormatError(f"{folder}/config.json: {type(e).__name__}: {e}") from None
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                 "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            try:
                sd = load_file(path) if name.endswith(".safetensors") else torch.load(path, "cpu", weights_only=True)
            except Exception as e:  # damaged file, or a pickle that holds more than tensors
                raise OfficialFormatError(f"{path}: cannot be read as tensors ({type(e).__name__})") from None
            return config, sd
    raise OfficialFormatError(f"{folder}: no diffusion_pytorch_model.safetensors or .bin")


def is_pipe(path):
    return path is not None and all(os.path.isdir(os.path.join(path, p)) for p in PIPE_PARTS)


def _harmless_config_keys(record):
    """False for diffusers' notice about the 2-D keys of a released unet_v/config.json (UNET2D_ONLY); any other
    unexpected key, or any other message, passes."""
    msg = record.getMessage()
    if not (msg.startswith("The config attributes {") and " were passed to UNetMotionModel," in msg):
        return True
    try:
        keys = ast.literal_eval(msg[len("The config attributes "):msg.index(" were passed to")])
    except (ValueError, SyntaxError):
        return True
    return not set(keys) <= UNET2D_ONLY


@contextlib.contextmanager
def _known_notices_hidden():
    log = logging.getLogger("diffusers.configuration_utils")
    log.addFilter(_harmless_config_keys)
    try:
        yield
    finally:
        log.removeFilter(_harmless_config_keys)


def _part(cls, path):
    """One component of a released folder, with none of the notices its format always causes: diffusers parts from
    the .bin the training script writes (no safetensors lookup first), the vocoder's config under its transformers
    4.31 model_type "hifigan" (now "speecht5_hifigan"), read as a SpeechT5HifiGanConfig all the same."""
    if cls.__module__.startswith("diffusers"):
        safetensors = glob.glob(os.path.join(path, "*.safetensors"))
        with _known_notices_hidden():  # low_cpu_mem_usage=False: no "install accelerate" notice
            return cls.from_pretrained(path, low_cpu_mem_usage=False, use_safetensors=bool(safetensors))
    if cls is SpeechT5HifiGan:
        config = json.loads(pathlib.Path(os.path.join(path, "config.json")).read_text())
        if config.get("model_type") == "hifigan":
            config["model_type"] = "speecht5_hifigan"
        return cls.from_pretrained(path, config=SpeechT5HifiGanConfig.from_dict(config))
    return cls.from_pretrained(path)


def _scheduler_config(path):
    """A scheduler_config.json of the released DDIMSchedulerRev: DDIMScheduler's keys; its own key "gamma" (null as
    saved) is set at sampling time, by sample.generate's gamma, so it is dropped here."""
    config = json.loads(pathlib.Path(os.path.join(path, "scheduler_config.json")).read_text())
    saved = config.pop("gamma", None)
    if saved is not None:  # the official scripts never save one (they set it on the loaded config)
        print(f"note: {path}: the saved gamma exponent {saved} is not used; the sampler's gamma is")
    return DDIMScheduler.from_config(config).config


def load_pipe(folder, device="cpu", dtype=torch.float32, fps=8, video_size=None):
    """A released pipe/ folder -> (JointModel, BaseModels), everything from it: its unet_v carries the trained
    motion modules (App. A.2), so it replaces the public adapter; scheduler_v/_a are read if present. dtype: of every
    weight (float64 reproduces the official float64 run)."""
    config, sd = read_unet_svg(os.path.join(folder, "unet_svg"))
    kinds = dict(unet_v=UNetMotionModel, unet_a=UNet2DConditionModel, vae_v=AutoencoderKL, vae_a=AutoencoderKL,
                 text_encoder_v=CLIPTextModel, text_encoder_a=ClapTextModelWithProjection, tokenizer_v=CLIPTokenizer,
                 tokenizer_a=RobertaTokenizer, vocoder=SpeechT5HifiGan)
    parts = {}
    for name, cls in kinds.items():
        try:
            parts[name] = _part(cls, os.path.join(folder, name))
        except (OSError, ValueError) as e:
            raise OfficialFormatError(f"{folder}/{name}: cannot be loaded as {cls.__name__} ({type(e).__name__})") \
                from None
    schedulers = {m: _scheduler_config(os.path.join(folder, f"scheduler_{m}"))
                  for m in "va" if os.path.isdir(os.path.join(folder, f"scheduler_{m}"))}
    bases = assemble(dict(video_unet=parts.pop("unet_v"), audio_unet=parts.pop("unet_a"), **parts), "pretrained",
                     device, dtype, fps, video_size or 256, schedulers)  # 256x256 frames: Sec. 4.1.2
    model = JointModel.from_official(bases.video_unet, bases.audio_unet, config, sd, fps=fps)
    model.to(device, dtype).set_trainable()
    return model, bases
