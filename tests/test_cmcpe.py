"""cmcpe.py: time resampling by seconds (closed forms, avg-pool / nearest ground truths), identity at init, where the
context enters in time under both time_align modes (CMC-PE is local in time, the cross-attention baseline of Sec. 3.3.1
is not), the connectors' shapes, self-conditioning and frame causality. Exactness against the released model (with
diffusers' Attention and FeedForward inside): test_official.py."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cmcpe import CMCPE, Connector, CrossAttentionBlock, context_encoding, pool_sequence, pool_vector, time_weights

FPS, SEC_LATENT = 8, 0.04  # video 8 fps; one AudioLDM latent row = 4 hops * 160 / 16000 s


def randomize(module, seed=0):  # undo every zero-init so that all paths carry signal
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.1
    return module


# ---------------------------------------------------------------- time_weights
def test_time_weights_closed_forms_audio13_on_video32():
    W = time_weights(13, 0.32, 32, 1 / FPS)  # audio down[2] features (13 x 0.32 s = 4.16 s) <- video connector
    assert W.shape == (13, 32) and torch.allclose(W.sum(1), torch.ones(13))
    # frame 0 = [0, 0.32): video frames 0, 1 fully (0.125 s each), frame 2 = [0.25, 0.375) for 0.07 s
    assert torch.allclose(W[0, :3], torch.tensor([0.125, 0.125, 0.07]) / 0.32) and W[0, 3:].abs().sum() == 0
    # the padding frame 12 = [3.84, 4.16) sees only the video inside [3.84, 4.0): frames 30 (0.035 s) and 31 (0.125 s)
    assert torch.allclose(W[12, 30:], torch.tensor([0.035, 0.125]) / 0.16) and W[12, :30].abs().sum() == 0
    # the released nearest-by-index stretch (F.interpolate, floor(i * 32 / 13)) feeds frame 12 with video frame 29,
    # which ends at 3.75 s, before frame 12 even starts; ours gives it weight 0
    nearest = F.interpolate(torch.arange(32.0)[None, None], size=13, mode="nearest")[0, 0].long()
    assert nearest[12] == 29 and W[12, 29] == 0
    assert (W.argmax(1) != nearest).sum() >= 3  # the 4 % stretch drifts by whole frames towards the end


def test_time_weights_video32_on_audio_context52_and_zero_rows():
    W = time_weights(32, 1 / FPS, 52, 2 * SEC_LATENT)  # video frames <- audio connector (52 steps of 0.08 s, padded)
    # frame 16 = [2.0, 2.125): steps 25 = [2.0, 2.08) fully, 26 = [2.08, 2.16) for 0.045 s
    assert torch.allclose(W[16, 25:27], torch.tensor([0.08, 0.045]) / 0.125)
    assert W[16, :25].abs().sum() == 0 and W[16, 27:].abs().sum() == 0
    assert W[:, 50:].abs().sum() == 0  # steps 50, 51 hold the 0.16 s of padding: no video frame reads them
    W = time_weights(5, 1.0, 2, 1.0)  # context ends at 2 s: later rows have no overlap -> all zeros
    assert torch.equal(W, torch.tensor([[1.0, 0], [0, 1], [0, 0], [0, 0], [0, 0]]))


def test_time_weights_matches_avg_pool_and_nearest_when_grids_align():
    ctx = torch.randn(2, 100, 3)  # (B, L, C)
    down = time_weights(25, 4 * SEC_LATENT, 100, SEC_LATENT) @ ctx  # 4 latent rows per feature frame
    assert torch.allclose(down, F.avg_pool1d(ctx.transpose(1, 2), 4).transpose(1, 2), atol=1e-6)
    up = time_weights(32, 1 / FPS, 16, 2 / FPS) @ ctx[:, :16]  # each x-frame lies inside one c-frame
    assert torch.allclose(up, F.interpolate(ctx[:, :16].transpose(1, 2), size=32).transpose(1, 2))


# ---------------------------------------------------------------- CMC-PE / cross-attention blocks
def case(side):
    """(h, ctx, sec_h, sec_c, num_frames): video frames (B*F, C, H, W) fed the audio context (B, C_c, 52 steps of
    0.08 s), audio features (B, C, 13 rows of 0.32 s, M) fed the video frames (B, C_c, 32 frames)."""
    g = torch.Generator().manual_seed(1)
    if side == "video":
        return torch.randn(2 * 32, 32, 2, 2, generator=g), torch.randn(2, 16, 52, generator=g), 1 / FPS, 0.08, 32
    return torch.randn(2, 32, 13, 2, generator=g), torch.randn(2, 16, 32, generator=g), 0.32, 1 / FPS, None


@pytest.mark.parametrize("time_align", ["seconds", "index"])
@pytest.mark.parametrize("cls", [CMCPE, CrossAttentionBlock])
@pytest.mark.parametrize("side", ["video", "audio"])
def test_identity_at_init(cls, side, time_align):
    h, ctx, sec_h, sec_c, num_frames = case(side)
    block = cls(32, 16, video=side == "video", head_dim=8, time_align=time_align)
    ctx = ctx if cls is CMCPE else pool_vector(ctx[..., None])  # the baseline reads one vector (B, 1, C_c)
    assert torch.equal(block(h, ctx, sec_h, sec_c, num_frames=num_frames), h)
    out = randomize(block)(h, ctx, sec_h, sec_c, num_frames=num_frames)  # and not by accident: trained blocks act
    assert out.shape == h.shape and not torch.allclose(out, h)


def changed_frames(block, j0, j1):
    """Video CMC-PE with its context GroupNorm bypassed (it couples all steps through its statistics): which of the
    32 output frames change when context steps j0..j1-1 change."""
    h, ctx, sec_h, sec_c, num_frames = case("video")
    block.attn_c.norm = nn.Identity()
    ctx2 = ctx.clone()
    ctx2[:, :, j0:j1] += torch.randn(2, 16, j1 - j0)
    d = block(h, ctx2, sec_h, sec_c, num_frames=num_frames) != block(h, ctx, sec_h, sec_c, num_frames=num_frames)
    changed = d.view(2, num_frames, -1).any(-1)  # (B*F, C, H, W) -> (B, F): b*F+f order
    assert (changed[0] == changed[1]).all()
    return changed[0].nonzero().flatten().tolist()


def test_video_time_alignment_seconds_vs_index():
    # audio context steps of 0.08 s, padded to 52 (4.16 s): step 25 = [2.0, 2.08) lies inside frame 16 = [2.0, 2.125)
    seconds = randomize(CMCPE(32, 16, video=True, time_align="seconds"))
    assert changed_frames(seconds, 25, 26) == [16]
    # steps 48, 49 = [3.84, 4.0) lie in frames 30 = [3.75, 3.875) and 31 = [3.875, 4.0)
    assert changed_frames(seconds, 48, 50) == [30, 31]
    assert changed_frames(seconds, 50, 52) == []  # the padding past 4.0 s reaches no frame
    # released: frame i reads step floor(i * 52 / 32): steps 48, 49 (3.84-4.0 s) land on frame 30 (3.75-3.875 s) only,
    # and frame 31 (3.875-4.0 s) reads step 50 = [4.0, 4.08), padding after the clip's end: the 4 % stretch
    index = randomize(CMCPE(32, 16, video=True, time_align="index"))
    assert changed_frames(index, 48, 50) == [30] and changed_frames(index, 50, 52) == [31]
    # and nearest sampling reads only 32 of the 52 steps: step 25 = [2.0, 2.08), inside frame 16, reaches no frame
    assert changed_frames(index, 25, 26) == [] and changed_frames(index, 26, 27) == [16]


def test_audio_side_encoding_changes_only_at_shared_time():
    block = randomize(CMCPE(32, 16, video=False))
    block.attn_c.norm = nn.Identity()
    ctx = torch.randn(2, 16, 32)
    ctx2 = ctx.clone()
    ctx2[:, :, 16] += torch.randn(2, 16)  # video frame 16 = [2.0, 2.125) s
    W = time_weights(50, 0.08, 32, 1 / FPS)  # audio up[1] features: 50 frames of 0.08 s
    d = (context_encoding(block.attn_c, ctx2, 50, W) != context_encoding(block.attn_c, ctx, 50, W)).any(1)  # (B, 50)
    assert d[:, [25, 26]].all() and d.sum() == 4  # [2.0, 2.08), [2.08, 2.16)


def test_cross_attention_baseline_is_not_local_in_time():
    """Sec. 3.3.1 / Fig. 3a, beside CMC-PE's locality above: the baseline reads the audio as ONE vector, so changing
    one audio step changes EVERY video frame's output, and frames that enter identical leave identical whatever the
    audio says when; CMC-PE makes them differ by the audio at each frame's own time."""
    h, ctx, sec_h, sec_c, num_frames = case("video")
    run = lambda block, h, c: block(h, c, sec_h, sec_c, num_frames=num_frames).view(2, num_frames, -1)  # (B, F, ...)
    z = ctx[..., None]  # the audio connector map (B, C_c, 52 steps, 1) that both contexts are pooled from
    z2 = z.clone()
    z2[:, :, 25] += torch.randn(2, 16, 1)  # audio step 25 = [2.0, 2.08) s only
    xattn = randomize(CrossAttentionBlock(32, 16, video=True))
    assert (run(xattn, h, pool_vector(z2)) != run(xattn, h, pool_vector(z))).any(-1).all()  # all 32 frames, B = 2
    still = h.view(2, num_frames, 32, 2, 2)[:, :1].expand(-1, num_frames, -1, -1, -1).reshape(h.shape)  # frame 0 x 32
    out = run(xattn, still, pool_vector(z))
    assert (out - out[:, :1]).abs().max() < 1e-6  # no audio timing reaches the frames
    out = run(randomize(CMCPE(32, 16, video=True)), still, pool_sequence(z))
    assert (out - out[:, :1]).abs().amax((0, 2))[1:].min() > 1e-3  # every later frame differs from frame 0


def test_video_requires_num_frames():
    with pytest.raises(ValueError, match="num_frames"):
        CMCPE(32, 16, video=True)(torch.randn(6, 32, 2, 2), torch.randn(1, 16, 4), 0.125, 0.08)


def test_pooling_normalises_over_time_or_channels():
    z = torch.randn(2, 16, 8, 4, 4)  # a video connector map (B, C, F, h, w)
    ctx = pool_sequence(z)
    assert ctx.shape == (2, 16, 8) and torch.allclose(ctx.norm(dim=-1), torch.ones(2, 16))  # released: over TIME
    one = pool_vector(z)
    assert one.shape == (2, 1, 16) and torch.allclose(one.norm(dim=-1), torch.ones(2, 1))
    assert torch.allclose(one[:, 0] * z.mean((2, 3, 4)).norm(dim=-1, keepdim=True), z.mean((2, 3, 4)), atol=1e-6)


# ---------------------------------------------------------------- connectors
def test_connector_shapes_and_self_conditioning_default():
    v, a = Connector(4, 32, 48, 128, video=True), Connector(8, 32, 48, 128, video=False)
    x_v, x_a, emb = torch.randn(2, 4, 6, 8, 8), torch.randn(2, 8, 104, 16), torch.randn(2, 128)
    assert v(x_v, None, emb).shape == (2, 48, 6, 4, 4)  # every frame kept, space halved
    assert a(x_a, None, emb).shape == (2, 48, 52, 8)  # time and mel halved
    assert torch.equal(a(x_a, None, emb), a(x_a, torch.zeros_like(x_a), emb))  # no x0_hat = zeros (first step)
    assert not torch.equal(a(x_a, x_a, emb), a(x_a, None, emb))  # x0_hat reaches the features
    randomize(a)  # at init emb only feeds the zero-init ResBlock branches
    assert not torch.equal(a(x_a, None, emb), a(x_a, None, emb.flip(0)))


def test_video_connector_is_causal_at_init_and_bidirectional_after():
    v = Connector(4, 32, 48, 128, video=True)
    x, emb = torch.randn(1, 4, 8, 8, 8), torch.randn(1, 128)
    x2 = x.clone()
    x2[:, :, 3] += torch.randn(1, 4, 8, 8)  # change input frame 3 only
    changed = lambda: (v(x2, None, emb) != v(x, None, emb)).flatten(3).any(-1).any(1)[0].tolist()  # (F,)
    # zero-init temporal attention and frame shift; each feed-forward shifts half its channels one frame later
    assert changed() == [False] * 3 + [True] * 3 + [False] * 2
    for attn in (v.attn1, v.attn2):
        torch.nn.init.normal_(attn.temporal_attn.to_out.weight, std=0.1)
    assert all(changed())  # trained temporal attention looks both ways
