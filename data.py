"""Audio-video clips as the paper uses them (Sec. 4.1.2 GreatestHits, Sec. 4.2.1 Landscape / VGGSound).
Every clip is 4 s: video at 8 fps (GreatestHits) or 4 fps (Landscape, VGGSound), 256x256 centre crop, in [-1, 1];
audio 16 kHz mono as a 400 x 64 log-mel (AudioLDM's recipe, or the released training code's). ffmpeg cuts video and
audio *by time*, so a clip always has exactly fps*4 frames and 64000 samples. The offline default is the procedural
GreatestHits of support/synthetic.py. Left out: random-start sampling, flips, LLaVA captioning, downloading datasets.
"""
import csv
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import librosa
import numpy as np
import torch
from tqdm import tqdm

from support import cli
from support.media import FFMPEG, SR, ffmpeg, write_mp4  # noqa: F401 (FFMPEG, SR: re-exported)
from support.synthetic import FPS as SYNTHETIC_FPS, MAX_CLIPS, TEST_SEED, synthetic_clip, write_synthetic

HOP, N_FFT, N_MELS = 160, 1024, 64  # AudioLDM 16 kHz mel config (its HiFi-GAN 16k-64 setup)
VIDEO_EXT = (".mp4", ".avi", ".mkv", ".mov", ".webm")
CLIP_LINE = re.compile(r'([^,"]*?(?:%s))\s*(?:,\s*(.*))?$' % "|".join(map(re.escape, VIDEO_EXT)), re.I)  # clip,caption
# what the work can take, checked before any: above 60 fps ffmpeg only repeats frames (at 1e9 it filled the
# memory); square sizes are multiples of 8 (the VAEs' factor, H.264's even sizes) up to twice Sec. 4.1.2's 256
FPS, SIZE = (1, 60), (16, 512)

def normalize_wav(wave):
    """AudioLDM dataset normalisation: remove DC, peak at 0.5 (works on numpy arrays and torch tensors)."""
    wave = wave - wave.mean()
    return 0.5 * wave / (abs(wave).max() + 1e-8)

def log_mel(wave, recipe="audioldm"):
    """Log-mel (N,) 16 kHz -> (N // 160, 64): |STFT| (Hann 1024, hop 160), slaney mels 0-8 kHz, ln clamped at 1e-5.
    "audioldm": HiFi-GAN's framing (reflect pad (n_fft - hop) / 2, no centring), of normalize_wav's output; "official":
    the released training code's: transformers' SpeechT5FeatureExtractor (frames centred, half a hop earlier), raw."""
    wave = np.asarray(wave, np.float32)
    if recipe == "official":  # train_svg.py's logmel_extractor (hop 10 ms, window 64 ms); 10 ** undoes its log10
        from transformers import SpeechT5FeatureExtractor  # here: metrics.py's workers import this file, and fast
        ext = SpeechT5FeatureExtractor(num_mel_bins=N_MELS, hop_length=10, win_length=64, fmin=0, fmax=8000)  # 16 kHz
        mel = ext(audio_target=wave, sampling_rate=SR, max_length=len(wave) // HOP, truncation=True)["input_values"][0]
        return torch.from_numpy(np.log(np.clip(10.0 ** mel, 1e-5, None)))  # (T, 64)
    pad = (N_FFT - HOP) // 2  # 432 each side: exactly N / hop frames, the vocoder's framing
    wave = torch.from_numpy(np.pad(wave, pad, mode="reflect"))
    spec = torch.stft(wave, N_FFT, HOP, N_FFT, torch.hann_window(N_FFT), center=False, return_complex=True).abs()
    fb = librosa.filters.mel(sr=SR, n_fft=N_FFT, n_mels=N_MELS, fmin=0, fmax=8000)  # slaney scale and norm
    mel = torch.from_numpy(fb).float() @ spec  # (64, 513) @ (513, T) -> (64, T)
    return mel.clamp(min=1e-5).log().T  # (T, 64): time first, as AudioLDM's VAE expects

def probe(path):
    """(duration s, height, width) from ffmpeg's header dump; raises ValueError when unreadable."""
    m = re.search(r"Duration: (\d+):(\d+):([\d.]+).*?Video:.*?, (\d+)x(\d+)", ffmpeg(["-i", path])[2], re.S)
    if not m:
        raise ValueError(f"unreadable: {path}")
    return int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3]), int(m[5]), int(m[4])

def read_clip(path, fps, sr=SR, seconds=4.0, size=None, start=0.0, max_pad=0.3):
    """-> frames uint8 (fps*seconds, H, W, 3), audio float32 (sr*seconds,) mono, both cut by time from `start`.
    Frame k is the one on screen at start + k/fps (ffmpeg's default fps rounding takes one up to 67 ms later). size:
    short side scaled to it, then centre crop. Input short by <= max_pad s is padded (the authors' GreatestHits clips
    hold ~3.75 s of audio). Raises ValueError('<reason>: <path>') if unreadable, audio-less, too short or silent."""
    n_f, n_a = round(fps * seconds), round(sr * seconds)

    def decode(stream, args):  # one ffmpeg call per stream, cut by time (-ss before -i seeks exactly)
        rc, out, err = ffmpeg(["-ss", f"{start:.6f}", "-i", str(path), "-t", f"{seconds:.6f}",
                               "-map", f"0:{stream[0]}:0", *args, "-"])
        if rc:
            raise ValueError(f"{'no ' + stream if 'matches no streams' in err else 'unreadable'}: {path}")
        return out
    h, w = (size, size) if size else probe(path)[1:]
    crop = f",scale={size}:{size}:force_original_aspect_ratio=increase,crop={size}:{size}" if size else ""
    vid = decode("video", ["-vf", f"fps=fps={fps}:start_time=0:round=up" + crop, "-f", "rawvideo", "-pix_fmt", "rgb24"])
    audio = np.frombuffer(decode("audio", ["-ac", "1", "-ar", str(sr), "-f", "f32le", "-c:a", "pcm_f32le"]), np.float32)
    frames = np.frombuffer(vid, np.uint8)[: len(vid) // (h * w * 3) * h * w * 3].reshape(-1, h, w, 3)[:n_f]  # (F,H,W,3)
    if len(frames) == 0 or n_f - len(frames) > max_pad * fps or n_a - len(audio) > max_pad * sr:
        raise ValueError(f"too short: {path} ({len(frames)} frames, {len(audio) / sr:.2f} s audio)")
    if np.abs(audio).max(initial=0) < 1e-4:  # below -80 dBFS: nothing to learn, and normalize_wav would blow up noise
        raise ValueError(f"silent: {path}")
    frames = np.concatenate([frames, frames[-1:].repeat(n_f - len(frames), 0)])
    return frames, np.pad(audio, (0, max(0, n_a - len(audio))))[:n_a].copy()

class Clips(torch.utils.data.Dataset):
    """Items dict(video (3, F, H, W) in [-1, 1], mel (1, 400, 64), caption, name) of `clips`: synthetic seeds (ints),
    or (path, caption, name) of files that all passed read_clip when the index was built (nothing fails mid-epoch)."""

    def __init__(self, clips, fps, size, mel="audioldm"):
        self.clips, self.fps, self.size, self.mel = clips, fps, size, mel

    def __len__(self):
        return len(self.clips)

    def __getitem__(self, i):
        c = self.clips[i]
        if isinstance(c, int):  # generated on the fly from its seed
            s = synthetic_clip(c, self.size, self.fps)
            frames, audio, caption, name = s["frames"], s["audio"], s["caption"], f"synth_{c:07d}"
        else:
            (frames, audio), caption, name = read_clip(c[0], self.fps, size=self.size), c[1], c[2]
        video = torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1  # (F, H, W, 3) -> (3, F, H, W)
        wave = normalize_wav(audio) if self.mel == "audioldm" else audio  # the official recipe takes the raw waveform
        return dict(video=video, mel=log_mel(wave, self.mel)[None], caption=caption, name=name)

def _check(clips, fps, size, label, missing):
    """Reads every clip once (in threads: ffmpeg does the work), keeps the good ones and prints one line."""
    def reason(clip):
        try:
            read_clip(clip[0], fps, size=size)
        except (ValueError, OSError) as e:
            return str(e).split(":")[0]
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        errors = list(tqdm(pool.map(reason, clips), total=len(clips), desc=f"checking {label}", leave=False))
    skipped = Counter(missing=missing) + Counter(e for e in errors if e)  # + drops a zero count
    why = ", ".join(f"{n} {r}" for r, n in skipped.items())
    print(f"{label}: {errors.count(None)} clips, {sum(skipped.values())} skipped" + (f" ({why})" if why else ""))
    return [c for c, e in zip(clips, errors) if e is None]

def read_captions(path, clips=True):
    """The one parser of caption lists; errors name the file and line. A line is one of
        <clip path>,"<caption>"   the official GreatestHits lists (CSV quoting: "" inside the quotes is one ")
        <clip path>,<caption>     unquoted: the caption is the rest of the line, commas included
        <caption> / "<caption>"   a bare caption, only where clips=False (sample.py --captions)
    A line starts with a clip path when its first field ends in a video extension; blank lines are skipped.
    -> [(clip stem, or None for a bare caption, caption)]."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror}") from None
    rows = []
    for n, raw in enumerate(data.splitlines(), 1):
        try:
            line = raw.decode("utf-8-sig" if n == 1 else "utf-8").strip()
        except UnicodeDecodeError:
            raise ValueError(f"{path}:{n}: not UTF-8 text") from None
        if not line:
            continue
        m = CLIP_LINE.match(line)
        clip, text = (m[1], m[2]) if m else (None, line)
        if clips and clip is None:
            raise ValueError(f"{path}:{n}: no clip path (expected <clip>.mp4,\"<caption>\")")
        if not text:
            raise ValueError(f"{path}:{n}: no caption after the clip path")
        if text.startswith('"'):
            if len(text) < 2 or not text.endswith('"') or '"' in text[1:-1].replace('""', ""):
                raise ValueError(f"{path}:{n}: unbalanced quotes in the caption")
            text = text[1:-1].replace('""', '"')
        rows.append((Path(clip).stem if clip else None, text.strip()))
    return rows

def build_dataset(name, split, root=None, flist=None, fps=None, size=None, num_clips=None, id_filter=None,
                  mel="audioldm"):
    """name: synthetic | greatesthits | landscape | vggsound; split: train | test.
    greatesthits: root = folder of 4 s clips (from `prepare` or the authors' download), flist = flist_train.txt /
      flist_val.txt (official; default <root>/flist_{train,val}.txt); clips are matched by file name under root.
    landscape / vggsound: root = folder of downloaded clips named <youtube id>[_<start:06d>].<ext>, flist = the CSV
      (landscape.csv: ytid,start_time,class,set; vggsound.csv: youtube_id,start_seconds,label,split); the first 4 s
      are used, the class name is the caption. id_filter: a file of YouTube ids to drop from train (TempoTokens
      unmatch_videos), after which classes with < 120 clips are dropped as TempoTokens does (Sec. 4.2.1).
    mel: the log-mel recipe (log_mel); "official" for a run that continues the released model."""
    if name not in ("synthetic", "greatesthits", "landscape", "vggsound") or mel not in ("audioldm", "official"):
        raise ValueError(f"unknown dataset {name!r} (synthetic | greatesthits | landscape | vggsound) or mel {mel!r}")
    lo, hi = SYNTHETIC_FPS if name == "synthetic" else FPS  # the settings first: one line before any work
    if fps is not None and not lo <= fps <= hi:
        raise ValueError(f"fps {fps} is outside [{lo}, {hi}] for {name} clips")
    if size is not None and not (SIZE[0] <= size <= SIZE[1] and size % 8 == 0):
        raise ValueError(f"size {size}: clips are {SIZE[0]}..{SIZE[1]} pixels square, a multiple of 8")
    if name == "synthetic" and num_clips is not None and not 1 <= num_clips <= MAX_CLIPS:
        raise ValueError(f"{num_clips} synthetic clips: a split has 1..{MAX_CLIPS} (its seeds)")
    if name == "synthetic":  # offline default, 64x64 at 8 fps (Sec. 4.1.2 rate); test seeds offset: disjoint splits
        offset, n = (0, num_clips or 2048) if split == "train" else (TEST_SEED, num_clips or 64)
        return Clips(range(offset, offset + n), fps or 8, size or 64, mel)
    fps, size = fps or (8 if name == "greatesthits" else 4), size or 256  # Sec. 4.1.2 / 4.2.1
    if root is None or not os.path.isdir(root):
        raise ValueError(f"{name} needs --root, a folder of clips (got {root})")
    default = f"flist_{'train' if split == 'train' else 'val'}.txt" if name == "greatesthits" else f"{name}.csv"
    listing = flist or os.path.join(root, default)
    if not os.path.isfile(listing):
        raise ValueError(f"{name} needs --flist, the official file list / CSV (not found: {listing})")
    videos = {Path(f).stem: os.path.join(d, f) for d, _, files in os.walk(root) for f in sorted(files)
              if f.lower().endswith(VIDEO_EXT)}  # every video under root by stem
    if name == "greatesthits":
        wanted = read_captions(listing)
    else:  # landscape, vggsound
        with open(listing, newline="") as f:
            rows = [r for r in csv.reader(f) if len(r) >= 4 and r[1].strip().isdigit() and r[3].strip() == split]
        if id_filter and split == "train":
            drop = set(Path(id_filter).read_text().split())
            rows = [r for r in rows if r[0] not in drop]
            big = {c for c, n in Counter(r[2] for r in rows).items() if n >= 120}  # TempoTokens keeps >= 120 per class
            rows = [r for r in rows if r[2] in big]
        label = {**{r[0]: r[2] for r in rows}, **{f"{r[0]}_{int(r[1]):06d}": r[2] for r in rows}}
        wanted = [(stem, cap) for stem in videos if (cap := label.get(stem, label.get(stem[:11]))) is not None]
    wanted = wanted[:num_clips]  # all where None
    clips = [(videos[stem], cap, stem) for stem, cap in wanted if stem in videos]
    return Clips(_check(clips, fps, size, f"{name} {split}", len(wanted) - len(clips)), fps, size, mel)

def prepare(src, out, fps=8, size=256, seconds=4.0, workers=None):
    """Cuts every video under src into non-overlapping `seconds` windows from t = 0, each by time, so each clip has
    exactly fps*seconds frames and sr*seconds samples (the official -f segment gives only ~3.75 s of audio)."""
    os.makedirs(out, exist_ok=True)
    def cut(path):
        try:
            windows, written = range(int(probe(path)[0] // seconds)), 0
        except ValueError:
            return 0
        for k in windows:
            try:  # max_pad 0.01 s: a window must really be there (short tails are dropped), only round-off is padded
                frames, audio = read_clip(path, fps, size=size, seconds=seconds, start=k * seconds, max_pad=0.01)
            except ValueError:
                continue
            write_mp4(os.path.join(out, f"{Path(path).stem}-{k:03d}.mp4"), frames, fps, audio)
            written += 1
        return written
    videos = sorted(os.path.join(d, f) for d, _, files in os.walk(src) for f in files if f.lower().endswith(VIDEO_EXT))
    with ThreadPoolExecutor(workers or os.cpu_count()) as pool:
        done = list(tqdm(pool.map(cut, videos), total=len(videos), desc="cutting videos"))
    print(f"wrote {sum(done)} clips from {len(videos)} videos to {out} ({done.count(0)} videos gave none)")

def main(argv=None):
    p = cli.Parser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("prepare", help="cut raw GreatestHits videos (vis-data-256/*_denoised_thumb.mp4) into clips")
    q.add_argument("--src", required=True, help="folder of raw videos (searched recursively)")
    q.add_argument("--out", required=True, help="folder for the 4 s clips, named <video>-<index:03d>.mp4")
    q.add_argument("--fps", type=cli.number(float, *FPS), default=8, help="8 fps: Sec. 4.1.2")
    q.add_argument("--size", type=cli.number(int, *SIZE), default=256, help="256x256 centre crop: Sec. 4.1.2")
    q = sub.add_parser("synthetic", help="write synthetic clips (held-out split) as a reference folder")
    q.add_argument("--out", required=True, help="folder for <name>.mp4, <name>.wav and captions.txt")
    q.add_argument("--num-clips", type=cli.number(int, 1, 10000), default=64, help="test split: 64 (10000: ~5 GB)")
    q.add_argument("--split", default="test", choices=["test", "train"])
    q.add_argument("--fps", type=cli.number(int, *SYNTHETIC_FPS), default=8, help="8 fps: Sec. 4.1.2")
    q.add_argument("--size", type=cli.number(int, *SIZE), default=64, help="the tiny demo's 64x64")
    a = p.parse_args(argv)
    if a.size % 8:
        cli.fail(f"--size: {a.size} is not a multiple of 8 (the VAEs' factor)")
    if a.cmd == "prepare":
        cli.existing(a.src, "--src", folder=True)
    cli.writable_dir(a.out, "--out")
    if a.cmd == "prepare":
        return prepare(a.src, a.out, a.fps, a.size)
    write_synthetic(a.out, a.num_clips, a.fps, a.size, a.split)

if __name__ == "__main__":
    main()
