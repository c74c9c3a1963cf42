"""Command-line checks shared by the scripts: bad input gets ONE line "error: ..." and exit code 2, before any model is
built or any weight is loaded. Not in the paper."""
import argparse
import math
import os
import socket
import sys
import tempfile


# the frozen base models (App. A.2): SD-1.5 (runwayml/stable-diffusion-v1-5 left the hub in 2024; this is its mirror;
# the official code uses the SD-1.5 fine-tune SG161222/Realistic_Vision_V5.1_noVAE), AnimateDiff's motion adapter and
# AudioLDM-m (official code; "the U-Nets exceed 1.7B", A.2)
BASES = dict(video_base="stable-diffusion-v1-5/stable-diffusion-v1-5",
             motion_adapter="guoyww/animatediff-motion-adapter-v1-5-2", audio_base="cvssp/audioldm-m-full")


# the tiny base models, trained once on the synthetic clips (docs/results.md says how): the tiny size's "pretrained"
# AnimateDiff and AudioLDM, so that the demo trains what the paper trains
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # support/ lies in the repository root
TINY_BASES = os.path.join(REPO, "weights", "tiny_bases.safetensors")


class WeightsNotFound(RuntimeError):
    """Pretrained weights are not available (offline); str(e) is one line that CLIs print as is."""


def add_base_args(p):
    for k, v in BASES.items():
        p.add_argument("--" + k.replace("_", "-"), default=v, help=f"hub id or local folder (default {v})")


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


class Parser(argparse.ArgumentParser):
    """argparse whose own errors (unknown flag, bad type, bad choice) are one line too, not usage + error."""

    def error(self, message):
        fail(message)


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
    """Fail unless path is an existing file / folder."""
    if path is None or not (os.path.isfile(path) if kind == "file" else os.path.isdir(path)):
        fail(f"{what}: no such {kind}: {path}")


def writable_dir(path, what):
    """Create the folder if needed and prove that it takes files; fail with one line otherwise."""
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        fail(f"{what}: cannot write to {path} ({e.strerror or type(e).__name__})")


def hub_reachable(timeout=3.0):
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def check_weights(video_base, motion_adapter, audio_base, hint=""):
    """Fail at once (not after the hub client's retries) when the pretrained base models are neither local folders,
    nor in the Hugging Face cache, nor downloadable now."""
    from huggingface_hub import try_to_load_from_cache
    wanted = ((video_base, "unet/config.json"), (motion_adapter, "config.json"), (audio_base, "unet/config.json"))
    absent = [i for i, f in wanted if not os.path.isdir(i) and not isinstance(try_to_load_from_cache(i, f), str)]
    if absent and not hub_reachable():
        fail("pretrained weights not in the local cache and the hub is unreachable; get them with " +
             ", ".join(f"`hf download {i}`" for i in absent) + " (or pass local folders: --video-base, "
             "--motion-adapter, --audio-base)" + hint)
