"""Training of the joint model: the loss of Eq. (9)-(10), Sec. 3.4, with the setup of Sec. 4.1.2 and App. A.2.

Per step: draw t_v and t_a INDEPENDENTLY and uniformly from {1..T_v} and {1..T_a} (Eq. (7) per modality, Sec. 3.4;
`--shared-t`: one t for both, as the official code), noise both latents with Eq. (2), run the joint model with
self-conditioning (Chen et al., 2022, as the official code: with p = 0.5 a first no-grad pass gives x0_hat of Eq. (6)
to the connectors, else zeros) and sum the two noise-prediction errors. Captions become "" with p = 0.1 (official
code) for classifier-free guidance. Only the added modules and AnimateDiff's motion modules train (App. A.2). The loop
reads batch -> loss -> backward -> clip -> step -> EMA -> log -> checkpoint; support/training.py holds its helpers.
The default demo, `python train.py --data synthetic --size tiny`, trains the joint stage only (200 steps) on the
shipped tiny base models weights/tiny_bases.safetensors; the tiny U-Nets predict v (timesteps.target; why:
base_models.py) and the lr decays by a cosine. Only with `--tiny-bases random` does a stage "base" first train the
random tiny U-Nets alone (Eq. (7) each, 700 steps) and then freeze them, as the paper starts from pretrained bases.
Multi-GPU: `torchrun --nproc_per_node N train.py ...` (DDP); --batch-size is the global batch for any N. Runs survive
kills and resume exactly (support/checkpoint.py). Exit codes: 2 bad input, 3 divergence (a non-finite loss or
weights; the last good checkpoint stays), 128 + signal for SIGINT / SIGTERM. Left out: lr warm-up, DeepSpeed.
"""
import functools
import json
import os
import re
import sys
import time

import torch
from torch.nn.functional import mse_loss
from tqdm import tqdm

from data import build_dataset
from model import build_model, cast_frozen
from support import checkpoint, cli, seeds, training
from support.cache import CachedClips
from timesteps import add_noise, alpha_bar_table, predict_x0, target, to_eps


def parse_args(argv=None):
    p = cli.Parser(description=__doc__.split("\n")[0])
    pos = cli.number(int, 1)
    p.add_argument("--data", default="greatesthits", choices=["greatesthits", "landscape", "vggsound", "synthetic"],
                   help="training clips (Sec. 4.1.1, 4.2.1); synthetic: the offline stand-in of GreatestHits")
    p.add_argument("--root", default=None, help="folder of prepared clips (see data.py prepare)")
    p.add_argument("--flist", default=None, help="official file list <clip>,\"<caption>\" (GreatestHits)")
    p.add_argument("--cache", default=None, help="folder by python -m support.cache: stored latents + text embeddings")
    p.add_argument("--size", default="pretrained", choices=["tiny", "full", "pretrained"],
                   help="pretrained: the paper's base models (App. A.2); tiny: the offline CPU demo")
    p.add_argument("--conditioner", default="cmcpe", choices=["cmcpe", "crossattn"], help="Table 1 rows")
    p.add_argument("--time-align", default="seconds", choices=["seconds", "index"],
                   help="CMC-PE context onto feature time: by seconds (ours) or by index (the released model)")
    cli.add_base_args(p)  # --video-base, --motion-adapter, --audio-base (cli.BASES)
    p.add_argument("--tiny-bases", default=cli.TINY_BASES, help="tiny: trained base U-Nets, or 'random' (stage base)")
    p.add_argument("--fps", type=cli.number(int, 2, 8), default=None, help="default 8 for GreatestHits (Sec. 4.1.2), "
                   "4 for Landscape/VGGSound (4.2.1); 4-s clips: AnimateDiff's motion modules take at most 32 frames")
    p.add_argument("--batch-size", type=pos, default=None,
                   help="the GLOBAL batch over all GPUs and accumulation; default 16 (Sec. 4.1.2), tiny 8")
    p.add_argument("--micro-batch", type=pos, default=None, help="clips per GPU per pass (accumulation = batch-size "
                   "/ (GPUs x micro-batch)); default batch-size / GPUs (official launch: 8 GPUs x 1, accumulation 2)")
    p.add_argument("--epochs", type=pos, default=1000, help="Sec. 4.1.2 (4.2.1: 100 Landscape, 30 VGGSound)")
    p.add_argument("--max-steps", type=cli.number(int, 0), default=None, help="joint steps; default --epochs, tiny 200")
    p.add_argument("--base-steps", type=cli.number(int, 0), default=None,
                   help="tiny: steps of stage base; default 700 with --tiny-bases random, else 0")
    p.add_argument("--lr", type=cli.number(float, 0, lo_open=True), default=None,
                   help="default 1e-5 (Sec. 4.1.2), tiny 1e-3")
    p.add_argument("--lr-schedule", default=None, choices=["constant", "cosine"],
                   help="default constant (Sec. 4.1.2); tiny cosine: a few hundred steps must settle")
    p.add_argument("--optimizer", default="adam", choices=["adam", "adamw"],
                   help="Adam (Sec. 4.1.2); the official code: AdamW, weight decay 0.01")
    p.add_argument("--max-grad-norm", type=cli.number(float, 0), default=1.0, help="official code: 1.0; 0: off")
    p.add_argument("--p-self-cond", type=cli.number(float, 0, 1), default=0.5,
                   help="self-conditioning probability (Chen et al., 2022; official code)")
    p.add_argument("--p-uncond", type=cli.number(float, 0, 1), default=0.1,
                   help="caption dropout for classifier-free guidance (official --drop_rate_cfg)")
    p.add_argument("--shared-t", action="store_true", help="one t for both U-Nets (official code), not Sec. 3.4's two")
    p.add_argument("--ema-decay", type=cli.number(float, 0, 1, hi_open=True), default=None,
                   help="default 0.9999 (official --use_ema: diffusers' EMAModel), tiny 0.995 (a few hundred steps)")
    p.add_argument("--precision", default=None, choices=["bf16", "fp16", "fp32"], help="default: bf16 on CUDA, fp32")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations: less memory")
    p.add_argument("--out", default=None, help="run folder; default runs/<data>-<size>-<conditioner>")
    p.add_argument("--ckpt-every", type=pos, default=1000, help="steps between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    p.add_argument("--allow-changed-args", action="store_true", help="let --resume change trajectory arguments")
    p.add_argument("--num-clips", type=pos, default=None, help="synthetic: training clips (default 2048)")
    p.add_argument("--num-workers", type=cli.number(int, 0, 64), default=None, help="data loaders; default 4, tiny 0")
    p.add_argument("--seed", type=cli.number(int, 0, seeds.MAX_SEED), default=0, help="weights, data order and noise")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:<n>")
    args = p.parse_args(argv)
    tiny = args.size == "tiny"  # the offline demo: small enough to learn on 2 CPU cores in minutes
    args.tiny_bases = None if not tiny or args.tiny_bases == "random" else checkpoint.stored_path(args.tiny_bases)
    # tiny: 200 joint steps on the shipped base models (or 700 base steps first from random ones); else Sec. 4.1.2
    defaults = dict(fps=4 if args.data in ("landscape", "vggsound") else 8, batch_size=8 if tiny else 16,
                    lr=1e-3 if tiny else 1e-5, lr_schedule="cosine" if tiny else "constant",
                    ema_decay=0.995 if tiny else 0.9999, base_steps=700 if tiny and not args.tiny_bases else 0,
                    max_steps=200 if tiny else None, num_workers=0 if tiny else 4,
                    precision="bf16" if args.device.startswith("cuda") else "fp32",
                    out=f"runs/{args.data}-{args.size}-{args.conditioner}")
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    check_args(args)
    return args


def check_args(args):
    """What argparse's types cannot see; one line and exit 2 before any model."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        cli.fail(f"--device {args.device}: use cpu, cuda or cuda:<index>")
    if args.device.startswith("cuda") and int(args.device[5:] or 0) >= torch.cuda.device_count():
        cli.fail(f"--device {args.device}: {torch.cuda.device_count()} CUDA devices here (use --device cpu)")
    args.rank, args.world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # torchrun
    try:
        args.micro_batch, args.accumulation = training.split_batch(args.batch_size, args.world_size, args.micro_batch)
    except ValueError as e:
        cli.fail(str(e))
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
        cli.check_weights(args.video_base, args.motion_adapter, args.audio_base,
                          hint="; or add --size tiny for the offline demo")


def loss_settings(args):
    """joint_loss's hyperparameters from the command line."""
    return dict(seed=args.seed, p_uncond=args.p_uncond, p_self_cond=args.p_self_cond, shared_t=args.shared_t,
                precision=args.precision)


def joint_loss(model, bases, batch, *, seed, step, offset=0, p_uncond, p_self_cond, shared_t, precision, joint=True):
    """Eq. (9)-(10) on one batch -> (loss, per-sample losses and timesteps for the Fig. 2 log). joint=False: the base
    U-Nets alone (Eq. (7) each; stage "base"). Sample j draws from stream (seed, step, offset + j) (training.py)."""
    rng = training.SampleStreams(seed, step, offset, len(batch["caption"]), bases.device)
    captions = training.drop_captions(batch["caption"], p_uncond, rng)  # for classifier-free guidance
    text_v, text_a, x_v, x_a = training.encode(bases, batch, captions, rng)  # x ~ the VAE latent distribution
    T_v, T_a, kind = len(bases.alphas_cumprod_v), len(bases.alphas_cumprod_a), bases.prediction_type  # 1000, 1000
    t_v = rng.randint(1, T_v)  # Eq. (7): t_v ~ U(1, T_v)
    t_a = t_v.clone() if shared_t else rng.randint(1, T_a)  # Eq. (7), independent of t_v (Sec. 3.4)
    eps_v, eps_a = rng.randn(x_v.shape), rng.randn(x_a.shape)
    ab_v, ab_a = alpha_bar_table(bases.alphas_cumprod_v)[t_v], alpha_bar_table(bases.alphas_cumprod_a)[t_a]
    xt_v = add_noise(x_v, eps_v, ab_v)  # Eq. (2)
    xt_a = training.pad_rows(add_noise(x_a, eps_a, ab_a), model)  # Eq. (2)
    i_v, i_a = (t_v - 1).to(bases.device), (t_a - 1).to(bases.device)  # paper t -> diffusers index (timesteps.py)
    x0_v = x0_a = None
    if joint and rng.coin() < p_self_cond:  # self-conditioning (Chen et al., 2022): one coin per step
        with torch.no_grad(), training.autocast(bases.device, precision):
            out_v, out_a = model(xt_v, xt_a, i_v, i_a, text_v, text_a)
        x0_v = predict_x0(xt_v, to_eps(out_v.float(), xt_v, ab_v, kind["v"]), ab_v)  # Eq. (6)
        x0_a = predict_x0(xt_a, to_eps(out_a.float(), xt_a, ab_a, kind["a"]), ab_a)  # Eq. (6)
    with training.autocast(bases.device, precision):
        out_v, out_a = model(xt_v, xt_a, i_v, i_a, text_v, text_a, x0_v, x0_a, joint=joint)
    y_v, y_a = target(x_v, eps_v, ab_v, kind["v"]), target(x_a, eps_a, ab_a, kind["a"])  # eps (paper) or v (tiny)
    loss_v = mse_loss(out_v.float(), y_v, reduction="none").flatten(1).mean(1)  # Eq. (10), per sample
    loss_a = mse_loss(out_a[:, :, :x_a.shape[2]].float(), y_a, reduction="none").flatten(1).mean(1)  # Eq. (10)
    loss = loss_v.mean() + loss_a.mean()  # Eq. (9)
    return loss, dict(t_v=t_v.tolist(), t_a=t_a.tolist(), loss_v=loss_v.tolist(), loss_a=loss_a.tolist())


def train_stage(stage, model, bases, dataset, steps, args, signals):
    """One loop for both stages: Adam on the stage's parameters, AMP, DDP, gradient accumulation and clipping, EMA,
    kill-safe checkpoints, exact resume (the helpers: support/training.py)."""
    params = model.stage_parameters(stage)
    model.requires_grad_(False)
    for param in params.values():
        param.requires_grad_(True)
    adamw = args.optimizer == "adamw"  # the official code: AdamW, weight decay 0.01
    opt = torch.optim.AdamW(params.values(), lr=args.lr, weight_decay=0.01) if adamw else torch.optim.Adam(
        params.values(), lr=args.lr)
    scaler = torch.amp.GradScaler(torch.device(args.device).type, enabled=args.precision == "fp16")
    ema = training.EMA(params, args.ema_decay)
    folder, step = checkpoint.latest(args.out, stage)
    if folder is None:
        step = 0
    else:  # main() made sure that this is a --resume with the same trajectory
        step = training.resume(folder, model, params, ema, opt, scaler)
        print(f"[{stage}] resumed from {folder} at step {step}")
    if step >= steps:
        return
    net = model if args.world_size == 1 else torch.nn.parallel.DistributedDataParallel(model)  # grads: GPUs' mean
    data = training.GlobalBatches(dataset, args.seed, args.world_size, args.rank, args.micro_batch, args.accumulation,
                                  args.num_workers)
    loss_of = functools.partial(joint_loss, net, bases, joint=stage == "joint", **loss_settings(args))
    log = checkpoint.StepLog(os.path.join(args.out, f"log_{stage}.jsonl"), step) if args.rank == 0 else None
    bar = tqdm(total=steps, initial=step, desc=f"{stage} (global batch {args.batch_size})", dynamic_ncols=True,
               disable=args.rank > 0)

    def save():  # rank 0 writes: DDP keeps the weights the same on every process
        if args.rank == 0:
            log.flush()
            checkpoint.save(args.out, stage, params, ema.shadow, dict(opt=opt.state_dict(),
                            scaler=scaler.state_dict(), step=step), dict(vars(args), step=step))
    model.train()
    try:
        with signals.loop(save, lambda: f"{args.out}/{stage} at step {step}"):
            for epoch, micro_batches in data.steps(step, steps):
                t0 = time.time()
                for group in opt.param_groups:
                    group["lr"] = training.cosine_lr(args.lr, step, steps, args.lr_schedule)
                opt.zero_grad(set_to_none=True)
                info = {}
                for a, (offset, batch) in enumerate(micro_batches):
                    with training.no_sync_unless_last(net, a, args.accumulation):
                        loss, part = loss_of(batch, step=step, offset=offset)
                        scaler.scale(loss / args.accumulation).backward()  # the global batch's mean gradient
                    info = {key: info.get(key, []) + v for key, v in part.items()}
                if args.max_grad_norm > 0:  # official code: clip at 1.0
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(params.values(), args.max_grad_norm)
                with signals.atomic():  # a signal waits for the block's end: a step is saved whole or not at all
                    scaler.step(opt)
                    scaler.update()
                    loss_sum = sum(info["loss_v"]) + sum(info["loss_a"])
                    training.check_finite(step + 1, loss_sum, params, args.world_size)  # else: no EMA, no save
                    step += 1
                    ema.update(params, step)
                    if log:
                        log_step(log, bar, dict(step=step, epoch=epoch, global_batch=args.batch_size, **info), t0)
                    if step % args.ckpt_every == 0 or step == steps:
                        save()
    finally:
        bar.close()
        if log:
            log.close()


def log_step(log, bar, record, t0):
    mean_v, mean_a = (sum(record[key]) / len(record[key]) for key in ("loss_v", "loss_a"))
    log.write(dict(record, loss=mean_v + mean_a))
    bar.set_postfix(loss_v=f"{mean_v:.4f}", loss_a=f"{mean_a:.4f}",
                    clips_s=f"{record['global_batch'] / (time.time() - t0):.1f}")
    bar.update(1)


def main(argv=None):
    with training.Signals() as signals:  # SIGINT / SIGTERM: exit 130 / 143; in the loop after a checkpoint
        args = parse_args(argv)
        held = None  # rank 0 holds the run's lock while it trains
        try:
            if args.rank == 0:
                cli.writable_dir(args.out, "--out")
                if args.resume:  # a foreign config is named before open_run compares it with these arguments
                    training.check_stored_configs(args.out, vars(args))
                held = checkpoint.open_run(args.out, vars(args), args.resume, args.allow_changed_args)
            run(args, signals)
        except checkpoint.CheckpointError as e:
            cli.fail(str(e))
        except training.Diverged as e:
            print(f"error: {e}; the last complete checkpoint in {args.out} is kept", file=sys.stderr)
            sys.exit(training.EXIT_DIVERGED)
        finally:
            if held:
                held.close()


def run(args, signals):
    try:  # the data before the weights: a bad --root fails in seconds, not after minutes of loading
        dataset = CachedClips(args.cache, args.size, args.fps) if args.cache else build_dataset(
            args.data, "train", root=args.root, flist=args.flist, fps=args.fps, size=64 if args.size == "tiny" else 256,
            num_clips=args.num_clips)
    except ValueError as e:
        cli.fail(str(e))
    if len(dataset) < args.batch_size:
        cli.fail(f"{len(dataset)} training clips, fewer than one global batch of {args.batch_size}")
    if args.world_size > 1:  # launched by torchrun: NCCL on GPUs, gloo on CPUs
        torch.distributed.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
        if args.device.startswith("cuda"):
            args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(args.device)
    if args.rank == 0:
        print(json.dumps(vars(args), indent=1) + "\nbuilding the model", flush=True)
    torch.manual_seed(args.seed)
    try:
        kw = {name: getattr(args, name) for name in cli.BUILD_ARGS}
        model, bases = build_model(args.size, args.conditioner, device=args.device, fps=args.fps,
                                   tiny_bases=checkpoint.resolve_stored(args.tiny_bases), **kw)
    except RuntimeError as e:  # e.g. weights not available offline: one line, no traceback
        cli.fail(str(e))
    if args.grad_checkpointing:
        model.enable_gradient_checkpointing()
    if args.precision == "bf16" and args.device.startswith("cuda") and args.size != "tiny":  # tiny trains its U-Nets
        print(f"frozen weights stored in bf16: {cast_frozen(model, bases) / 2 ** 30:.2f} GiB saved")
    joint = args.max_steps if args.max_steps is not None else args.epochs * (len(dataset) // args.batch_size)
    stages = [(s, steps) for s, steps in (("base", args.base_steps), ("joint", joint)) if steps > 0]  # base: tiny only
    for stage, steps in stages:
        train_stage(stage, model, bases, dataset, steps, args, signals)
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
