"""The authors' released model (SonyResearch/SVG_baseline, commit e8ebd06) on our modules, as nanoGPT's
GPT.from_pretrained("gpt2") loads GPT-2: its `unet_svg` config and parameter names (model.JointModel.from_official).
Folders (`pipe/`, `unet_svg/`) are read and written by support/released_folder.py.

cmcpe.py already uses the released names inside every module; only the containers differ:
  connector_in_<video|audio>.<0|1>.<j>.0.[transformer_blocks.0.]X  <->  blocks_<v|a>.<k>.X   (k = 0..3: down2, down3,
                                                                                               up0, up1; App. A.2)
  connector_out_<video|audio>.<stage>...                            <->  connector_<v|a>.<conv_in|res1|attn1|down|...>
`official_name` is the one direction; the other is read off a built model, so the two cannot disagree.
Left out: the released config variants it never trained (other with_connector, channel_mult_connector,
num_blocks_connector, connector_out_input "x_cur"): they are refused with one line.
"""
import diffusers
import torch

RELEASED = dict(with_connector=[False, False, True, True], channel_mult_connector=[2, 4], num_blocks_connector=[1, 1],
                connector_out_input="x_pred")  # what our modules implement (config_greatesthits.json)
IN_TYPE = {"additive": "cmcpe", "attn": "crossattn"}  # released connector_in_type -> our conditioner
MODALITY = {"v": "video", "a": "audio"}
BLOCK = ("0.2", "0.3", "1.0", "1.1")  # released (down|up list, block index) of POINTS
INNER = ("attn_c", "attn_s", "attn1", "attn2", "ff", "norm1", "norm2", "norm3")  # released: inside transformer_blocks.0
STAGE = {"conv_in": "0.0", "down": "2.0.op", "out": "4", "res1": "1.0", "res2": "3.0",  # released connector stages
         "attn1": "1.0.1", "attn2": "3.0.1"}


class OfficialFormatError(ValueError):
    """A released file does not fit; str(e) is one line that the CLIs print as is (exit code 2)."""


def as_list(v):
    return list(v) if isinstance(v, (list, tuple)) else v


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
    code = STAGE[stage] + (".0" if video_pair else "")
    return f"connector_out_{MODALITY[modality]}.{code}.{name}"


def added_state(model):
    """Our added modules' tensors under their released names."""
    sd = model.state_dict()
    return {official_name(k): sd[k] for k in sd if k.startswith(("blocks_", "connector_"))}


def from_official(cls, video_unet, audio_unet, config, state_dict, fps=8):
    """Build cls (JointModel) from a released unet_svg config.json dict with time_align "index" (what it computes),
    around the given U-Nets, and load the released state_dict strictly (float32 or fp16 tensors)."""
    cv, ca = config.get("connector_video_config"), config.get("connector_audio_config")
    if not isinstance(cv, dict) or not isinstance(ca, dict):
        raise OfficialFormatError("unet_svg config.json has no connector_video_config / connector_audio_config")
    for name, c in (("video", cv), ("audio", ca)):
        for k, want in RELEASED.items():
            if c.get(k, want) != want:
                raise OfficialFormatError(f"unet_svg connector_{name}_config {k}={c[k]!r} is not supported (only "
                                          f"{want!r})")
    if cv.get("connector_in_type") not in IN_TYPE or ca.get("connector_in_type") != cv["connector_in_type"]:
        raise OfficialFormatError(f"unet_svg connector_in_type must be 'additive' or 'attn' for both, got "
                                  f"{cv.get('connector_in_type')!r} / {ca.get('connector_in_type')!r}")
    head_dim = {}
    for modality, unet in (("video", video_unet), ("audio", audio_unet)):
        base = config.get(f"unet_{modality}_config", {})
        for k in ("block_out_channels", "in_channels"):
            have, want = as_list(unet.config[k]), as_list(base.get(k, unet.config[k]))
            if want != have:
                raise OfficialFormatError(f"unet_svg was built for a {modality} U-Net with {k}={want}, this one has "
                                          f"{have}")
        # released: read as the per-head width of the added blocks
        head_dim[modality] = base.get("attention_head_dim", 8)
    if head_dim["video"] != head_dim["audio"]:
        raise OfficialFormatError(f"unet_svg: attention_head_dim differs between the U-Nets ({head_dim})")
    model = cls(video_unet, audio_unet, IN_TYPE[cv["connector_in_type"]], fps=config.get("_fps", fps),
                context_channels=cv.get("connector_channel", 1280), head_dim=head_dim["video"],
                time_align=config.get("_time_align", "index"))  # written by export_official for our own runs
    load_official(model, state_dict)
    return model


def load_official(model, state_dict, where="unet_svg"):
    """Copy released tensors into model; one line naming the first missing / unexpected / mis-shaped key."""
    ours = {official_name(k): k for k in model.state_dict() if k.startswith(("blocks_", "connector_"))}
    missing, unexpected = sorted(set(ours) - set(state_dict)), sorted(set(state_dict) - set(ours))
    if missing or unexpected:
        raise OfficialFormatError(f"{where}: {len(missing)} missing keys (first: {missing[:1]}), {len(unexpected)} "
                                  f"unexpected keys (first: {unexpected[:1]})")
    own = model.state_dict()
    for key, name in ours.items():
        if tuple(state_dict[key].shape) != tuple(own[name].shape):
            raise OfficialFormatError(f"{where}: {key} has shape {tuple(state_dict[key].shape)}, the model expects "
                                      f"{tuple(own[name].shape)}")
    with torch.no_grad():
        for key, name in ours.items():
            own[name].copy_(state_dict[key])  # casts fp16 -> our dtype


def official_config(model):
    """The unet_svg config.json that the released UNetModelSVG(**config) rebuilds our modules from."""
    c = model.config
    connector = dict(RELEASED, connector_channel=c["context_channels"],
                     connector_in_type={v: k for k, v in IN_TYPE.items()}[c["conditioner"]])
    bases = {}
    for modality, unet in (("video", model.video_unet), ("audio", model.audio_unet)):
        base = {k: as_list(v) for k, v in unet.config.items()}
        bases[f"unet_{modality}_config"] = dict(base, attention_head_dim=c["head_dim"],  # released: read from here
                                         time_embedding_dim=base.get("time_embedding_dim"))
    return {"_class_name": "UNetModelSVG", "_diffusers_version": diffusers.__version__, "_time_align": c["time_align"],
            "_fps": c["fps"], "connector_audio_config": connector, "connector_video_config": connector, **bases}
