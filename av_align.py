"""AV-Align (App. A.4, Eq. (11)-(15); Sec. 4.1.1): the temporal alignment of a clip's audio onsets and video motion.
It reproduces the published scripts (OpenCV Farneback flow, strict local maxima of the mean flow magnitude, librosa's
default onsets at 22050 Hz, a match when v - 1/fps < a < v + 1/fps): "iou" = Eq. (14)-(15), the paper's script, in
[0, 1]; "official" = Eq. (12), TempoTokens 2023, can exceed 1 (A.4.2); "official_2025" = TempoTokens since 2025-02
(mean flow >= 0.1 at a peak, one onset per peak). Left out: the parameters tuned in Sec. 4.1.1 (never released).
"""
import re
from pathlib import Path

import cv2
import librosa
import numpy as np
import soundfile as sf

from support.media import ffmpeg

VARIANTS = ("iou", "official", "official_2025")

def read_video(path):
    """All frames as uint8 RGB (T, H, W, 3) and the container's fps, decoded by OpenCV as the official scripts do;
    a file that decodes fewer frames than its header lists (truncated, damaged) is an error, not a shorter clip."""
    cap, frames = cv2.VideoCapture(str(path)), []
    fps, listed = cap.get(cv2.CAP_PROP_FPS), int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    while (frame := cap.read())[0]:
        frames.append(cv2.cvtColor(frame[1], cv2.COLOR_BGR2RGB))
    if not frames or len(frames) < listed or not fps > 0:
        raise ValueError(f"truncated or unreadable: {len(frames)} of the {listed} frames decode")
    return np.stack(frames), fps

def read_audio(path, dtype="float32"):
    """Mono audio at its own rate from a wav (soundfile, as librosa.load reads it) or a video's track (ffmpeg)."""
    if Path(path).suffix.lower() in (".wav", ".flac"):
        y, sr = sf.read(str(path), dtype=dtype, always_2d=True)
        return y.mean(1), sr  # librosa's to_mono: the mean of the channels
    rc, out, err = ffmpeg(["-i", str(path), "-vn", "-ac", "1", "-f", "f32le", "-acodec", "pcm_f32le", "-"])
    if rc or not (rate := re.search(r"Audio:.*?(\d+) Hz", err)):
        raise ValueError(f"no audio track in {path}")
    return np.frombuffer(out, np.float32).astype(dtype), int(rate[1])

def audio_path(mp4):  # the same-stem wav (as sample.py and the official scripts write it), else the mp4 itself
    return Path(mp4).with_suffix(".wav") if Path(mp4).with_suffix(".wav").exists() else Path(mp4)

def flow_trajectory(frames):
    """Mean Farneback flow magnitude per frame (T,), T >= 2: flow(i-1 -> i), element 0 repeating flow(0 -> 1)."""
    gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]  # RGB2GRAY on RGB == BGR2GRAY on BGR
    # OpenCV's (IPP) magnitude rounds by its output's alignment (the official values vary by run): fix it at 32 bytes
    buf = np.empty(gray[0].size + 8, np.float32)
    mag, traj = buf[(-buf.ctypes.data % 32) // 4:][:gray[0].size].reshape(gray[0].shape), []
    for p, q in zip(gray[:-1], gray[1:]):
        flow = cv2.calcOpticalFlowFarneback(p, q, None, 0.5, 3, 15, 3, 5, 1.2, 0)
        traj.append(cv2.mean(cv2.magnitude(flow[..., 0], flow[..., 1], mag))[0])
    return np.array(traj[:1] + traj, dtype=np.float64)

def video_peaks(traj, fps, min_flow=-np.inf):
    """Times i / fps of strict local maxima, i in 1..T-2; min_flow=0.1 is the 2025 script's threshold."""
    i = np.arange(1, len(traj) - 1)
    return i[(traj[i - 1] < traj[i]) & (traj[i] > traj[i + 1]) & (traj[i] >= min_flow)] / fps

def audio_onsets(audio, sr, res_type="soxr_hq"):
    """Onset times (s) with librosa's defaults at 22050 Hz, spelled out so that new librosa defaults change nothing;
    resampled as librosa >= 0.10's load does (0.9.2's: "kaiser_best", resampy; docs/repro/audio_path/ compares)."""
    y = librosa.resample(np.asarray(audio, np.float32), orig_sr=sr, target_sr=22050, res_type=res_type)
    env = librosa.onset.onset_strength(y=y, sr=22050, n_fft=2048, hop_length=512, n_mels=128, fmax=11025.0,
                                       center=True, pad_mode="constant", lag=1, max_size=1, aggregate=np.mean)
    on = librosa.onset.onset_detect(onset_envelope=env, sr=22050, hop_length=512, backtrack=False, normalize=True,
                                    pre_max=1, post_max=1, pre_avg=4, post_avg=5, wait=1, delta=0.07)
    return librosa.frames_to_time(on, sr=22050, hop_length=512)

def align_score(A, V, fps, variant="iou"):
    """AV-Align of onset times A and peak times V, the window written as the scripts write it. Empty sets score 0.0
    (TempoTokens divides by zero when both are empty; the paper's script sets p = 0 or r = 0 for an empty side)."""
    A, V, w = np.asarray(A, np.float64), np.asarray(V, np.float64), 1.0 / fps
    a_hit = (V - w < A[:, None]) & (A[:, None] < V + w)  # (|A|, |V|): onset a lies in peak v's window
    if variant == "iou":
        v_hit = (A - w < V[:, None]) & (V[:, None] < A + w)  # (|V|, |A|): peak v lies in onset a's window
        p = a_hit.any(1).mean() if len(A) else 0.0  # Eq. (15)
        r = v_hit.any(1).mean() if len(V) else 0.0  # Eq. (15)
        return float(p * r / (p + r - p * r)) if p > 0 or r > 0 else 0.0  # Eq. (14)
    if variant == "official":
        c = int(a_hit.any(1).sum())  # Eq. (12): c counts onsets, and one peak may serve several of them
    elif variant == "official_2025":
        used, c = np.zeros(len(V), bool), 0
        for row in a_hit:  # onsets in time order each take the first unused peak in their window
            if len(j := np.flatnonzero(row & ~used)):
                used[j[0]], c = True, c + 1
    else:
        raise ValueError(f"unknown AV-Align variant {variant!r}; choose from {VARIANTS}")
    return c / (len(A) + len(V) - c) if len(A) + len(V) else 0.0  # Eq. (12)

def av_align(frames, fps, audio, sr, variant="iou"):
    """AV-Align (App. A.4) of uint8 RGB frames (T, H, W, 3) at fps and mono audio at sr (variant=None: all three)."""
    align_score([], [], 1, variant or "iou")  # rejects an unknown variant before the expensive part
    traj, A = flow_trajectory(frames), audio_onsets(audio, sr)
    V, V_2025 = video_peaks(traj, fps), video_peaks(traj, fps, min_flow=0.1)
    scores = {v: align_score(A, V_2025 if v == "official_2025" else V, fps, v) for v in VARIANTS}
    return scores if variant is None else scores[variant]

def av_align_file(mp4_path, wav_path=None, variant="iou", seconds=0.0):
    """AV-Align of an mp4 at its fps with wav_path, else the same-stem wav, else its track (variant=None: all three);
    a clip whose video or audio is shorter than `seconds` (less one frame) is an error."""
    (frames, fps), (audio, sr) = read_video(mp4_path), read_audio(wav_path or audio_path(mp4_path))
    if min(len(frames) / fps, len(audio) / sr) < seconds - 1 / fps:
        raise ValueError(f"too short: {len(frames) / fps:.2f} s of video, {len(audio) / sr:.2f} s of audio")
    return av_align(frames, fps, audio, sr, variant)
