"""data.py: AudioLDM log-mel vs librosa, mp4 round trips through ffmpeg, file lists, bad-file skipping, synthetic clips
(hit timing checked with librosa onsets and OpenCV Farneback flow, the two halves of AV-Align)."""
import os, shutil, subprocess, sys

import cv2
import librosa
import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
from support import media  # noqa: E402
from support import synthetic  # noqa: E402

LISTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "datasets")  # the official lists, in the repo


def lavfi_clip(path, seconds, size="320x240", rate=30, sr=48000, channels=2, audio=True):
    """A test pattern video from ffmpeg's own generators (not from data.py), optionally with a 440 Hz tone."""
    args = [data.FFMPEG, "-y", "-v", "error", "-f", "lavfi", "-i", f"testsrc=size={size}:rate={rate}"]
    if audio:
        args += ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate={sr}", "-ac", str(channels)]
    subprocess.run(args + ["-t", str(seconds), "-pix_fmt", "yuv420p", str(path)], check=True)
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """A small library of good and bad files, written once for the module."""
    d = tmp_path_factory.mktemp("clips")
    c = synthetic.synthetic_clip(3)
    media.write_mp4(d / "good-000.mp4", c["frames"], 8, c["audio"])
    lavfi_clip(d / "stereo48k30fps-000.mp4", 5)  # stereo, 48 kHz, 30 fps, 320x240: resampled, kept
    lavfi_clip(d / "noaudio-000.mp4", 5, audio=False)
    lavfi_clip(d / "short-000.mp4", 2)  # only 2 s
    (d / "corrupt-000.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    media.write_mp4(d / "silent-000.mp4", c["frames"], 8, np.zeros(64000, np.float32))
    return d, c


# ---------------------------------------------------------------- features
def test_log_mel_matches_librosa():
    noise = 0.01 * np.random.default_rng(0).standard_normal(64000)
    wave = data.normalize_wav(synthetic.synthetic_clip(1)["audio"] + noise)
    ours = data.log_mel(wave).numpy()
    pad = (1024 - 160) // 2  # AudioLDM / HiFi-GAN framing, computed here with librosa's own STFT and filterbank
    spec = np.abs(librosa.stft(np.pad(wave, pad, mode="reflect"), n_fft=1024, hop_length=160, win_length=1024,
                               window="hann", center=False))
    mel = librosa.filters.mel(sr=16000, n_fft=1024, n_mels=64, fmin=0, fmax=8000)  # slaney scale + norm by default
    ref = np.log(np.maximum(mel @ spec, 1e-5)).T
    assert ours.shape == ref.shape == (400, 64)
    np.testing.assert_allclose(ours, ref, atol=2e-3)
    assert ours.min() >= np.log(1e-5) - 1e-6


def test_official_mel_recipe_reaches_the_items():
    """build_dataset(mel="official"): the released training code's log-mel of the raw waveform (tests/test_audio_path.py
    checks the recipe itself against librosa); the default stays AudioLDM's of the normalised one."""
    raw = synthetic.synthetic_clip(0)["audio"]
    official = data.build_dataset("synthetic", "train", num_clips=1, mel="official")[0]["mel"]
    assert torch.equal(official[0], data.log_mel(raw, "official")) and official.shape == (1, 400, 64)
    default = data.build_dataset("synthetic", "train", num_clips=1)[0]["mel"]
    assert torch.equal(default[0], data.log_mel(data.normalize_wav(raw))) and not torch.equal(default, official)
    with pytest.raises(ValueError, match="mel 'hifigan'"):
        data.build_dataset("synthetic", "train", mel="hifigan")


def test_normalize_wav():
    w = data.normalize_wav(np.random.default_rng(0).uniform(-0.1, 0.3, 1000))
    assert abs(w.mean()) < 1e-9 and abs(np.abs(w).max() - 0.5) < 1e-6
    assert torch.allclose(data.normalize_wav(torch.tensor([1.0, 3.0])), torch.tensor([-0.5, 0.5]))


# ---------------------------------------------------------------- synthetic clips
def test_synthetic_clip_shapes_and_caption():
    c = synthetic.synthetic_clip(0)
    assert c["frames"].shape == (32, 64, 64, 3) and c["frames"].dtype == np.uint8
    assert c["audio"].shape == (64000,) and c["audio"].dtype == np.float32
    assert 2 <= len(c["hit_times"]) <= 5 and np.all(np.diff(c["hit_times"]) >= 0.5)
    assert all(abs(t * 8 - round(t * 8)) < 1e-9 for t in c["hit_times"])  # on the frame grid
    words = c["caption"].split()
    assert c["caption"].startswith("A person is hitting") and {words[5], words[6].strip(".")} & set(synthetic.MATERIALS)
    assert synthetic.synthetic_clip(5, size=32, fps=4)["frames"].shape == (16, 32, 32, 3)
    np.testing.assert_array_equal(synthetic.synthetic_clip(7)["audio"], synthetic.synthetic_clip(7)["audio"])  # seeded
    item = data.build_dataset("synthetic", "train", num_clips=4)[2]
    assert item["video"].shape == (3, 32, 64, 64) and item["mel"].shape == (1, 400, 64)
    assert item["video"].min() >= -1 and item["video"].max() <= 1 and item["name"] == "synth_0000002"


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_synthetic_sound_starts_exactly_at_hits(seed):
    c = synthetic.synthetic_clip(seed)
    a, hits = c["audio"], [round(t * 16000) for t in c["hit_times"]]
    assert np.all(a[: hits[0]] == 0)  # silence before the first hit
    win = 48  # 3 ms
    for h in hits:
        before, after = np.sqrt(np.mean(a[h - win: h] ** 2)), np.sqrt(np.mean(a[h: h + win] ** 2))
        assert after > 2 * before + 1e-3, (seed, h / 16000)
    # librosa's onset detector (AV-Align's audio half, at 22050 Hz) finds each hit, within one frame after it
    y = librosa.resample(a, orig_sr=16000, target_sr=22050)
    onsets = librosa.frames_to_time(librosa.onset.onset_detect(y=y, sr=22050), sr=22050)
    assert len(onsets) == len(hits)
    assert np.all((onsets - np.array(c["hit_times"]) >= -0.03) & (onsets - np.array(c["hit_times"]) < 1 / 8))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_synthetic_motion_peaks_exactly_at_hits(seed):
    """Mean Farneback flow (AV-Align's video half) has its strict local maxima exactly at the hit frames."""
    c = synthetic.synthetic_clip(seed)
    grey = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in c["frames"]]
    mag = [np.linalg.norm(cv2.calcOpticalFlowFarneback(p, q, None, 0.5, 3, 15, 3, 5, 1.2, 0), axis=-1).mean()
           for p, q in zip(grey[:-1], grey[1:])]
    mag = [mag[0]] + mag  # element i = flow into frame i
    peaks = [i for i in range(1, len(mag) - 1) if mag[i - 1] < mag[i] > mag[i + 1]]
    assert peaks == [round(t * 8) for t in c["hit_times"]]


def test_synthetic_splits_disjoint():
    train, test = data.build_dataset("synthetic", "train"), data.build_dataset("synthetic", "test")
    assert set(train.clips).isdisjoint(test.clips) and len(train) > len(test) > 0
    assert train[0]["name"] != test[0]["name"]
    assert not torch.equal(train[0]["video"], test[0]["video"])


# ---------------------------------------------------------------- mp4 I/O
def test_mp4_roundtrip(clips):
    d, c = clips
    info = subprocess.run([data.FFMPEG, "-hide_banner", "-i", str(d / "good-000.mp4")], capture_output=True,
                          text=True).stderr
    assert "Video: h264" in info and "yuv420p" in info and "Audio: aac" in info and "16000 Hz, mono" in info
    frames, audio = data.read_clip(d / "good-000.mp4", 8, max_pad=0)
    assert frames.shape == (32, 64, 64, 3) and audio.shape == (64000,)
    assert np.corrcoef(audio, c["audio"])[0, 1] > 0.98
    assert np.abs(frames.astype(int) - c["frames"]).mean() < 6
    cap = cv2.VideoCapture(str(d / "good-000.mp4"))  # OpenCV's own demuxer agrees on frame count and rate
    assert cap.get(cv2.CAP_PROP_FPS) == 8 and int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 32


def test_read_clip_resamples_stereo_48k_30fps(clips):
    d, _ = clips
    frames, audio = data.read_clip(d / "stereo48k30fps-000.mp4", 8, size=64, start=0.5, max_pad=0)
    assert frames.shape == (32, 64, 64, 3) and audio.shape == (64000,)
    spectrum = np.abs(np.fft.rfft(audio))
    assert abs(np.argmax(spectrum) * 16000 / 64000 - 440) <= 1  # the tone survives the 48 -> 16 kHz resampling
    assert data.read_clip(d / "stereo48k30fps-000.mp4", 4, size=32)[0].shape == (16, 32, 32, 3)


def test_read_clip_timing_from_30fps_source(tmp_path):
    """Each frame of a 30 fps source shows its index in binary; a 48 kHz click sits at exactly 2.5 s. Reading from
    start = 0.5 s at 8 fps must give the frame on screen at 0.5 + k/8 and the click at sample 2.0 * 16000."""
    idx = np.arange(150)
    frames = np.zeros((150, 32, 128, 3), np.uint8)
    for b in range(8):
        frames[(idx >> b) & 1 == 1, :, 16 * b: 16 * b + 16] = 255
    audio = np.zeros(5 * 48000, np.float32)
    audio[int(2.5 * 48000):][:96] = 0.9
    media.write_mp4(tmp_path / "bits.mp4", frames, 30, audio, sr=48000)
    got, a = data.read_clip(tmp_path / "bits.mp4", 8, start=0.5, max_pad=0)
    shown = [sum(int(f[16, 16 * b + 8, 0] > 127) << b for b in range(8)) for f in got]
    assert shown == [int(np.floor((0.5 + k / 8) * 30 + 1e-9)) for k in range(32)]
    assert abs(int(np.argmax(np.abs(a) > 0.3)) - 32000) <= 2


# ---------------------------------------------------------------- file lists and datasets
def test_caption_lists_parse_every_documented_form(tmp_path):
    p = tmp_path / "flist.txt"
    p.write_text('./src/va_core/dataset/greatesthits/x/a_denoised_thumb-003.mp4,"A person is hitting a, b."\n'
                 "./src/va_core/dataset/greatesthits/x/b_denoised_thumb-010.mp4,A person is hitting c, d.\n\n"
                 'c.MP4, "He said ""hit"" twice."\r\n')
    assert data.read_captions(p) == [("a_denoised_thumb-003", "A person is hitting a, b."),
                                     ("b_denoised_thumb-010", "A person is hitting c, d."),
                                     ("c", 'He said "hit" twice.')]
    p.write_text('A person is hitting a red, wooden box.\n"A quoted, bare caption"\n')  # bare: sample.py --captions
    assert data.read_captions(p, clips=False) == [(None, "A person is hitting a red, wooden box."),
                                                  (None, "A quoted, bare caption")]


@pytest.mark.parametrize("text, why", [
    ('a.mp4,"A person is hitting\nb.mp4,"a drum"\n', "unbalanced quotes"),  # an unclosed quote: no merged lines
    ("a.mp4\nb.mp4\n", "no caption"),  # a list without a caption column
    ("A person is hitting a box, loudly.\n", "no clip path"),  # a bare caption where a clip is needed
    ('a.mp4,"A "quoted" word"\n', "unbalanced quotes")])
def test_caption_lists_fail_with_file_and_line(tmp_path, text, why):
    p = tmp_path / "flist.txt"
    p.write_text("good.mp4,A person is hitting x.\n" + text)
    with pytest.raises(ValueError, match=rf"flist.txt:2: {why}"):
        data.read_captions(p)


def test_caption_lists_non_utf8_and_long_lines(tmp_path):
    p = tmp_path / "flist.txt"
    p.write_bytes(b"a.mp4,A person is hitting x.\nb.mp4,A caf\xe9 table.\n")  # latin-1, not UTF-8
    with pytest.raises(ValueError, match="flist.txt:2: not UTF-8"):
        data.read_captions(p)
    p.write_text("a.mp4," + "x" * 200_000 + "\n")  # csv's field limit (131,072) does not apply
    assert len(data.read_captions(p)[0][1]) == 200_000


def test_official_flists_parse():
    train = data.read_captions(os.path.join(LISTS, "greatesthits", "flist_train.txt"))
    test = data.read_captions(os.path.join(LISTS, "greatesthits", "flist_val.txt"))
    assert (len(train), len(test)) == (6177, 2040)
    assert all(cap.startswith("A person is hitting") for _, cap in train + test)  # outer quotes removed
    assert any("," in cap for _, cap in train)  # quoted captions keep their commas
    assert 'the brand name "ASUS" visible' in dict(train)["2015-03-25-00-29-45_denoised_thumb-001"]  # "" unescaped
    videos = lambda rows: {stem.rsplit("-", 1)[0] for stem, _ in rows}  # noqa: E731
    assert len(videos(train)) == 733 and len(videos(test)) == 244 and videos(train).isdisjoint(videos(test))


def test_bad_files_skipped_and_counted(clips, tmp_path, capsys):
    d, _ = clips
    flist = tmp_path / "flist_train.txt"
    names = ["good", "stereo48k30fps", "noaudio", "short", "corrupt", "silent", "missing"]
    flist.write_text("".join(f'./src/va_core/dataset/greatesthits/seg/{n}-000.mp4,"A person is hitting {n}."\n'
                             for n in names))
    ds = data.build_dataset("greatesthits", "train", root=d, flist=flist, size=64)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "2 clips, 5 skipped" in out[0]
    for reason in ["1 missing", "1 no audio", "1 too short", "1 unreadable", "1 silent"]:
        assert reason in out[0], out[0]
    assert [c[2] for c in ds.clips] == ["good-000", "stereo48k30fps-000"]
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch["video"].shape == (2, 3, 32, 64, 64) and batch["mel"].shape == (2, 1, 400, 64)
    assert batch["caption"] == ["A person is hitting good.", "A person is hitting stereo48k30fps."]


def test_vggsound_csv_filter_and_class_captions(clips, tmp_path, capsys):
    d, _ = clips
    root = tmp_path / "vgg"
    root.mkdir()
    for ytid in ["AAAAAAAAAAA", "BBBBBBBBBBB", "CCCCCCCCCCC"]:
        shutil.copy(d / "good-000.mp4", root / f"{ytid}_000030.mp4")
    rows = [f"ID{i:09d},0,dog barking,train" for i in range(120)] + [
        "AAAAAAAAAAA,30,dog barking,train", 'BBBBBBBBBBB,30,"alligators, crocodiles hissing",train',
        "CCCCCCCCCCC,30,dog barking,test"]
    (root / "vggsound.csv").write_text("\n".join(rows) + "\n")
    test = data.build_dataset("vggsound", "test", root=root, size=32)
    assert [(c[1], c[2]) for c in test.clips] == [("dog barking", "CCCCCCCCCCC_000030")]
    assert test[0]["video"].shape == (3, 16, 32, 32)  # 4 fps (Sec. 4.2.1)
    train = data.build_dataset("vggsound", "train", root=root, size=32)
    assert sorted(c[1] for c in train.clips) == ["alligators, crocodiles hissing", "dog barking"]
    (tmp_path / "drop.txt").write_text("ID000000000\n")
    filtered = data.build_dataset("vggsound", "train", root=root, size=32, id_filter=tmp_path / "drop.txt")
    assert [c[1] for c in filtered.clips] == ["dog barking"]  # 120 dog rows remain; the 1-clip class is dropped
    capsys.readouterr()


def test_prepare_cuts_exact_windows(tmp_path, capsys):
    src, out = tmp_path / "raw", tmp_path / "clips"
    src.mkdir()
    lavfi_clip(src / "2015-01-01-00-00-00_denoised_thumb.mp4", 9, size="96x64", sr=44100)
    data.prepare(src, out, fps=8, size=64, workers=1)
    assert sorted(os.listdir(out)) == ["2015-01-01-00-00-00_denoised_thumb-000.mp4",
                                       "2015-01-01-00-00-00_denoised_thumb-001.mp4"]  # the 1 s tail is dropped
    for f in os.listdir(out):
        frames, audio = data.read_clip(out / f, 8, max_pad=0)
        assert frames.shape == (32, 64, 64, 3) and audio.shape == (64000,)
    assert "wrote 2 clips" in capsys.readouterr().out


# ---------------------------------------------------------------- command line: ranges the work can take
@pytest.mark.parametrize("argv, why", [
    (["prepare", "--fps", "1e9"], "--fps: 1e9 is outside [1, 60]"),  # ffmpeg filled 22.5 GB in 55 s at 1e9
    (["prepare", "--fps", "0.5"], "--fps"), (["prepare", "--fps", "nan"], "--fps"),
    (["prepare", "--size", "4096"], "--size: 4096 is outside"), (["prepare", "--size", "100"], "a multiple of 8"),
    (["synthetic", "--num-clips", "1000000000000"], "--num-clips: 1000000000000 is outside"),  # 8 TB of seeds
    (["synthetic", "--fps", "1"], "--fps: 1 is outside [2, 60]"), (["synthetic", "--fps", "61"], "--fps"),
    (["synthetic", "--num-clips", "10001"], "--num-clips: 10001 is outside")])  # ~5 GB at most
def test_bad_cli_input_one_line_exit_2_before_any_work(argv, why, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "prepare", lambda *a, **k: pytest.fail("prepare started"))
    monkeypatch.setattr(data, "write_synthetic", lambda *a, **k: pytest.fail("writing started"))
    extra = ["--src", str(tmp_path)] if argv[0] == "prepare" else []
    with pytest.raises(SystemExit) as e:
        data.main(argv + extra + ["--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error:") and why in err[0], err


@pytest.mark.parametrize("kw, why", [(dict(num_clips=10 ** 12), "synthetic clips: a split has 1..1000000"),
                                     (dict(fps=10 ** 9), "fps 1000000000 is outside .2, 60. for synthetic"),
                                     (dict(size=17), "size 17")])
def test_datasets_refuse_settings_they_cannot_take(kw, why):
    """train.py builds its data here: the same ranges hold for it."""
    with pytest.raises(ValueError, match=why):
        data.build_dataset("synthetic", "train", **kw)
    assert len(data.build_dataset("synthetic", "train", num_clips=data.MAX_CLIPS)) == data.MAX_CLIPS  # lazy: no memory
