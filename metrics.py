"""Evaluation metrics (Sec. 4.1.1, 4.2.1): AV-Align (av_align.py), FVD, FAD, ImageBind scores, one command for a folder.
FVD follows StyleGAN-V's fvd2048_16f, FAD audioldm_eval's VGGish, ImageBind the official script; feature extractors are
arguments (tests plug in tiny stand-ins). A clip that does not decode whole, or is shorter than --seconds, fails, never
scored from what decodes. Left out: JPEG frame dumps before FVD; PANNs FD, KL, CLAP, CAVP (not in the paper).
"""
import concurrent.futures as cf
import contextlib
import functools
import json
import multiprocessing
import os
import random
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import scipy.linalg
import torch
from tqdm import tqdm

from av_align import VARIANTS, audio_path, av_align_file, read_audio, read_video
from data import read_captions
from support import cli
from support.media import die_with_parent, write_atomic

METRICS = ("av_align", "fvd", "fad", "imagebind")  # Table 1: FVD, FAD, AV-Align; Tables 2-3: ImageBind scores
I3D_URL = "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1"  # StyleGAN-V's fvd2048_16f detector
VGGISH_URL = "https://github.com/harritaylor/torchvggish/releases/download/v0.1/vggish-10086976.pth"  # audioldm_eval
IMAGEBIND_URL = "https://dl.fbaipublicfiles.com/imagebind/imagebind_huge.pth"  # the official ImageBind script

class MetricError(RuntimeError):  # a missing weight file or package: one line, and the other metrics go on
    pass

def _safe(fn, path):  # a bad file is reported, never fatal
    try:
        return fn(path), None
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"

def _worker(parent):
    """A worker's start: one OpenCV thread; it dies with its parent (no worker outlives a killed metrics.py)."""
    cv2.setNumThreads(1)
    die_with_parent()
    if os.getppid() != parent:  # the parent died before the line above: no signal will come, and no work
        os._exit(1)

def map_clips(fn, paths, workers=1, desc=None):
    """fn(path) for each path, a clip per process with one OpenCV thread; returns ({path: value}, {path: error})."""
    ctx = multiprocessing.get_context("spawn")  # a forked child can inherit a lock held by OpenCV's thread pool
    ex = cf.ProcessPoolExecutor(workers, ctx, initializer=_worker, initargs=(os.getpid(),)) if workers > 1 else None
    with ex or contextlib.nullcontext():  # the pool shuts down however the loop ends
        results, ok, bad = (ex.map if ex else map)(_safe, [fn] * len(paths), paths), {}, {}
        for p, (value, err) in tqdm(zip(paths, results), total=len(paths), desc=desc):  # the bar reaches its end
            (bad if err else ok)[str(p)] = err or value
    return ok, bad

def gaussian_stats(feats, ddof):  # ddof=0 as StyleGAN-V's FVD, ddof=1 (np.cov) as audioldm_eval's FAD
    return (f := np.asarray(feats, np.float64)).mean(0), np.atleast_2d(np.cov(f, rowvar=False, ddof=ddof))

def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)); eps * I is added to both when S1 S2 is nearly singular."""
    mu1, mu2, s1, s2 = np.atleast_1d(mu1), np.atleast_1d(mu2), np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    with warnings.catch_warnings(action="ignore", category=scipy.linalg.LinAlgWarning):  # handled below
        covmean = scipy.linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all() or np.abs(np.imag(covmean)).max() > 1e-3 * max(1.0, np.abs(covmean).max()):
            covmean = scipy.linalg.sqrtm((s1 + eps * np.eye(len(s1))) @ (s2 + eps * np.eye(len(s1))))
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)

def _weights(path, url, name, flag):  # the given file, else torch's hub cache, else a download, else one clear line
    if not (cached := Path(path or Path(torch.hub.get_dir()) / "checkpoints" / name)).is_file():
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(cached), progress=False)
        except Exception:
            raise MetricError(f"needs {name}: download {url} and pass {flag} PATH (or save it as {cached})") from None
    return cached

def load_i3d(path=None, device="cpu"):
    """StyleGAN-V's I3D TorchScript: uint8 clips (B, 3, T, H, W) -> (B, 400) pre-softmax features, called like it."""
    with warnings.catch_warnings(action="ignore", category=DeprecationWarning):  # torch calls TorchScript deprecated
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
        import torchvggish
    except ImportError:
        raise MetricError("FAD needs the VGGish code: pip install torchvggish") from None
    net = torchvggish.VGG(torchvggish.make_layers(), postprocess=False).eval().to(device)
    net.load_state_dict(torch.load(_weights(path, VGGISH_URL, "vggish-10086976.pth", "--vggish"), map_location="cpu",
                                   weights_only=True))  # tensors only: never run a file's pickled code
    net.embeddings = net.embeddings[:-1]  # audioldm_eval: use_activation=False
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
        from imagebind import data as ib
        from imagebind.models import imagebind_model
    except ImportError:
        raise MetricError("needs the imagebind package (facebookresearch/ImageBind, CC BY-NC 4.0)") from None
    model, M = imagebind_model.imagebind_huge(pretrained=False).eval().to(device), imagebind_model.ModalityType
    model.load_state_dict(torch.load(_weights(path, IMAGEBIND_URL, "imagebind_huge.pth", "--imagebind"),
                                     map_location="cpu", weights_only=True))
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
    """-> the results; exits 1, after writing what it could, when a requested metric could not be computed."""
    ap = cli.Parser(description="Evaluate generated sounding videos: AV-Align, FVD, FAD, ImageBind.")
    ap.add_argument("--gen", required=True, help="folder of generated <name>.mp4 (+ <name>.wav), as sample.py writes")
    ap.add_argument("--ref", help="folder of reference clips (needed for FVD and FAD)")
    ap.add_argument("--captions", help="`<clip path>,<caption>` list for IB-TV, IB-TA (default: the manifest.jsonl)")
    ap.add_argument("--metrics", nargs="+", choices=METRICS, default=list(METRICS), help="any of them")
    ap.add_argument("--seconds", type=cli.number(float, 0), default=4.0, help="clips shorter fail (4 s: Sec. 4.1.2)")
    ap.add_argument("--out", default="results.json", help="JSON file")
    ap.add_argument("--i3d", help="i3d_torchscript.pt of StyleGAN-V (downloaded when missing and online)")
    ap.add_argument("--vggish", help="vggish-10086976.pth of torchvggish (downloaded when missing and online)")
    ap.add_argument("--imagebind", help="imagebind_huge.pth (downloaded when missing and online)")
    ap.add_argument("--workers", type=cli.number(int, 1), default=os.cpu_count(), help="AV-Align processes")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if not args.out.strip():
        cli.fail("--out: give a file name for the results")
    if args.ref:
        cli.existing(args.ref, "--ref", folder=True)
    if not (gen := sorted(Path(args.gen).glob("*.mp4"))):  # also where --gen is no folder
        cli.fail(f"--gen {args.gen}: no .mp4 files there")
    manifest = Path(args.gen) / "manifest.jsonl"  # sample.py's: a JSON row per clip, with its file and prompt
    try:
        caps = {Path(r["file"]).stem: r["prompt"] for r in map(json.loads, manifest.read_text().splitlines())}
    except OSError:  # no manifest: captions only from --captions
        caps = {}
    except (ValueError, KeyError, TypeError):
        cli.fail(f"{manifest} is not sample.py's (a JSON row per clip with its file and prompt)")
    try:  # --captions over the manifest's
        caps.update(read_captions(args.captions) if args.captions else [])
    except ValueError as e:  # it names the file and line
        cli.fail(str(e))
    ref, res, failed, skipped, per_clip = sorted(Path(args.ref).glob("*.mp4")) if args.ref else [], {}, {}, {}, {}
    def save():  # after each metric, atomically (a temporary file renamed into place): a crash keeps what is done
        try:
            write_atomic(args.out, lambda tmp: Path(tmp).write_text(json.dumps(dict(
                results=res, per_clip=per_clip, failed_files=failed, not_computed=skipped, args=vars(args)), indent=1)))
        except OSError as e:  # unwritable, disk full: one line
            cli.fail(f"--out {args.out}: {e.strerror or type(e).__name__}")
    def av_align_sets():  # each clip in a worker process: the scores per clip, their mean per set and variant
        for name, clips in [("gen", gen)] + ([("ref", ref)] if ref else []):
            fn = functools.partial(av_align_file, variant=None, seconds=args.seconds)
            per_clip[name], bad = map_clips(fn, clips, args.workers, f"AV-Align {name}")
            failed.update(bad)
            res.update({f"av_align_{v}/{name}": float(np.mean([s[v] for s in per_clip[name].values()]))
                        for v in VARIANTS if per_clip[name]})
        if not per_clip["gen"]:
            raise MetricError("no generated clip could be scored")
        return {}, {}
    rows = [(p, caps.get(p.stem)) for p in gen]  # (clip, caption or None)
    jobs = dict(av_align=av_align_sets, fvd=lambda: fvd(gen, ref, load_i3d(args.i3d, args.device)),
                fad=lambda: fad(gen, ref, load_vggish(args.vggish, args.device)),
                imagebind=lambda: (imagebind_scores(rows, args.imagebind, args.device), {}))
    if "imagebind" in args.metrics and not any(c for _, c in rows):
        skipped["IB-TV, IB-TA"] = "no caption for any clip (no manifest.jsonl in --gen with them; give --captions)"
    save()  # first: an unwritable --out fails now, not after the work
    for name in [m for m in METRICS if m in args.metrics]:
        try:
            if name in ("fvd", "fad") and not ref:
                raise MetricError("needs --ref")
            value, bad = jobs[name]()
            res.update(value if isinstance(value, dict) else {name: value})
            failed.update(bad)
        except Exception as e:  # one metric failing never stops the others
            skipped[name] = str(e) if isinstance(e, MetricError) else f"{type(e).__name__}: {e}"
        save()
    for k, v in list(failed.items()) + [(f"{k} not computed", v) for k, v in skipped.items()]:
        print(f"{k}: {v}", file=sys.stderr)
    print(f"{'metric':<36}value\n" + "\n".join(f"{k:<36}{v:.4f}" for k, v in res.items()))
    if skipped:
        print(f"error: not computed: {', '.join(skipped)} (see above); the rest is in {args.out}", file=sys.stderr)
        raise SystemExit(1)
    return res

if __name__ == "__main__":
    main()
