"""Benchmark (not in the paper): what the joint model costs on top of its two frozen base U-Nets, tiny or full size.

Prints measurements and writes them as JSON (--json); never asserts a time.
- On the meta device at full size (32 frames at 256x256, 4 s of audio; no memory, no time): FLOPs of one forward
  per clip, joint model (Sec. 3.4) vs the base U-Nets alone; bytes saved for backward, without / with checkpointing.
- Seconds, the median of --reps after a warm-up: a sampling step of Alg. 1 (batch 2, classifier-free guidance), joint
  vs base U-Nets alone; a whole clip (T steps, decoded); a training step of Eq. (9) (train.joint_loss, backward,
  Adam) at --train-batch without / with the self-conditioning pass (p = 0.5 costs their mean). Full size on CUDA only
  (bf16 autocast, frozen weights in bf16, as train.py).

  python -m scripts.benchmark --size tiny                                  # CPU, about a minute
  python -m scripts.benchmark --size full --device cuda --json bench.json  # one GPU
Weights are random (configs/*.json for "full"): speed does not depend on them. Left out: torch.compile, attention
processors other than diffusers' default (SDPA), several GPUs.
"""
import json
import platform
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import train
from model import build_model, cast_frozen
from sample import generate_clips
from support import cli

PROMPT = "A person is hitting a metal bowl with a stick."
FRAMES = 32  # 4-s clips at 8 fps (Sec. 4.1.2)


def inputs(model, bases, batch, device, dtype=torch.float32):
    """Noisy latents at diffusers index 500 and random text states: what one U-Net call of a step sees."""
    h, rows = bases.latent_size, bases.audio_rows(FRAMES / bases.fps)  # 100 latent rows for 4 s
    x_v = torch.randn(batch, 4, FRAMES, h, h, device=device, dtype=dtype)  # (B, 4, F, h, w)
    x_a = torch.randn(batch, 8, rows, 16, device=device, dtype=dtype)  # (B, 8, rows, 16)
    text_v = torch.randn(batch, 77, model.video_unet.config.cross_attention_dim, device=device, dtype=dtype)  # CLIP
    text_a = torch.randn(batch, model.audio_unet.config.projection_class_embeddings_input_dim, device=device,
                         dtype=dtype)  # CLAP
    return x_v, x_a, torch.full((batch,), 500, device=device), text_v, text_a


def meta_counts(record):
    """FLOPs and saved activations per clip at full size on the meta device (shapes only)."""
    model, bases = build_model("full", device="meta", dtype=torch.bfloat16)
    x_v, x_a, t, text_v, text_a = inputs(model, bases, 1, "meta", torch.bfloat16)
    for joint, name in ((True, "joint model"), (False, "base U-Nets alone")):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x_v, x_a, t, t, text_v, text_a, joint=joint)
        record(f"forward per clip, {name}", counter.get_total_flops() / 1e12, "TFLOP")
    model.train()
    for name in ("without", "with"):
        if name == "with":
            model.enable_gradient_checkpointing()
        saved = []

        def pack(x):
            saved.append(x.numel() * x.element_size())
            return x
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            model(x_v, x_a, t, t, text_v, text_a, x_v, x_a)  # with the self-conditioning estimates x0_v, x0_a
        record(f"saved for backward per clip, {name} gradient checkpointing", sum(saved) / 2 ** 30, "GiB",
               "math SDPA on meta (saves the softmax); a tensor saved twice counts twice")


def timings(a, record):
    """Seconds per sampling and training step at --size on --device, random weights."""
    cuda = a.device.startswith("cuda")
    amp = torch.bfloat16 if cuda else None  # bf16 autocast on GPUs, fp32 on CPUs (as train.py and sample.py)
    sync = torch.cuda.synchronize if cuda else lambda: None  # CUDA runs asynchronously: wait for the kernels

    def median(fn, reps=a.reps):
        fn()  # warm-up
        times = []
        for _ in range(reps):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    model, bases = build_model(a.size, device=a.device)
    if cuda and a.size == "full":
        cast_frozen(model, bases)  # as train.py --precision bf16
    x_v, x_a, t, text_v, text_a = inputs(model, bases, 2, a.device)  # batch 2: CFG's [unconditional; conditional]

    def joint():  # as sample.generate: the connectors (they see no text) once for both halves
        ctx = model.contexts(x_v[:1], x_a[:1], t[:1], t[:1])
        return model(x_v, x_a, t, t, text_v, text_a, context=tuple(torch.cat([c, c]) for c in ctx))
    model.eval()
    with torch.no_grad(), torch.autocast(torch.device(a.device).type, dtype=amp, enabled=amp is not None):
        step_joint = median(joint)
        step_base = median(lambda: model(x_v, x_a, t, t, text_v, text_a, joint=False))
    record("sampling step, joint model (batch 2)", step_joint, "s")
    record("sampling step, base U-Nets alone (batch 2)", step_base, "s")
    record("sampling step ratio joint / base", step_joint / step_base, "")
    clip = lambda: generate_clips(model, bases, PROMPT, T=a.steps, generator=0, amp=amp, progress=False)  # noqa: E731
    record(f"one clip, Alg. 1 with T = {a.steps} + decoding", median(clip, 1), "s")
    g, H, B = torch.Generator().manual_seed(1), bases.video_size, a.train_batch
    batch = dict(video=torch.rand(B, 3, FRAMES, H, H, generator=g) * 2 - 1,  # frames in [-1, 1], as data.py
                 mel=torch.rand(B, 1, 400, 64, generator=g) * 12 - 11, caption=[PROMPT] * B)  # log-mel range
    params = model.set_trainable("joint")
    opt = torch.optim.Adam(params.values(), lr=1e-5)  # Sec. 4.1.2
    model.train()
    for ckpt in ("off", "on"):
        if ckpt == "on":
            model.enable_gradient_checkpointing()
        for p_self_cond in (0.0, 1.0):
            def step():
                loss, _ = train.joint_loss(model, bases, batch, seed=0, step=0, p_uncond=0.1, p_self_cond=p_self_cond,
                                           shared_t=False, precision="bf16" if cuda else "fp32")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            name = f"training step, batch {B}, gradient checkpointing {ckpt}, self-conditioning pass {p_self_cond:g}"
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            try:
                seconds = median(step)
            except torch.OutOfMemoryError:
                opt.zero_grad(set_to_none=True)
                record(name, "out of memory", "")
                continue
            record(name, seconds, "s", f"{B / seconds:.2f} clips/s")
            if cuda:
                record(f"{name}: peak memory", torch.cuda.max_memory_allocated() / 2 ** 30, "GiB")


def main(argv=None):
    p = cli.Parser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="tiny", choices=["tiny", "full"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--json", help="write the measurements here")
    p.add_argument("--reps", type=cli.number(int, 1, 100), default=3, help="timed runs per measurement")
    p.add_argument("--steps", type=cli.number(int, 1, 1000), default=25)  # T = 25 (Sec. 4.1.2)
    p.add_argument("--train-batch", type=cli.number(int, 1, 256), default=16)  # Sec. 4.1.2
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        cli.fail("--device cuda: no CUDA device here (use --device cpu)")
    device = torch.cuda.get_device_name() if a.device == "cuda" else f"{platform.processor() or 'CPU'}"
    out = dict(args=vars(a), torch=torch.__version__, device=device, threads=torch.get_num_threads(), results={})

    def record(name, value, unit, note=""):
        out["results"][name] = dict(value=value, unit=unit, note=note)
        shown = f"{value:.4g}" if isinstance(value, float) else value
        print(f"{name}: {shown} {unit} {note}", flush=True)
        if a.json:  # after every measurement: a run cut short keeps what it measured
            with open(a.json, "w") as f:
                json.dump(out, f, indent=1)
    print(f"{a.size} size on {device}, torch {torch.__version__}, {out['threads']} threads")
    meta_counts(record)
    if a.size == "full" and a.device == "cpu":
        print("full-size timings need --device cuda (a CPU takes minutes per step)")
        return out
    timings(a, record)
    return out


if __name__ == "__main__":
    main()
