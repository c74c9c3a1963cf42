"""A look at generated clips (not in the paper): per mp4, a strip of its frames and its waveform with the audio onsets
and video flow peaks that AV-Align matches (App. A.4), titled with the caption and the clip's AV-Align.

  python -m scripts.demo_figure out/demo/*.mp4 --real 1    # + 1 held-out synthetic test clip; out/demo_samples.png
"""
import os
from pathlib import Path

import numpy as np

import av_align
from support import cli
from support.media import SR
from support.synthetic import TEST_SEED, synthetic_clip


def main(argv=None):
    p = cli.Parser(description=__doc__.split("\n")[0])
    p.add_argument("mp4", nargs="*")
    p.add_argument("--real", type=cli.number(int, 0, 64), default=0, help="append this many held-out test clips")
    p.add_argument("--out", default="out/demo_samples.png", help="image file")
    a = p.parse_args(argv)
    if not a.mp4 and not a.real:
        cli.fail("give mp4 files and/or --real K")
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    rows = []
    for path in a.mp4:
        cli.existing(path, "mp4")
        audio, sr = av_align.read_audio(av_align.audio_path(path))
        rows.append((Path(path).stem[5:70], *av_align.read_video(path), audio, sr))  # name, frames, fps, audio, sr
    for c in (synthetic_clip(TEST_SEED + k) for k in range(a.real)):  # data.py's test split, 8 fps
        rows.append(("REAL test clip: " + c["caption"][len("A person is hitting a "):], c["frames"], 8, c["audio"], SR))
    fig, axes = plt.subplots(len(rows), 2, figsize=(14, 1.9 * len(rows)), gridspec_kw=dict(width_ratios=[4, 1]),
                             squeeze=False)
    for (name, frames, fps, audio, sr), (ax_v, ax_a) in zip(rows, axes):
        onsets = av_align.audio_onsets(audio, sr)
        peaks = av_align.video_peaks(av_align.flow_trajectory(frames), fps)  # in seconds
        ax_v.imshow(np.concatenate(list(frames[::2]), axis=1))  # frames 0, 2, 4, ... side by side: (H, W * F / 2, 3)
        ax_v.set_axis_off()
        ax_v.set_title(f"{name}   (frames 0, 2, 4, ...; AV-Align {av_align.align_score(onsets, peaks, fps):.2f})",
                       fontsize=8)
        ax_a.plot(np.arange(len(audio)) / sr, audio, lw=0.4)
        ax_a.vlines(onsets, -1, 1, colors="r", lw=0.8, label="audio onsets")
        ax_a.vlines(peaks, -1, 1, colors="g", lw=0.8, linestyles="dashed", label="flow peaks")
        ax_a.set_ylim(-1, 1)
    axes[0, 1].legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    fig.savefig(a.out, dpi=90)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
