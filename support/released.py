"""The authors' released model (SonyResearch/SVG_baseline e8ebd06) on our modules, as nanoGPT's from_pretrained loads
GPT-2: its unet_svg config, names and folder (JointModel.from_official) and pipe/ parts. cmcpe.py uses the released
names inside every module; only the containers differ (`official_name`; the reverse is read off a built model):
  connector_in_<video|audio>.<0|1>.<j>.0.[transformer_blocks.0.]X  <->  blocks_<v|a>.<k>.X  (k: down2, down3, up0, up1)
  connector_out_<video|audio>.<stage>...                            <->  connector_<v|a>.<conv_in|res1|attn1|down|...>
Left out: config variants the release never trained (refused with one line). Not in the paper: file formats."""
import inspect
import json
import os
from pathlib import Path

import diffusers
import torch
import torch.nn as nn
from diffusers import AutoencoderKL, UNet2DConditionModel, UNetMotionModel
from safetensors.torch import load_file, save_file
from transformers import ClapTextModelWithProjection, CLIPTextModel, CLIPTokenizer, RobertaTokenizer, SpeechT5HifiGan

from support.media import write_atomic

RELEASED = dict(with_connector=[False, False, True, True], channel_mult_connector=[2, 4], num_blocks_connector=[1, 1],
                connector_out_input="x_pred")  # what our modules implement (config_greatesthits.json)
IN_TYPE = {"additive": "cmcpe", "attn": "crossattn"}  # released connector_in_type -> our conditioner
MODALITY = {"v": "video", "a": "audio"}
BLOCK = ("0.2", "0.3", "1.0", "1.1")  # released (down|up list, block index) of POINTS
INNER = ("attn_c", "attn_s", "attn1", "attn2", "ff", "norm1", "norm2", "norm3")  # released: inside transformer_blocks.0
STAGE = {"conv_in": "0.0", "down": "2.0.op", "out": "4", "res1": "1.0", "res2": "3.0",  # released connector stages
         "attn1": "1.0.1", "attn2": "3.0.1"}
ADDED = ("connector_v", "connector_a", "blocks_v", "blocks_a")  # JointModel's added modules
PARTS = dict(unet_v=UNetMotionModel, unet_a=UNet2DConditionModel, vae_v=AutoencoderKL, vae_a=AutoencoderKL,
             text_encoder_v=CLIPTextModel, text_encoder_a=ClapTextModelWithProjection, tokenizer_v=CLIPTokenizer,
             tokenizer_a=RobertaTokenizer, vocoder=SpeechT5HifiGan)  # pipe/'s folders, and unet_svg
# diffusers 0.27's UNetMotionModel.from_unet2d saved the whole 2-D config: keys UNetMotionModel does not take
UNET2D_ONLY = {*inspect.signature(UNet2DConditionModel).parameters} - {*inspect.signature(UNetMotionModel).parameters}
WEIGHTS = [f"diffusion_pytorch_model{v}.{e}" for e in ("safetensors", "bin") for v in ("", ".fp16")]  # in this order


class OfficialFormatError(ValueError):
    """A released file does not fit; str(e) is one line that the CLIs print as is (exit code 2)."""


def one_line(e):
    return " ".join(str(e).split())


def read_json(path):
    return json.loads(Path(path).read_text())


def official_name(key):
    """One of our added-module parameter names (JointModel.state_dict()) -> the released unet_svg key."""
    kind, rest = key.split(".", 1)
    modality = kind[-1]
    if kind.startswith("blocks_"):
        k, name = rest.split(".", 1)
        inner = "transformer_blocks.0." if name.split(".")[0] in INNER else ""
        return f"connector_in_{MODALITY[modality]}.{BLOCK[int(k)]}.0.{inner}{name}"
    stage, name = rest.split(".", 1)
    video_pair = modality == "v" and stage in ("res1", "res2")  # video: [ResBlock, STA] lists
    return f"connector_out_{MODALITY[modality]}.{STAGE[stage]}{'.0' if video_pair else ''}.{name}"


def added_state(model):
    """Our added modules' tensors under their released names."""
    return {official_name(k): v for k, v in model.state_dict().items() if k.startswith(ADDED)}


def from_official(cls, video_unet, audio_unet, config, state_dict, fps=8):
    """cls (JointModel) around the U-Nets from a released unet_svg config and state_dict (loaded strictly)."""
    cv, ca = config.get("connector_video_config"), config.get("connector_audio_config")
    if not isinstance(cv, dict) or not isinstance(ca, dict):
        raise OfficialFormatError("unet_svg config.json has no connector_video_config / connector_audio_config")
    for name, c in (("video", cv), ("audio", ca)):
        for k, want in RELEASED.items():
            if c.get(k, want) != want:
                raise OfficialFormatError(f"unet_svg connector_{name}_config {k}={c[k]!r} is not supported: {want!r}")
    if cv.get("connector_in_type") not in IN_TYPE or ca.get("connector_in_type") != cv["connector_in_type"]:
        raise OfficialFormatError(f"unet_svg connector_in_type must be 'additive' or 'attn' for both, got "
                                  f"{cv.get('connector_in_type')!r} / {ca.get('connector_in_type')!r}")
    # released: the U-Nets' attention_head_dim is read as the added blocks' head width
    head_dim = [config.get(f"unet_{m}_config", {}).get("attention_head_dim", 8) for m in ("video", "audio")]
    if head_dim[0] != head_dim[1]:
        raise OfficialFormatError(f"unet_svg: attention_head_dim differs between the U-Nets (video, audio: {head_dim})")
    model = cls(video_unet, audio_unet, IN_TYPE[cv["connector_in_type"]], fps=config.get("_fps", fps),
                context_channels=cv.get("connector_channel", 1280), head_dim=head_dim[0],
                time_align=config.get("_time_align", "index"))  # written by export_official for our own runs
    ours = {official_name(k): k for k in model.state_dict() if k.startswith(ADDED)}
    try:  # also the U-Nets' fit (the shapes follow their channels); an unknown key is reported under its own name
        nn.ModuleDict({n: getattr(model, n) for n in ADDED}).load_state_dict(
            {ours.get(k, k): v for k, v in state_dict.items()}, strict=True)
    except RuntimeError as e:
        raise OfficialFormatError(f"unet_svg: {one_line(e)}") from None
    return model


def official_config(model):
    """The unet_svg config.json that the released UNetModelSVG(**config) rebuilds our modules from."""
    c = model.config
    connector = dict(RELEASED, connector_channel=c["context_channels"],
                     connector_in_type={v: k for k, v in IN_TYPE.items()}[c["conditioner"]])
    bases = {}
    for modality, unet in (("video", model.video_unet), ("audio", model.audio_unet)):
        base = dict(unet.config)
        bases[f"unet_{modality}_config"] = dict(base, attention_head_dim=c["head_dim"],  # released: read from here
                                                time_embedding_dim=base.get("time_embedding_dim"))
    return {"_class_name": "UNetModelSVG", "_diffusers_version": diffusers.__version__, "_time_align": c["time_align"],
            "_fps": c["fps"], "connector_audio_config": connector, "connector_video_config": connector, **bases}


def export_official(model, folder):
    """Our added modules as a released-format unet_svg/ folder (config.json + safetensors, each renamed into place)."""
    os.makedirs(folder, exist_ok=True)
    if model.config["time_align"] != "index":
        print(f"note: {folder}: this model resamples by seconds; the official code resamples by index, so it will "
              "compute a slightly different function there (ours reads '_time_align' back)")
    tensors = {k: v.detach().cpu().contiguous() for k, v in added_state(model).items()}
    write_atomic(os.path.join(folder, WEIGHTS[0]), lambda tmp: save_file(tensors, tmp))
    config = json.dumps(official_config(model), indent=2)
    write_atomic(os.path.join(folder, "config.json"), lambda tmp: Path(tmp).write_text(config))


def read_weights(folder):
    """The tensors of a diffusers-format folder: .safetensors, or the training script's .bin (tensors only)."""
    for path in (os.path.join(folder, name) for name in WEIGHTS):
        if os.path.isfile(path):
            try:
                return load_file(path) if path.endswith(".safetensors") else torch.load(path, "cpu", weights_only=True)
            except Exception as e:  # damaged file, or a pickle that holds more than tensors
                raise OfficialFormatError(f"{path}: cannot be read as tensors ({type(e).__name__})") from None
    raise OfficialFormatError(f"{folder}: no diffusion_pytorch_model.safetensors or .bin")


def read_unet_svg(folder):
    """-> (config dict, state_dict) of a unet_svg/ folder."""
    try:
        config = read_json(os.path.join(folder, "config.json"))
    except (OSError, ValueError) as e:
        raise OfficialFormatError(f"{folder}/config.json: {type(e).__name__}: {one_line(e)}") from None
    return config, read_weights(folder)


def is_pipe(path):
    return path is not None and all(os.path.isdir(os.path.join(path, p)) for p in ("unet_svg", *PARTS))
