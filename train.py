"""Training of the joint model: the loss of Eq. (9)-(10), Sec. 3.4, with the setup of Sec. 4.1.2 and App. A.2.

Per step: draw t_v and t_a INDEPENDENTLY from {1..T_v} and {1..T_a} (Eq. (7) per modality, Sec. 3.4; `--shared-t`:
one t, as the official code), noise both latents by Eq. (2), run the joint model with self-conditioning (Chen et al.,
2022, as the official code: with p = 0.5 a first no-grad pass gives x0_hat of Eq. (6) to the connectors, else zeros)
and sum the two noise-prediction errors. Captions become "" with p = 0.1 (official code) for classifier-free guidance.
Only the added modules and AnimateDiff's motion modules train (App. A.2). `--data synthetic --size tiny`: the offline
demo, 200 steps on the shipped tiny base models (they predict v: timesteps.target), which `--stage base` trained
from random (Eq. (7) each). Multi-GPU: `torchrun --nproc_per_node N train.py ...`; --batch-size is the global batch.
A run killed at any instant resumes exactly with --resume (support/checkpoint.py); SIGTERM / Ctrl-C save first and
exit 143 / 130; a non-finite loss exits 3, bad input 2. Left out: lr warm-up, DeepSpeed.
"""
import contextlib
import json
import math
import os
import signal
import sys

import torch
from diffusers.training_utils import EMAModel
from torch.nn.functional import mse_loss
from tqdm import tqdm

from data import build_dataset
from model import build_model, cast_frozen
from support import checkpoint, cli, training
from timesteps import add_noise, alpha_bar_table, predict_x0, target, to_eps

# per dataset: Sec. 4.1.2 (GreatestHits) and 4.2.1-4.2.2 (Landscape, VGGSound); synthetic: the GreatestHits stand-in
PAPER = dict(greatesthits=dict(fps=8, batch_size=16, epochs=1000),
             landscape=dict(fps=4, batch_size=16, epochs=100),
             vggsound=dict(fps=4, batch_size=128, epochs=30,  # and the 60K-clip filter "as done in TempoToken"
                           vggsound_filter=os.path.join(cli.REPO, "datasets", "tempotokens", "unmatch_videos.txt")),
             synthetic=dict(fps=8, batch_size=16, epochs=1000))
# the offline demo: small enough to learn on 2 CPU cores in minutes (a few hundred steps must settle: lr, cosine, EMA)
TINY = dict(batch_size=8, lr=1e-3, lr_schedule="cosine", ema_decay=0.995, num_workers=0, max_steps=200,
            tiny_bases=cli.TINY_BASES)


def parse_args(argv=None):
    first = cli.Parser(add_help=False)
    first.add_argument("--data", default="greatesthits", choices=list(PAPER), help="sets the paper's defaults below")
    first.add_argument("--size", default="pretrained", choices=["tiny", "full", "pretrained"], help="tiny: the demo")
    known, _ = first.parse_known_args(argv)
    p = cli.Parser(description=__doc__.split("\n")[0], parents=[first])
    p.add_argument("--root", help="folder of prepared clips (data.py prepare)")
    p.add_argument("--flist", help="the official list <clip>,\"<caption>\" (GreatestHits), or the CSV")
    p.add_argument("--vggsound-filter", help="VGGSound: YouTube ids to drop (Sec. 4.2.1: TempoTokens' 60K-clip filter)")
    p.add_argument("--mel", default="audioldm", choices=["audioldm", "official"], help="log-mel recipe (data.log_mel)")
    p.add_argument("--stage", default="joint", choices=["joint", "base"], help="base: tiny base U-Nets alone (Eq. 7)")
    p.add_argument("--conditioner", default="cmcpe", choices=["cmcpe", "crossattn"], help="Table 1 rows")
    p.add_argument("--center-context", action="store_true", help="not released: docs/results.md sec. 8")
    p.add_argument("--time-align", default="seconds", choices=["seconds", "index"],
                   help="CMC-PE context onto feature time: by seconds (ours) or by index (the released model)")
    cli.add_base_args(p)
    p.add_argument("--tiny-bases", help="tiny base U-Nets: a weights file, or 'random'")
    p.add_argument("--fps", type=cli.number(int, 2, 8), help="4-s clips, and AnimateDiff takes at most 32 frames")
    p.add_argument("--batch-size", type=cli.number(int, 1), help="the GLOBAL batch over GPUs and accumulation")
    p.add_argument("--micro-batch", type=cli.number(int, 1), help="clips per GPU per pass (official: 8 GPUs x 1)")
    p.add_argument("--epochs", type=cli.number(int, 1), help="Sec. 4.1.2, 4.2.2")
    p.add_argument("--max-steps", type=cli.number(int, 1), help="default: --epochs over the data")
    p.add_argument("--lr", type=cli.number(float, 0, open_lo=True), default=1e-5, help="Sec. 4.1.2")
    p.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"], help="Sec. 4.1.2: constant")
    p.add_argument("--weight-decay", type=cli.number(float, 0), default=0.0, help="0: Adam (Sec. 4.1.2); > 0: AdamW "
                   "with this decoupled decay (official code: 0.01)")
    p.add_argument("--max-grad-norm", type=cli.number(float, 0), default=1.0, help="official code; 0: off")
    p.add_argument("--p-self-cond", type=cli.number(float, 0, 1), default=0.5, help="Chen et al. 2022; official")
    p.add_argument("--p-uncond", type=cli.number(float, 0, 1), default=0.1, help="caption dropout (official code)")
    p.add_argument("--shared-t", action="store_true", help="one t for both U-Nets (official code), not Sec. 3.4's two")
    p.add_argument("--ema-decay", type=cli.number(float, 0, 1, open_hi=True), default=0.9999, help="official code")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], help="default: bf16 on CUDA, else fp32")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations: less memory")
    p.add_argument("--out", help="run folder; default runs/<data>-<size>-<conditioner>")
    p.add_argument("--ckpt-every", type=cli.number(int, 1), default=1000, help="steps between checkpoints")
    p.add_argument("--keep", type=cli.number(int, 1), default=2, help="checkpoints kept, the newest")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    p.add_argument("--allow-changed-args", action="store_true", help="let --resume change the run's arguments")
    p.add_argument("--num-clips", type=cli.number(int, 1, 10 ** 6), help="use the first N training clips")
    p.add_argument("--num-workers", type=cli.number(int, 0, 64), default=4, help="data loader processes")
    p.add_argument("--seed", type=cli.number(int, 0, 2 ** 63 - 1), default=0, help="data order, noise, timesteps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   choices=["cpu", "cuda"][:1 + torch.cuda.is_available()], help="one GPU per process (torchrun)")
    p.set_defaults(**{**PAPER[known.data], **(TINY if known.size == "tiny" else {})})
    args = p.parse_args(argv)
    args.precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")
    args.out = args.out or f"runs/{args.data}-{args.size}-{args.conditioner if args.stage == 'joint' else 'base'}"
    args.rank, args.world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # torchrun
    try:
        args.micro_batch, args.accumulation = training.split_batch(args.batch_size, args.world_size, args.micro_batch)
    except ValueError as e:
        cli.fail(str(e))
    for path, what in ((args.flist, "--flist"), (args.vggsound_filter, "--vggsound-filter")):
        if path:
            cli.existing(path, what)
    if args.tiny_bases not in (None, "random"):
        cli.existing(args.tiny_bases, "--tiny-bases")
    if args.size == "pretrained":
        cli.check_weights(args.video_base, args.motion_adapter, args.audio_base, "; or add --size tiny for the demo")
    return args


def joint_loss(model, bases, batch, *, seed, step, offset=0, p_uncond, p_self_cond, shared_t, precision, joint=True):
    """Eq. (9)-(10) on one batch -> (loss, per-sample losses and timesteps for the log). joint=False: the base U-Nets
    alone (Eq. (7) each; --stage base). Sample j draws from stream (seed, step, offset + j) (support/training.py)."""
    rng = training.SampleStreams(seed, step, offset, len(batch["caption"]), bases.device)
    captions = [c if u >= p_uncond else "" for c, u in zip(batch["caption"], rng.uniform())]  # for CFG
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


def main(argv=None):
    args = parse_args(argv)
    stop = []  # SIGINT / SIGTERM: the loop finishes its step, saves it and exits 128 + signal
    handlers = {s: signal.signal(s, lambda signum, frame: stop.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:  # rank 0 holds the run folder's lock while it trains
        with checkpoint.open_run(args.out, vars(args), args.resume, args.allow_changed_args) if args.rank == 0 else \
                contextlib.nullcontext():
            train(args, stop)
    except checkpoint.CheckpointError as e:
        cli.fail(str(e))
    finally:
        for s, h in handlers.items():  # a library caller gets its handlers back
            signal.signal(s, h)


def train(args, stop):
    try:  # the data before the weights: a bad --root fails in seconds, not after minutes of loading
        dataset = build_dataset(args.data, "train", root=args.root, flist=args.flist, fps=args.fps,
                                size=64 if args.size == "tiny" else 256, num_clips=args.num_clips,
                                id_filter=args.vggsound_filter, mel=args.mel)
    except ValueError as e:
        cli.fail(str(e))
    if len(dataset) < args.batch_size:
        cli.fail(f"{len(dataset)} training clips, fewer than one global batch of {args.batch_size}")
    if args.world_size > 1:  # launched by torchrun: NCCL on GPUs, gloo on CPUs
        torch.distributed.init_process_group("nccl" if args.device == "cuda" else "gloo")
        if args.device == "cuda":
            args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(args.device)
    if args.rank == 0:
        print(json.dumps(vars(args), indent=1) + "\nbuilding the model", flush=True)
    try:
        model, bases = build_model(args.size, args.conditioner, device=args.device, fps=args.fps,
                                   tiny_bases=None if args.tiny_bases == "random" else args.tiny_bases,
                                   **{k: getattr(args, k) for k in cli.BUILD_ARGS})
    except (OSError, ValueError) as e:  # weights not available, a setting the model refuses: one line
        cli.fail(str(e).splitlines()[0])
    if args.grad_checkpointing:
        model.enable_gradient_checkpointing()
    if args.precision == "bf16" and args.device.startswith("cuda") and args.size != "tiny":
        print(f"frozen weights stored in bf16: {cast_frozen(model, bases) / 2 ** 30:.2f} GiB saved")
    steps = args.max_steps or args.epochs * (len(dataset) // args.batch_size)
    params = model.set_trainable(args.stage)  # {name: param}, the only ones with requires_grad
    Opt = torch.optim.AdamW if args.weight_decay > 0 else torch.optim.Adam  # Adam: Sec. 4.1.2
    opt = Opt(params.values(), lr=args.lr, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(torch.device(args.device).type, enabled=args.precision == "fp16")
    ema = EMAModel(params.values(), decay=args.ema_decay)  # diffusers' EMA, as the official --use_ema
    step = saved = 0
    if args.resume and (folder := checkpoint.latest(args.out)):
        step = saved = checkpoint.resume(folder, params, ema, opt, scaler)
        print(f"resumed from {folder}", flush=True)
    net = model if args.world_size == 1 else torch.nn.parallel.DistributedDataParallel(model)  # grads: GPUs' mean
    data = training.global_batches(dataset, args.seed, args.world_size, args.rank, args.micro_batch,
                                   args.accumulation, step, steps, args.num_workers)
    log = checkpoint.open_log(os.path.join(args.out, "log.jsonl"), step) if args.rank == 0 else None
    bar = tqdm(total=steps, initial=step, desc=f"{args.stage} (global batch {args.batch_size})", disable=args.rank > 0)
    settings = dict(seed=args.seed, p_uncond=args.p_uncond, p_self_cond=args.p_self_cond, shared_t=args.shared_t,
                    precision=args.precision, joint=args.stage == "joint")

    def save():  # rank 0 writes (DDP keeps the weights the same everywhere)
        if args.rank == 0:
            log.flush()
            checkpoint.save(args.out, step, params, ema, opt, scaler, vars(args), args.keep)
        return step
    model.train()
    for epoch, micro_batches in data:
        if stop:
            break
        for group in opt.param_groups:
            group["lr"] = training.learning_rate(args.lr, step, steps, args.lr_schedule)
        opt.zero_grad(set_to_none=True)
        info = {}
        for a, (offset, batch) in enumerate(micro_batches):
            with training.no_sync_unless_last(net, a, args.accumulation):
                loss, part = joint_loss(net, bases, batch, step=step, offset=offset, **settings)
                scaler.scale(loss / args.accumulation).backward()  # the global batch's mean gradient
            info = {k: info.get(k, []) + v for k, v in part.items()}
        loss_v, loss_a = (sum(info[k]) / len(info[k]) for k in ("loss_v", "loss_a"))
        if not math.isfinite(loss_v + loss_a):
            print(f"\nerror: step {step + 1}: the loss is {loss_v + loss_a} (try a lower --lr); the last checkpoint "
                  "is kept", file=sys.stderr)
            sys.exit(3)
        if args.max_grad_norm > 0:  # official code: clip at 1.0
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params.values(), args.max_grad_norm)
        scaler.step(opt)
        scaler.update()
        ema.step(params.values())
        step += 1
        if log:
            log.write(json.dumps(dict(step=step, epoch=epoch, loss=loss_v + loss_a, **info)) + "\n")
        bar.set_postfix(loss_v=f"{loss_v:.4f}", loss_a=f"{loss_a:.4f}")
        bar.update(1)
        if step % args.ckpt_every == 0 or step == steps:
            saved = save()
    bar.close()
    if stop:
        if step > saved:
            save()
        print(f"\ninterrupted: {args.out} saved at step {step}; continue with --resume", file=sys.stderr)
        sys.exit(128 + stop[0])
    if args.world_size > 1:
        torch.distributed.destroy_process_group()
    if args.rank == 0:
        print(f"done: {steps} steps in {args.out} (sample with: python sample.py --ckpt {args.out} --prompt ...)")


if __name__ == "__main__":
    main()
