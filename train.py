"""Training of the joint model: the loss of Eq. (9)-(10), Sec. 3.4, with the setup of Sec. 4.1.2 and App. A.2.

Per step: draw t_v and t_a INDEPENDENTLY and uniformly from {1..T} (the paper; `--shared-t`: one t for both, as the
official code), noise both latents with Eq. (2), run the joint model with self-conditioning (Chen et al., 2022, as
the official code: with p = 0.5 a first no-grad pass gives x0_hat of Eq. (6) to the connectors, else zeros) and sum
the two noise-prediction errors. Captions become "" with p = 0.1 (official code) for classifier-free guidance.
Tiny size (offline demo): stage "base" first trains the random tiny U-Nets alone (Eq. (7) each), then stage "joint"
freezes them and trains the added and motion modules, as the paper starts from pretrained base models; the tiny
U-Nets predict v (timesteps.target; why: base_models.py), lr decays by a cosine. Multi-GPU: `torchrun
--nproc_per_node N train.py ...` (DDP; --batch-size per GPU). Runs survive kills (checkpoint.py). Left out: warm-up.
"""
import contextlib
import json
import math
import os
import signal
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import build_dataset
from model import build_model, cast_frozen
from support import checkpoint, cli
from support.cache import CachedClips, cached_inputs
from timesteps import add_noise, alpha_bar_table, predict_x0, target, to_eps


def parse_args(argv=None):
    p, pos, frac = cli.Parser(description=__doc__.split("\n")[0]), cli.number(int, 1), cli.number(float, 0, 1)
    p.add_argument("--data", default="greatesthits", choices=["greatesthits", "landscape", "vggsound", "synthetic"])
    p.add_argument("--root", default=None, help="folder of prepared clips (see data.py prepare)")
    p.add_argument("--flist", default=None, help="official file list <clip>,\"<caption>\" (GreatestHits)")
    p.add_argument("--cache", default=None, help="folder written by python -m support.cache: stored latents + text embeddings")
    p.add_argument("--size", default="pretrained", choices=["tiny", "full", "pretrained"])
    p.add_argument("--conditioner", default="cmcpe", choices=["cmcpe", "crossattn"])  # Table 1 rows
    p.add_argument("--time-align", default="seconds", choices=["seconds", "index"],
                   help="CMC-PE context onto feature time: by seconds (ours) or by index (the released model)")
    cli.add_base_args(p)  # --video-base, --motion-adapter, --audio-base (cli.BASES)
    p.add_argument("--tiny-bases", default=cli.TINY_BASES, help="tiny: trained base U-Nets, or 'random' (stage base)")
    p.add_argument("--fps", type=pos, default=None, help="8 for GreatestHits (4.1.2), 4 for Landscape/VGGSound (4.2.1)")
    p.add_argument("--batch-size", type=pos, default=None, help="per GPU and micro-batch; 16 in all (Sec. 4.1.2)")
    p.add_argument("--grad-accum", type=pos, default=1, help="micro-batches per step (official script: 2)")
    p.add_argument("--epochs", type=pos, default=1000)  # Sec. 4.1.2 (100 Landscape, 30 VGGSound)
    p.add_argument("--max-steps", type=cli.number(int, 0), default=None, help="stop after this many joint steps")
    p.add_argument("--base-steps", type=cli.number(int, 0), default=None, help="tiny only: steps of the base stage")
    p.add_argument("--lr", type=cli.number(float, 0, lo_open=True), default=None, help="1e-5 (Sec. 4.1.2)")
    p.add_argument("--lr-schedule", default=None, choices=["constant", "cosine"],
                   help="constant (paper, Sec. 4.1.2); tiny default cosine: a few hundred steps must settle")
    p.add_argument("--optimizer", default="adam", choices=["adam", "adamw"])  # paper: Adam; official: AdamW wd 0.01
    p.add_argument("--max-grad-norm", type=cli.number(float, 0), default=1.0, help="official code: 1.0; 0: off")
    p.add_argument("--p-self-cond", type=frac, default=0.5)  # Chen et al. (2022); official code
    p.add_argument("--p-uncond", type=frac, default=0.1)  # official --drop_rate_cfg
    p.add_argument("--shared-t", action="store_true", help="official code: one t for both U-Nets")
    p.add_argument("--ema-decay", type=cli.number(float, 0, 1, hi_open=True), default=0.9999)  # official --use_ema
    p.add_argument("--precision", default=None, choices=["bf16", "fp16", "fp32"], help="bf16 on CUDA, fp32 on CPU")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--out", default=None, help="run folder (default runs/<data>-<size>-<conditioner>)")
    p.add_argument("--ckpt-every", type=pos, default=1000, help="steps between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    p.add_argument("--allow-changed-args", action="store_true", help="let --resume change trajectory arguments")
    p.add_argument("--num-clips", type=pos, default=None, help="synthetic: number of training clips")
    p.add_argument("--num-workers", type=cli.number(int, 0), default=None)
    p.add_argument("--seed", type=cli.number(int, 0), default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    tiny = args.size == "tiny"  # the offline demo: small enough to learn on 2 CPU cores in minutes
    args.tiny_bases = None if not tiny or args.tiny_bases == "random" else checkpoint.stored_path(args.tiny_bases)
    # tiny: 200 joint steps on the shipped base models (or 700 base steps first from random ones); else Sec. 4.1.2
    defaults = dict(fps=4 if args.data in ("landscape", "vggsound") else 8, batch_size=8 if tiny else 16,
                    lr=1e-3 if tiny else 1e-5, lr_schedule="cosine" if tiny else "constant",
                    base_steps=700 if tiny and not args.tiny_bases else 0, max_steps=200 if tiny else None,
                    num_workers=0 if tiny else 4, precision="bf16" if args.device.startswith("cuda") else "fp32",
                    out=f"runs/{args.data}-{args.size}-{args.conditioner}")
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if tiny and args.ema_decay == 0.9999:
        args.ema_decay = 0.995  # a few hundred steps only: the EMA must be able to move
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        cli.fail(f"--device {args.device}: no CUDA device here (use --device cpu)")
    if args.cache:
        cli.existing(os.path.join(args.cache, "index.json"), "--cache (a folder written by python -m support.cache)")
    elif args.data != "synthetic":
        cli.existing(args.root, "--root (a folder of clips, see data.py prepare)", "dir")
    for path, what in ((args.flist, "--flist"), (checkpoint.resolve_stored(args.tiny_bases), "--tiny-bases")):
        if path:
            cli.existing(path, what)
    if args.max_steps == 0 and args.base_steps == 0:
        cli.fail("--max-steps 0 and --base-steps 0: nothing to train")
    if args.size == "pretrained":
        cli.check_weights(args.video_base, args.motion_adapter, args.audio_base)
    return args


def drop_text(captions, p, gens):
    """Classifier-free guidance: each caption independently becomes "" with probability p (fires at batch 1 too)."""
    return ["" if torch.rand((), generator=g).item() < p else c for c, g in zip(captions, gens)]


def joint_loss(model, bases, batch, args, step, offset=0, joint=True):
    """Eq. (9)-(10) for one batch; returns (loss, per-sample losses and timesteps for the Fig. 2 log).
    joint=False: the two base U-Nets alone (Eq. (7) each; the identity added modules are skipped, same result).

    Every random draw of sample j comes from its own generator seeded by (seed, step, offset + j), so a run is
    reproducible from its step alone (exact resume) and does not depend on how a global batch is split over GPUs
    or micro-batches (offset = the batch's position in the step's global batch)."""
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
    rows, k = xt_a.shape[2], getattr(model, "module", model).audio_rows_multiple
    xt_a = F.pad(xt_a, (0, 0, 0, -rows % k))  # time_align "index": zero rows to a multiple of 8, as released
    tv, ta = (t_v - 1).to(dev), (t_a - 1).to(dev)  # paper timestep -> diffusers index (timesteps.py)
    x0_v = x0_a = None
    coin = torch.Generator().manual_seed((args.seed << 40) + (step << 16) + 65535)  # one draw per step, on all GPUs
    if joint and torch.rand((), generator=coin).item() < args.p_self_cond:  # self-conditioning (Chen et al., 2022)
        with torch.no_grad(), autocast(args):
            e_v, e_a = model(xt_v, xt_a, tv, ta, text_v, text_a)
        x0_v = predict_x0(xt_v, to_eps(e_v.float(), xt_v, ab_v, P["v"]), ab_v)  # Eq. (6)
        x0_a = predict_x0(xt_a, to_eps(e_a.float(), xt_a, ab_a, P["a"]), ab_a)  # Eq. (6)
    with autocast(args):
        pred_v, pred_a = model(xt_v, xt_a, tv, ta, text_v, text_a, x0_v, x0_a, joint=joint)
    pred_a = pred_a[:, :, :rows]  # the loss sees the clip's rows only
    # Eq. (10), per sample; the target is eps for the real base models (the paper), v for the tiny ones (README)
    l_v = F.mse_loss(pred_v.float(), target(x_v, eps_v, ab_v, P["v"]), reduction="none").flatten(1).mean(1)
    l_a = F.mse_loss(pred_a.float(), target(x_a, eps_a, ab_a, P["a"]), reduction="none").flatten(1).mean(1)
    loss = l_v.mean() + l_a.mean()  # Eq. (9)
    return loss, dict(t_v=t_v.tolist(), t_a=t_a.tolist(), loss_v=l_v.tolist(), loss_a=l_a.tolist())


def autocast(args):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    return torch.autocast(args.device.split(":")[0], dtype=dtype, enabled=dtype is not None)


def train_stage(stage, model, bases, dataset, steps, args):
    """One loop for both stages: Adam on the stage's parameters, EMA, AMP, DDP, gradient accumulation and
    clipping, kill-safe checkpoints, exact resume."""
    params, rank, world, out = model.stage_parameters(stage), args.rank, args.world_size, args.out
    model.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    opt_cls = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
    opt = opt_cls(params.values(), lr=args.lr, **({"weight_decay": 0.01} if args.optimizer == "adamw" else {}))
    scaler = torch.amp.GradScaler(args.device.split(":")[0], enabled=args.precision == "fp16")
    ema, step = {n: p.detach().float().clone() for n, p in params.items()}, 0
    folder, found = checkpoint.latest(out, stage)
    if found is not None:  # main() made sure that this is a --resume with the same trajectory
        state = torch.load(f"{folder}/state.pt", weights_only=True)  # tensors and numbers only
        checkpoint.load_weights(model, folder, params, ema=False)
        ema = checkpoint.load_file(f"{folder}/ema.safetensors", device=args.device)
        opt.load_state_dict(state["opt"]), scaler.load_state_dict(state["scaler"])
        step = state["step"]
        print(f"[{stage}] resumed from {folder} at step {step}")
    if step >= steps:
        return
    save = lambda: checkpoint.save(out, stage, params, ema, dict(opt=opt.state_dict(), scaler=scaler.state_dict(),
                                   step=step), dict(vars(args), step=step))
    net = model if world == 1 else torch.nn.parallel.DistributedDataParallel(model)  # grads averaged over GPUs
    b, N, G = args.batch_size, args.grad_accum, args.batch_size * world * args.grad_accum  # micro, accum, global
    per_epoch = len(dataset) // G  # >= 1: checked in main()
    log = checkpoint.StepLog(os.path.join(out, f"log_{stage}.jsonl"), step) if rank == 0 else None
    bar = tqdm(total=steps, initial=step, desc=f"{stage} (global batch {G})", dynamic_ncols=True, disable=rank > 0)
    model.train()
    try:
        while step < steps:
            epoch, k = divmod(step, per_epoch)  # data order is a function of (seed, epoch): resumable exactly
            order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed * 100003 + epoch))
            pos = [(a * world + rank) * b for a in range(N)]  # this GPU's micro-batches within a global batch
            mine = [order[s * G + o + j].item() for s in range(k, per_epoch) for o in pos for j in range(b)]
            batches = iter(torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, mine), b,
                                                       num_workers=args.num_workers))
            for _ in range(k, min(per_epoch, k + steps - step)):
                t0 = time.time()
                cosine = 0.5 + 0.5 * math.cos(math.pi * step / steps) if args.lr_schedule == "cosine" else 1.0
                for g in opt.param_groups:  # a function of the step alone: resume stays exact
                    g["lr"] = args.lr * cosine
                opt.zero_grad(set_to_none=True)
                info = {}
                for a, o in enumerate(pos):
                    with net.no_sync() if world > 1 and a < N - 1 else contextlib.nullcontext():
                        loss, part = joint_loss(net, bases, next(batches), args, step, o, joint=stage == "joint")
                        scaler.scale(loss / N).backward()  # the mean over the global batch, as one big batch
                    info = {key: info.get(key, []) + v for key, v in part.items()}
                if args.max_grad_norm > 0:  # official code: clip at 1.0
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(params.values(), args.max_grad_norm)
                scaler.step(opt), scaler.update()
                step += 1
                decay = min(args.ema_decay, (1 + step) / (10 + step))  # diffusers EMAModel warm-up
                with torch.no_grad():
                    for n, p in params.items():
                        ema[n].lerp_(p.detach().float(), 1 - decay)
                if rank == 0:
                    mean = lambda xs: sum(xs) / len(xs)
                    log.write(dict(step=step, epoch=epoch, loss=mean(info["loss_v"]) + mean(info["loss_a"]),
                                   global_batch=G, **info))
                    bar.set_postfix(loss_v=f"{mean(info['loss_v']):.4f}", loss_a=f"{mean(info['loss_a']):.4f}",
                                    clips_s=f"{G / (time.time() - t0):.1f}")
                    bar.update(1)
                    if step % args.ckpt_every == 0 or step == steps:
                        log.flush(), save()
    except checkpoint.Interrupted as e:  # Ctrl-C or SIGTERM (what cluster schedulers send)
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)  # the save must finish now
        if rank == 0:
            log.flush(), save()
        print(f"\ninterrupted ({signal.Signals(e.args[0]).name}): checkpoint saved to {out}/{stage} at step {step}; "
              f"continue with --resume", file=sys.stderr)
        sys.exit(128 + e.args[0])
    finally:
        bar.close()
        if log:
            log.close()


def main(argv=None):
    args = parse_args(argv)
    args.rank, args.world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    held = None  # rank 0 holds the run's lock while it trains
    if args.rank == 0:
        cli.writable_dir(args.out, "--out")
        try:
            held = checkpoint.open_run(args.out, vars(args), args.resume, args.allow_changed_args)
        except checkpoint.CheckpointError as e:
            cli.fail(str(e))
    handlers = {s: signal.signal(s, checkpoint.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        run(args)
    finally:  # a library caller gets its signal handlers and the folder back
        for s, h in handlers.items():
            signal.signal(s, h)
        if held:
            held.close()


def run(args):
    try:  # the data before the weights: a bad --root fails in seconds, not after minutes of loading
        dataset = CachedClips(args.cache, args.size, args.fps) if args.cache else build_dataset(
            args.data, "train", root=args.root, flist=args.flist, fps=args.fps, size=64 if args.size == "tiny" else 256,
            num_clips=args.num_clips)
    except ValueError as e:
        cli.fail(str(e))
    G = args.batch_size * args.world_size * args.grad_accum
    if len(dataset) < G:
        cli.fail(f"{len(dataset)} training clips, fewer than one global batch of {G}")
    if args.world_size > 1:  # launched by torchrun: NCCL on GPUs, gloo on CPUs
        torch.distributed.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
        if args.device.startswith("cuda"):
            args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(args.device)
    if args.rank == 0:
        print(json.dumps(vars(args), indent=1))
    torch.manual_seed(args.seed)
    try:
        kw = {k: getattr(args, k) for k in ("time_align", "video_base", "motion_adapter", "audio_base")}
        model, bases = build_model(args.size, args.conditioner, device=args.device, fps=args.fps,
                                   tiny_bases=checkpoint.resolve_stored(args.tiny_bases), **kw)
    except RuntimeError as e:  # e.g. weights not available offline: one line, no traceback
        cli.fail(str(e))
    if args.grad_checkpointing:
        model.enable_gradient_checkpointing()
    if args.precision == "bf16" and args.device.startswith("cuda") and args.size != "tiny":  # tiny trains its U-Nets
        print(f"frozen weights stored in bf16: {cast_frozen(model, bases) / 2 ** 30:.2f} GiB saved")
    joint = args.max_steps if args.max_steps is not None else args.epochs * (len(dataset) // G)
    stages = [(s, n) for s, n in (("base", args.base_steps), ("joint", joint)) if n > 0]  # base: tiny only, Eq. (7)
    for stage, steps in stages:
        train_stage(stage, model, bases, dataset, steps, args)
        if args.world_size > 1:
            torch.distributed.barrier()  # rank 0 has written the checkpoint
        if stage == "base":  # freeze the EMA base models
            checkpoint.load_weights(model, checkpoint.latest(args.out, "base")[0], model.stage_parameters("base"))
    if args.rank == 0:
        print(f"done: {' + '.join(s for s, _ in stages)} in {args.out} (sample with: python sample.py --ckpt "
              f"{args.out} --prompt ...)")
    if args.world_size > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
