"""The authors' released folders (SonyResearch/SVG_baseline, commit e8ebd06): read a `pipe/` folder (every part of
the model, as its training script saves it) and read / write a `unet_svg/` folder (the added modules). The names and
the config of the added modules are support/released.py's. Not in the paper: file formats.
"""
import json
import os

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel, UNetMotionModel
from safetensors.torch import load_file, save_file
from transformers import ClapTextModelWithProjection, CLIPTextModel, CLIPTokenizer, RobertaTokenizer, SpeechT5HifiGan

from base_models import assemble
from model import JointModel
from support.released import OfficialFormatError, added_state, official_config

PIPE_PARTS = ("unet_svg", "unet_v", "unet_a", "vae_v", "vae_a", "text_encoder_v", "text_encoder_a", "tokenizer_v",
              "tokenizer_a", "vocoder")  # the subfolders of the released pipe/ (VideoAudioGenWithSVGPipeline)


def export_official(model, folder):
    """Write our added modules as a released-format unet_svg/ folder (config.json + safetensors), atomically."""
    os.makedirs(folder, exist_ok=True)
    if model.config["time_align"] != "index":
        print(f"note: {folder}: this model resamples by seconds; the official code resamples by index, so it will "
              "compute a slightly different function there (ours reads '_time_align' back)")
    tensors = {k: v.detach().cpu().contiguous() for k, v in added_state(model).items()}
    for name, write in (("diffusion_pytorch_model.safetensors", lambda p: save_file(tensors, p)),
                        ("config.json", lambda p: open(p, "w").write(json.dumps(official_config(model), indent=2)))):
        write(os.path.join(folder, name + ".tmp"))
        os.replace(os.path.join(folder, name + ".tmp"), os.path.join(folder, name))


def read_unet_svg(folder):
    """-> (config dict, state_dict) of a unet_svg/ folder: .safetensors, or the training script's .bin (loaded
    with weights_only=True: tensors only, never arbitrary pickled objects)."""
    try:
        config = json.load(open(os.path.join(folder, "config.json")))
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


def load_pipe(folder, device="cpu", dtype=torch.float32, fps=8, video_size=None):
    """A released pipe/ folder -> (JointModel, BaseModels), everything from it: its unet_v carries the trained
    motion modules (App. A.2), so it replaces the public adapter; scheduler_v/_a are read if present."""
    config, sd = read_unet_svg(os.path.join(folder, "unet_svg"))
    kinds = dict(unet_v=UNetMotionModel, unet_a=UNet2DConditionModel, vae_v=AutoencoderKL, vae_a=AutoencoderKL,
                 text_encoder_v=CLIPTextModel, text_encoder_a=ClapTextModelWithProjection, tokenizer_v=CLIPTokenizer,
                 tokenizer_a=RobertaTokenizer, vocoder=SpeechT5HifiGan)
    parts = {}
    for name, cls in kinds.items():
        kw = dict(low_cpu_mem_usage=False) if cls.__module__.startswith("diffusers") else {}  # no accelerate notice
        try:
            parts[name] = cls.from_pretrained(os.path.join(folder, name), **kw)
        except (OSError, ValueError) as e:
            raise OfficialFormatError(f"{folder}/{name}: cannot be loaded as {cls.__name__} ({type(e).__name__})") \
                from None
    schedulers = {m: DDIMScheduler.from_pretrained(os.path.join(folder, f"scheduler_{m}")).config
                  for m in "va" if os.path.isdir(os.path.join(folder, f"scheduler_{m}"))}
    bases = assemble(dict(video_unet=parts.pop("unet_v"), audio_unet=parts.pop("unet_a"), **parts), "pretrained",
                     device, dtype, fps, video_size or 256, schedulers)  # 256x256 frames: Sec. 4.1.2
    model = JointModel.from_official(bases.video_unet, bases.audio_unet, config, sd, fps=fps)
    return model.to(device, dtype).set_trainable(), bases
