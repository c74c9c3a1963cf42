"""Writing clips: float32 wav and browser-playable mp4 (H.264 + AAC), each through support/files.atomic_write (a
temporary file renamed into place; one line on a full disk); ffmpeg dies with the process that runs it.
Not in the paper: file formats.
"""
import errno
import os

import imageio_ffmpeg
import numpy as np
import scipy.io.wavfile
import soundfile as sf

from support import files

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
SR = 16000  # AudioLDM's sampling rate


def _ffmpeg(args, stdin=None):
    out = files.run([FFMPEG, "-nostdin", "-hide_banner", *args], stdin=stdin)
    return out.returncode, out.stdout, out.stderr.decode(errors="replace")


def write_wav(path, audio, sr=SR):
    """float32 wav, as the official scripts write it (scipy: unlike libsndfile, no time-stamped PEAK chunk, so the
    same audio gives the same bytes)."""
    files.atomic_write(path, lambda tmp: scipy.io.wavfile.write(tmp, sr, np.asarray(audio, np.float32)))


def write_mp4(path, frames, fps, audio, sr=SR):
    """H.264 yuv420p + AAC mono at `sr`, an mp4 that browsers play (faststart). frames uint8 (F, H, W, 3), H, W even."""
    frames = np.ascontiguousarray(frames, np.uint8)

    def write(tmp):
        wav = files.temporary(os.path.dirname(tmp), ".wav")  # the audio goes in as a float wav, stdin the frames
        try:
            sf.write(wav, np.asarray(audio, np.float32), sr, subtype="FLOAT")
            rc, _, err = _ffmpeg(["-y", "-v", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s",
                                  f"{frames.shape[2]}x{frames.shape[1]}", "-r", str(fps), "-i", "-", "-i", wav,
                                  "-map", "0:v", "-map", "1:a", "-c:v", "libx264", "-crf", "18", "-pix_fmt", "yuv420p",
                                  "-c:a", "aac", "-b:a", "128k", "-ar", str(sr), "-ac", "1", "-movflags", "+faststart",
                                  "-shortest", "-f", "mp4", tmp], stdin=frames.tobytes())
        finally:
            os.remove(wav)
        if rc and files.FULL_TEXT.search(err):
            raise OSError(errno.ENOSPC, err.strip()[-300:])
        if rc:
            raise RuntimeError(f"ffmpeg could not write {path}: {err.strip()[-300:]}")
    files.atomic_write(path, write)


def save_clips(out, result, names=None):
    """Write each clip of a generate_clips result as <name>.mp4 (H.264 + AAC, plays in a browser) and <name>.wav
    into out/, each through a temporary file renamed into place (never through a file or link already there).
    -> the mp4 paths."""
    os.makedirs(out, exist_ok=True)
    names = names or [f"{k:04d}" for k in range(len(result["frames"]))]
    paths = []
    for name, frames, wave in zip(names, result["frames"], result["audios"]):
        base = os.path.join(os.path.abspath(out), name)
        write_wav(base + ".wav", wave, result["sample_rate"])
        write_mp4(base + ".mp4", frames, result["fps"], wave, result["sample_rate"])
        paths.append(base + ".mp4")
    return paths
