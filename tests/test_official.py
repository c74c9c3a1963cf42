"""The released model, against vectors produced by running the official code (SonyResearch/SVG_baseline e8ebd06) on a
CPU with random weights (tests/data/official; each .json describes its tensors): every added module, the joint forward
(sampling cases A, B and training cases C, D), the full-size key manifest, export/import round trip and released pipe/
folders."""
import copy
import json
import pathlib

import pytest
import torch
from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
from safetensors.torch import load_file, save_file

from cmcpe import context_encoding, pool_sequence
from model import JointModel
from support import released as official
from test_model import full_meta

DATA = pathlib.Path(__file__).resolve().parent / "data" / "official"
ATOL = 1e-5  # module by module in float32 (outputs O(1)): measured <= 2.7e-6 with AVX-512, AVX2 and no-SIMD kernels
# The joint forward is compared in float64. The tiny video U-Net (8x8 latents, three downsamplers) runs down_blocks[3],
# the mid-block and up_blocks[0] at 1x1 pixels, where GroupNorm(32 groups, 64 channels) normalises groups of TWO numbers
# a, b to +-d / sqrt(d^2 + eps), d = (a - b) / 2: when a ~ b it multiplies their rounding by up to 1 / sqrt(eps) (316;
# 1000 in the transformer's norm, eps 1e-6), nine such norms in a row. Measured in case A: our float32 video output
# differs from our float64 one by 1.8e-4 (AVX-512), 9.8e-4 (AVX2), 2.4e-4 (no SIMD), 1.8e-3 (oneDNN off), so float32
# against the float32 vectors compares CPU kernels. In float64 the video output agrees to 1e-11 on all of these, and
# what is left is the vectors' own float32 rounding: max |ours_f64 - official| = 1.0e-4 x max|official| for video
# (case A; B-D 4e-6..3e-5) and <= 7.7e-7 x max|official| for audio (its groups hold >= 16 numbers). Rounding only the
# inputs to float32 (a relative 2^-24 jitter) already moves our float64 video output of case A by up to 7e-5.
OFFICIAL_ROUNDING = {"video": 2.5e-4, "audio": 5e-6}  # x max(1, max|official|): 2.5x / 6x the measured
OURS_F32 = {"video": 2.5e-3, "audio": 5e-6}  # float32 vs float64, x max(1, max|official|): measured <= 9.1e-4 / 1.1e-6


def load_released():
    """Tiny base U-Nets and the tiny released unet_svg, all with the official weights; the captured tensors."""
    info, fwd, mods = json.load(open(DATA / "forward_tiny.json")), load_file(DATA / "forward_tiny.safetensors"), \
        load_file(DATA / "modules_tiny.safetensors")
    cfg = info["tiny_base_configs"]
    video = UNetMotionModel.from_unet2d(UNet2DConditionModel(**cfg["unet_2d_for_video"]),
                                        MotionAdapter(**cfg["motion_adapter"]))
    audio = UNet2DConditionModel(**cfg["unet_a"])
    for unet, prefix in ((video, "unet_v."), (audio, "unet_a.")):
        unet.load_state_dict({k[len(prefix):]: v.float() for k, v in fwd.items() if k.startswith(prefix)})
        unet.eval()
    sd = {k[len("state_dict."):]: v.float() for k, v in mods.items() if k.startswith("state_dict.")}
    model = JointModel.from_official(video, audio, info["tiny_unet_svg_config_json"], sd).eval()
    tensors = {k: v.float().clone() if v.is_floating_point() else v.clone() for k, v in {**fwd, **mods}.items()}
    return model, tensors, info


@pytest.fixture(scope="module")
def released():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the vectors were made; more threads reorder float32 sums (amplified: see above)
    yield load_released()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def released64(released):
    return copy.deepcopy(released[0]).double()


def close(a, b):
    return a.shape == b.shape and (a - b).abs().max().item() <= ATOL


def test_every_cmcpe_block_matches(released):
    model, t, _ = released
    for m, blocks in (("video", model.blocks_v), ("audio", model.blocks_a)):
        for k, code in enumerate(official.BLOCK):
            p = f"A.connector_in_{m}.{code}"
            x, ctx = t[f"{p}.in.x"], t[f"{p}.in.context"][..., 0]  # (B, C_c, T_c, 1) -> (B, C_c, T_c)
            with torch.no_grad():
                if m == "video":  # official layout (B, C, F, H, W); ours folds frames: (B*F, C, H, W)
                    B, C, n, H, W = x.shape
                    out = blocks[k](x.transpose(1, 2).reshape(B * n, C, H, W), ctx, None, None, n)
                    out = out.view(B, n, C, H, W).transpose(1, 2)
                else:
                    out = blocks[k](x, ctx, None, None)
                    T = x.shape[2]
                    pe = context_encoding(blocks[k].attn_c, ctx, T)  # after proj_c, GroupNorm and interpolation
                    gn = t[f"{p}.0.transformer_blocks.0.attn_c.norm.out"]
                    assert close(pe, torch.nn.functional.interpolate(gn, size=T)), p
            assert close(out, t[f"{p}.out"]), (p, (out - t[f"{p}.out"]).abs().max())


def test_connectors_and_pooling_match(released):
    model, t, _ = released
    for m, conn in (("video", model.connector_v), ("audio", model.connector_a)):
        p = f"A.connector_out_{m}"
        x_con, emb = t[f"{p}.in.x_con"], t[f"{p}.in.emb"]
        C = x_con.shape[1] // 2
        with torch.no_grad():
            z = conn(x_con[:, :C], x_con[:, C:], emb)
            pooled = pool_sequence(z)
        assert close(z, t[f"{p}.4.out"]), (m, (z - t[f"{p}.4.out"]).abs().max())
        assert close(pooled, t[f"{p}.pooled"][..., 0])
    with torch.no_grad():  # the connectors' time embedding is the frozen U-Net's own (call 1: of t_con = t here)
        from model import time_embedding
        assert close(time_embedding(model.video_unet, t["in.t_v"]), t["A.unet_v.time_embedding.call1.out"])
        assert close(time_embedding(model.audio_unet, t["in.t_a"]), t["A.connector_out_audio.in.emb"])


def joint_forward(model, t, case, dtype):
    """(eps_v, eps_a) of one official case, with the model already in dtype: sampling A (x0_hat given), B (first step,
    x0_hat = 0); training C (connectors on latents noised at t_con), D (at t, x0_hat = 0)."""
    x = {k: v.to(dtype) if v.is_floating_point() else v for k, v in t.items() if k.startswith("in.")}
    x_a = x["in.x_a"] if case in "AB" else x["in.x_a_trainpad"]
    x0_v, x0_a = (x["in.x0hat_v"], x["in.x0hat_a"]) if case in "AC" else (None, None)
    with torch.no_grad():
        context = None
        if case in "CD":  # training: the connectors read latents noised at t_con (C) or at t (D), not x_t
            con_v, con_a = x["in.xtcon_v"], x["in.xtcon_a_trainpad"]
            tc_v, tc_a = (x["in.tcon_v"], x["in.tcon_a"]) if case == "C" else (x["in.t_v"], x["in.t_a"])
            context = model.contexts(con_v, con_a, tc_v, tc_a, x0_v, x0_a)
        return model(x["in.x_v"], x_a, x["in.t_v"], x["in.t_a"], x["in.context_v"], x["in.class_a"], x0_v, x0_a,
                     context=context)


@pytest.mark.parametrize("case", ["A", "B", "C", "D"])
def test_joint_forward_matches_official_cases(released, released64, case):
    """In float64 against the official float32 outputs (OFFICIAL_ROUNDING), and our float32 against our float64
    (OURS_F32). Real differences are far larger; measured in case A: +1e-3 on one weight of blocks_v[0].proj_out, of
    connector_a's last bias or of connector_v's first conv moves video by 3.8e-2 / 2.1e-3 and audio by 1.8e-5; CMC-PE's
    GroupNorm eps 1e-5 instead of 1e-6 moves video by 1.3e-3; time_align "seconds" or a nearest-exact instead of
    nearest lookup moves video / audio by 0.09..0.12 / 0.02..0.03. test_every_cmcpe_block_matches catches the
    single-weight changes inside a block that barely move the outputs."""
    model, t, _ = released
    ours64 = joint_forward(released64, t, case, torch.float64)
    ours32 = joint_forward(model, t, case, torch.float32)
    for m, e64, e32 in zip(("video", "audio"), ours64, ours32):
        official = t[f"{case}.out.{m}"].double()
        scale = max(1.0, official.abs().max().item())
        assert e64.shape == official.shape and e32.shape == official.shape
        assert (e64 - official).abs().max() <= OFFICIAL_ROUNDING[m] * scale, (m, (e64 - official).abs().max())
        assert (e32.double() - e64).abs().max() <= OURS_F32[m] * scale, (m, (e32.double() - e64).abs().max())
    if case == "A":  # and the connectors matter: the single-modality outputs (case E) are far from it
        eps_v, eps_a = ours32
        assert (eps_a - t["E.audio_only.out"]).abs().max() > 0.1 and (eps_v - t["E.video_only.out"]).abs().max() > 0.1


def test_full_size_manifest_maps_one_to_one():
    manifest = json.load(open(DATA / "manifest_full.json"))
    model, _ = full_meta()  # names and shapes do not depend on time_align
    ours = {official.official_name(k): tuple(v.shape) for k, v in model.state_dict().items()
            if k.startswith(("blocks_", "connector_"))}
    theirs = {e["key"]: tuple(e["shape"]) for e in manifest["state_dict"]}
    assert len(ours) == len(theirs) == 354 and ours == theirs
    total = sum(p.numel() for m in model.added_modules() for p in m.parameters())
    assert total == manifest["param_counts"]["total"] == 467_744_079
    xattn, _ = full_meta("crossattn")
    n = sum(p.numel() for m in xattn.added_modules() for p in m.parameters())
    print(f"\nadded modules: CMC-PE {total:,} (official 467,744,079), cross-attention {n:,} (official 323.69 M)")
    assert abs(n - 323.69e6) < 0.005e6


def test_export_then_import_is_bit_exact(tmp_path, released):
    model, t, info = released
    official.export_official(model, tmp_path / "unet_svg")
    config, sd = official.read_unet_svg(tmp_path / "unet_svg")
    assert set(sd) == {k[len("state_dict."):] for k in t if k.startswith("state_dict.")}
    again = JointModel.from_official(model.video_unet, model.audio_unet, config, sd)
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again.config == model.config
    for k in ("connector_video_config", "connector_audio_config"):  # what the official constructor reads
        assert config[k] == info["tiny_unet_svg_config_json"][k]


def test_load_is_strict_with_one_line(released):
    model, t, info = released
    sd = {k[len("state_dict."):]: v for k, v in t.items() if k.startswith("state_dict.")}
    cfg, (v, a) = info["tiny_unet_svg_config_json"], (model.video_unet, model.audio_unet)
    key = "connector_out_video.4.2.weight"
    extra = "connector_out_video.9.weight"
    for bad, what in (({k: w for k, w in sd.items() if k != key}, 'Missing key.*"connector_v.out.2.weight"'),
                      ({**sd, extra: sd[key]}, f'Unexpected key.*"{extra}"'),
                      ({**sd, key: sd[key][:, :1]}, "size mismatch for connector_v.out.2.weight")):
        with pytest.raises(official.OfficialFormatError, match=what) as e:
            JointModel.from_official(v, a, cfg, bad)
        assert "\n" not in str(e.value)
    with pytest.raises(official.OfficialFormatError, match="num_blocks_connector"):
        JointModel.from_official(v, a, dict(cfg, connector_video_config={**cfg["connector_video_config"],
                                                                         "num_blocks_connector": [2, 2]}), sd)


def write_pipe(folder, weights="bin"):
    """A released-layout pipe/ folder of tiny random models, each saved with save_pretrained as the official training
    script does; unet_svg as the .bin the script writes, or as fp16 .safetensors."""
    from diffusers import AutoencoderKL
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    from support.tiny import byte_tokenizers, tiny_parts
    torch.manual_seed(0)
    parts, (tok_v, tok_a) = tiny_parts(), byte_tokenizers()
    vae = lambda c, z, n: AutoencoderKL(in_channels=c, out_channels=c, latent_channels=z, block_out_channels=(8,) * n,
                                        down_block_types=("DownEncoderBlock2D",) * n, layers_per_block=1,
                                        up_block_types=("UpDecoderBlock2D",) * n, norm_num_groups=8)
    hifigan = SpeechT5HifiGan(SpeechT5HifiGanConfig(model_in_dim=64, upsample_initial_channel=16,
                                                    upsample_rates=[8, 5, 4], upsample_kernel_sizes=[16, 10, 8],
                                                    resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1]],
                                                    normalize_before=False))
    saved = dict(unet_v=parts["video_unet"], unet_a=parts["audio_unet"], vae_v=vae(3, 4, 4), vae_a=vae(1, 8, 3),
                 text_encoder_v=parts["text_encoder_v"], text_encoder_a=parts["text_encoder_a"], tokenizer_v=tok_v,
                 tokenizer_a=tok_a, vocoder=hifigan)
    for name, part in saved.items():
        part.save_pretrained(folder / name)
    model = JointModel(parts["video_unet"], parts["audio_unet"], time_align="index")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))  # no zero-init identity: the added modules really act
    (folder / "unet_svg").mkdir()
    config = {k: v for k, v in official.official_config(model).items() if k not in ("_time_align", "_fps")}
    json.dump(config, open(folder / "unet_svg" / "config.json", "w"))
    sd = official.added_state(model)
    if weights == "bin":
        torch.save(sd, folder / "unet_svg" / "diffusion_pytorch_model.bin")
    else:
        fp16 = {k: v.half().contiguous() for k, v in sd.items()}
        save_file(fp16, folder / "unet_svg" / "diffusion_pytorch_model.safetensors")
    return sd


@pytest.mark.parametrize("weights", ["bin", "fp16"])
def test_released_pipe_folder_samples_through_the_cli(tmp_path, weights):
    import sample
    from pipeline import SoundingVideoPipeline
    sd = write_pipe(tmp_path / "pipe", weights)
    pipe = SoundingVideoPipeline.from_pretrained(str(tmp_path / "pipe"), video_size=64)
    got = official.added_state(pipe.model)
    tol = 0 if weights == "bin" else 1e-3  # fp16 storage
    assert got.keys() == sd.keys() and all((got[k] - sd[k]).abs().max() <= tol * (1 + sd[k].abs().max()) for k in sd)
    assert pipe.model.config["time_align"] == "index" and pipe.model.audio_rows_multiple == 8
    sample.main(["--ckpt", str(tmp_path / "pipe"), "--prompt", "A person is hitting a box.", "--steps", "2",
                 "--video-size", "64", "--out", str(tmp_path / "out")])
    row = json.loads((tmp_path / "out" / "manifest.jsonl").read_text())
    frames, fps = __import__("av_align").read_video(tmp_path / "out" / row["file"])
    assert frames.shape == (32, 64, 64, 3) and fps == 8 and row["kind"] == "released pipe/"


def test_released_pipe_folder_with_a_renamed_key_fails_with_one_line(tmp_path, capfd):
    import sample
    write_pipe(tmp_path / "pipe", "fp16")
    path = tmp_path / "pipe" / "unet_svg" / "diffusion_pytorch_model.safetensors"
    sd = load_file(path)
    sd["connector_out_audio.4.2.weights"] = sd.pop("connector_out_audio.4.2.weight")
    save_file(sd, path)
    capfd.readouterr()
    with pytest.raises(SystemExit) as e:  # sample.py's own exit, in this process (a new one only adds torch's import)
        sample.main(["--ckpt", str(tmp_path / "pipe"), "--prompt", "x", "--video-size", "64", "--out",
                     str(tmp_path / "out")])
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert e.value.code == 2 and len(lines) == 1 and "connector_out_audio.4.2.weight" in lines[0], err[-1000:]
