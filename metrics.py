"""Evaluation metrics (Sec. 4.1.1, 4.2.1, App. A.4): AV-Align, FVD, FAD, ImageBind scores, one command for a folder.

AV-Align reproduces the published scripts (OpenCV Farneback flow, strict local maxima, librosa's default onsets at
22050 Hz, a match when v - 1/fps < a < v + 1/fps): "iou" = Eq. (14)-(15), the paper's script, in [0, 1]; "official" =
Eq. (12), TempoTokens 2023, can exceed 1 (A.4.2); "official_2025" = TempoTokens since 2025-02 (mean flow >= 0.1 at a
peak, one onset per peak). FVD follows StyleGAN-V's fvd2048_16f, FAD audioldm_eval's VGGish, ImageBind the official
script; feature extractors are arguments, so tests plug in tiny stand-ins. Leaves out: the tuned flow/onset parameters
of Sec. 4.1.1 (never released; the released script uses the values here), JPEG frame dumps before FVD, and the
official extras that the paper does not report (PANNs FD, KL, CLAP, CAVP).
"""
import argparse, csv, functools, json, multiprocessing, os, random, re, subprocess, sys, time, warnings  # noqa: E401
import concurrent.futures as cf
from pathlib import Path

import cv2, imageio_ffmpeg, librosa, scipy.linalg  # noqa: E401
import numpy as np
import soundfile as sf
from tqdm import tqdm

VARIANTS = ("iou", "official", "official_2025")
I3D_URL = "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1"  # StyleGAN-V's fvd2048_16f detector
VGGISH_URL = "https://github.com/harritaylor/torchvggish/releases/download/v0.1/vggish-10086976.pth"  # audioldm_eval
IMAGEBIND_URL = "https://dl.fbaipublicfiles.com/imagebind/imagebind_huge.pth"  # the official ImageBind script

class MetricError(RuntimeError):  # a missing weight file or package: one line, and the other metrics go on
    pass

def read_video(path):
    """All frames as uint8 RGB (T, H, W, 3) and the container's fps, decoded by OpenCV as the official scripts do."""
    cap, frames = cv2.VideoCapture(str(path)), []
    fps = cap.get(cv2.CAP_PROP_FPS)
    while (frame := cap.read())[0]:
        frames.append(cv2.cvtColor(frame[1], cv2.COLOR_BGR2RGB))
    if not frames or not fps > 0:
        raise ValueError(f"cannot decode video {path}")
    return np.stack(frames), fps

def read_audio(path, dtype="float32"):
    """Mono audio at its own rate from a wav (soundfile, as librosa.load reads it) or a video's track (ffmpeg)."""
    if Path(path).suffix.lower() in (".wav", ".flac"):
        y, sr = sf.read(str(path), dtype=dtype, always_2d=True)
        return y.mean(1) if y.shape[1] > 1 else y[:, 0], sr
    out = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-hide_banner", "-i", str(path), "-vn",
                          "-ac", "1", "-f", "f32le", "-acodec", "pcm_f32le", "-"], capture_output=True)
    if out.returncode or not (rate := re.search(rb"Audio:.*?(\d+) Hz", out.stderr)):
        raise ValueError(f"no audio track in {path}")
    return np.frombuffer(out.stdout, np.float32).astype(dtype), int(rate.group(1))

def audio_path(mp4):  # the same-stem wav (as sample.py and the official scripts write it), else the mp4 itself
    return Path(mp4).with_suffix(".wav") if Path(mp4).with_suffix(".wav").exists() else Path(mp4)

# ------------------------------------------------------------------------------------------------------ AV-Align
def flow_trajectory(frames):
    """Mean Farneback flow magnitude per frame (T,): flow(i-1 -> i), element 0 repeating flow(0 -> 1) as officially."""
    if len(frames) < 2:
        return np.zeros(len(frames))
    gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]  # RGB2GRAY on RGB == BGR2GRAY on BGR
    # OpenCV's (IPP) magnitude rounds by its output's alignment (the official values vary by run): fix it at 32 bytes
    buf = np.empty(gray[0].size + 8, np.float32)
    mag, traj = buf[(-buf.ctypes.data % 32) // 4:][:gray[0].size].reshape(gray[0].shape), []
    for p, q in zip(gray[:-1], gray[1:]):
        flow = cv2.calcOpticalFlowFarneback(p, q, None, 0.5, 3, 15, 3, 5, 1.2, 0)
        traj.append(cv2.mean(cv2.magnitude(flow[..., 0], flow[..., 1], mag))[0])
    return np.array(traj[:1] + traj, dtype=np.float64)

def video_peaks(traj, fps, min_flow=None):
    """Times i / fps of strict local maxima, i in 1..T-2; min_flow=0.1 is the 2025 script's threshold."""
    i = np.arange(1, len(traj) - 1)
    keep = (traj[i - 1] < traj[i]) & (traj[i] > traj[i + 1])
    return i[keep & (traj[i] >= min_flow) if min_flow is not None else keep] / fps

def audio_onsets(audio, sr):
    """Onset times (s) with librosa's defaults at 22050 Hz, spelled out so that new librosa defaults change nothing."""
    y = np.asarray(audio, np.float32)
    if sr != 22050:
        y = librosa.resample(y, orig_sr=sr, target_sr=22050, res_type="soxr_hq")  # what librosa.load(wav) does
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

def align_scores(traj, A, fps):
    V, V_2025 = video_peaks(traj, fps), video_peaks(traj, fps, min_flow=0.1)
    return {v: align_score(A, V_2025 if v == "official_2025" else V, fps, v) for v in VARIANTS}

def av_align(frames, fps, audio, sr, variant="iou"):
    """AV-Align (App. A.4) of uint8 RGB frames (T, H, W, 3) at fps and mono audio at sr; empty sets score 0.0."""
    align_score([], [], 1, variant)  # rejects an unknown variant before the expensive part
    return align_scores(flow_trajectory(frames), audio_onsets(audio, sr), fps)[variant]

def av_align_file(mp4_path, wav_path=None, variant="iou"):
    """AV-Align of an mp4 at its fps with wav_path, else the same-stem wav, else its track (variant=None: all three)."""
    frames, fps = read_video(mp4_path)
    scores = align_scores(flow_trajectory(frames), audio_onsets(*read_audio(wav_path or audio_path(mp4_path))), fps)
    return scores if variant is None else scores[variant]

def _safe(fn, path):  # a bad file is reported, never fatal
    try:
        return fn(path), None
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"

def map_clips(fn, paths, workers=1, desc=None):
    """fn(path) for each path, a clip per process with one OpenCV thread; returns ({path: value}, {path: error})."""
    ctx = multiprocessing.get_context("spawn")  # a forked child can inherit a lock held by OpenCV's thread pool
    ex = cf.ProcessPoolExecutor(workers, ctx, initializer=cv2.setNumThreads, initargs=(1,)) if workers > 1 else None
    results, ok, bad = (ex.map if ex else map)(_safe, [fn] * len(paths), paths), {}, {}
    for p, (value, err) in zip(paths, tqdm(results, total=len(paths), desc=desc)):
        (bad if err else ok)[str(p)] = err or value
    if ex:
        ex.shutdown()
    return ok, bad

# ------------------------------------------------------------------------------------------ Frechet distances
def gaussian_stats(feats, ddof):  # ddof=0 as StyleGAN-V's FVD, ddof=1 (np.cov) as audioldm_eval's FAD
    return (f := np.asarray(feats, np.float64)).mean(0), np.atleast_2d(np.cov(f, rowvar=False, ddof=ddof))

def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)). A nearly singular product whose square root is not finite or
    keeps more than a round-off imaginary part is retried with eps * I added to both; round-off is dropped."""
    mu1, mu2, s1, s2 = np.atleast_1d(mu1), np.atleast_1d(mu2), np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    with warnings.catch_warnings():  # a singular product is expected here and handled below
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all() or np.abs(np.imag(covmean)).max() > 1e-3 * max(1.0, np.abs(covmean).max()):
            covmean = scipy.linalg.sqrtm((s1 + eps * np.eye(len(s1))) @ (s2 + eps * np.eye(len(s1))))
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)

def _weights(path, url, name, flag):  # the given file, else torch's hub cache, else a download, else one clear line
    import torch
    if not (cached := Path(path or Path(torch.hub.get_dir()) / "checkpoints" / name)).is_file():
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(cached), progress=False)
        except Exception:
            raise MetricError(f"needs {name}: download {url} and pass {flag} PATH (or save it as {cached})") from None
    return cached

def load_i3d(path=None, device="cpu"):
    """StyleGAN-V's I3D TorchScript: uint8 clips (B, 3, T, H, W) -> (B, 400) pre-softmax features, called like it."""
    import torch
    with warnings.catch_warnings():  # StyleGAN-V ships TorchScript, which torch now calls deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        model = torch.jit.load(str(_weights(path, I3D_URL, "i3d_torchscript.pt", "--i3d")), map_location=device)
    def extract(clips):
        with torch.no_grad():
            return model.eval()(torch.as_tensor(np.ascontiguousarray(clips), device=device), rescale=True, resize=True,
                                return_features=True).cpu().numpy()
    return extract

def video_features(paths, extract, real, num_frames=16, max_items=2048, mirror=True, seed=0, batch=8):
    """Features as fvd2048_16f takes them: num_frames consecutive frames of the first max_items clips long enough,
    generated from frame 0, real from a random offset followed by their left-right flips (the paper's --mirror 1)."""
    rng, feats, buf, bad, n = random.Random(seed), [], [], {}, 0
    items = [(p, False) for p in paths] + ([(p, True) for p in paths] if real and mirror else [])
    for p, flip in tqdm(items, desc="FVD real" if real else "FVD generated"):
        if n == max_items:
            break
        if (video := _safe(read_video, p))[1]:
            bad[str(p)] = video[1]
        elif len(frames := video[0][0]) >= num_frames:  # StyleGAN-V: discard_short_videos
            o = rng.randint(0, len(frames) - num_frames) if real else 0
            clip = frames[o:o + num_frames, :, ::-1] if flip else frames[o:o + num_frames]
            buf, n = buf + [clip.transpose(3, 0, 1, 2)], n + 1  # (T, H, W, 3) -> (3, T, H, W)
        if len(buf) == batch or (buf and n == max_items):
            feats, buf = feats + [np.asarray(extract(np.stack(buf)), np.float64)], []
    feats += [np.asarray(extract(np.stack(buf)), np.float64)] if buf else []
    if not feats:
        raise MetricError(f"FVD: no readable clip with {num_frames} frames")
    return np.concatenate(feats), bad

def fvd(gen_paths, ref_paths, extract, **kw):
    """FVD (Sec. 4.1.1) of generated vs reference mp4s; returns (fvd, {bad path: error})."""
    (g, bad_g), (r, bad_r) = (video_features(p, extract, real, **kw) for p, real in ((gen_paths, 0), (ref_paths, 1)))
    return frechet_distance(*gaussian_stats(g, 0), *gaussian_stats(r, 0)), {**bad_g, **bad_r}

def load_vggish(path=None, device="cpu"):
    """audioldm_eval's VGGish (torchvggish, no PCA, no last ReLU): (wave, sr) -> (n, 128), one row per 0.96 s."""
    try:
        import torch
        import torchvggish
    except ImportError:
        raise MetricError("FAD needs the VGGish code: pip install torchvggish") from None
    net = torchvggish.VGG(torchvggish.make_layers(), postprocess=False)
    net.load_state_dict(torch.load(_weights(path, VGGISH_URL, "vggish-10086976.pth", "--vggish"), map_location="cpu"))
    net.embeddings = torch.nn.Sequential(*list(net.embeddings.children())[:-1])  # audioldm_eval: use_activation=False
    net.eval().to(device)
    def extract(wave, sr):
        with torch.no_grad():
            return net(torchvggish.waveform_to_examples(wave, sr, return_tensor=True).to(device)).cpu().numpy()
    return extract

def fad(gen_paths, ref_paths, extract):
    """FAD (Sec. 4.1.1) of the clips' audio (float64, as audioldm_eval reads it), examples pooled per set."""
    feats, bad = [], {}
    for paths in (gen_paths, ref_paths):
        ok, err = map_clips(lambda p: extract(*read_audio(audio_path(p), "float64")), paths, 1, "FAD features")
        if not ok:
            raise MetricError("FAD: no readable audio")
        feats, bad = feats + [np.concatenate(list(ok.values()))], {**bad, **err}
    return frechet_distance(*gaussian_stats(feats[0], 1), *gaussian_stats(feats[1], 1)), bad

def imagebind_scores(rows, path=None, device="cpu"):
    """IB-TV, IB-TA, IB-AV (Sec. 4.2.1): cosine similarities of ImageBind-huge embeddings per clip, averaged as the
    official script does (rows without a caption: IB-AV only). ImageBind is CC BY-NC 4.0 (non-commercial use only)."""
    try:
        import torch
        from imagebind import data as ib
        from imagebind.models import imagebind_model
    except ImportError:
        raise MetricError("needs the imagebind package (facebookresearch/ImageBind, CC BY-NC 4.0)") from None
    model, M = imagebind_model.imagebind_huge(pretrained=False).eval().to(device), imagebind_model.ModalityType
    model.load_state_dict(torch.load(_weights(path, IMAGEBIND_URL, "imagebind_huge.pth", "--imagebind")))
    cos, scores = torch.nn.CosineSimilarity(dim=1, eps=1e-6), {"IB-TV": [], "IB-TA": [], "IB-AV": []}
    pairs = {"IB-TV": (M.TEXT, M.VISION), "IB-TA": (M.TEXT, M.AUDIO), "IB-AV": (M.VISION, M.AUDIO)}
    for mp4, caption in tqdm(rows, desc="ImageBind"):  # audio from the same-stem wav, else torchaudio reads the mp4
        x = {M.VISION: ib.load_and_transform_video_data([str(mp4)], device),
             M.AUDIO: ib.load_and_transform_audio_data([str(audio_path(mp4))], device)}
        x.update({M.TEXT: ib.load_and_transform_text([caption], device)} if caption else {})
        with torch.no_grad():
            e = model(x)
        for key, (a, b) in pairs.items():
            scores[key] += [cos(e[a], e[b]).item()] if a in e else []
    return {k: float(np.mean(v)) for k, v in scores.items() if v}

def main(argv=None):
    ap = argparse.ArgumentParser(description="Evaluate generated sounding videos: AV-Align, FVD, FAD, ImageBind.")
    ap.add_argument("--gen", required=True, help="folder of generated <name>.mp4 (+ <name>.wav), as sample.py writes")
    ap.add_argument("--ref", help="folder of reference clips (needed for FVD and FAD)")
    ap.add_argument("--captions", help="file list `<clip path>,<caption>` for IB-TV and IB-TA")
    ap.add_argument("--metrics", default="av_align,fvd,fad,imagebind")  # Table 1: FVD, FAD, AV-Align; Tables 2-3: IB
    ap.add_argument("--out", default="results.json")
    ap.add_argument("--i3d", help="i3d_torchscript.pt of StyleGAN-V (downloaded when missing and online)")
    ap.add_argument("--vggish", help="vggish-10086976.pth of torchvggish (downloaded when missing and online)")
    ap.add_argument("--imagebind", help="imagebind_huge.pth (downloaded when missing and online)")
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="AV-Align processes, one clip each")
    ap.add_argument("--seed", type=int, default=0, help="FVD: random 16-frame offsets of the real clips")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if unknown := set(wanted := args.metrics.split(",")) - {"av_align", "fvd", "fad", "imagebind"}:
        ap.error(f"unknown metric(s) {sorted(unknown)}; choose from av_align,fvd,fad,imagebind")
    if missing := [d for d in (args.gen, args.ref) if d and not Path(d).is_dir()]:
        ap.error(f"{missing[0]} is not a folder")
    if not (gen := sorted(Path(args.gen).glob("*.mp4"))):
        ap.error(f"no .mp4 files in {args.gen}")
    ref, res, failed, skipped, per_clip = sorted(Path(args.ref).glob("*.mp4")) if args.ref else [], {}, {}, {}, {}
    for name, clips in (("gen", gen), ("ref", ref)) if "av_align" in wanted else ():
        if clips:
            t0 = time.perf_counter()
            per_clip[name], bad = map_clips(functools.partial(av_align_file, variant=None), clips, args.workers, name)
            res.update({f"av_align_{v}/{name}": float(np.mean([s[v] for s in per_clip[name].values()]))
                        if per_clip[name] else None for v in VARIANTS})
            res[f"av_align_sec_per_clip/{name}"] = (time.perf_counter() - t0) / len(clips)
            failed.update(bad)
    with open(args.captions or os.devnull, newline="") as f:  # the official file list: `<clip path>,"<caption>"`
        caps = {Path(row[0]).stem: row[-1] for row in csv.reader(f) if row}
    for name, fn in (("fvd", lambda: fvd(gen, ref, load_i3d(args.i3d, args.device), seed=args.seed)),
                     ("fad", lambda: fad(gen, ref, load_vggish(args.vggish, args.device))),
                     ("imagebind", lambda: (imagebind_scores([(p, caps.get(p.stem)) for p in gen], args.imagebind,
                                                             args.device), {}))):
        if name in wanted and name != "imagebind" and not ref:
            skipped[name] = "needs --ref"
        elif name in wanted:
            try:
                value, bad = fn()
                res.update(value if isinstance(value, dict) else {name: value})
                failed.update(bad)
            except Exception as e:  # one metric failing never stops the others
                skipped[name] = str(e) if isinstance(e, MetricError) else f"{type(e).__name__}: {e}"
    for k, v in list(failed.items()) + [(f"{k} not computed", v) for k, v in skipped.items()]:
        print(f"{k}: {v}", file=sys.stderr)
    print(f"{'metric':<36}value\n" + "\n".join(f"{k:<36}{'n/a' if v is None else f'{v:.4f}'}" for k, v in res.items()))
    Path(args.out).write_text(json.dumps({"results": res, "per_clip": per_clip, "failed_files": failed,
                                          "not_computed": skipped, "args": vars(args)}, indent=1))
    return res

if __name__ == "__main__":
    main()
