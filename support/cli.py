"""Command-line checks: bad input gets ONE line "error: ..." and exit 2, before any model is built. Not in the paper."""
import argparse
import math
import os
import sys

from huggingface_hub import constants, try_to_load_from_cache

# the frozen base models (App. A.2): SD-1.5 (a mirror of runwayml's; the official code uses the fine-tune
# SG161222/Realistic_Vision_V5.1_noVAE), AnimateDiff's motion adapter v1-5-2 and AudioLDM-m (official code)
BASES = dict(video_base="stable-diffusion-v1-5/stable-diffusion-v1-5",
             motion_adapter="guoyww/animatediff-motion-adapter-v1-5-2", audio_base="cvssp/audioldm-m-full")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # support/ lies in the repository root
TINY_BASES = os.path.join(REPO, "weights", "tiny_bases.safetensors")  # the demo's bases: train.py --stage base
BUILD_ARGS = ("time_align", "center_context", *BASES, "snr_scale_v", "snr_scale_a")  # run keys build_model takes


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


class Parser(argparse.ArgumentParser):
    """argparse whose own errors (unknown flag, bad value) are one line; no prefix matching; defaults in --help."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kwargs)

    def error(self, message):
        fail(message)


def number(kind=float, lo=-math.inf, hi=math.inf, open_lo=False, open_hi=False):
    """An argparse type: a finite int / float in [lo, hi] ((lo, ... with open_lo, ..., hi) with open_hi)."""
    def parse(text):
        try:
            x = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if not (math.isfinite(x) and (x > lo if open_lo else x >= lo) and (x < hi if open_hi else x <= hi)):
            span = f"{'(' if open_lo else '['}{lo}, {hi}{')' if open_hi else ']'}"
            raise argparse.ArgumentTypeError(f"{text} is outside {span}")
        return x
    return parse


def existing(path, what, folder=False):
    if not (os.path.isdir(path or "") if folder else os.path.isfile(path or "")):
        fail(f"{what}: {path} is not an existing {'folder' if folder else 'file'}")


def writable_dir(path, what):
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        fail(f"{what}: cannot create {path} ({e.strerror})")
    if not os.access(path, os.W_OK | os.X_OK):
        fail(f"{what}: cannot write to {path}")


def add_base_args(p):
    for k, v in BASES.items():
        p.add_argument("--" + k.replace("_", "-"), default=v, help="hub id or local folder")
    for m, name in (("v", "video"), ("a", "audio")):  # 1: the base models as they are (the paper)
        p.add_argument(f"--snr-scale-{m}", type=number(float, 0, open_lo=True), default=1.0,
                       help=f"the {name} base model on a schedule with s times its SNR (support/retime.py)")


def check_weights(video_base, motion_adapter, audio_base, hint=""):
    """Offline (HF_HUB_OFFLINE=1): fail now if a base model is neither a folder nor cached (online, the hub says)."""
    wanted = ((video_base, "unet/config.json"), (motion_adapter, "config.json"), (audio_base, "unet/config.json"))
    absent = [i for i, f in wanted if not os.path.isdir(i) and not isinstance(try_to_load_from_cache(i, f), str)]
    if absent and constants.HF_HUB_OFFLINE:
        fail("HF_HUB_OFFLINE is set and these weights are not in the local cache: get them with " +
             ", ".join(f"`hf download {i}`" for i in absent) + " (or pass local folders)" + hint)
