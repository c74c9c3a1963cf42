"""Cross-modal conditioning: connectors and CMC-PE (Sec. 3.3.2, Fig. 3b, Eq. (6), App. A.2), plus the
cross-attention baseline of Sec. 3.3.1 / Fig. 3a (Table 1).

- Connector: the other modality's per-time-step features, from [x_t ; x0_hat] (self-conditioning, Eq. (6)) and t.
  A simplified CoDi "environment encoder"; time resolution is kept (video: every frame, audio: every latent frame).
- CMCPE: context sequence -> resampled onto the feature's time axis BY SECONDS -> broadcast -> added like a positional
  encoding -> self-attention -> feed-forward; zero-initialised output, so the frozen U-Net is unchanged at init.
- CrossAttentionConditioner: the baseline, ctx pooled to one vector and attended to (CoDi SpatialTransformer style).
Left out (vs. the official code): the second self-attention of each CMC-PE block, the connector's temporal
feed-forward / frame-shift blocks and relative position bias, dropout, gradient checkpointing.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def time_weights(T_x, sec_x, T_c, sec_c):
    """(T_x, T_c) resampling matrix from a context time axis onto a feature time axis, by seconds.

    x-frame i covers [i*sec_x, (i+1)*sec_x), c-frame k covers [k*sec_c, (k+1)*sec_c).
    W[i, k] = |span_i & span_k| / sum_k' |span_i & span_k'|, so (W @ ctx)[i] is the overlap-weighted mean of the
    context frames that share time with x-frame i; a row with no overlap at all (x-frame past the context's end) is 0.
    Example: 13 audio frames of 0.32 s onto 32 video frames of 0.125 s: audio frame 12 covers [3.84, 4.16) (half
    padding) and averages video frames 30 and 31 with weights 0.035 : 0.125. Unlike the official nearest-by-index
    stretching (F.interpolate), a padded sequence is not stretched over the clip.
    """
    i, k = torch.arange(T_x, dtype=torch.float64), torch.arange(T_c, dtype=torch.float64)
    start = torch.maximum(i[:, None] * sec_x, k[None, :] * sec_c)
    end = torch.minimum((i[:, None] + 1) * sec_x, (k[None, :] + 1) * sec_c)
    overlap = (end - start).clamp(min=0)
    overlap[overlap < 1e-9 * min(sec_x, sec_c)] = 0  # touching spans (float round-off), not overlapping ones
    total = overlap.sum(1, keepdim=True)
    return (overlap / total.clamp(min=1e-30)).float()


def sinusoidal(t, dim):
    """(N,) positions or diffusers timesteps (float ok) -> (N, dim) cos/sin embedding (ADM / diffusers convention)."""
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    args = t.float()[:, None] * freqs
    return torch.cat([args.cos(), args.sin()], -1)


def group_norm(c):
    return nn.GroupNorm(math.gcd(32, c), c, eps=1e-6)  # 32 groups at full size; fewer for tiny test widths


def zero(module):
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class Attention(nn.Module):
    """Pre-LN multi-head attention (self-attention when context is None); the caller adds the residual."""

    def __init__(self, dim, heads=8, context_dim=None, zero_out=False):
        super().__init__()
        self.heads, self.norm = heads, nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(context_dim or dim, 2 * dim, bias=False)
        self.to_out = zero(nn.Linear(dim, dim)) if zero_out else nn.Linear(dim, dim)

    def forward(self, x, context=None):  # x (N, S, C), context (N, S_c, C_c)
        x = self.norm(x)
        k, v = self.to_kv(x if context is None else context).chunk(2, -1)
        q, k, v = (z.unflatten(-1, (self.heads, -1)).transpose(1, 2) for z in (self.to_q(x), k, v))  # (N, heads, S, d)
        return self.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))  # (N, S, C)


class FeedForward(nn.Module):
    """Pre-LN GEGLU feed-forward (SD / CoDi): dim -> 2*mult*dim -> GEGLU -> dim_out. LN per token (= per time step)."""

    def __init__(self, dim, dim_out, mult=4):
        super().__init__()
        self.norm, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 2 * mult * dim)
        self.out = nn.Linear(mult * dim, dim_out)

    def forward(self, x):
        a, gate = self.proj(self.norm(x)).chunk(2, -1)
        return self.out(a * F.gelu(gate))


class ResBlock(nn.Module):
    """ADM / CoDi residual block: GN-SiLU-conv, + Linear(SiLU(emb)), GN-SiLU-zero conv; 1x1 skip if channels change."""

    def __init__(self, c_in, c_out, emb_dim):
        super().__init__()
        self.in_layers = nn.Sequential(group_norm(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1))
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, c_out))
        self.out_layers = nn.Sequential(group_norm(c_out), nn.SiLU(), zero(nn.Conv2d(c_out, c_out, 3, padding=1)))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):  # x (N, c_in, H, W), emb (N, emb_dim)
        return self.skip(x) + self.out_layers(self.in_layers(x) + self.emb(emb)[:, :, None, None])


class Connector(nn.Module):
    """[x_t ; x0_hat] (Eq. (6) self-conditioning) and t -> (B, L, out_channels), one feature per time step."""

    def __init__(self, latent_channels, base_channels, out_channels, video):
        super().__init__()
        b, e = base_channels, 4 * base_channels  # e: time-embedding width, 4 x model channels as in ADM / SD
        self.video, self.base = video, b
        self.time_embed = nn.Sequential(nn.Linear(b, e), nn.SiLU(), nn.Linear(e, e))
        self.conv_in = nn.Conv2d(2 * latent_channels, b // 2, 3, padding=1)
        self.res1, self.res2 = ResBlock(b // 2, 2 * b, e), ResBlock(2 * b, 4 * b, e)
        # spatial-only downsampling: video halves H, W of each frame; audio halves frequency and keeps every time frame
        self.down = nn.Conv2d(2 * b, 2 * b, 3, stride=2 if video else (1, 2), padding=1)
        if video:  # temporal self-attention over frames so video features see motion; zero-init: per-frame at init
            self.temporal = nn.ModuleList([Attention(2 * b, zero_out=True), Attention(4 * b, zero_out=True)])
        self.out = nn.Sequential(group_norm(4 * b), nn.SiLU(), nn.Conv2d(4 * b, out_channels, 3, padding=1))
        self.norm_out = nn.LayerNorm(out_channels)  # per time step over channels (official: L2 over time)

    def mix_frames(self, attn, h, n):  # h (B*F, C, H, W) in b*F+f order, n = F
        BF, C, H, W = h.shape
        x = h.view(BF // n, n, C, H, W).permute(0, 3, 4, 1, 2).reshape(-1, n, C)  # (B*H*W, F, C)
        pe = sinusoidal(torch.arange(n, device=h.device), C).to(h.dtype)  # (F, C): tells attention the frame order
        x = x + attn(x + pe)
        return x.view(BF // n, H, W, n, C).permute(0, 3, 4, 1, 2).reshape(BF, C, H, W)  # back to (B*F, C, H, W)

    def forward(self, x_t, x0_hat, t):
        x = torch.cat([x_t, torch.zeros_like(x_t) if x0_hat is None else x0_hat], 1)  # Eq. (6): (B, 2C, ...)
        B = x.shape[0]
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(B)  # (B,) diffusers index 0..999
        emb = self.time_embed(sinusoidal(t, self.base).to(x.dtype))  # (B, 4*base)
        if self.video:
            n = x.shape[2]
            x = x.transpose(1, 2).flatten(0, 1)  # (B, 2C, F, H, W) -> (B*F, 2C, H, W): 2-D convs per frame
            emb = emb.repeat_interleave(n, 0)  # (B*F, 4*base), same b*F+f order
        h = self.res1(self.conv_in(x), emb)
        h = self.mix_frames(self.temporal[0], h, n) if self.video else h
        h = self.res2(self.down(h), emb)
        h = self.mix_frames(self.temporal[1], h, n) if self.video else h
        h = self.out(h).mean(-1)  # mean over W (video) / frequency (audio): (B*F, out, H') or (B, out, T)
        h = h.mean(-1).view(B, n, -1) if self.video else h.transpose(1, 2)  # (B, F, out) or (B, T, out)
        return self.norm_out(h)


class _Conditioner(nn.Module):
    """GN -> proj_in -> condition -> [self-attn, (cross-attn), FF] -> zero-init proj_out, + h. Identity at init."""

    def __init__(self, channels, video, heads):
        super().__init__()
        C = channels
        self.video, self.cross = video, None
        self.norm, self.proj_in = group_norm(C), nn.Linear(C, C)  # a 1x1 conv == a per-token Linear
        self.attn, self.ff = Attention(C, heads), FeedForward(C, C)
        self.proj_out = zero(nn.Linear(C, C))  # zero-init: exact identity at init

    def forward(self, h, ctx, sec_h, sec_c, num_frames=None):
        if self.video:
            if num_frames is None or h.shape[0] % num_frames:
                raise ValueError(f"video features (B*F, C, h, w) need num_frames dividing {len(h)}, got {num_frames}")
            BF, C, hh, ww = h.shape
            x = self.proj_in(self.norm(h).flatten(2).transpose(1, 2))  # (B*F, C, hh, ww) -> (B*F, hh*ww, C)
            x = x.view(BF // num_frames, num_frames, hh * ww, C)  # (B, F, hh*ww, C): time axis = frames
        else:
            B, C, T, M = h.shape
            x = self.proj_in(self.norm(h).permute(0, 2, 3, 1))  # (B, C, T', M') -> (B, T', M', C)
        x, kv = self.condition(x, ctx, sec_h, sec_c)
        # attention groups: video tokens within each frame (B*F, hh*ww, C); audio all tokens (B, T'*M', C)
        x = x.flatten(0, 1) if self.video else x.flatten(1, 2)
        x = x + self.attn(x)
        x = x + self.cross(x, kv) if self.cross is not None else x
        x = self.proj_out(x + self.ff(x))
        if self.video:
            return h + x.transpose(1, 2).reshape(h.shape)  # (B*F, hh*ww, C) -> (B*F, C, hh, ww)
        return h + x.view(B, T, M, C).permute(0, 3, 1, 2)  # (B, T'*M', C) -> (B, C, T', M')


class CMCPE(_Conditioner):
    """Sec. 3.3.2 / Fig. 3b: the other modality's feature sequence, resampled by seconds onto this feature's time
    axis and broadcast over its non-time axes, is ADDED like a positional encoding before the self-attention."""

    def __init__(self, channels, context_channels, video, heads=8):
        super().__init__(channels, video, heads)
        self.proj_c = FeedForward(context_channels, channels)  # per time step (LN over channels, not over time)

    def condition(self, x, ctx, sec_h, sec_c):  # x (B, T_h, S, C), ctx (B, L, Cc)
        W = time_weights(x.shape[1], sec_h, ctx.shape[1], sec_c).to(x)  # (T_h, L)
        pe = W @ self.proj_c(ctx)  # (B, T_h, C): context interpolated over time by seconds
        return x + pe[:, :, None], None  # broadcast over the S = hh*ww positions / M' frequency bins


class CrossAttentionConditioner(_Conditioner):
    """Sec. 3.3.1 / Fig. 3a baseline (CoDi): ctx pooled over time to ONE vector, then cross-attention to it."""

    def __init__(self, channels, context_channels, video, heads=8):
        super().__init__(channels, video, heads)
        self.cross = Attention(channels, heads, context_dim=context_channels)

    def condition(self, x, ctx, sec_h, sec_c):  # x (B, T_h, S, C), ctx (B, L, Cc)
        # One key: softmax over a single key is 1, so this "cross-attention" just adds to_out(to_v(c)), the SAME global
        # vector, to every token: no temporally local information can reach the features (Sec. 3.3.1).
        c = ctx.mean(1, keepdim=True)  # (B, 1, Cc)
        return x, c.repeat_interleave(x.shape[1], 0) if self.video else c  # video: (B*F, 1, Cc), one per frame
