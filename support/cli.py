"""Command-line checks shared by the scripts: bad input gets ONE line "error: ..." and exit code 2, before any model is
built or any weight is loaded. Not in the paper."""
import argparse
import math
import os
import socket
import sys
import tempfile
import urllib.parse

from huggingface_hub import constants, try_to_load_from_cache


# the frozen base models (App. A.2): SD-1.5 (runwayml/stable-diffusion-v1-5 left the hub in 2024; this is its mirror;
# the official code uses the SD-1.5 fine-tune SG161222/Realistic_Vision_V5.1_noVAE), AnimateDiff's motion adapter and
# AudioLDM-m (official code; "the U-Nets exceed 1.7B", A.2)
BASES = dict(video_base="stable-diffusion-v1-5/stable-diffusion-v1-5",
             motion_adapter="guoyww/animatediff-motion-adapter-v1-5-2", audio_base="cvssp/audioldm-m-full")


# the tiny base models, trained once on the synthetic clips (docs/results.md says how): the tiny size's "pretrained"
# AnimateDiff and AudioLDM, so that the demo trains what the paper trains
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # support/ lies in the repository root
TINY_BASES = os.path.join(REPO, "weights", "tiny_bases.safetensors")
# run-config values that model.build_model takes by name (train.py passes them, support/loading.py reads them back)
BUILD_ARGS = ("time_align", *BASES, "snr_scale_v", "snr_scale_a")


class WeightsNotFound(RuntimeError):
    """Pretrained weights are not available (offline); str(e) is one line that CLIs print as is."""


def add_base_args(p, schedules=True):
    """The base models' weights; with schedules, also their noise schedules (what the VAEs' cache does not need)."""
    for k, v in BASES.items():
        p.add_argument("--" + k.replace("_", "-"), default=v, help="hub id or local folder")
    for m, name in (("v", "video"), ("a", "audio")) if schedules else ():  # 1: the base models as they are (the paper)
        p.add_argument(f"--snr-scale-{m}", type=number(float, 0, lo_open=True), default=1.0,
                       help=f"s: the {name} base model on another noise schedule, SNR x s at every timestep "
                       "(support/retime.py; scripts/gamma_mismatch.py)")


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


class Parser(argparse.ArgumentParser):
    """argparse whose own errors (unknown flag, bad type, bad choice) are one line too, not usage + error; no prefix
    matching (--num is not --num-clips); every option's default in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        empty = action.default is None or action.default is False or action.default in ([], argparse.SUPPRESS)
        shown = not empty and "%(default)" not in (action.help or "")  # 0 and 0.0 are shown: `is`, not ==
        if action.option_strings and shown and action.help != argparse.SUPPRESS:
            action.help = f"{action.help or ''} (default: %(default)s)".strip()
        return action

    def error(self, message):
        fail(message)


class Listing(argparse.Action):
    """A list option whose items may be separated by spaces, commas or both: `--gamma 1,1.5 2`, `--metrics a, b`.
    item: the type of one item (argparse's `type` would see a whole comma-separated token)."""

    def __init__(self, option_strings, dest, item=str, **kwargs):
        super().__init__(option_strings, dest, nargs="+", **kwargs)
        self.item = item

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            items = [self.item(v.strip()) for token in values for v in token.split(",") if v.strip()]
        except (argparse.ArgumentTypeError, ValueError) as e:
            parser.error(f"argument {option_string}: {e}")
        if not items:
            parser.error(f"argument {option_string}: expected at least one value")
        setattr(namespace, self.dest, items)


def number(kind=float, lo=None, hi=None, lo_open=False, hi_open=False):
    """An argparse type: a finite int/float in [lo, hi] (or open at either end)."""
    def parse(text):
        try:
            x = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        bad = not math.isfinite(x) or (lo is not None and (x <= lo if lo_open else x < lo)) or (
            hi is not None and (x >= hi if hi_open else x > hi))
        if bad:
            span = f"{'(' if lo_open else '['}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}" \
                   f"{')' if hi_open else ']'}"
            raise argparse.ArgumentTypeError(f"{text} is outside {span}")
        return x
    return parse


def existing(path, what, kind="file"):
    """Fail unless path is an existing file / folder, saying what is wrong: missing option, a file for a folder, ..."""
    noun = "folder" if kind == "dir" else "file"
    if path is None:
        fail(f"{what} is required here: give a {noun}")
    if kind == "dir" and os.path.isfile(path):
        fail(f"{what}: {path} is a file; give a folder")
    if kind == "file" and os.path.isdir(path):
        fail(f"{what}: {path} is a folder; give a file")
    if not (os.path.isfile(path) if kind == "file" else os.path.isdir(path)):
        fail(f"{what}: no such {noun}: {path}")


def run_folder(path, what):
    """Fail unless path is a folder, and say so when it is one stage's checkpoint (<run>/joint) instead of the run."""
    existing(path, what, "dir")
    if os.path.isfile(os.path.join(path, "COMPLETE")):  # written last into each stage's checkpoint folder
        fail(f"{what} {path} is one stage's checkpoint; give its run folder: {what} "
             f"{os.path.dirname(os.path.abspath(path))}")


def writable_dir(path, what):
    """Create the folder if needed and prove that it takes files; fail with one line otherwise."""
    if os.path.lexists(path) and not os.path.isdir(path):
        fail(f"{what}: {path} is a file, not a folder; give a folder (created if missing) or another name")
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        fail(f"{what}: cannot write to {path} ({e.strerror or type(e).__name__})")


def hub_reachable(timeout=3.0):
    """Whether the configured hub (HF_ENDPOINT, else huggingface.co) accepts a connection now."""
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    url = urllib.parse.urlsplit(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)),
                                 timeout=timeout).close()
        return True
    except OSError:
        return False


def check_weights(video_base, motion_adapter, audio_base, hint=""):
    """Fail at once (not after the hub client's retries) when the pretrained base models are neither local folders,
    nor in the Hugging Face cache, nor downloadable now."""
    wanted = ((video_base, "unet/config.json"), (motion_adapter, "config.json"), (audio_base, "unet/config.json"))
    absent = [i for i, f in wanted if not os.path.isdir(i) and not isinstance(try_to_load_from_cache(i, f), str)]
    if absent and not hub_reachable():
        fail("pretrained weights not in the local cache and the hub is unreachable; get them with " +
             ", ".join(f"`hf download {i}`" for i in absent) + " (or pass local folders: --video-base, "
             "--motion-adapter, --audio-base)" + hint)
