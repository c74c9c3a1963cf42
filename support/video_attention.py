"""The released video connector's spatio-temporal attention (CoDi's, which the paper only names: Sec. 3.3.2 / App. A.2),
so that frame f's context sees the motion around f: three residual steps on (B, C, F, H, W) maps, released names."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def zero(module):  # zero-initialised output layers: each residual step starts as the identity
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def group_norm(c, eps=1e-5):
    return nn.GroupNorm(math.gcd(32, c), c, eps=eps)  # 32 groups as released; fewer only for tiny widths


class Dim1Norm(nn.Module):
    """CoDi's bias-free norm over axis 1 with gain g (channels; released: the FRAMES of the temporal attention's)."""

    def __init__(self, *shape):
        super().__init__()
        self.g = nn.Parameter(torch.ones(*shape))

    def forward(self, x):
        eps = 1e-5 if x.dtype == torch.float32 else 1e-3
        var, mean = torch.var(x, dim=1, unbiased=False, keepdim=True), torch.mean(x, dim=1, keepdim=True)
        return ((x - mean) * var.clamp(min=eps).rsqrt()).to(self.g.dtype) * self.g


class RelativePositionBias(nn.Module):
    """Swin v2's continuous position bias: an MLP of the signed log frame offset -> one bias per head."""

    def __init__(self, dim, heads):
        super().__init__()
        self.net = nn.Sequential(nn.Sequential(nn.Linear(1, dim), nn.SiLU()), nn.Sequential(nn.Linear(dim, dim),
                                 nn.SiLU()), nn.Linear(dim, heads))

    def forward(self, num_frames):  # -> (heads, F, F)
        w = self.net[0][0].weight
        i = torch.arange(num_frames, device=w.device, dtype=torch.float32)
        d = (i[:, None] - i[None, :])[..., None]  # (F, F, 1): frame offset i - j
        return self.net((torch.sign(d) * torch.log(d.abs() + 1)).to(w.dtype)).permute(2, 0, 1)


class TemporalAttention(nn.Module):
    """Self-attention across the frames of each pixel, with a frame-time encoding and the relative position bias."""

    def __init__(self, dim, heads, dim_head):
        super().__init__()
        self.heads, self.norm = heads, Dim1Norm(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * heads * dim_head, bias=False)
        self.to_out = zero(nn.Linear(heads * dim_head, dim, bias=False))

    def forward(self, x, bias):  # x (N, F, C), bias (heads, F, F)
        half = x.shape[2] // 2  # CoDi's frame-time encoding [sin | cos], frequencies 1e4 ** (-i / (half - 1))
        seconds = torch.arange(x.shape[1], device=x.device, dtype=torch.float32) / 8  # released: 8 fps, any fps
        freqs = torch.exp(torch.arange(half, device=x.device, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
        args = seconds[:, None] * freqs[None]  # (F, C/2)
        x = self.norm(x + torch.cat([args.sin(), args.cos()], -1).to(x.dtype))  # released: the norm runs over frames
        q, k, v = (z.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (N, F, heads*d) -> (N, heads, F, d)
                   for z in (self.to_q(x), *self.to_kv(x).chunk(2, -1)))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))  # (N, heads, F, dim_head)
        return self.to_out(out.transpose(1, 2).flatten(2))  # (N, heads, F, d) -> (N, F, heads*d)


class SpatioTemporalAttention(nn.Module):
    """The video connector's step after each ResBlock: temporal attention, feed-forward, frame shift (residuals)."""

    def __init__(self, dim, heads=8):
        super().__init__()
        inner = int(dim * 4 * 2 / 3)  # the feed-forward's gated width
        self.temporal_attn = TemporalAttention(dim, heads, dim // 4)  # released: dim/4-wide heads, 2 dim inner
        self.temporal_rel_pos_bias = RelativePositionBias(dim // 2, heads)
        # released names: ff.proj_in.0 (its GEGLU at index 1 has no weights), ff.proj_out, frameshiftblock.out_layers
        self.ff = nn.ModuleDict(dict(proj_in=nn.Sequential(nn.Conv3d(dim, 2 * inner, 1, bias=False)), proj_out=(
            nn.Sequential(Dim1Norm(inner, 1, 1, 1), nn.Conv3d(inner, dim, 1, bias=False)))))
        self.frameshiftblock = nn.ModuleDict(dict(out_layers=nn.Sequential(
            group_norm(dim), nn.SiLU(), zero(nn.Conv2d(dim, dim, 3, padding=1)))))

    def forward(self, x):  # (B, C, F, H, W)
        B, C, num_frames, H, W = x.shape
        seq = x.permute(0, 3, 4, 2, 1).reshape(B * H * W, num_frames, C)  # (B*H*W, F, C): one sequence per pixel
        seq = seq + self.temporal_attn(seq, self.temporal_rel_pos_bias(num_frames))
        x = seq.view(B, H, W, num_frames, C).permute(0, 4, 3, 1, 2)  # (B*H*W, F, C) -> (B, C, F, H, W)
        h, gate = self.ff.proj_in(x).float().chunk(2, 1)  # a 1x1x1 conv GEGLU, in float32 as released
        a, b = (h * F.gelu(gate)).chunk(2, 1)
        x = x + self.ff.proj_out(torch.cat([a, F.pad(b, (0, 0, 0, 0, 1, -1))], 1))  # b: frame f sees frame f - 1
        h = self.frameshiftblock.out_layers(x.transpose(1, 2).reshape(B * num_frames, C, H, W))  # (B*F, C, H, W)
        h = h.view(B, num_frames, C, H, W).transpose(1, 2)  # (B*F, C, H, W) -> (B, C, F, H, W)
        delay = lambda i: min(i, num_frames)  # channel group i (of 8) delayed by i frames
        return x + torch.cat([F.pad(g, (0, 0, 0, 0, delay(i), -delay(i))) for i, g in enumerate(h.chunk(8, 1))], 1)
