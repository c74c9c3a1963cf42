"""Look at generated clips: per mp4, its frames in a strip and its waveform with the detected audio onsets and video
flow peaks (the two event lists AV-Align matches, App. A.4), titled with the caption and the clip's AV-Align.

  python scripts/demo_figure.py out/demo/*.mp4 --real 1                    # writes out/demo_samples.png

--real K appends K held-out synthetic test clips (never trained on) as the reference. Needs matplotlib.
"""
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the top-level modules, as a reader runs them
from support import cli  # noqa: E402
import av_align  # noqa: E402
from support.synthetic import synthetic_clip  # noqa: E402


def panel(frames, audio, fps, sr, every=2):
    """-> (strip of every `every`-th frame side by side, onsets in s, flow peaks in s, AV-Align IoU)."""
    onsets = av_align.audio_onsets(audio, sr)
    peaks = av_align.video_peaks(av_align.flow_trajectory(frames), fps)  # in seconds
    strip = np.concatenate(list(frames[::every]), axis=1)  # (H, W * F / every, 3)
    return strip, onsets, peaks, av_align.align_score(onsets, peaks, fps)


def main(argv=None):
    p = cli.Parser(description=__doc__.split("\n")[0])
    p.add_argument("mp4", nargs="*")
    p.add_argument("--real", type=int, default=0, help="append this many held-out synthetic test clips")
    p.add_argument("--fps", type=int, default=8)
    # docs/demo_samples.png is a copy of it (docs/results.md)
    p.add_argument("--out", default="out/demo_samples.png", help="image file")
    a = p.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    rows = []
    for path in a.mp4:
        frames, fps = av_align.read_video(path)
        audio, sr = av_align.read_audio(av_align.audio_path(path))
        rows.append((Path(path).stem[5:70], frames, fps, audio, sr))
    for k in range(a.real):
        c = synthetic_clip(10 ** 6 + k, fps=a.fps)  # data.py's test seeds
        rows.append(("REAL test clip: " + c["caption"][len("A person is hitting a "):], c["frames"], a.fps, c["audio"],
                     16000))
    if not rows:
        p.exit(2, "error: give mp4 files and/or --real K\n")
    fig, axes = plt.subplots(len(rows), 2, figsize=(14, 1.9 * len(rows)), gridspec_kw=dict(width_ratios=[4, 1]),
                             squeeze=False)
    for (name, frames, fps, audio, sr), (ax_v, ax_a) in zip(rows, axes):
        strip, onsets, peaks, score = panel(frames, audio, fps, sr)
        ax_v.imshow(strip), ax_v.set_axis_off()
        ax_v.set_title(f"{name}   (frames 0, 2, 4, ...; AV-Align {score:.2f})", fontsize=8)
        ax_a.plot(np.arange(len(audio)) / sr, audio, lw=0.4)
        ax_a.vlines(onsets, -1, 1, colors="r", lw=0.8, label="audio onsets")
        ax_a.vlines(peaks, -1, 1, colors="g", lw=0.8, linestyles="dashed", label="flow peaks")
        ax_a.set_ylim(-1, 1), ax_a.tick_params(labelsize=7)
    axes[0, 1].legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    fig.savefig(a.out, dpi=90)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
