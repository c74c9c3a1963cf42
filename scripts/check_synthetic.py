"""Does AV-Align see alignment in the synthetic clips, and what survives the tiny codec? Prints a Markdown table.

  python scripts/check_synthetic.py [--num 64] [--split test]

Rows: the real pairs (raw frames, and after the mp4 round trip that sample.py's files go through), the same pairs
with the audio shifted by one frame or 0.5 s or taken from another clip (what misalignment scores), and the real
clips through the tiny video codec (8x8 average pooling, decoded by nearest upsampling: the ceiling of what a tiny
video model can show). Columns: AV-Align (the paper's IoU variant, App. A.4) and flow peaks per clip.
"""
import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the top-level modules, as a reader runs them
import av_align  # noqa: E402
from base_models import PoolVideoAE  # noqa: E402
from data import TEST_SEED, write_mp4  # noqa: E402
from synthetic import synthetic_clip  # noqa: E402

FPS, SR = 8, 16000


def codec(frames):
    """Real frames (F, H, W, 3) uint8 through the tiny video codec and back."""
    ae = PoolVideoAE()
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1  # (F, 3, H, W) in [-1, 1]
    y = ae.decode(ae.encode(x)[0])
    return ((y / 2 + 0.5).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()


def mp4_round_trip(frames, audio):
    with tempfile.TemporaryDirectory() as d:
        write_mp4(os.path.join(d, "c.mp4"), frames, FPS, audio)
        return av_align.read_video(os.path.join(d, "c.mp4"))[0]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num", type=int, default=64)
    p.add_argument("--split", default="test", choices=["test", "val"])  # val: seeds 5 * 10**5.., as reproduce.py
    a = p.parse_args(argv)
    first = TEST_SEED if a.split == "test" else 5 * 10 ** 5
    clips = [synthetic_clip(s) for s in range(first, first + a.num)]
    shift = lambda w, sec: np.roll(w, round(sec * SR))  # noqa: E731  (wraps around: the clip keeps its hit count)
    rows = {"real pairs, raw frames": [(c["frames"], c["audio"]) for c in clips],
            "real pairs, after the mp4 round trip": [(mp4_round_trip(c["frames"], c["audio"]), c["audio"])
                                                     for c in clips],
            "audio 1 frame late (+0.125 s)": [(c["frames"], shift(c["audio"], 0.125)) for c in clips],
            "audio 1 frame early (-0.125 s)": [(c["frames"], shift(c["audio"], -0.125)) for c in clips],
            "audio 0.5 s late": [(c["frames"], shift(c["audio"], 0.5)) for c in clips],
            "audio of another clip": [(c["frames"], clips[i - 1]["audio"]) for i, c in enumerate(clips)],
            "real pairs through the tiny codec (the ceiling)": [(codec(c["frames"]), c["audio"]) for c in clips]}
    print(f"{a.num} {a.split} clips, 64x64, 8 fps\n")
    print("| pair | AV-Align (IoU) | flow peaks / clip | onsets / clip |\n|---|---|---|---|")
    for name, pairs in rows.items():
        A = [av_align.audio_onsets(w, SR) for _, w in pairs]
        V = [av_align.video_peaks(av_align.flow_trajectory(f), FPS) for f, _ in pairs]
        score = np.mean([av_align.align_score(x, y, FPS) for x, y in zip(A, V)])
        print(f"| {name} | {score:.3f} | {np.mean([len(v) for v in V]):.1f} | {np.mean([len(x) for x in A]):.1f} |")


if __name__ == "__main__":
    main()
