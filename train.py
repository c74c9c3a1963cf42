"""Training of the joint model: the loss of Eq. (9)-(10), Sec. 3.4, with the setup of Sec. 4.1.2 and App. A.2.

Per step: draw t_v and t_a INDEPENDENTLY and uniformly from {1..T} (the paper; `--shared-t` draws one t for both, as
the official code does), noise both latents with Eq. (2), run the joint model with self-conditioning (Chen et al.,
2022: with probability 0.5 a first no-grad pass gives x0_hat of Eq. (6) to the connectors, else zeros) and sum the two
noise-prediction errors. Captions are replaced by "" with p = 0.1 for classifier-free guidance, per sample.

Tiny size (offline demo): the tiny base U-Nets start random, so stage "base" first trains them alone (Eq. (7) for each
model: the added modules are an exact identity and stay untrained), then stage "joint" freezes them and trains the
added modules and the motion modules, mirroring the paper's premise of pretrained base models. The tiny U-Nets
predict v, so both stages regress on v there (timesteps.target; why: base_models.py); lr decays by a cosine.
Multi-GPU: `torchrun --nproc_per_node N train.py ...` (DDP; --batch-size is per GPU). Left out: LR warm-up and other schedules.
"""
import argparse
import json
import math
import os
import shutil
import sys
import time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from cache import CachedClips, cached_inputs
from data import build_dataset
from model import build_model
from timesteps import add_noise, alpha_bar_table, predict_x0, target, to_eps


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="greatesthits", choices=["greatesthits", "landscape", "vggsound", "synthetic"])
    p.add_argument("--root", default=None, help="folder of prepared clips (see data.py prepare)")
    p.add_argument("--flist", default=None, help="official file list <clip>,\"<caption>\" (GreatestHits)")
    p.add_argument("--cache", default=None, help="folder written by cache.py: stored latents + text embeddings")
    p.add_argument("--size", default="pretrained", choices=["tiny", "full", "pretrained"])
    p.add_argument("--conditioner", default="cmcpe", choices=["cmcpe", "crossattn"])  # Table 1 rows
    p.add_argument("--video-base", default="stable-diffusion-v1-5/stable-diffusion-v1-5")  # SD-1.5 mirror (official: Realistic Vision 5.1)
    p.add_argument("--motion-adapter", default="guoyww/animatediff-motion-adapter-v1-5-2")  # official code
    p.add_argument("--audio-base", default="cvssp/audioldm-m-full")  # official code; "U-Nets exceed 1.7B" (A.2)
    p.add_argument("--fps", type=int, default=None, help="8 for GreatestHits (4.1.2), 4 for Landscape/VGGSound (4.2.1)")
    p.add_argument("--batch-size", type=int, default=None, help="16 (Sec. 4.1.2)")
    p.add_argument("--epochs", type=int, default=1000)  # Sec. 4.1.2 (100 Landscape, 30 VGGSound)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many joint steps")
    p.add_argument("--base-steps", type=int, default=None, help="tiny only: steps of the base-model stage")
    p.add_argument("--lr", type=float, default=None, help="1e-5 (Sec. 4.1.2)")
    p.add_argument("--lr-schedule", default=None, choices=["constant", "cosine"],
                   help="constant (paper, Sec. 4.1.2); tiny default cosine: a few hundred steps must settle")
    p.add_argument("--optimizer", default="adam", choices=["adam", "adamw"])  # paper: Adam; official: AdamW wd 0.01
    p.add_argument("--p-self-cond", type=float, default=0.5)  # Chen et al. (2022); official code
    p.add_argument("--p-uncond", type=float, default=0.1)  # official --drop_rate_cfg
    p.add_argument("--shared-t", action="store_true", help="official code: one t for both U-Nets")
    p.add_argument("--ema-decay", type=float, default=0.9999)  # official --use_ema (diffusers EMAModel default)
    p.add_argument("--precision", default=None, choices=["bf16", "fp16", "fp32"], help="bf16 on CUDA, fp32 on CPU")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--out", default=None, help="run folder (default runs/<data>-<size>-<conditioner>)")
    p.add_argument("--ckpt-every", type=int, default=1000, help="steps between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from <out>/<stage>/ exactly")
    p.add_argument("--num-clips", type=int, default=None, help="synthetic: number of training clips")
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    tiny = args.size == "tiny"  # the offline demo: small enough to learn on 2 CPU cores in minutes
    # tiny: 700 + 200 steps fit the demo's 15 minutes on 2 CPU cores (README); the rest is Sec. 4.1.2
    defaults = dict(fps=4 if args.data in ("landscape", "vggsound") else 8, batch_size=8 if tiny else 16,
                    lr=1e-3 if tiny else 1e-5, lr_schedule="cosine" if tiny else "constant",
                    base_steps=700 if tiny else 0, max_steps=200 if tiny else None,
                    num_workers=0 if tiny else 4, precision="bf16" if args.device.startswith("cuda") else "fp32",
                    out=f"runs/{args.data}-{args.size}-{args.conditioner}")
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if tiny and args.ema_decay == 0.9999:
        args.ema_decay = 0.995  # a few hundred steps only: the EMA must be able to move
    return args


def drop_text(captions, p, gens):
    """Classifier-free guidance: each caption independently becomes "" with probability p (fires at batch 1 too)."""
    return ["" if torch.rand((), generator=g).item() < p else c for c, g in zip(captions, gens)]


def joint_loss(model, bases, batch, args, step, offset=0):
    """Eq. (9)-(10) for one batch; returns (loss, per-sample losses and timesteps for the Fig. 2 log).

    Every random draw of sample j comes from its own generator seeded by (seed, step, offset + j), so a run is
    reproducible from its step alone (exact resume) and does not depend on how a global batch is split over GPUs."""
    dev, B, P = args.device, len(batch["caption"]), bases.prediction_type
    gens = [torch.Generator().manual_seed((args.seed << 40) + (step << 16) + offset + j) for j in range(B)]
    randn = lambda shape: torch.stack([torch.randn(shape[1:], generator=g) for g in gens]).to(dev)
    with torch.no_grad():
        captions = drop_text(list(batch["caption"]), args.p_uncond, gens)
        if "video_mean" in batch:  # --cache: the frozen encoders already ran, once per clip (cache.py)
            text_v, text_a, mu_v, sd_v, mu_a, sd_a = cached_inputs(batch, captions, dev)
        else:
            text_v, text_a = bases.encode_text(captions)
            mu_v, sd_v = bases.encode_video(batch["video"].to(dev))
            mu_a, sd_a = bases.encode_audio(batch["mel"].to(dev))
    x_v, x_a = mu_v + sd_v * randn(mu_v.shape), mu_a + sd_a * randn(mu_a.shape)  # sample the VAE latent distribution
    T = bases.alphas_cumprod_v.shape[0]
    t_v = torch.cat([torch.randint(1, T + 1, (1,), generator=g) for g in gens])  # Eq. (7): t ~ U(1, T)
    t_a = t_v.clone() if args.shared_t else torch.cat([torch.randint(1, T + 1, (1,), generator=g) for g in gens])
    eps_v, eps_a = randn(x_v.shape), randn(x_a.shape)
    ab_v, ab_a = alpha_bar_table(bases.alphas_cumprod_v)[t_v], alpha_bar_table(bases.alphas_cumprod_a)[t_a]
    xt_v, xt_a = add_noise(x_v, eps_v, ab_v), add_noise(x_a, eps_a, ab_a)  # Eq. (2)
    tv, ta = (t_v - 1).to(dev), (t_a - 1).to(dev)  # paper timestep -> diffusers index (timesteps.py)
    x0_v = x0_a = None
    coin = torch.Generator().manual_seed((args.seed << 40) + (step << 16) + 65535)  # one draw per step, same on all GPUs
    if torch.rand((), generator=coin).item() < args.p_self_cond:  # self-conditioning (Chen et al., 2022)
        with torch.no_grad(), autocast(args):
            e_v, e_a = model(xt_v, xt_a, tv, ta, text_v, text_a)
        x0_v = predict_x0(xt_v, to_eps(e_v.float(), xt_v, ab_v, P["v"]), ab_v)  # Eq. (6)
        x0_a = predict_x0(xt_a, to_eps(e_a.float(), xt_a, ab_a, P["a"]), ab_a)  # Eq. (6)
    with autocast(args):
        pred_v, pred_a = model(xt_v, xt_a, tv, ta, text_v, text_a, x0_v, x0_a)
    # Eq. (10), per sample; the target is eps for the real base models (the paper), v for the tiny ones (README)
    l_v = F.mse_loss(pred_v.float(), target(x_v, eps_v, ab_v, P["v"]), reduction="none").flatten(1).mean(1)
    l_a = F.mse_loss(pred_a.float(), target(x_a, eps_a, ab_a, P["a"]), reduction="none").flatten(1).mean(1)
    loss = l_v.mean() + l_a.mean()  # Eq. (9)
    return loss, dict(t_v=t_v.tolist(), t_a=t_a.tolist(), loss_v=l_v.tolist(), loss_a=l_a.tolist())


def autocast(args):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    return torch.autocast(args.device.split(":")[0], dtype=dtype, enabled=dtype is not None)


def save_checkpoint(folder, params, ema, opt, scaler, step, args):
    """Atomic: everything goes to <folder>.tmp, which then replaces <folder> by rename; no pickled objects."""
    tmp, old = folder + ".tmp", folder + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({n: p.detach().float().cpu().contiguous() for n, p in params.items()}, f"{tmp}/model.safetensors")
    save_file({n: e.cpu().contiguous() for n, e in ema.items()}, f"{tmp}/ema.safetensors")
    state = dict(opt=opt.state_dict(), scaler=scaler.state_dict(), step=step, args=json.dumps(vars(args)))
    torch.save(state, f"{tmp}/state.pt")
    with open(f"{tmp}/config.json", "w") as f:
        json.dump(dict(vars(args), step=step), f, indent=1)
    if os.path.exists(folder):
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def load_weights(model, folder, ema=True):
    """Load a stage folder's weights (EMA by default) into the model; strict on names so a wrong run fails loudly."""
    sd = load_file(f"{folder}/{'ema' if ema else 'model'}.safetensors")
    own = dict(model.named_parameters())
    missing = [n for n in sd if n not in own]
    if missing:
        raise ValueError(f"{folder}: {len(missing)} weights do not fit this model (e.g. {missing[0]})")
    with torch.no_grad():
        for n, w in sd.items():
            own[n].copy_(w)


def train_stage(stage, model, bases, params, steps, args):
    """One loop for both stages: Adam on `params`, EMA, AMP, DDP, atomic checkpoints, exact resume."""
    folder, rank, world = os.path.join(args.out, stage), args.rank, args.world_size
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    opt_cls = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
    opt = opt_cls(params.values(), lr=args.lr, **({"weight_decay": 0.01} if args.optimizer == "adamw" else {}))
    scaler = torch.amp.GradScaler(args.device.split(":")[0], enabled=args.precision == "fp16")
    ema, step = {n: p.detach().float().clone() for n, p in params.items()}, 0
    if args.resume and os.path.exists(f"{folder}/state.pt"):
        state = torch.load(f"{folder}/state.pt", weights_only=True)  # no arbitrary unpickling
        load_weights(model, folder, ema=False)
        ema = load_file(f"{folder}/ema.safetensors", device=args.device)
        opt.load_state_dict(state["opt"]), scaler.load_state_dict(state["scaler"])
        step = state["step"]
        print(f"[{stage}] resumed from {folder} at step {step}")
    if steps is not None and step >= steps:
        return
    net = model if world == 1 else torch.nn.parallel.DistributedDataParallel(model)  # grads averaged over GPUs
    dataset = CachedClips(args.cache, args.size, args.fps) if args.cache else build_dataset(
        args.data, "train", root=args.root, flist=args.flist, fps=args.fps, size=bases.video_size, num_clips=args.num_clips)
    b, G = args.batch_size, args.batch_size * world  # per-GPU and global batch
    per_epoch = len(dataset) // G
    if per_epoch == 0:
        sys.exit(f"error: {len(dataset)} training clips, fewer than one global batch of {G}")
    steps = steps if steps is not None else args.epochs * per_epoch  # --epochs unless --max-steps
    log = open(os.path.join(args.out, f"log_{stage}.jsonl"), "a") if rank == 0 else None
    bar = tqdm(total=steps, initial=step, desc=f"{stage} (global batch {G})", dynamic_ncols=True, disable=rank > 0)
    model.train()
    try:
        while step < steps:
            epoch, k = divmod(step, per_epoch)  # data order is a function of (seed, epoch): resumable exactly
            order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed * 100003 + epoch))
            mine = [order[i * G + rank * b + j].item() for i in range(k, per_epoch) for j in range(b)]  # this GPU's share
            for batch in torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, mine), b, num_workers=args.num_workers):
                t0 = time.time()
                cosine = 0.5 + 0.5 * math.cos(math.pi * step / steps) if args.lr_schedule == "cosine" else 1.0
                for g in opt.param_groups:  # a function of the step alone: resume stays exact
                    g["lr"] = args.lr * cosine
                loss, info = joint_loss(net, bases, batch, args, step, offset=rank * b)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt), scaler.update()
                step += 1
                decay = min(args.ema_decay, (1 + step) / (10 + step))  # diffusers EMAModel warm-up
                with torch.no_grad():
                    for n, p in params.items():
                        ema[n].lerp_(p.detach().float(), 1 - decay)
                if rank == 0:
                    log.write(json.dumps(dict(step=step, epoch=epoch, loss=loss.item(), global_batch=G, **info)) + "\n")
                    mean = lambda xs: sum(xs) / len(xs)
                    bar.set_postfix(loss_v=f"{mean(info['loss_v']):.4f}", loss_a=f"{mean(info['loss_a']):.4f}",
                                    clips_s=f"{G / (time.time() - t0):.1f}")
                    bar.update(1)
                    if step % args.ckpt_every == 0 or step == steps:
                        save_checkpoint(folder, params, ema, opt, scaler, step, args)
                if step >= steps:
                    break
    except KeyboardInterrupt:
        if rank == 0:
            save_checkpoint(folder, params, ema, opt, scaler, step, args)
        sys.exit(f"\ninterrupted: checkpoint saved to {folder} at step {step}; continue with --resume")
    finally:
        bar.close()
        if log:
            log.close()


def main(argv=None):
    args = parse_args(argv)
    args.rank, args.world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if args.world_size > 1:  # launched by torchrun: NCCL on GPUs, gloo on CPUs
        torch.distributed.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
        if args.device.startswith("cuda"):
            args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(args.device)
    if args.rank == 0:
        print(json.dumps(vars(args), indent=1))
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    try:
        model, bases = build_model(args.size, args.conditioner, device=args.device, fps=args.fps,
                                   video_base=args.video_base, motion_adapter=args.motion_adapter, audio_base=args.audio_base)
    except RuntimeError as e:  # e.g. weights not available offline: one line, no traceback
        sys.exit(f"error: {e}")
    if args.grad_checkpointing:
        model.enable_gradient_checkpointing()
    if args.base_steps > 0:  # stage "base": each base model alone, Eq. (7); the identity added modules stay untrained
        unets = {n: p for n, p in model.named_parameters() if n.startswith(("video_unet.", "audio_unet."))}
        train_stage("base", model, bases, unets, args.base_steps, dict_replace(args, p_self_cond=0.0))
        if args.world_size > 1:
            torch.distributed.barrier()  # rank 0 has written the base checkpoint
        load_weights(model, os.path.join(args.out, "base"), ema=True)  # freeze the EMA base models
    train_stage("joint", model, bases, dict(model.trainable_parameters()), args.max_steps, args)
    if args.rank == 0:
        print(f"done: {args.out}/joint (sample with: python sample.py --ckpt {args.out} --prompt ...)")
    if args.world_size > 1:
        torch.distributed.destroy_process_group()


def dict_replace(args, **kw):
    return argparse.Namespace(**{**vars(args), **kw})


if __name__ == "__main__":
    main()
