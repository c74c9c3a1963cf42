"""cache.py: stored latents / text embeddings equal the frozen encoders' outputs, and training from the cache gives the
same losses as encoding on the fly (same seeds), caption dropout (classifier-free guidance) included."""
import json
import os

import pytest
import torch

from support import cache
import train
from data import build_dataset
from model import build_model

COMMON = ["--data", "synthetic", "--size", "tiny", "--num-clips", "5"]


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """A 5-clip tiny cache made by the CLI, in shards of 3 (so a clip is read from a second shard), and the
    on-the-fly dataset it came from."""
    out = str(tmp_path_factory.mktemp("cache"))
    cache.main(COMMON + ["--out", out, "--batch-size", "2", "--shard-size", "3", "--device", "cpu"])
    model, bases = build_model("tiny")
    raw = build_dataset("synthetic", "train", size=bases.video_size, num_clips=5)
    return out, model, bases, raw, cache.CachedClips(out, size="tiny", fps=8)


def test_items_are_the_encoders_outputs(cached):
    out, _, bases, raw, ds = cached
    assert len(ds) == len(raw) == 5 and json.load(open(f"{out}/index.json"))["shards"] == [3, 2]
    null_v, null_a = bases.encode_text([""])
    for i in (0, 4):  # first shard, second shard
        r, c = raw[i], ds[i]
        assert c["name"] == r["name"] and c["caption"] == r["caption"]
        mu_v, sd_v = bases.encode_video(r["video"][None])
        mu_a, sd_a = bases.encode_audio(r["mel"][None])
        text_v, text_a = bases.encode_text([r["caption"]])
        for key, want in dict(video_mean=mu_v, video_std=sd_v, mel_mean=mu_a, mel_std=sd_a, text_v=text_v,
                              text_a=text_a, null_v=null_v, null_a=null_a).items():
            torch.testing.assert_close(c[key], want[0], rtol=1e-5, atol=1e-6, msg=key)
    assert not torch.allclose(ds[0]["text_v"], ds[0]["null_v"])  # a caption's embedding is not the empty one's


@pytest.mark.parametrize("p_uncond", [0.0, 0.5, 1.0])
def test_same_losses_as_on_the_fly(cached, p_uncond):
    _, model, bases, raw, ds = cached
    collate = torch.utils.data.default_collate
    raw_batch, cached_batch = collate([raw[i] for i in range(4)]), collate([ds[i] for i in range(4)])
    args = train.parse_args(COMMON + ["--p-uncond", str(p_uncond), "--device", "cpu"])
    losses = []
    with torch.no_grad():
        for step in (0, 1, 2):  # the self-conditioning coin comes up both ways over these steps (seed 0)
            a, info_a = train.joint_loss(model, bases, raw_batch, step=step, **train.loss_settings(args))
            b, info_b = train.joint_loss(model, bases, cached_batch, step=step, **train.loss_settings(args))
            assert info_a["t_v"] == info_b["t_v"] and info_a["t_a"] == info_b["t_a"]
            torch.testing.assert_close(b, a, rtol=1e-5, atol=0)
            losses.append(a)
    if p_uncond == 1.0:  # every caption dropped: the loss must differ from keeping them, so dropout did something
        args.p_uncond = 0.0
        with torch.no_grad():
            kept = train.joint_loss(model, bases, cached_batch, step=0, **train.loss_settings(args))[0]
        assert (kept - losses[0]).abs() > 1e-4 * losses[0]


def test_cached_inputs_swap_in_the_empty_caption(cached):
    _, _, bases, _, ds = cached
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    text_v, text_a, *_ = cache.cached_inputs(batch, ["", batch["caption"][1]], "cpu")
    want_v, want_a = bases.encode_text(["", batch["caption"][1]])
    torch.testing.assert_close(text_v, want_v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(text_a, want_a, rtol=1e-5, atol=1e-6)


def test_train_py_with_cache_logs_the_same_losses(cached, tmp_path):
    out = cached[0]
    run = COMMON + ["--base-steps", "1", "--max-steps", "2", "--batch-size", "2", "--device", "cpu"]
    train.main(run + ["--out", str(tmp_path / "fly")])
    train.main(run + ["--out", str(tmp_path / "cached"), "--cache", out])
    for stage in ("base", "joint"):
        read = lambda d: [r["loss"] for r in map(json.loads, open(tmp_path / d / f"log_{stage}.jsonl"))]
        fly, cached_ = read("fly"), read("cached")
        assert len(fly) == len(cached_) > 0
        torch.testing.assert_close(torch.tensor(cached_), torch.tensor(fly), rtol=1e-5, atol=0)


def test_clear_errors(cached, tmp_path):
    with pytest.raises(ValueError, match="no complete cache"):
        cache.CachedClips(str(tmp_path))
    with pytest.raises(ValueError, match="size=tiny"):
        cache.CachedClips(cached[0], size="full")


def test_links_at_the_old_temporary_names_are_never_written_through(tmp_path):
    """Earlier versions wrote <file>.tmp beside each cache file, following a link planted there."""
    out, victim = tmp_path / "cache", tmp_path / "victim.txt"
    out.mkdir()
    victim.write_text("precious")
    for name in ("shard_00000.safetensors.tmp", "text.safetensors.tmp", "index.json.tmp", "index.json"):
        os.symlink(victim, out / name)
    cache.main(COMMON[:-1] + ["2", "--out", str(out), "--shard-size", "1", "--device", "cpu"])
    assert victim.read_text() == "precious" and not (out / "index.json").is_symlink()
    assert cache.CachedClips(str(out), size="tiny", fps=8)[1]["video_mean"].shape[0] == 4
    assert sorted(n for n in os.listdir(out) if not n.endswith(".tmp")) == [
        "index.json", "shard_00000.safetensors", "shard_00001.safetensors", "text.safetensors"]
