"""The joint video-audio noise predictor eps_theta(x_v, x_a, t_v, t_a) of Sec. 3.1 / Fig. 1 and App. A.2.

Two frozen U-Nets (AnimateDiff video, AudioLDM audio). A conditioning block (CMC-PE, Sec. 3.3.2, or the cross-attention
baseline, Sec. 3.3.1) sits after "the last two down-sampling blocks and the first two up-sampling blocks" (App. A.2)
of each U-Net and reads the OTHER modality's connector sequence. The connectors read only latents (and t), so both
sequences come first and the two U-Nets then run one after the other. Trainable: the added modules and AnimateDiff's
motion modules (App. A.2). The U-Net forwards are re-walked from their public submodules to insert the blocks; left
out of the walk: ControlNet/T2I residuals, IP-adapter, GLIGEN, attention masks, cross_attention_kwargs, FreeInit.
"""
import functools
import math

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from base_models import load_base_models
from cmcpe import TIME_ALIGN, CMCPE, Connector, CrossAttentionBlock, pool_sequence, pool_vector
from support.released import from_official

POINTS = (("down", 2), ("down", 3), ("up", 0), ("up", 1))  # App. A.2: where the 4 blocks per modality sit
CONDITIONERS = {"cmcpe": CMCPE, "crossattn": CrossAttentionBlock}
POOLS = {"cmcpe": pool_sequence, "crossattn": pool_vector}  # a sequence over time (Fig. 3b) / one vector (Fig. 3a)


def unet_walk(unet, h, emb, text, extra, insert=None, ckpt=False):
    """conv_in .. conv_out as diffusers 0.42.1's UNetMotionModel / UNet2DConditionModel.forward (re-diff on upgrade),
    h replaced by insert(k, h) after the k-th of POINTS. h (N, C, H, W) (video: frames in N); emb (N, D); text: video
    (N, 77, D), audio None; extra: {"num_frames": F} or {}. ckpt: recompute blocks (motion modules too) in backward."""
    run = (lambda f, **kw: checkpoint(f, use_reentrant=False, **kw)) if ckpt and torch.is_grad_enabled() else (
        lambda f, **kw: f(**kw))
    # sizes not a multiple of 2**num_upsamplers (audio rows 100 -> 50, 25, 13): up blocks interpolate to the skip's
    forward_upsample_size = any(d % 2 ** unet.num_upsamplers for d in h.shape[-2:])
    h = unet.conv_in(h)
    res = (h,)
    for i, block in enumerate(unet.down_blocks):
        cross = dict(encoder_hidden_states=text) if getattr(block, "has_cross_attention", False) else {}
        h, r = run(block, hidden_states=h, temb=emb, **cross, **extra)
        if insert and ("down", i) in POINTS:
            h = insert(POINTS.index(("down", i)), h)
            r = r[:-1] + (h,)  # as released: the conditioned feature also replaces the block's last skip
        res += r
    mid_extra = extra if hasattr(unet.mid_block, "motion_modules") else {}
    h = run(unet.mid_block, hidden_states=h, temb=emb, encoder_hidden_states=text, **mid_extra)
    for i, block in enumerate(unet.up_blocks):
        r, res = res[-len(block.resnets):], res[:-len(block.resnets)]  # this block's skips, popped from the end
        size = res[-1].shape[2:] if forward_upsample_size and i < len(unet.up_blocks) - 1 else None
        cross = dict(encoder_hidden_states=text) if getattr(block, "has_cross_attention", False) else {}
        h = run(block, hidden_states=h, temb=emb, res_hidden_states_tuple=r, upsample_size=size, **cross, **extra)
        if insert and ("up", i) in POINTS:
            h = insert(POINTS.index(("up", i)), h)
    if unet.conv_norm_out is not None:
        h = unet.conv_act(unet.conv_norm_out(h))
    return unet.conv_out(h)


def time_embedding(unet, t):
    """The frozen U-Net's embedding of t, (B, D); also the connectors' (released: never with the class/text)."""
    emb = unet.time_embedding(unet.time_proj(t).to(unet.dtype))
    return unet.time_embed_act(emb) if getattr(unet, "time_embed_act", None) is not None else emb


def video_forward(unet, x_v, t_v, text_v, insert=None, ckpt=False):
    """AnimateDiff's UNetMotionModel: x_v (B, 4, F, h, w), t_v (B,), text_v (B, 77, D) -> eps_v (B, 4, F, h, w)."""
    B, C, num_frames, H, W = x_v.shape
    emb = time_embedding(unet, t_v).repeat_interleave(num_frames, 0)  # (B*F, 1280): the 2-D layers see every frame
    text = text_v.repeat_interleave(num_frames, 0)  # (B*F, 77, D): as AnimateDiffPipeline, b*F + f order
    h = x_v.transpose(1, 2).reshape(B * num_frames, C, H, W)  # (B, C, F, h, w) -> (B*F, C, h, w)
    eps = unet_walk(unet, h, emb, text, {"num_frames": num_frames}, insert, ckpt)
    return eps.unflatten(0, (B, num_frames)).transpose(1, 2)  # (B*F, C, h, w) -> (B, C, F, h, w)


def audio_forward(unet, x_a, t_a, text_a, insert=None, ckpt=False):
    """AudioLDM: x_a (B, 8, rows, 16), t_a (B,), text_a (B, D) CLAP -> eps_a. Text enters only through the class
    embedding; its cross-attentions get None and act as self-attentions."""
    emb = time_embedding(unet, t_a)  # (B, D_t)
    text = unet.get_class_embed(sample=x_a, class_labels=text_a)  # (B, D_t)
    emb = torch.cat([emb, text], -1) if unet.config.class_embeddings_concat else emb + text  # AudioLDM: concat
    return unet_walk(unet, x_a, emb, None, {}, insert, ckpt)


class JointModel(nn.Module):
    """eps_theta(x_v, x_a, t_v, t_a) -> (eps_v, eps_a) (Sec. 3.4, Eq. (10)): two frozen base U-Nets + added modules.
    conditioner: "cmcpe" (Sec. 3.3.2) or "crossattn" (Sec. 3.3.1, Table 1). context_channels: the connector sequences'
    width (released: 1280, the video U-Net's widest). head_dim: the added attention heads' width (released: 8).
    time_align: "seconds" (ours) or "index" (released; its audio latents padded to a multiple of 8 rows, as trained).
    A video frame spans 1/fps s, an audio latent row sec_per_audio_latent (4 mel hops of 10 ms)."""

    def __init__(self, video_unet, audio_unet, conditioner="cmcpe", fps=8, sec_per_audio_latent=0.04,
                 context_channels=None, head_dim=8, time_align="seconds", center_context=False):
        super().__init__()
        if conditioner not in CONDITIONERS:
            raise ValueError(f"conditioner must be one of {sorted(CONDITIONERS)}, not {conditioner!r}")
        if time_align not in TIME_ALIGN:
            raise ValueError(f"time_align must be one of {TIME_ALIGN}, not {time_align!r}")
        if center_context and conditioner != "cmcpe":
            raise ValueError("center_context centres CMC-PE's context sequences: it needs conditioner 'cmcpe'")
        self.video_unet = video_unet
        self.audio_unet = audio_unet
        self.gradient_checkpointing = False
        ch_v, ch_a = video_unet.config.block_out_channels, audio_unet.config.block_out_channels
        C = context_channels or ch_v[-1]
        self.config = dict(conditioner=conditioner, fps=fps, sec_per_audio_latent=sec_per_audio_latent,
                           context_channels=C, head_dim=head_dim, time_align=time_align, center_context=center_context)
        self.audio_rows_multiple = 8 if time_align == "index" else 1  # 2**num_upsamplers: the released walk's need
        emb = lambda u: u.time_embedding.linear_2.out_features  # the frozen time embedding's width (4 x ch0)
        self.connector_v = Connector(video_unet.config.in_channels, ch_v[0], C, emb(video_unet), video=True)
        self.connector_a = Connector(audio_unet.config.in_channels, ch_a[0], C, emb(audio_unet), video=False)
        width = lambda ch, kind, i: ch[i] if kind == "down" else ch[-1 - i]  # up_blocks run over reversed channels
        Block = CONDITIONERS[conditioner]
        self.blocks_v = nn.ModuleList(Block(width(ch_v, kind, i), C, True, head_dim, time_align) for kind, i in POINTS)
        self.blocks_a = nn.ModuleList(Block(width(ch_a, kind, i), C, False, head_dim, time_align) for kind, i in POINTS)

    @classmethod
    def from_official(cls, video_unet, audio_unet, config, state_dict, fps=8):
        """The authors' released `unet_svg` (its config.json as a dict, its state_dict) around these two U-Nets."""
        return from_official(cls, video_unet, audio_unet, config, state_dict, fps)

    def added_modules(self):
        return [self.connector_v, self.connector_a, self.blocks_v, self.blocks_a]

    def trainable_parameters(self):
        """App. A.2's trainable set, [(name, param)]: the added modules and AnimateDiff's motion layers (by structure,
        not by the requires_grad flags)."""
        added = {id(p) for module in self.added_modules() for p in module.parameters()}
        return [(name, p) for name, p in self.named_parameters()
                if id(p) in added or (name.startswith("video_unet.") and "motion_modules" in name)]

    def set_trainable(self, stage="joint"):
        """requires_grad True exactly for what a stage trains -> {name: param}: "joint" App. A.2's trainable_parameters,
        "base" the two base U-Nets (the tiny size's pre-training, train.py --stage base)."""
        base = {n: p for n, p in self.named_parameters() if n.startswith(("video_unet.", "audio_unet."))}
        params = base if stage == "base" else dict(self.trainable_parameters())
        self.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        return params

    def enable_gradient_checkpointing(self):
        """Every U-Net block, added block and connector keeps only its inputs for backward (batch 16 on one GPU)."""
        self.gradient_checkpointing = True

    def _ckpt(self, module, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def contexts(self, x_v, x_a, t_v, t_a, x0_v=None, x0_a=None, held=None):
        """Both connector sequences from the noisy latents and, for self-conditioning (Sec. 3.3.2), x0_v, x0_a (x0_hat
        of Eq. (6) at the previous step; None = zeros): (B, C, F) and (B, C, rows/2) for CMC-PE, (B, 1, C) each for the
        baseline. They never see text: one call serves both halves of a classifier-free-guidance batch. held "v" / "a":
        that modality is given (sample.generate), so the sequence only its own U-Net would read is None."""
        pool, ctx_v, ctx_a = POOLS[self.config["conditioner"]], None, None
        pool = functools.partial(pool, center=True) if self.config["center_context"] else pool  # an experiment
        if held != "a":
            ctx_v = pool(self._ckpt(self.connector_v, x_v, x0_v, time_embedding(self.video_unet, t_v)))  # [x_v ; x0_v]
        if held != "v":
            ctx_a = pool(self._ckpt(self.connector_a, x_a, x0_a, time_embedding(self.audio_unet, t_a)))  # [x_a ; x0_a]
        return ctx_v, ctx_a

    def forward(self, x_v, x_a, t_v, t_a, text_v, text_a, x0_v=None, x0_a=None, context=None, joint=True, held=None):
        """x_v (B, 4, F, h, w), x_a (B, 8, rows, 16): noisy latents at t_v = m(t) - 1, t_a = n(t) - 1 (diffusers
        indices, (B,) or scalar); text_v (B, 77, D) CLIP states; text_a (B, D) normalised CLAP embedding; x0_v, x0_a:
        x0_hat (Eq. (6), previous step) or None; context: contexts(), if already computed; joint=False: the two base
        models alone; held "v" / "a": that U-Net does not run (its output is None). -> (eps_v, eps_a)."""
        B, num_frames, rows = x_v.shape[0], x_v.shape[2], x_a.shape[2]
        t_v = torch.as_tensor(t_v, device=x_v.device).reshape(-1).expand(B)  # (B,)
        t_a = torch.as_tensor(t_a, device=x_a.device).reshape(-1).expand(B)
        if not joint:
            return (video_forward(self.video_unet, x_v, t_v, text_v, ckpt=self.gradient_checkpointing),
                    audio_forward(self.audio_unet, x_a, t_a, text_a, ckpt=self.gradient_checkpointing))
        ctx_v, ctx_a = context if context is not None else self.contexts(x_v, x_a, t_v, t_a, x0_v, x0_a, held)
        sec_v, sec_a = 1 / self.config["fps"], self.config["sec_per_audio_latent"]  # seconds per frame / latent row

        def insert_v(k, h):  # video features (B*F, C, h, w) see the audio sequence (steps of 2 latent rows)
            return self._ckpt(self.blocks_v[k], h, ctx_a, sec_v, 2 * sec_a, num_frames)

        def insert_a(k, h):  # audio features (B, C, L, M) see the video frames
            stride = 2 ** round(math.log2(rows / h.shape[2]))  # rows per feature step: 100 -> 13 is 8
            return self._ckpt(self.blocks_a[k], h, ctx_v, stride * sec_a, sec_v)

        ckpt = self.gradient_checkpointing
        eps_v = None if held == "v" else video_forward(self.video_unet, x_v, t_v, text_v, insert_v, ckpt)
        eps_a = None if held == "a" else audio_forward(self.audio_unet, x_a, t_a, text_a, insert_a, ckpt)
        return eps_v, eps_a


def cast_frozen(model, bases, dtype=torch.bfloat16):
    """Every frozen weight in dtype, the trainable ones in float32 (diffusers examples' bf16 on CUDA) -> bytes saved."""
    keep = {id(p) for _, p in model.trainable_parameters()}
    saved = 0
    for p in {id(p): p for part in (model, bases) for p in part.parameters()}.values():
        if id(p) not in keep and p.dtype == torch.float32:
            p.data = p.data.to(dtype)
            saved += p.numel() * (4 - torch.finfo(dtype).bits // 8)
    return saved


def build_model(size, conditioner="cmcpe", device="cpu", dtype=torch.float32, fps=8, time_align="seconds",
                center_context=False, **base_kwargs):
    """-> (JointModel, BaseModels) of size "tiny" | "full" | "pretrained"; the joint model holds the base U-Nets
    themselves (not copies), with only the added and motion modules trainable."""
    bases = load_base_models(size, device=device, dtype=dtype, fps=fps, **base_kwargs)
    with torch.random.fork_rng(), torch.device(device):  # same initial added modules every build
        torch.manual_seed(0)
        model = JointModel(bases.video_unet, bases.audio_unet, conditioner, fps=fps, time_align=time_align,
                           center_context=center_context)
    model.to(dtype=dtype).set_trainable()
    return model, bases
