"""The released video connector's spatio-temporal attention (CoDi's, inside the connector of Sec. 3.3.2 / App. A.2):
it lets the video context of frame f see the motion around f. Three residual steps on (B, C, F, H, W) maps: attention
across the frames of each pixel (frame-time encoding, relative position bias), a feed-forward that shifts half its
channels one frame later, and a residual block that delays channel group i by i frames. Parameter names are the
released ones. Not in the paper's words at all; the paper says only "we followed the environment encoder of CoDi".
"""
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
    """CoDi's bias-free norm over axis 1 with gain g: over channels of (B, C, F, H, W) maps ("ChanLayerNorm"), and,
    released quirk, over the FRAMES of the (N, F, C) sequences of the temporal attention (there named LayerNorm)."""

    def __init__(self, *shape):
        super().__init__()
        self.g = nn.Parameter(torch.ones(*shape))

    def forward(self, x):
        eps = 1e-5 if x.dtype == torch.float32 else 1e-3
        var, mean = torch.var(x, dim=1, unbiased=False, keepdim=True), torch.mean(x, dim=1, keepdim=True)
        return ((x - mean) * var.clamp(min=eps).rsqrt()).to(self.g.dtype) * self.g


class RelativePositionBias(nn.Module):
    """Continuous position bias (Swin v2): an MLP of the signed log frame offset -> one attention bias per head."""

    def __init__(self, dim, heads):
        super().__init__()
        self.net = nn.ModuleList([nn.Sequential(nn.Linear(1, dim), nn.SiLU()), nn.Sequential(nn.Linear(dim, dim),
                                  nn.SiLU()), nn.Linear(dim, heads)])

    def forward(self, num_frames):  # -> (heads, F, F)
        w = self.net[0][0].weight
        i = torch.arange(num_frames, device=w.device, dtype=torch.float32)
        d = (i[:, None] - i[None, :])[..., None]  # (F, F, 1): frame offset i - j
        d = (torch.sign(d) * torch.log(d.abs() + 1)).to(w.dtype)
        for layer in self.net:
            d = layer(d)
        return d.permute(2, 0, 1)


def sinusoidal(pos, dim):  # (F,) -> (F, dim), [sin | cos] with CoDi's frequency spacing log(1e4) / (dim/2 - 1)
    step = -(math.log(10000) / (dim // 2 - 1))
    freqs = torch.exp(torch.arange(dim // 2, device=pos.device, dtype=torch.float32) * step)
    args = pos[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], -1)


class TemporalAttention(nn.Module):
    """Self-attention across the frames of each pixel; frame-time encoding and relative position bias."""

    def __init__(self, dim, heads, dim_head):
        super().__init__()
        self.heads, self.norm = heads, Dim1Norm(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * heads * dim_head, bias=False)
        self.to_out = zero(nn.Linear(heads * dim_head, dim, bias=False))

    def forward(self, x, bias):  # x (N, F, C), bias (heads, F, F)
        seconds = torch.arange(x.shape[1], device=x.device, dtype=torch.float32) / 8  # released: 8 fps, any fps
        x = self.norm(x + sinusoidal(seconds, x.shape[2]).to(x.dtype))  # released: the norm runs over frames
        q, k, v = (z.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (N, heads, F, dim_head)
                   for z in (self.to_q(x), *self.to_kv(x).chunk(2, -1)))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))  # (N, heads, F, dim_head)
        return self.to_out(out.transpose(1, 2).flatten(2))


class ChannelGEGLU(nn.Module):
    def forward(self, x):  # (B, 2C, ...) -> (B, C, ...), computed in float32 as released
        x, gate = x.float().chunk(2, 1)
        return x * F.gelu(gate)


class TemporalFeedForward(nn.Module):
    """1x1x1 conv GEGLU MLP whose second half of channels is shifted one frame later (token shift)."""

    def __init__(self, dim, mult=4):
        super().__init__()
        inner = int(dim * mult * 2 / 3)
        self.proj_in = nn.Sequential(nn.Conv3d(dim, 2 * inner, 1, bias=False), ChannelGEGLU())
        self.proj_out = nn.Sequential(Dim1Norm(inner, 1, 1, 1), nn.Conv3d(inner, dim, 1, bias=False))

    def forward(self, x):  # (B, C, F, H, W)
        a, b = self.proj_in(x).chunk(2, 1)
        return self.proj_out(torch.cat([a, F.pad(b, (0, 0, 0, 0, 1, -1))], 1))  # b: frame f sees frame f - 1


class FrameShift(nn.Module):
    """GN-SiLU-zero conv per frame, channel group i (of 8) delayed by i frames, plus the input."""

    def __init__(self, dim):
        super().__init__()
        self.out_layers = nn.Sequential(group_norm(dim), nn.SiLU(), zero(nn.Conv2d(dim, dim, 3, padding=1)))

    def forward(self, x):  # (B, C, F, H, W)
        B, C, num_frames, H, W = x.shape
        h = self.out_layers(x.transpose(1, 2).reshape(B * num_frames, C, H, W))  # per frame: (B*F, C, H, W)
        h = h.view(B, num_frames, C, H, W).transpose(1, 2)  # (B*F, C, H, W) -> (B, C, F, H, W)
        delay = lambda i: min(i, num_frames)
        return x + torch.cat([F.pad(g, (0, 0, 0, 0, delay(i), -delay(i))) for i, g in enumerate(h.chunk(8, 1))], 1)


class SpatioTemporalAttention(nn.Module):
    """Video connector only (CoDi): lets frame f's features see the motion around f. Each step adds a residual."""

    def __init__(self, dim, heads=8):
        super().__init__()
        self.temporal_attn = TemporalAttention(dim, heads, dim // 4)  # released: dim/4-wide heads, 2 dim inner
        self.temporal_rel_pos_bias = RelativePositionBias(dim // 2, heads)
        self.ff, self.frameshiftblock = TemporalFeedForward(dim), FrameShift(dim)

    def forward(self, x):  # (B, C, F, H, W)
        B, C, num_frames, H, W = x.shape
        seq = x.permute(0, 3, 4, 2, 1).reshape(B * H * W, num_frames, C)  # (B*H*W, F, C): one sequence per pixel
        seq = seq + self.temporal_attn(seq, self.temporal_rel_pos_bias(num_frames))
        x = seq.view(B, H, W, num_frames, C).permute(0, 4, 3, 1, 2)  # (B*H*W, F, C) -> (B, C, F, H, W)
        return self.frameshiftblock(x + self.ff(x))
