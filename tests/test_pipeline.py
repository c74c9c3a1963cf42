"""The pipeline object in diffusers' manner: an output object with float frames in [0, 1] that diffusers'
export_to_video writes at the right level, output types, return_dict, torch_dtype (bf16 on a CPU), generators (an int,
a torch.Generator's state, one per clip, unseeded), the seed of each clip regenerating it alone, one progress bar."""
import numpy as np
import pytest
import torch
from diffusers.utils import export_to_video

from av_align import read_video
from pipeline import SoundingVideoPipeline
from support.pipeline import MAX_SEED, clip_seeds

KW = dict(num_inference_steps=1, seconds=0.5, progress=False)  # 4 frames, 8000 samples: seconds on 2 CPU cores


@pytest.fixture(scope="module")
def pipe():
    return SoundingVideoPipeline.from_pretrained(size="tiny")  # the shipped tiny base models: frames with content


def test_output_object_types_and_export_to_video(pipe, tmp_path):
    out = pipe("a red wooden box", generator=0, **KW)
    assert type(out).__name__ == "SoundingVideoPipelineOutput" and out["frames"] is out.frames
    assert out.frames.shape == (1, 4, 64, 64, 3) and out.frames.dtype == np.float32
    assert 0 <= out.frames.min() and out.frames.max() <= 1 and out.frames.std() > 0.01
    assert out.audios.shape == (1, 8000) and out.audios.dtype == np.float32 and (out.fps, out.sample_rate) == (8, 16000)
    path = export_to_video(list(out.frames[0]), str(tmp_path / "x.mp4"), fps=out.fps)  # diffusers' own writer
    back, _ = read_video(path)
    assert back.shape[0] == 4 and abs(back.mean() - out.frames[0].mean() * 255) < 3  # uint8 frames would wrap: 40 off
    u8 = pipe("a red wooden box", generator=0, output_type="uint8", **KW)
    assert u8.frames.dtype == np.uint8 and np.array_equal(u8.frames, np.round(out.frames * 255).astype(np.uint8))
    pt = pipe("a red wooden box", generator=0, output_type="pt", **KW)
    assert isinstance(pt.frames, torch.Tensor) and pt.frames.shape == (1, 4, 3, 64, 64)
    assert torch.equal(pt.frames.permute(0, 1, 3, 4, 2), torch.from_numpy(out.frames))
    x_v, x_a = pipe("a red wooden box", generator=0, output_type="latent", return_dict=False, **KW)
    assert x_v.shape == (1, 4, 4, 8, 8) and x_a.shape == (1, 8, 12, 16)
    g = torch.Generator().manual_seed(0)  # the initial noise of seed 0, drawn as sample.generate draws it
    noise = torch.randn(1, 4, 4, 8, 8, generator=g), torch.randn(1, 8, 12, 16, generator=g)
    assert np.array_equal(pipe("a red wooden box", latents=noise, **KW).frames, out.frames)
    with pytest.raises(ValueError, match="output_type"):
        pipe("x", output_type="pil", **KW)
    paths = pipe.save(tmp_path / "saved", out)  # float frames -> the same uint8 clip
    assert np.abs(read_video(paths[0])[0].astype(float).mean() - u8.frames[0].mean()) < 3


def test_every_seed_regenerates_its_clip_alone(pipe):
    out = pipe(["a red wooden box", "a glass bottle", "a metal can"], generator=3, batch_size=1, **KW)
    assert out.seeds == [3, 4, 5]
    alone = pipe("a metal can", generator=out.seeds[2], **KW)
    assert np.array_equal(alone.frames[0], out.frames[2]) and np.array_equal(alone.audios[0], out.audios[2])
    assert not np.array_equal(out.frames[1], out.frames[2])
    assert clip_seeds(MAX_SEED, 2) == [MAX_SEED, 0]  # seeds up to 2**63 - 1; the next clip wraps to 0


def test_generators_state_lists_and_unseeded(pipe):
    g = torch.Generator().manual_seed(7)
    a, b = clip_seeds(g, 2), clip_seeds(g, 2)
    assert a != b and a == clip_seeds(torch.Generator().manual_seed(7), 2)  # its state is drawn from and advances
    assert clip_seeds([torch.Generator().manual_seed(s) for s in (7, 8)], 2)[0] == a[0]  # one generator per clip
    assert len(clip_seeds(torch.Generator(), 3)) == 3  # unseeded: no overflow
    with pytest.raises(ValueError, match="one per clip"):
        clip_seeds([g], 2)
    two = pipe("a box", generator=[torch.Generator().manual_seed(s) for s in (7, 8)], num_videos_per_prompt=2, **KW)
    assert two.seeds[0] == a[0] and two.prompts == ["a box", "a box"] and not np.array_equal(*two.frames)


def test_negative_prompts_one_per_prompt(pipe):
    out = pipe(["a box", "a can"], negative_prompt=["noise", "silence"], generator=0, **KW)
    assert np.allclose(pipe("a can", negative_prompt="silence", generator=1, **KW).frames[0], out.frames[1],
                       atol=1 / 255)  # clip 1 with its own negative prompt
    assert not np.allclose(pipe("a can", negative_prompt="noise", generator=1, **KW).frames[0], out.frames[1],
                           atol=1 / 255)
    with pytest.raises(ValueError, match="one per prompt"):
        pipe(["a", "b"], negative_prompt=["x"], **KW)


def test_bf16_on_cpu_and_device(tmp_path):
    pipe = SoundingVideoPipeline.from_pretrained(size="tiny", torch_dtype=torch.bfloat16).to("cpu")
    assert pipe.dtype == torch.bfloat16 and pipe.device == torch.device("cpu")
    out = pipe("a red wooden box", generator=0, **KW)  # autocast to bf16: no dtype mismatch at call time
    assert np.isfinite(out.frames).all() and np.isfinite(out.audios).all() and out.frames.std() > 0.01


def test_one_progress_bar_over_clips_and_steps(pipe, capsys):
    pipe(["a box", "a can", "a bottle"], num_inference_steps=2, seconds=0.5, generator=0, batch_size=2)
    err = capsys.readouterr().err
    assert "3 clips" in err and "6/6" in err and "Alg. 1" not in err  # one bar, not one per batch
    pipe(["a box", "a can"], generator=0, **KW)
    assert capsys.readouterr().err == ""
