"""The joint video-audio noise predictor eps_theta(x_v, x_a, t_v, t_a) of Sec. 3.1 / Fig. 1 and App. A.2.

Two frozen U-Nets (AnimateDiff video, AudioLDM audio) run in LOCKSTEP. One conditioning block (CMC-PE, Sec. 3.3.2,
or the cross-attention baseline of Sec. 3.3.1) sits after down_blocks[2], down_blocks[3], up_blocks[0] and
up_blocks[1] of each U-Net ("the last two down-sampling blocks and the first two up-sampling blocks", App. A.2), and
sees the OTHER modality's connector sequence. Trainable: the added modules and AnimateDiff's motion modules (App. A.2).

The U-Net forwards are re-walked from their public submodules (no fork, no hooks: a block needs the other U-Net's
output at the same depth, so the two forwards must be interleaved). Left out of the walk: ControlNet/T2I residuals,
IP-adapter, GLIGEN, attention masks, cross_attention_kwargs, FreeInit/FreeNoise (unused by the paper).
"""
import math

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from base_models import load_base_models
from cmcpe import CMCPE, Connector, CrossAttentionConditioner

POINTS = (("down", 2), ("down", 3), ("up", 0), ("up", 1))  # App. A.2: where the 4 blocks per modality sit
CONDITIONERS = {"cmcpe": CMCPE, "crossattn": CrossAttentionConditioner}


def unet_walk(unet, h, emb, text, extra, ckpt=False):
    """Generator: conv_in .. conv_out of a diffusers U-Net, mirroring UNetMotionModel.forward /
    UNet2DConditionModel.forward of diffusers 0.42.1 (re-diff them on upgrade). Yields h after each of POINTS and
    continues with the value sent back. Returns the conv_out output.
    h: (N, C, H, W) latent (video: frames folded into N); emb: (N, D) time(+class) embedding; text: the
    encoder_hidden_states (video (N, 77, D), audio None); extra: {"num_frames": F} for the video U-Net, {} for audio.
    ckpt: recompute each whole block in backward, motion modules included (diffusers' own flag skips those)."""
    run = (lambda f, **kw: checkpoint(f, use_reentrant=False, **kw)) if ckpt and torch.is_grad_enabled() else (
        lambda f, **kw: f(**kw))
    # Sizes that are not a multiple of 2**num_upsamplers (audio T = 100 -> 50, 25, 13) make the up blocks
    # interpolate to the skip's size instead of doubling (diffusers' forward_upsample_size).
    forward_upsample_size = any(s % 2 ** unet.num_upsamplers for s in h.shape[-2:])
    h = unet.conv_in(h)
    res = (h,)
    for i, block in enumerate(unet.down_blocks):
        cross = dict(encoder_hidden_states=text) if getattr(block, "has_cross_attention", False) else {}
        h, r = run(block, hidden_states=h, temb=emb, **cross, **extra)
        if ("down", i) in POINTS:
            h = yield h
            # As the official code: the block's output replaces the main path AND the block's last skip (notes §3.1
            # (a)), so the decoder also sees the conditioned feature (diffusers returns h is r[-1]).
            r = r[:-1] + (h,)
        res += r
    mid_extra = extra if hasattr(unet.mid_block, "motion_modules") else {}
    h = run(unet.mid_block, hidden_states=h, temb=emb, encoder_hidden_states=text, **mid_extra)
    for i, block in enumerate(unet.up_blocks):
        r, res = res[-len(block.resnets):], res[:-len(block.resnets)]  # this block's skips, popped from the end
        size = res[-1].shape[2:] if forward_upsample_size and i < len(unet.up_blocks) - 1 else None
        cross = dict(encoder_hidden_states=text) if getattr(block, "has_cross_attention", False) else {}
        h = run(block, hidden_states=h, temb=emb, res_hidden_states_tuple=r, upsample_size=size, **cross, **extra)
        if ("up", i) in POINTS:
            h = yield h
    if unet.conv_norm_out is not None:
        h = unet.conv_act(unet.conv_norm_out(h))
    return unet.conv_out(h)


def video_walk(unet, x_v, t_v, text_v, ckpt=False):
    """AnimateDiff's UNetMotionModel: x_v (B, 4, F, h, w), t_v (B,), text_v (B, 77, D) -> generator, eps_v at end."""
    B, C, n, hh, ww = x_v.shape
    emb = unet.time_embedding(unet.time_proj(t_v).to(unet.dtype))  # (B, 1280)
    emb = emb.repeat_interleave(n, 0)  # (B*F, 1280): the 2-D layers see every frame as an image
    text = text_v.repeat_interleave(n, 0)  # (B*F, 77, D): as AnimateDiffPipeline, b*F + f order
    h = x_v.permute(0, 2, 1, 3, 4).reshape(B * n, C, hh, ww)  # (B, C, F, h, w) -> (B*F, C, h, w)
    eps = yield from unet_walk(unet, h, emb, text, {"num_frames": n}, ckpt)
    return eps.reshape(B, n, *eps.shape[1:]).permute(0, 2, 1, 3, 4)  # (B*F, C, h, w) -> (B, C, F, h, w)


def audio_walk(unet, x_a, t_a, text_a, ckpt=False):
    """AudioLDM's UNet2DConditionModel: x_a (B, 8, T, 16), t_a (B,), text_a (B, D) CLAP -> generator; eps_a at the end.
    Text enters only through the class embedding; its cross-attentions get None and act as self-attentions."""
    emb = unet.time_embedding(unet.get_time_embed(sample=x_a, timestep=t_a))  # (B, D_t)
    c = unet.get_class_embed(sample=x_a, class_labels=text_a)  # (B, D_t)
    emb = torch.cat([emb, c], -1) if unet.config.class_embeddings_concat else emb + c  # AudioLDM: concat, (B, 2 D_t)
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    return (yield from unet_walk(unet, x_a, emb, None, {}, ckpt))


def _send(gen, h):
    """Advance a walk: the next yielded feature, or the walk's return value (the noise prediction) at its end."""
    try:
        return gen.send(h)
    except StopIteration as stop:
        return stop.value


class JointModel(nn.Module):
    """eps_theta(x_v, x_a, t_v, t_a) -> (eps_v, eps_a) (Sec. 3.4, Eq. (10)): two frozen base U-Nets + added modules.

    conditioner: "cmcpe" (Sec. 3.3.2) or "crossattn" (Sec. 3.3.1 baseline, Table 1).
    context_channels: width of the connector sequences; default the video U-Net's widest level (1280 at full size,
    the official `connector_channel`). Time spans: video frame = 1/fps s; audio latent frame = sec_per_audio_latent
    (4 mel hops of 10 ms); an audio feature with total time stride s covers s * sec_per_audio_latent (CONTRACT.md).
    """

    def __init__(self, video_unet, audio_unet, conditioner="cmcpe", fps=8, sec_per_audio_latent=0.04,
                 context_channels=None, heads=8):
        super().__init__()
        if conditioner not in CONDITIONERS:
            raise ValueError(f"conditioner must be one of {sorted(CONDITIONERS)}, not {conditioner!r}")
        self.video_unet, self.audio_unet = video_unet, audio_unet
        self.fps, self.sec_per_audio_latent, self.gradient_checkpointing = fps, sec_per_audio_latent, False
        ch_v, ch_a = video_unet.config.block_out_channels, audio_unet.config.block_out_channels
        C = context_channels or ch_v[-1]
        self.connector_v = Connector(video_unet.config.in_channels, ch_v[0], C, video=True)
        self.connector_a = Connector(audio_unet.config.in_channels, ch_a[0], C, video=False)
        width = lambda ch, kind, i: ch[i] if kind == "down" else ch[-1 - i]  # up_blocks run over reversed channels
        Block = CONDITIONERS[conditioner]
        self.blocks_v = nn.ModuleList(Block(width(ch_v, k, i), C, video=True, heads=heads) for k, i in POINTS)
        self.blocks_a = nn.ModuleList(Block(width(ch_a, k, i), C, video=False, heads=heads) for k, i in POINTS)

    def added_modules(self):
        return [self.connector_v, self.connector_a, self.blocks_v, self.blocks_a]

    def trainable_parameters(self):
        """App. A.2's trainable set, (name, param): the added modules and AnimateDiff's motion layers. Defined by
        structure, not by the current requires_grad flags (a base-model pre-training stage may have changed them)."""
        added = {id(p) for m in self.added_modules() for p in m.parameters()}
        return [(n, p) for n, p in self.named_parameters()
                if id(p) in added or (n.startswith("video_unet.") and "motion_modules" in n)]

    def set_trainable(self):
        """requires_grad True exactly for trainable_parameters(); the frozen U-Nets carry gradients but get none."""
        self.requires_grad_(False)
        for _, p in self.trainable_parameters():
            p.requires_grad_(True)
        return self

    def enable_gradient_checkpointing(self):
        """Recompute activations in backward: every U-Net block (motion modules included), the added blocks and the
        connectors keep only their inputs for backward."""
        self.gradient_checkpointing = True

    def _ckpt(self, module, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def forward(self, x_v, x_a, t_v, t_a, text_v, text_a, x0_v=None, x0_a=None):
        """x_v (B, 4, F, h, w), x_a (B, 8, T, 16): noisy latents at local timesteps t_v = m(t) - 1, t_a = n(t) - 1
        (diffusers indices, (B,) or scalar); text_v (B, 77, D) CLIP states; text_a (B, D) normalised CLAP embedding;
        x0_v, x0_a: self-conditioning estimates (Eq. (6)) or None. -> (eps_v, eps_a), shaped like x_v, x_a."""
        B, n, T = x_v.shape[0], x_v.shape[2], x_a.shape[2]
        t_v = torch.as_tensor(t_v, device=x_v.device).reshape(-1).expand(B)  # (B,)
        t_a = torch.as_tensor(t_a, device=x_a.device).reshape(-1).expand(B)
        ctx_v = self._ckpt(self.connector_v, x_v, x0_v, t_v)  # (B, F, C): one vector per video frame, 1/fps s each
        ctx_a = self._ckpt(self.connector_a, x_a, x0_a, t_a)  # (B, T, C): one vector per audio latent frame
        sec_v, sec_a = 1 / self.fps, self.sec_per_audio_latent
        walk_v = video_walk(self.video_unet, x_v, t_v, text_v, self.gradient_checkpointing)
        walk_a = audio_walk(self.audio_unet, x_a, t_a, text_a, self.gradient_checkpointing)
        h_v, h_a = next(walk_v), next(walk_a)
        for block_v, block_a in zip(self.blocks_v, self.blocks_a):  # the 4 points, both U-Nets at the same depth
            s = 2 ** round(math.log2(T / h_a.shape[2]))  # audio time stride here: 100 -> 13 frames is s = 8
            new_v = self._ckpt(block_v, h_v, ctx_a, sec_v, sec_a, n)  # video features see the audio sequence
            new_a = self._ckpt(block_a, h_a, ctx_v, s * sec_a, sec_v)  # and vice versa
            h_v, h_a = _send(walk_v, new_v), _send(walk_a, new_a)
        return h_v, h_a  # after the last point the walks ran to the end: (eps_v, eps_a)


def build_model(size, conditioner="cmcpe", device="cpu", dtype=torch.float32, fps=8, **base_kwargs):
    """-> (JointModel, BaseModels). size "tiny" | "full" | "pretrained" (base_models.load_base_models); the joint
    model holds the base U-Nets themselves (not copies), with only added modules + motion modules trainable."""
    bases = load_base_models(size, device=device, dtype=dtype, fps=fps, **base_kwargs)
    with torch.random.fork_rng(), torch.device(device):  # same initial added modules every build
        torch.manual_seed(0)
        model = JointModel(bases.video_unet, bases.audio_unet, conditioner, fps=fps)
    return model.to(dtype=dtype).set_trainable(), bases
