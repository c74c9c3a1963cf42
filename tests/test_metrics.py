"""Tests for metrics.py: AV-Align on synthetic clips with known hit times and against an independent transcription of
the official scripts, Frechet distances against closed forms, the FVD / FAD / ImageBind paths with stand-in feature
extractors, and the command end to end on a folder of tiny mp4s."""
import json
import os
import random
import re
import sys
from pathlib import Path

import cv2
import imageio_ffmpeg
import librosa
import numpy as np
import pytest
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import av_align  # noqa: E402
import metrics  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")  # stand-ins for a TorchScript file

FPS, SR, SIZE, T = 8, 16000, 64, 32  # 4 s clips at the paper's 8 fps and 16 kHz, 64x64 to stay fast
HITS = [5, 13, 22]  # frames at which the bar strikes


def make_frames(hits=HITS, seed=0, num_frames=T):
    """A textured bar that moves 1 px, then 6 px onto the hit frame, then bounces back by 3, 2, 1 px: the mean flow
    has a strict local maximum exactly at every hit frame."""
    texture = np.random.default_rng(seed).integers(0, 256, (8, 40, 3), dtype=np.uint8)
    y = np.full(num_frames, 8)
    for k in hits:
        for d, pos in zip(range(-1, 4), [9, 15, 12, 10, 9]):
            if 0 <= k + d < num_frames:
                y[k + d] = pos
    frames = np.full((num_frames, SIZE, SIZE, 3), 40, np.uint8)
    for t in range(num_frames):
        frames[t, y[t]:y[t] + 8, 12:52] = texture
    return frames


def make_audio(times, seed=0, gap=None):
    """Silence with a 30 ms decaying noise click at each time (two clicks gap s apart when gap is set)."""
    rng, y = np.random.default_rng(seed), np.zeros(4 * SR, np.float32)
    click = (rng.standard_normal(480) * np.exp(-np.arange(480) / 80)).astype(np.float32)
    for t in times:
        for s in ([t] if gap is None else [t - gap / 2, t + gap / 2]):
            i = int(round(s * SR))
            y[i:i + 480] += click[:len(y[i:i + 480])]
    return 0.5 * y / max(np.abs(y).max(), 1e-9)


HIT_TIMES = [k / FPS for k in HITS]


def write_clip(path, frames, audio, fps=FPS, wav=True):
    """H.264 mp4 with the audio as its AAC track (imageio-ffmpeg), plus a same-stem 16-bit wav when wav is set."""
    track = Path(path).with_suffix(".wav") if wav else Path(path).with_name(Path(path).stem + "_track.wav")
    sf.write(track, audio, SR, subtype="PCM_16")
    gen = imageio_ffmpeg.write_frames(str(path), (frames.shape[2], frames.shape[1]), fps=fps, codec="libx264",
                                      pix_fmt_out="yuv420p", quality=None, audio_path=str(track), audio_codec="aac",
                                      output_params=["-crf", "18", "-ar", str(SR), "-ac", "1", "-shortest"])
    gen.send(None)
    for f in frames:
        gen.send(np.ascontiguousarray(f))
    gen.close()
    if not wav:
        track.unlink()
    return Path(path)


# ---------------------------------------------------------------------------- independent reference transcription
def official_reference(mp4, wav, flows=None):
    """The official algorithms transcribed from their description (App. A.4 and the official scripts), as literally as
    they are written there: TempoTokens 2023 (Eq. 12), TempoTokens 2025 and the paper's SVG_baseline script (Eq. 14).
    Undefined scores (division by zero) are None. flows: a flow trajectory to score instead of the one computed here
    (OpenCV's magnitude varies in the last bits from run to run, so a near-tie of two frames can flip a peak)."""
    cap, frames = cv2.VideoCapture(str(mp4)), []
    fps = cap.get(cv2.CAP_PROP_FPS)
    while True:
        ret, frame = cap.read()
        if not ret:
            break
        frames.append(frame)
    cap.release()

    def flow(img1, img2):
        prev, curr = cv2.cvtColor(img1, cv2.COLOR_BGR2GRAY), cv2.cvtColor(img2, cv2.COLOR_BGR2GRAY)
        f = cv2.calcOpticalFlowFarneback(prev, curr, None, 0.5, 3, 15, 3, 5, 1.2, 0)
        return cv2.mean(cv2.magnitude(f[..., 0], f[..., 1]))[0]

    traj = []
    for i in range(len(frames)):
        traj.append(flow(frames[0], frames[1]) if i == 0 else flow(frames[i - 1], frames[i]))

    def peaks(arr, threshold):
        return [i / fps for i in range(1, len(arr) - 1) if arr[i - 1] < arr[i] > arr[i + 1] and arr[i] >= threshold]

    y, sr = librosa.load(str(wav))
    env = librosa.onset.onset_strength(y=y, sr=sr)
    onsets = list(librosa.frames_to_time(librosa.onset.onset_detect(onset_envelope=env, sr=sr), sr=sr))
    traj = traj if flows is None else list(flows)
    V, V25 = peaks(traj, -np.inf), peaks(traj, 0.1)

    c = 0  # 2023: each onset counts once if any peak is in its window
    for a in onsets:
        for v in V:
            if v - 1 / fps < a < v + 1 / fps:
                c += 1
                break
    c25, used = 0, [False] * len(V25)  # 2025: greedy one-to-one
    for a in onsets:
        for j, v in enumerate(V25):
            if not used[j] and v - 1 / fps < a < v + 1 / fps:
                used[j], c25 = True, c25 + 1
                break
    p = sum(any(v - 1 / fps < a < v + 1 / fps for v in V) for a in onsets) / len(onsets) if onsets else 0
    r = sum(any(a - 1 / fps < v < a + 1 / fps for a in onsets) for v in V) / len(V) if V else 0
    scores = {"iou": p * r / (p + r - p * r) if p > 0 or r > 0 else 0.0,
              "official": c / (len(onsets) + len(V) - c) if onsets or V else None,
              "official_2025": c25 / (len(onsets) + len(V25) - c25) if onsets or V25 else None}
    return np.array(traj), np.array(onsets), scores


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """Tiny mp4 + wav clips: aligned, shifted by 0.5 s, random clicks, two clicks per hit, silent and static."""
    d, rng = tmp_path_factory.mktemp("clips"), np.random.default_rng(3)
    audio = {"aligned": make_audio(HIT_TIMES), "shifted": make_audio([t + 0.5 for t in HIT_TIMES]),
             "random": make_audio(rng.uniform(0.2, 3.8, 4), seed=1), "double": make_audio(HIT_TIMES, gap=0.08),
             "silent": np.zeros(4 * SR, np.float32)}
    for name, a in audio.items():
        write_clip(d / f"{name}.mp4", make_frames(hits=[] if name == "silent" else HITS), a)
    return d


# ------------------------------------------------------------------------------------------------------ AV-Align
def test_aligned_scores_above_shifted_and_random():
    frames = make_frames()
    aligned = {v: av_align.av_align(frames, FPS, make_audio(HIT_TIMES), SR, v) for v in av_align.VARIANTS}
    shifted = {v: av_align.av_align(frames, FPS, make_audio([t + 0.5 for t in HIT_TIMES]), SR, v)
               for v in av_align.VARIANTS}
    assert all(aligned[v] >= 0.9 and shifted[v] < aligned[v] for v in av_align.VARIANTS), (aligned, shifted)
    for seed in range(3):
        times = np.random.default_rng(seed).uniform(0.2, 3.8, 3)
        rand = av_align.av_align(frames, FPS, make_audio(times, seed=seed), SR, "iou")
        assert rand < aligned["iou"]


def test_peaks_and_onsets_land_on_the_hits():
    assert np.allclose(av_align.video_peaks(av_align.flow_trajectory(make_frames()), FPS), HIT_TIMES)
    onsets = av_align.audio_onsets(make_audio(HIT_TIMES), SR)
    assert len(onsets) == len(HITS) and np.all(np.abs(onsets - HIT_TIMES) < 0.5 / FPS)


def test_two_onsets_per_peak_official_exceeds_one():
    """App. A.4.2: when |A| > |V| Eq. (12) exceeds one; Eq. (14) and the 2025 script stay in [0, 1]."""
    frames, audio = make_frames(), make_audio(HIT_TIMES, gap=0.08)
    A, V = av_align.audio_onsets(audio, SR), av_align.video_peaks(av_align.flow_trajectory(frames), FPS)
    assert len(A) == 2 * len(V)
    s = {v: av_align.av_align(frames, FPS, audio, SR, v) for v in av_align.VARIANTS}
    assert s["official"] == 2 * len(V) / (2 * len(V) + len(V) - 2 * len(V)) == 2.0
    assert s["iou"] == 1.0 and s["official_2025"] == len(V) / (2 * len(V)) == 0.5


def test_scores_by_hand_and_bounds():
    # A = {0.5, 1.0, 2.0}, V = {0.55, 3.0}, window 1/8 s: one onset and one peak match, p = 1/3, r = 1/2
    p, r = 1 / 3, 1 / 2
    iou = av_align.align_score([0.5, 1.0, 2.0], [0.55, 3.0], 8, "iou")
    assert iou == pytest.approx(p * r / (p + r - p * r)) == 0.25
    assert av_align.align_score([0.5, 1.0, 2.0], [0.55, 3.0], 8, "official") == 1 / (3 + 2 - 1)
    rng = np.random.default_rng(0)
    for _ in range(300):
        A, V = np.sort(rng.uniform(0, 4, rng.integers(0, 8))), np.sort(rng.uniform(0, 4, rng.integers(0, 8)))
        fps = rng.choice([4, 8, 30])
        assert 0.0 <= av_align.align_score(A, V, fps, "iou") <= 1.0
        assert 0.0 <= av_align.align_score(A, V, fps, "official_2025") <= 1.0
        assert av_align.align_score(A, V, fps, "official") >= 0.0
    with pytest.raises(ValueError, match="unknown AV-Align variant"):
        av_align.av_align(make_frames(), FPS, make_audio(HIT_TIMES), SR, "nope")


def test_empty_onset_and_peak_sets():
    for v in av_align.VARIANTS:
        assert av_align.align_score([], [], FPS, v) == 0.0
        assert av_align.align_score([1.0], [], FPS, v) == 0.0
        assert av_align.align_score([], [1.0], FPS, v) == 0.0
        static = np.full((T, SIZE, SIZE, 3), 90, np.uint8)
        assert av_align.av_align(static, FPS, np.zeros(4 * SR, np.float32), SR, v) == 0.0  # no onsets, no peaks
        assert av_align.av_align(make_frames()[:2], FPS, make_audio(HIT_TIMES), SR, v) == 0.0  # too short for a peak


def test_exactly_the_official_numbers(clip_dir):
    for name in ["aligned", "shifted", "random", "double", "silent"]:
        mp4, wav = clip_dir / f"{name}.mp4", clip_dir / f"{name}.wav"
        traj, onsets, _ = official_reference(mp4, wav)
        frames, fps = av_align.read_video(mp4)
        ours_traj = av_align.flow_trajectory(frames)
        # the official script's own flow values vary in the last bits between runs (see flow_trajectory)
        assert np.allclose(ours_traj, traj, rtol=1e-9, atol=0), name
        assert np.array_equal(av_align.audio_onsets(*av_align.read_audio(wav)), onsets), name
        ref = official_reference(mp4, wav, flows=ours_traj)[2]  # the official peak picking and scores on our flows
        ours = av_align.av_align_file(mp4, wav, variant=None)
        for v in av_align.VARIANTS:
            assert ours[v] == (0.0 if ref[v] is None else ref[v]), (name, v, ours[v], ref[v])
    assert official_reference(clip_dir / "double.mp4", clip_dir / "double.wav")[2]["official"] > 1


def test_audio_from_the_mp4_track(tmp_path):
    mp4 = write_clip(tmp_path / "track.mp4", make_frames(), make_audio(HIT_TIMES), wav=False)
    audio, sr = av_align.read_audio(mp4)
    assert sr == SR and abs(len(audio) - 4 * SR) < 0.01 * SR
    assert av_align.audio_path(mp4) == mp4 and av_align.av_align_file(mp4, variant="iou") == 1.0


# ------------------------------------------------------------------------------------------ Frechet distances
def eig_trace_sqrt(s1, s2):
    """Tr((S1 S2)^(1/2)) by an independent route: eigenvalues of S1^(1/2) S2 S1^(1/2), which is symmetric PSD."""
    w, U = np.linalg.eigh(s1)
    r = (U * np.sqrt(np.clip(w, 0, None))) @ U.T
    return np.sqrt(np.clip(np.linalg.eigvalsh(r @ s2 @ r), 0, None)).sum()


def test_frechet_closed_forms():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, 6))
    mu, S = X.mean(0), np.cov(X, rowvar=False)
    assert abs(metrics.frechet_distance(mu, S, mu, S)) < 1e-8
    assert metrics.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx((1 - 3) ** 2 + (2 - 3) ** 2)
    m1, m2, d1, d2 = rng.normal(size=5), rng.normal(size=5), rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    diag = np.sum((m1 - m2) ** 2 + (np.sqrt(d1) - np.sqrt(d2)) ** 2)
    assert metrics.frechet_distance(m1, np.diag(d1), m2, np.diag(d2)) == pytest.approx(diag, rel=1e-10)
    S2 = np.cov(rng.standard_normal((200, 6)) @ rng.standard_normal((6, 6)), rowvar=False)
    general = np.sum((mu - 1) ** 2) + np.trace(S) + np.trace(S2) - 2 * eig_trace_sqrt(S, S2)
    assert metrics.frechet_distance(mu, S, np.ones(6), S2) == pytest.approx(general, rel=1e-9)


def test_frechet_near_singular():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((30, 64)) * 3, rng.standard_normal((30, 64)) @ rng.standard_normal((64, 64)) * 0.3
    (m1, s1), (m2, s2) = metrics.gaussian_stats(a, 1), metrics.gaussian_stats(b, 1)  # rank 29 < 64
    d = metrics.frechet_distance(m1, s1, m2, s2)
    expected = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * eig_trace_sqrt(s1, s2)
    assert isinstance(d, float) and np.isfinite(d) and d == pytest.approx(expected, rel=1e-6)
    z = np.zeros((3, 3))  # degenerate Gaussians: only the means are left
    assert metrics.frechet_distance(np.zeros(3), z, np.ones(3), z) == pytest.approx(3.0)


# ----------------------------------------------------------------------------------- FVD / FAD with stand-ins
def test_fvd_protocol_with_stand_in(monkeypatch):
    """16 consecutive frames, generated clips from frame 0, real clips from a random offset followed by their flips,
    at most max_items clips; features -> population covariance -> Frechet distance."""
    def fake_video(path):  # frame t holds the value t, column 0 is 255 (so a flip moves it to the last column)
        n = int(Path(path).stem.split("_")[1])
        frames = np.repeat(np.arange(n, dtype=np.uint8)[:, None, None, None], SIZE, 1).repeat(SIZE, 2).repeat(3, 3)
        frames[:, :, 0] = 255
        return frames, FPS
    monkeypatch.setattr(metrics, "read_video", fake_video)
    shapes = []

    def extract(clips):  # (B, 3, T, H, W) uint8 -> frame values, and where the 255 column is
        shapes.append((clips.shape, clips.dtype))
        return np.concatenate([clips[:, 0, :, 1, 1], clips[:, 0, :1, 1, -1] == 255], 1).astype(float)
    gen, ref = [Path(f"g_{n}") for n in (20, 16, 10)], [Path(f"r_{n}") for n in (24, 30)]
    g, _ = metrics.video_features(gen, extract, real=False)
    assert g.shape == (2, 17) and np.array_equal(g[:, :16], np.tile(np.arange(16), (2, 1)))  # 10 frames: dropped
    assert all(s[0][1:] == (3, 16, SIZE, SIZE) and s[1] == np.uint8 for s in shapes)
    r, _ = metrics.video_features(ref, extract, real=True, max_items=3, seed=5, batch=2)
    rng = random.Random(5)
    offsets = [rng.randint(0, 24 - 16), rng.randint(0, 30 - 16), rng.randint(0, 24 - 16)]
    assert np.array_equal(r[:, :16], np.array([np.arange(o, o + 16) for o in offsets]))
    assert r[:, 16].tolist() == [0, 0, 1]  # two originals, then the flip of the first
    value, _ = metrics.fvd(gen, ref, extract, max_items=3, seed=5)
    cov = lambda x: (x - x.mean(0)).T @ (x - x.mean(0)) / len(x)  # noqa: E731, StyleGAN-V divides by N
    assert value == pytest.approx(metrics.frechet_distance(g.mean(0), cov(g), r.mean(0), cov(r)))


def test_i3d_torchscript_loader(tmp_path):
    class TinyI3D(torch.nn.Module):  # the call signature of StyleGAN-V's i3d_torchscript.pt
        def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False):
            assert x.dtype == torch.uint8 and rescale and resize and return_features
            x = x.float() / 127.5 - 1
            return torch.cat([x.mean((2, 3, 4)), x.std((2, 3, 4))], 1)
    torch.jit.save(torch.jit.script(TinyI3D()), tmp_path / "i3d.pt")
    clips = np.random.default_rng(0).integers(0, 256, (2, 3, 16, 8, 8), dtype=np.uint8)
    out = metrics.load_i3d(tmp_path / "i3d.pt")(clips)
    assert out.shape == (2, 6) and np.allclose(out[:, :3], (clips / 127.5 - 1).mean((2, 3, 4)), atol=1e-6)


def stand_in_audio_features(wave, sr):
    """Log energy and zero-crossing rate of each 0.25 s chunk: (16, 2) for 4 s."""
    chunks = np.asarray(wave)[: len(wave) // (sr // 4) * (sr // 4)].reshape(-1, sr // 4)
    return np.stack([np.log(1e-6 + (chunks ** 2).mean(1)), (np.diff(np.sign(chunks), axis=1) != 0).mean(1)], 1)


def test_fad_path_with_stand_in(tmp_path):
    gen, ref = tmp_path / "gen", tmp_path / "ref"
    gen.mkdir(), ref.mkdir()
    frames, seen = make_frames(), []
    for i in range(3):
        write_clip(gen / f"{i}.mp4", frames, make_audio(HIT_TIMES, seed=i))
        write_clip(ref / f"{i}.mp4", frames, 0.3 * make_audio([0.5, 1.5, 2.5, 3.5], seed=10 + i))

    def extract(wave, sr):
        seen.append((wave.dtype.name, sr))
        return stand_in_audio_features(wave, sr)
    gen_mp4, ref_mp4 = sorted(gen.glob("*.mp4")), sorted(ref.glob("*.mp4"))
    assert metrics.fad(gen_mp4, gen_mp4, extract)[0] == pytest.approx(0.0, abs=1e-8)
    value, bad = metrics.fad(gen_mp4, ref_mp4, extract)
    by_hand = [np.concatenate([stand_in_audio_features(sf.read(p.with_suffix(".wav"))[0], SR) for p in mp4s])
               for mp4s in (gen_mp4, ref_mp4)]
    expected = metrics.frechet_distance(by_hand[0].mean(0), np.cov(by_hand[0], rowvar=False),
                                        by_hand[1].mean(0), np.cov(by_hand[1], rowvar=False))
    assert value > 0.1 and value == pytest.approx(expected) and not bad
    assert set(seen) == {("float64", SR)}


def test_vggish_loader_drops_the_last_relu(tmp_path):
    tv = pytest.importorskip("torchvggish")
    full = tv.VGG(tv.make_layers(), postprocess=False).eval()
    torch.save(full.state_dict(), tmp_path / "vggish.pth")
    wave = np.random.default_rng(0).standard_normal(4 * SR) * 0.1
    ours = metrics.load_vggish(tmp_path / "vggish.pth")(wave, SR)
    with torch.no_grad():
        theirs = full(tv.waveform_to_examples(wave, SR, return_tensor=True)).numpy()
    assert ours.shape == (4, 128) and (ours < 0).any() and np.allclose(np.maximum(ours, 0), theirs, atol=1e-5)


def test_missing_weights_and_packages_are_one_line(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise OSError("no network")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(metrics.MetricError, match="i3d_torchscript.pt.*missing.pt") as e:
        metrics.load_i3d(tmp_path / "missing.pt")
    assert "\n" not in str(e.value)
    with pytest.raises(metrics.MetricError, match="dropbox.*--i3d.*hub"):
        metrics.load_i3d(None)
    with pytest.raises(metrics.MetricError, match="vggish-10086976.pth|pip install torchvggish"):
        metrics.load_vggish(tmp_path / "missing.pth")
    try:
        import imagebind  # noqa: F401
    except ImportError:
        with pytest.raises(metrics.MetricError, match="CC BY-NC 4.0"):
            metrics.imagebind_scores([])


def test_imagebind_path_with_stand_in_package(tmp_path, monkeypatch):
    """A stand-in `imagebind` package with ImageBind's module layout: checks the pairing of embeddings, the per-clip
    cosine and the averaging over clips (rows without a caption count for IB-AV only)."""
    import types
    M = types.SimpleNamespace(TEXT="text", VISION="vision", AUDIO="audio")
    vec = {"a.mp4": [1.0, 0.0], "a.wav": [1.0, 1.0], "b.mp4": [0.0, 1.0], "b.wav": [1.0, 0.0], "cap a": [2.0, 0.0]}

    class Huge(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):  # the loaders below already produce the embeddings; scale is loaded from the file
            return {k: v * self.scale for k, v in x.items()}
    load = lambda names, device: torch.tensor([vec[Path(n).name] for n in names])  # noqa: E731
    data = types.SimpleNamespace(load_and_transform_text=lambda caps, device: torch.tensor([vec[c] for c in caps]),
                                 load_and_transform_video_data=load, load_and_transform_audio_data=load)
    model_mod = types.SimpleNamespace(imagebind_huge=lambda pretrained: Huge(), ModalityType=M)
    pkg = types.SimpleNamespace(data=data, models=types.SimpleNamespace(imagebind_model=model_mod))
    monkeypatch.setitem(sys.modules, "imagebind", pkg)
    monkeypatch.setitem(sys.modules, "imagebind.models", pkg.models)
    monkeypatch.setitem(sys.modules, "imagebind.models.imagebind_model", model_mod)
    torch.save({"scale": torch.ones(1)}, tmp_path / "ib.pth")
    for name in ("a", "b"):
        (tmp_path / f"{name}.wav").write_bytes(b"")
    scores = metrics.imagebind_scores([(tmp_path / "a.mp4", "cap a"), (tmp_path / "b.mp4", None)], tmp_path / "ib.pth")
    assert scores["IB-TV"] == pytest.approx(1.0) and scores["IB-TA"] == pytest.approx(2 ** -0.5)  # clip a only
    assert scores["IB-AV"] == pytest.approx((2 ** -0.5 + 0.0) / 2)
    for name in ("a", "b"):  # the same through the command, captions from an official-format file list
        (tmp_path / f"{name}.mp4").write_bytes(b"")
    (tmp_path / "flist.txt").write_text('./clips/a.mp4,"cap a"\n')
    res = metrics.main(["--gen", str(tmp_path), "--metrics", "imagebind", "--captions", str(tmp_path / "flist.txt"),
                        "--imagebind", str(tmp_path / "ib.pth"), "--out", str(tmp_path / "r.json")])
    assert res == pytest.approx(scores)


# ------------------------------------------------------------------------------------------------------ command
def test_command_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    class TinyI3D(torch.nn.Module):
        def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False):
            return x.float().mean((3, 4)).flatten(1)  # (B, 3 * 16)
    torch.jit.save(torch.jit.script(TinyI3D()), tmp_path / "i3d.pt")
    gen, ref = tmp_path / "gen", tmp_path / "ref"
    gen.mkdir(), ref.mkdir()
    write_clip(gen / "a.mp4", make_frames(), make_audio(HIT_TIMES))
    write_clip(gen / "b.mp4", make_frames(seed=1), make_audio(HIT_TIMES, seed=1), wav=False)  # audio track only
    (gen / "broken.mp4").write_bytes(b"not a video")
    write_clip(ref / "c.mp4", make_frames(seed=2), make_audio([t + 0.5 for t in HIT_TIMES]))
    out = tmp_path / "results.json"
    with pytest.raises(SystemExit) as e:  # FAD's weights (and ImageBind) are missing: written, then exit 1
        metrics.main(["--gen", str(gen), "--ref", str(ref), "--out", str(out), "--workers", "1", "--i3d",
                      str(tmp_path / "i3d.pt"), "--vggish", str(tmp_path / "missing.pth")])
    res = json.loads(out.read_text())
    assert e.value.code == 1 and "fad" in res["not_computed"]
    assert res["results"]["av_align_iou/gen"] == 1.0 and res["results"]["av_align_iou/ref"] == 0.0
    assert set(res["per_clip"]["gen"]) == {str(gen / "a.mp4"), str(gen / "b.mp4")}
    assert str(gen / "broken.mp4") in res["failed_files"]
    assert res["results"]["fvd"] > 0 and {"fad", "imagebind"} <= set(res["not_computed"]) | set(res["results"])
    printed = capsys.readouterr()
    assert "av_align_iou/gen" in printed.out and "broken.mp4" in printed.err
    with pytest.raises(SystemExit):
        metrics.main(["--gen", str(tmp_path / "nowhere")])


def test_damaged_or_short_clips_fail_per_file_and_the_output_opens_first(tmp_path, monkeypatch, capsys):
    from support import media
    gen = tmp_path / "gen"
    gen.mkdir()
    media.write_mp4(gen / "good.mp4", make_frames(), FPS, make_audio(HIT_TIMES))  # as sample.py writes (faststart)
    whole = (gen / "good.mp4").read_bytes()
    (gen / "cut.mp4").write_bytes(whole[:len(whole) * 6 // 10])  # its header still lists 32 frames; 7 decode
    media.write_mp4(gen / "short.mp4", make_frames()[:16], FPS, make_audio(HIT_TIMES)[:2 * SR])  # 2 s of a 4 s clip
    res = metrics.main(["--gen", str(gen), "--metrics", "av_align", "--workers", "2", "--out",
                        str(tmp_path / "r.json")])
    failed = json.loads((tmp_path / "r.json").read_text())["failed_files"]
    assert res["av_align_iou/gen"] == 1.0 and set(failed) == {str(gen / "cut.mp4"), str(gen / "short.mp4")}
    assert "truncated or unreadable: 7 of the 32 frames decode" in failed[str(gen / "cut.mp4")]
    assert "too short" in failed[str(gen / "short.mp4")]
    monkeypatch.setattr(metrics, "map_clips", lambda *a, **k: pytest.fail("scored before --out was checked"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        metrics.main(["--gen", str(gen), "--out", "/proc/nope/r.json"])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: --out /proc/nope/r.json")


def test_weight_files_load_as_tensors_only(tmp_path, monkeypatch):
    import types

    class Payload:  # a pickle that runs code when loaded without weights_only
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))
    torch.save({"w": torch.zeros(1), "x": Payload()}, tmp_path / "evil.pth")
    fake = types.SimpleNamespace(VGG=lambda *a, **k: torch.nn.Linear(1, 1), make_layers=lambda: None)
    monkeypatch.setitem(sys.modules, "torchvggish", fake)
    with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
        metrics.load_vggish(tmp_path / "evil.pth")
    assert not (tmp_path / "pwned").exists()


# ------------------------------------------------------------------------------------ failures, files, processes
def test_a_requested_metric_not_computed_fails_the_run_after_writing_the_rest(clip_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    with pytest.raises(SystemExit) as e:  # FVD and FAD need --ref: requested, so the run fails
        metrics.main(["--gen", str(clip_dir), "--metrics", "av_align", "fvd", "fad", "--workers", "1",
                      "--out", str(out)])
    res = json.loads(out.read_text())
    assert e.value.code == 1 and res["results"]["av_align_iou/gen"] is not None
    assert res["not_computed"] == {"fvd": "needs --ref", "fad": "needs --ref"}
    err = capsys.readouterr().err
    assert "fvd not computed: needs --ref" in err and err.strip().splitlines()[-1].startswith("error: not computed")


def test_results_replace_the_file_and_bad_arguments_are_one_line(clip_dir, tmp_path, capsys):
    out, gen = tmp_path / "r.json", tmp_path / "gen"
    out.write_text("an earlier run")
    metrics.main(["--gen", str(clip_dir), "--metrics", "av_align", "--workers", "1", "--out", str(out)])
    assert json.loads(out.read_text())["results"]["av_align_iou/gen"] is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no temporary file left
    (tmp_path / "bad.txt").write_text("a.mp4\n")  # a clip without its caption
    gen.mkdir()
    (gen / "a.mp4").symlink_to(clip_dir / "aligned.mp4")
    (gen / "manifest.jsonl").write_text('{"file": "a.mp4"}\n')  # a row without its prompt
    for argv, message in ((["--gen", str(clip_dir), "--out", ""], "error: --out: give a file name"),
                          (["--gen", str(clip_dir), "--captions", str(tmp_path / "bad.txt")],
                           f"error: {tmp_path / 'bad.txt'}:1: no caption"),
                          (["--gen", str(clip_dir), "--metrics", "av_align", "fid"],
                           "error: argument --metrics: invalid choice: 'fid'"),
                          (["--gen", str(tmp_path / "nowhere")], f"error: --gen {tmp_path / 'nowhere'}: no .mp4 files"),
                          (["--gen", str(gen)], f"error: {gen / 'manifest.jsonl'} is not sample.py's")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            metrics.main(["--metrics", "av_align", "--out", str(out)] + argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(message) and len(err.strip().splitlines()) == 1, err


def _children(pid):
    """The multiprocessing workers among a process's children (Linux /proc)."""
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [int(k) for k in kids if b"spawn_main" in Path(f"/proc/{k}/cmdline").read_bytes()]


def _alive(pid):
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()  # a zombie has died
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc to find the workers")
def test_sigkill_takes_the_workers_along(clip_dir, tmp_path):
    import select
    import signal
    import subprocess
    import time
    gen = tmp_path / "gen"
    gen.mkdir()
    for k in range(40):  # ~4 s of work for two workers: both are busy when the kill comes
        for ext in (".mp4", ".wav"):
            (gen / f"c{k:02d}{ext}").symlink_to(clip_dir / f"aligned{ext}")
    root = Path(__file__).resolve().parents[1]
    log = open(tmp_path / "stderr.txt", "wb")
    proc = subprocess.Popen([sys.executable, str(root / "metrics.py"), "--gen", str(gen), "--metrics", "av_align",
                             "--workers", "2", "--out", str(tmp_path / "r.json")], cwd=root, stdout=subprocess.PIPE,
                            stderr=log)
    deadline, workers = time.time() + 180, []
    started = lambda: re.search(r"AV-Align gen: +[1-9]\d?%", (tmp_path / "stderr.txt").read_text())  # 1-99 %
    while time.time() < deadline and proc.poll() is None and not (len(workers) == 2 and started()):
        time.sleep(0.1)  # until both workers run and have scored some of the 40 clips
        workers = _children(proc.pid)
    assert len(workers) == 2 and proc.poll() is None, "the workers never started"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log.close()
    t0, eof = time.time(), False
    while time.time() - t0 < 20 and not eof:  # the caller's pipe closes once no worker holds it
        if select.select([proc.stdout], [], [], 0.5)[0]:
            eof = proc.stdout.read1(65536) == b""
    alive = [w for w in workers if _alive(w)]
    for w in alive:
        os.kill(w, signal.SIGKILL)
    assert eof and not alive, f"workers {alive} outlived the SIGKILLed metrics.py and hold its stdout"


def stand_in_imagebind(monkeypatch, texts):
    """A stand-in `imagebind` package (ImageBind's module layout) whose embeddings depend on the file or the text;
    the captions it embeds are collected in `texts`."""
    import types
    M = types.SimpleNamespace(TEXT="text", VISION="vision", AUDIO="audio")

    class Huge(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return {k: v * self.scale for k, v in x.items()}
    files = lambda names, device: torch.tensor([[1.0 + len(Path(n).stem), float(Path(n).suffix == ".wav")]  # noqa: E731
                                                for n in names])
    text = lambda caps, device: texts.extend(caps) or torch.tensor([[float(len(c)), 1.0] for c in caps])  # noqa: E731
    data = types.SimpleNamespace(load_and_transform_text=text, load_and_transform_video_data=files,
                                 load_and_transform_audio_data=files)
    model_mod = types.SimpleNamespace(imagebind_huge=lambda pretrained: Huge(), ModalityType=M)
    pkg = types.SimpleNamespace(data=data, models=types.SimpleNamespace(imagebind_model=model_mod))
    monkeypatch.setitem(sys.modules, "imagebind", pkg)
    monkeypatch.setitem(sys.modules, "imagebind.models", pkg.models)
    monkeypatch.setitem(sys.modules, "imagebind.models.imagebind_model", model_mod)


def stand_in_vggish(monkeypatch):
    """A stand-in `torchvggish` with its interface: VGG(make_layers(), postprocess) whose .embeddings ends in a ReLU,
    and waveform_to_examples (here: the stand-in audio features)."""
    import types

    class VGG(torch.nn.Module):
        def __init__(self, features, postprocess=True):
            super().__init__()
            self.embeddings = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU())

        def forward(self, x):
            return self.embeddings(x.float())
    examples = lambda wave, sr, return_tensor: torch.tensor(stand_in_audio_features(wave, sr))  # noqa: E731
    monkeypatch.setitem(sys.modules, "torchvggish", types.SimpleNamespace(VGG=VGG, make_layers=lambda: None,
                                                                          waveform_to_examples=examples))
    return VGG(None)


def test_sample_from_captions_then_every_metric(tmp_path, monkeypatch, capsys):
    """The whole evaluation chain on tiny stand-ins: sample.py from an official-format caption list (2 captions, tiny
    models, 2 steps) -> metrics.py with the reference clips and NO --captions (they come from the manifest) -> every
    requested metric is in the results; a metric that cannot be computed fails the run."""
    import sample
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    ref, gen = tmp_path / "ref", tmp_path / "gen"
    ref.mkdir()
    captions = {"clip_a": "A person hits a box with a stick.", "clip_b": "A person taps a metal can."}
    for k, stem in enumerate(captions):
        write_clip(ref / f"{stem}.mp4", make_frames(seed=k), make_audio(HIT_TIMES, seed=k))
    (tmp_path / "test.txt").write_text("".join(f'./ref/{s}.mp4,"{c}"\n' for s, c in captions.items()))
    sample.main(["--size", "tiny", "--captions", str(tmp_path / "test.txt"), "--steps", "2", "--out", str(gen),
                 "--device", "cpu"])
    assert sorted(p.name for p in gen.glob("*.mp4")) == ["clip_a.mp4", "clip_b.mp4"]  # named by the reference clip

    class TinyI3D(torch.nn.Module):
        def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False):
            return x.float().mean((3, 4)).flatten(1)  # (B, 3 * 16)
    torch.jit.save(torch.jit.script(TinyI3D()), tmp_path / "i3d.pt")
    torch.save(stand_in_vggish(monkeypatch).state_dict(), tmp_path / "vggish.pth")
    torch.save({"scale": torch.ones(1)}, tmp_path / "ib.pth")
    texts = []
    stand_in_imagebind(monkeypatch, texts)
    argv = ["--gen", str(gen), "--ref", str(ref), "--workers", "1", "--i3d", str(tmp_path / "i3d.pt"), "--vggish",
            str(tmp_path / "vggish.pth"), "--imagebind", str(tmp_path / "ib.pth"), "--out", str(tmp_path / "r.json")]
    res = metrics.main(argv)  # the four default metrics
    for key in ("av_align_iou/gen", "av_align_iou/ref", "fvd", "fad", "IB-TV", "IB-TA", "IB-AV"):
        assert res.get(key) is not None and np.isfinite(res[key]), key
    assert sorted(texts) == sorted(captions.values())  # one text embedding per clip, its caption from the manifest
    assert json.loads((tmp_path / "r.json").read_text())["not_computed"] == {}
    monkeypatch.delitem(sys.modules, "torchvggish")  # the real one, if installed, cannot read the stand-in's weights
    with pytest.raises(SystemExit) as e:
        metrics.main(argv + ["--metrics", "av_align", "fad"])
    assert e.value.code == 1 and "fad" in json.loads((tmp_path / "r.json").read_text())["not_computed"]
