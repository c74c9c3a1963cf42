"""Cross-modal conditioning: the connectors and CMC-PE (Sec. 3.3.2, Fig. 1, Fig. 3b, App. A.2), and the
cross-attention baseline (Sec. 3.3.1, Fig. 3a, Table 1 row 1), computed exactly as the authors' released model.

Data flow (model.py wires it): Connector([x_t ; x0_hat], emb(t)) -> pool_sequence: one vector per time step -> the
OTHER U-Net's CMCPE blocks, which (Fig. 3b) encode the sequence, INTERPOLATE it onto the feature's time axis,
BROADCAST it over the non-time axes, ADD it like a positional encoding, then run SELF-ATTENTION. Parameter names are
the released `unet_svg`'s (support/released.py maps only the prefixes), and diffusers' `Attention` and `FeedForward`
(GEGLU) carry them too. `# released:` marks where the released model does more or other than the paper's words.
Ours: `time_align="seconds"` (time_weights). Left out: dropout (0 in the release), the connector without
self-conditioning ("x_cur"), the CoDi modules the release never builds.
L: a feature's time steps (frames or audio rows), L_c a context's; S: tokens per time step (H*W or M); C, C_c channels.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention

from support.video_attention import SpatioTemporalAttention, group_norm, zero

TIME_ALIGN = ("seconds", "index")  # ours (default for new runs) / the released model's nearest-by-index


def time_weights(L_x, sec_x, L_c, sec_c):
    """(L_x, L_c) resampling BY SECONDS (ours): W[i, j] is context step j's share of feature step i's span
    [i*sec_x, (i+1)*sec_x) (0 past the context's end). The released model takes step floor(i * L_c / L_x)
    (F.interpolate's nearest): it stretches a padded 4.16 s audio context over 4 s of video, 4 % too slow."""
    i = torch.arange(L_x, dtype=torch.float64)[:, None]
    j = torch.arange(L_c, dtype=torch.float64)[None, :]
    start = torch.maximum(i * sec_x, j * sec_c)
    end = torch.minimum((i + 1) * sec_x, (j + 1) * sec_c)
    overlap = (end - start).clamp(min=0)
    overlap[overlap < 1e-9 * min(sec_x, sec_c)] = 0  # touching spans (float round-off), not overlapping ones
    return (overlap / overlap.sum(1, keepdim=True).clamp(min=1e-30)).float()


def self_conditioning_input(x_t, x0_hat):
    """[x_t ; x0_hat] along channels (Sec. 3.3.2, Chen et al., 2022); x0_hat: Eq. (6) at the previous step, None = 0."""
    return torch.cat([x_t, torch.zeros_like(x_t) if x0_hat is None else x0_hat], 1)


def pool_sequence(z, center=False):
    """CMC-PE's context: (B, C_c, F, h, w) / (B, C_c, L_c, M) -> (B, C_c, L_c), the mean over the non-time axes.
    released: then divided by its L2 norm over TIME (not channels), no epsilon. center (not released; an experiment,
    docs/results.md sec. 8): the temporal mean removed first, so that a channel's offset cannot flatten its profile."""
    z = z.mean(3).mean(3) if z.dim() == 5 else z.mean(3)
    z = z - z.mean(-1, keepdim=True) if center else z
    norm = torch.norm(z, dim=-1, keepdim=True)
    return z / (norm.clamp(min=1e-12) if center else norm)  # released: no epsilon


def pool_vector(z):
    """The baseline's context (Fig. 3a, CoDi): -> ONE vector (B, 1, C_c), L2-normalised over channels."""
    z = z.mean(2).mean(2).mean(2) if z.dim() == 5 else z.mean(2).mean(2)
    return (z / torch.norm(z, dim=-1, keepdim=True)).unsqueeze(1)


class ContextAttention(Attention):
    """attn_c of a CMC-PE block, the self-attention on x + PE. released: the context encoder's two layers live here
    too (attn_c.proj_c, attn_c.norm); context_encoding is what they compute."""

    def __init__(self, dim, heads, dim_head, context_dim):
        super().__init__(dim, heads=heads, dim_head=dim_head)
        self.proj_c = FeedForward(context_dim, dim, activation_fn="geglu")  # released: a GEGLU MLP per context step
        self.norm = group_norm(dim, eps=1e-6)  # released: GroupNorm over channels x ALL context steps


def context_encoding(attn_c, ctx, L, weights=None):
    """Fig. 3b's context encoder: ctx (B, C_c, L_c) -> (B, C, L), resampled by `weights` (time_weights, (L, L_c)),
    or nearest by index as released when None."""
    c = attn_c.proj_c(ctx.transpose(1, 2))  # (B, C_c, L_c) -> (B, L_c, C)
    c = attn_c.norm(c.transpose(1, 2))  # (B, L_c, C) -> (B, C, L_c)
    return F.interpolate(c, size=L) if weights is None else c @ weights.T.to(c)  # Fig. 3b: interpolate, (B, C, L)


class CMCPE(nn.Module):
    """Sec. 3.3.2 / Fig. 3b, one block after a U-Net stage: GN -> 1x1 conv -> [LN; + attn(x + PE)] ->
    [LN; + self-attn] -> [LN; + FF] -> zero-init 1x1 conv -> + input: an exact identity at init.
    released: two self-attentions (the first one on x + PE), and each residual adds the NORMALISED tensor."""

    def __init__(self, channels, context_channels, video, head_dim=8, time_align="seconds"):
        super().__init__()
        C = channels
        heads = C // head_dim  # released: 8-wide heads (the U-Net's attention_head_dim)
        self.video = video
        self.time_align = time_align
        self.norm = group_norm(C, eps=1e-6)
        self.proj_in = nn.Conv2d(C, C, 1)
        self.attn_c = ContextAttention(C, heads, head_dim, context_channels)
        self.attn_s = Attention(C, heads=heads, dim_head=head_dim)
        self.ff = FeedForward(C, activation_fn="geglu")
        self.norm1 = nn.LayerNorm(C)
        self.norm2 = nn.LayerNorm(C)
        self.norm3 = nn.LayerNorm(C)
        self.proj_out = zero(nn.Conv2d(C, C, 1))

    def attend(self, attn, x):  # released: video attends within each frame, audio over all L x S tokens
        B, L, S, C = x.shape
        tokens = x.reshape(B * L, S, C) if self.video else x.reshape(B, L * S, C)  # (B, L, S, C) -> (N, tokens, C)
        return attn(tokens).view(B, L, S, C)  # (N, tokens, C) -> (B, L, S, C)

    def forward(self, h, ctx, sec_h, sec_c, num_frames=None):
        """h: video (B*F, C, H, W) (num_frames = F) or audio (B, C, L, M); ctx (B, C_c, L_c): the other modality's
        sequence; sec_h, sec_c: seconds per time step of h and of ctx (for time_align="seconds")."""
        if self.video:
            if num_frames is None or h.shape[0] % num_frames:
                raise ValueError(f"video features (B*F, C, H, W): num_frames must divide {len(h)}, not {num_frames}")
            x = h.unflatten(0, (-1, num_frames)).transpose(1, 2).flatten(3)  # (B*F, C, H, W) -> (B, C, F, H*W)
        else:
            x = h  # (B, C, L, M)
        B, C, L, S = x.shape
        x = self.proj_in(self.norm(x))  # GroupNorm over ALL tokens (video: all frames together)
        weights = None if self.time_align == "index" else time_weights(L, sec_h, ctx.shape[-1], sec_c)
        pe = context_encoding(self.attn_c, ctx, L, weights)  # Fig. 3b: encode, interpolate: (B, C, L)
        pe = pe.transpose(1, 2)[:, :, None]  # (B, C, L) -> (B, L, 1, C): Fig. 3b: broadcast over the S tokens
        x = x.permute(0, 2, 3, 1)  # (B, C, L, S) -> (B, L, S, C)
        x = self.norm1(x)
        x = x + self.attend(self.attn_c, x + pe)  # Fig. 3b: add like a positional encoding, then self-attention
        x = self.norm2(x)
        x = x + self.attend(self.attn_s, x)
        x = self.norm3(x)
        x = x + self.ff(x)
        out = self.proj_out(x.permute(0, 3, 1, 2))  # (B, L, S, C) -> (B, C, L, S)
        if self.video:
            return h + out.transpose(1, 2).reshape(h.shape)  # (B, C, F, H*W) -> (B*F, C, H, W)
        return h + out


class CrossAttentionBlock(nn.Module):
    """Sec. 3.3.1 / Fig. 3a baseline (CoDi's SpatialTransformer; Table 1 row 1): every token attends to the other
    modality as ONE vector (pool_vector). With a single key the softmax is 1, so it adds the same to_out(to_v(c))
    everywhere: nothing temporally local reaches the features. Video runs per frame. Identity at init."""

    def __init__(self, channels, context_channels, video, head_dim=8, time_align=None):
        super().__init__()
        C = channels
        heads = C // head_dim
        self.video = video
        self.norm = group_norm(C, eps=1e-6)
        self.proj_in = nn.Conv2d(C, C, 1)
        self.attn1 = Attention(C, heads=heads, dim_head=head_dim)
        self.ff = FeedForward(C, activation_fn="geglu")
        self.attn2 = Attention(C, cross_attention_dim=context_channels, heads=heads, dim_head=head_dim)
        self.norm1 = nn.LayerNorm(C)
        self.norm2 = nn.LayerNorm(C)
        self.norm3 = nn.LayerNorm(C)
        self.proj_out = zero(nn.Conv2d(C, C, 1))

    def forward(self, h, ctx, sec_h=None, sec_c=None, num_frames=None):
        """h: video (B*F, C, H, W) or audio (B, C, L, M); ctx (B, 1, C_c). sec_h, sec_c: unused (no time axis)."""
        c = ctx.repeat_interleave(num_frames, 0) if self.video else ctx  # one key per frame: (B*F, 1, C_c)
        x = self.proj_in(self.norm(h)).flatten(2).transpose(1, 2)  # (N, C, H, W) -> (N, H*W, C)
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), c)
        x = x + self.ff(self.norm3(x))
        return h + self.proj_out(x.transpose(1, 2).reshape(h.shape))  # (N, H*W, C) -> (N, C, H, W)


class ResBlock(nn.Module):
    """ADM / CoDi residual block: GN-SiLU-conv, + Linear(SiLU(emb)), GN-SiLU-zero conv; 1x1 skip if channels change."""

    def __init__(self, c_in, c_out, emb_dim):
        super().__init__()
        self.in_layers = nn.Sequential(group_norm(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, c_out))
        self.out_layers = nn.Sequential(group_norm(c_out), nn.SiLU(), nn.Dropout(0.0),
                                        zero(nn.Conv2d(c_out, c_out, 3, padding=1)))
        self.skip_connection = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):  # x (N, c_in, H, W), emb (N, emb_dim)
        return self.skip_connection(x) + self.out_layers(self.in_layers(x) + self.emb_layers(emb)[:, :, None, None])


class Connector(nn.Module):
    """Sec. 3.3.2 / App. A.2 connector (CoDi's environment encoder) on [x_t ; x0_hat] and the frozen U-Net's own time
    embedding of t: conv, ResBlock(2 ch0) [+ STA], stride-2 conv, ResBlock(4 ch0) [+ STA], GN-SiLU-conv to
    context_channels. Video keeps every frame (2-D layers per frame); audio halves time."""

    def __init__(self, latent_channels, model_channels, context_channels, emb_dim, video):
        super().__init__()
        c0, c1, c2 = model_channels // 2, 2 * model_channels, 4 * model_channels  # released channel_mult (2, 4)
        self.video = video
        self.conv_in = nn.Conv2d(2 * latent_channels, c0, 3, padding=1)  # 2x: x_t and x0_hat
        self.res1 = ResBlock(c0, c1, emb_dim)
        self.res2 = ResBlock(c1, c2, emb_dim)
        self.down = nn.Conv2d(c1, c1, 3, stride=2, padding=1)  # video: H, W of each frame; audio: time and mel
        if video:
            self.attn1 = SpatioTemporalAttention(c1)
            self.attn2 = SpatioTemporalAttention(c2)
        self.out = nn.Sequential(group_norm(c2), nn.SiLU(), nn.Conv2d(c2, context_channels, 3, padding=1))

    def forward(self, x_t, x0_hat, emb):
        """x_t, x0_hat (or None): video (B, C, F, H, W) / audio (B, C, L, M); emb (B, D).
        -> video (B, C_c, F, H/2, W/2) / audio (B, C_c, L/2, M/2)."""
        x = self_conditioning_input(x_t, x0_hat)  # (B, 2 C, ...)
        if not self.video:
            return self.out(self.res2(self.down(self.res1(self.conv_in(x), emb)), emb))
        B, num_frames = x.shape[0], x.shape[2]
        frames = lambda z: z.transpose(1, 2).flatten(0, 1)  # (B, C, F, H, W) -> (B*F, C, H, W)
        video = lambda z: z.unflatten(0, (B, num_frames)).transpose(1, 2)  # (B*F, C, H, W) -> (B, C, F, H, W)
        emb = emb.repeat_interleave(num_frames, 0)  # (B*F, D)
        h = self.attn1(video(self.res1(self.conv_in(frames(x)), emb)))
        h = self.attn2(video(self.res2(self.down(frames(h)), emb)))
        return video(self.out(frames(h)))
