"""Files and child processes (not in the paper): every file is written under a temporary name and renamed into place (no
reader or killed run sees half a file); children (ffmpeg, metric workers) die with their parent. Clips: wav and mp4."""
import ctypes
import os
import signal
import subprocess
import sys

import imageio_ffmpeg
import numpy as np
import scipy.io.wavfile

SR = 16000  # AudioLDM's sampling rate: every waveform of the project
FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()


def die_with_parent():
    """Run in a child (subprocess preexec_fn, process-pool initializer): SIGKILL it when its parent dies (Linux)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def ffmpeg(args, stdin=None):
    """-> (return code, stdout bytes, stderr text) of ffmpeg with these arguments."""
    out = subprocess.run([FFMPEG, "-nostdin", "-hide_banner", *args], input=stdin, capture_output=True,
                         preexec_fn=die_with_parent)
    return out.returncode, out.stdout, out.stderr.decode(errors="replace")


def write_atomic(path, write):
    """write(tmp) fills a temporary file beside `path`, which then replaces `path` in one rename."""
    tmp = os.path.abspath(path) + ".partial"  # absolute: a name starting with "-" never reaches ffmpeg as a flag
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_wav(path, audio, sr=SR):
    """float32 wav, as the official scripts write it (scipy: the same audio always gives the same bytes)."""
    write_atomic(path, lambda tmp: scipy.io.wavfile.write(tmp, sr, np.asarray(audio, np.float32)))


def write_mp4(path, frames, fps, audio, sr=SR):
    """H.264 yuv420p + AAC mono, an mp4 that browsers play (faststart). frames uint8 (F, H, W, 3), H and W even."""
    frames = np.ascontiguousarray(frames, np.uint8)

    def write(tmp):
        wav = tmp + ".wav"  # the audio goes in as a float wav, the frames through stdin
        write_wav(wav, audio, sr)
        try:
            rc, _, err = ffmpeg(["-y", "-v", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s",
                                 f"{frames.shape[2]}x{frames.shape[1]}", "-r", str(fps), "-i", "-", "-i", wav,
                                 "-c:v", "libx264", "-crf", "18", "-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", "128k",
                                 "-ar", str(sr), "-ac", "1", "-movflags", "+faststart", "-shortest", "-f", "mp4", tmp],
                                stdin=frames.tobytes())
        finally:
            os.remove(wav)
        if rc:
            raise OSError(f"ffmpeg could not write {path}: {err.strip()[-300:]}")
    write_atomic(path, write)


def save_clips(out, result, names=None):
    """Each clip of a sample.generate_clips result as <name>.mp4 (with sound) and <name>.wav in out/. -> mp4 paths."""
    os.makedirs(out, exist_ok=True)
    names = names or [f"{k:04d}" for k in range(len(result["frames"]))]
    for name, frames, wave in zip(names, result["frames"], result["audios"]):
        write_wav(os.path.join(out, name + ".wav"), wave, result["sample_rate"])
        write_mp4(os.path.join(out, name + ".mp4"), frames, result["fps"], wave, result["sample_rate"])
    return [os.path.join(out, name + ".mp4") for name, _, _ in zip(names, result["frames"], result["audios"])]
