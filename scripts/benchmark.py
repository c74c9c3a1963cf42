"""Benchmark: speed, memory and FLOPs of sampling (Alg. 1) and training (Eq. 9), tiny or full size.

Prints measurements as a Markdown table and writes them as JSON; never asserts a time. Each section is skipped once
--budget-s would be exceeded, and the JSON is rewritten after every section, so a run cut short keeps what it measured.
  flops     FLOPs (torch.utils.flop_counter.FlopCounterMode) of one forward of the joint model and of the two base
            U-Nets alone, and of one training step per clip (self-conditioning pass off / on)
  memory    bytes saved for backward per clip by module group, with / without gradient checkpointing (meta device)
  sampling  seconds per denoising step at batch 2 (CFG: unconditional + conditional in one batch), joint model vs the
            two base U-Nets alone (diffusers' own forwards), with SDPA (diffusers' default) and with diffusers' classic
            AttnProcessor; one clip by Alg. 1 (sample.generate, 25 steps); VAE decode per chunk size; vocoder
  train     seconds per step, clips/s, peak memory at batch --train-batch (after an OOM: halved until a step fits),
            with / without gradient checkpointing; each with the self-conditioning pass off / on (the paper's p = 0.5
            costs their mean); MFU = counted model FLOPs (no recompute) / time / --peak-tflops
  cache     the same step with on-the-fly encoding (VAEs + text encoders) vs cached latents (cache.py), and
            cache.py's own throughput and per-clip read time
  compile   (--compile) regional torch.compile of the U-Net blocks and added modules: compile time, seconds per step
            (its first call had not finished after 215 s on an H200 machine: give it --est-compile 400 and the time)

  python scripts/benchmark.py --size tiny                                   # CPU, a few minutes
  python scripts/benchmark.py --size full --device cuda --json bench.json --budget-s 400   # GPU, ~4 min
Weights are random (configs/*.json for "full"): speed does not depend on them. Timings are medians of --reps runs after
a warm-up; CUDA timings synchronise the device.
"""
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from support import cli  # noqa: E402
from support import cache  # noqa: E402  (the repository's top-level modules)
import train  # noqa: E402
from data import build_dataset  # noqa: E402
from model import build_model  # noqa: E402
from sample import generate  # noqa: E402

PROMPT = "A person is hitting a metal bowl with a stick."
PEAKS = {"H100": 989e12, "H200": 989e12}  # dense bf16 tensor-core peak, SXM parts (NVIDIA datasheets)


class Bench:
    def __init__(self, args):
        self.args, self.dev, self.t0 = args, torch.device(args.device), time.time()
        self.cuda = self.dev.type == "cuda"
        self.amp = torch.bfloat16 if self.cuda else None  # bf16 autocast on GPUs; fp32 on CPUs (as train / sample)
        self.rows, self.out = [], dict(args=vars(args), env=env_info(self.dev), results={}, skipped=[], errors={})

    def left(self):
        return self.args.budget_s - (time.time() - self.t0)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.dev)

    def time(self, fn, reps=None, warmup=1):
        """Median seconds of fn() over reps runs after warm-up runs."""
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(reps or self.args.reps):
            t = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    def reset_peak(self):
        if self.cuda:
            gc.collect(), torch.cuda.empty_cache(), torch.cuda.reset_peak_memory_stats(self.dev)

    def peak_gib(self):
        return round(torch.cuda.max_memory_allocated(self.dev) / 2 ** 30, 2) if self.cuda else None

    def autocast(self):
        return torch.autocast(self.dev.type, dtype=self.amp, enabled=self.amp is not None)

    def record(self, section, name, value, unit="", note=""):
        self.out["results"].setdefault(section, {})[name] = value
        self.rows.append((section, name, value, unit, note))
        shown = f"{value:.4g}" if isinstance(value, float) else value
        print(f"[{time.time() - self.t0:6.0f}s] {section:9s} {name}: {shown} {unit} {note}", flush=True)

    def save(self):
        if self.args.json:
            with open(self.args.json, "w") as f:
                json.dump(self.out, f, indent=1)


def env_info(dev):
    import diffusers
    info = dict(torch=torch.__version__, diffusers=diffusers.__version__, device=str(dev), threads=torch.get_num_threads())
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        info.update(gpu=p.name, gpu_mem_gib=round(p.total_memory / 2 ** 30, 1), sms=p.multi_processor_count)
    return info


def sampling_inputs(b, bases, frames, batch=2):
    """Batch 2 = CFG's [unconditional; conditional] for one clip, at local timestep index 500, self-conditioned."""
    g, h = torch.Generator().manual_seed(0), bases.latent_size
    rand = lambda *s: torch.randn(*s, generator=g).to(b.dev)
    rows = bases.audio_rows(frames / bases.fps)  # the audio as long as the video: 100 latent rows for 4 s
    x_v, x_a = rand(batch, 4, frames, h, h), rand(batch, 8, rows, 16)  # (B, 4, F, h, w), (B, 8, T, 16)
    text_v, text_a = bases.encode_text([""] * (batch // 2) + [PROMPT] * (batch - batch // 2))
    return dict(x_v=x_v, x_a=x_a, t=torch.full((batch,), 500, device=b.dev), text_v=text_v, text_a=text_a,
                x0_v=rand(*x_v.shape), x0_a=rand(*x_a.shape))


def forwards(model, i, frames):
    """(joint forward, base U-Nets forward, video U-Net alone, audio U-Net alone) as closures, no grad."""
    def joint():  # as sample.generate: the connectors once for both CFG halves (they see no text)
        n = len(i["x_v"]) // 2 or 1
        ctx = model.contexts(*(i[k][:n] for k in ("x_v", "x_a", "t", "t", "x0_v", "x0_a")))
        return model(i["x_v"], i["x_a"], i["t"], i["t"], i["text_v"], i["text_a"],
                     context=tuple(torch.cat([c] * (len(i["x_v"]) // n)) for c in ctx))
    video = lambda: model.video_unet(i["x_v"], i["t"], encoder_hidden_states=i["text_v"].repeat_interleave(frames, 0))
    audio = lambda: model.audio_unet(i["x_a"], i["t"], encoder_hidden_states=None, class_labels=i["text_a"])
    return joint, lambda: (video(), audio()), video, audio


def count(fn):
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def train_batch(b, bases, batch, frames):
    """A random raw batch (what data.py gives) and its cached form (what cache.CachedClips gives, collated)."""
    g, H = torch.Generator().manual_seed(1), bases.video_size
    raw = dict(video=torch.rand(batch, 3, frames, H, H, generator=g) * 2 - 1,  # frames in [-1, 1]
               mel=torch.rand(batch, 1, 400, 64, generator=g) * 12 - 11, caption=[PROMPT] * batch)  # log-mel range
    with torch.no_grad():
        (mu_v, sd_v), (mu_a, sd_a) = bases.encode_video(raw["video"].to(b.dev)), bases.encode_audio(raw["mel"].to(b.dev))
        (text_v, text_a), (null_v, null_a) = bases.encode_text(raw["caption"]), bases.encode_text([""] * batch)
    cached = dict(video_mean=mu_v, video_std=sd_v, mel_mean=mu_a, mel_std=sd_a, text_v=text_v, text_a=text_a,
                  null_v=null_v, null_a=null_a)
    cached = {k: v.cpu() for k, v in cached.items()}  # both kinds of batch start on the CPU, as from a DataLoader
    return raw, dict(cached, caption=raw["caption"])


def section_flops(b, model, bases, frames):
    i = sampling_inputs(b, bases, frames, batch=1)
    joint, base, video, audio = forwards(model, i, frames)
    with torch.no_grad(), b.autocast():
        f = {k: count(fn) for k, fn in dict(joint=joint, base=base, video_unet=video, audio_unet=audio).items()}
    for k, v in f.items():
        b.record("flops", f"forward per clip: {k}", v / 1e12, "TFLOP")
    b.record("flops", "forward ratio joint / base", f["joint"] / f["base"])
    raw, cached = train_batch(b, bases, 1, frames)
    targs = train.parse_args(["--data", "synthetic", "--size", bases.size, "--device", str(b.dev)])
    model.train()
    for sc in (0.0, 1.0):  # one clip: FLOPs are linear in the batch
        targs.p_self_cond = sc
        settings = train.loss_settings(targs)
        flops = count(lambda: train.joint_loss(model, bases, cached, step=0, **settings)[0].backward())
        model.zero_grad(set_to_none=True)
        b.record("flops", f"train step per clip, self-cond {'on' if sc else 'off'}", flops / 1e12, "TFLOP", "no recompute")
    with torch.no_grad():
        enc = count(lambda: (bases.encode_video(raw["video"].to(b.dev)), bases.encode_audio(raw["mel"].to(b.dev)),
                             bases.encode_text(raw["caption"])))
    b.record("flops", "on-the-fly encoding per clip (VAEs + text)", enc / 1e12, "TFLOP")


def section_activations(b, size, frames):
    """Bytes the training forward saves for backward, by module group, with / without gradient checkpointing, counted
    on the meta device (no memory, no time) with bf16 weights and inputs (close to bf16 autocast), for one clip."""
    model, bases = build_model(size, device="meta", dtype=torch.bfloat16)
    model.train()
    names, stack = {id(m): n for n, m in model.named_modules()}, []
    groups = ("motion_modules", "attentions", "resnets", "connector_v", "connector_a", "blocks_v", "blocks_a")

    def group():  # the innermost enclosing module that belongs to a group
        for n in reversed(stack):
            hit = next((g for g in groups if g in n.split(".")), None)
            if hit:
                return ("audio U-Net " if n.startswith("audio_unet") else "video U-Net " if "unet" in n else "") + hit
        return "other"
    hooks = (torch.nn.modules.module.register_module_forward_pre_hook(lambda m, i: stack.append(names.get(id(m), ""))),
             torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: (stack.pop(), None)[1]))
    h = bases.latent_size
    x_v = torch.randn(1, 4, frames, h, h, device="meta")
    x_a = torch.randn(1, 8, bases.audio_rows(frames / bases.fps), 16, device="meta")
    t, text_v = torch.full((1,), 500, device="meta"), torch.randn(1, 77, model.video_unet.config.cross_attention_dim,
                                                                   device="meta")
    text_a = torch.randn(1, model.audio_unet.config.projection_class_embeddings_input_dim, device="meta")
    try:
        for gc_on in (False, True):
            if gc_on:
                model.enable_gradient_checkpointing()
            saved = {}

            def pack(x):
                saved[group()] = saved.get(group(), 0) + x.numel() * x.element_size()
                return x
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
                model(*(z.bfloat16() for z in (x_v, x_a)), t, t, text_v.bfloat16(), text_a.bfloat16(), x_v.bfloat16(),
                      x_a.bfloat16())
            tag = "ckpt" if gc_on else "no ckpt"
            b.record("memory", f"saved activations per clip ({tag})", sum(saved.values()) / 2 ** 30, "GiB",
                     "meta, bf16; math SDPA (overstates attention); repeats count twice")
            for k, v in sorted(saved.items(), key=lambda kv: -kv[1])[:4]:
                b.record("memory", f"  of which {k} ({tag})", v / 2 ** 30, "GiB")
    finally:
        for hook in hooks:
            hook.remove()


def section_sampling(b, model, bases, frames):
    model.eval()
    i = sampling_inputs(b, bases, frames)
    from diffusers.models.attention_processor import AttnProcessor
    unets = (model.video_unet, model.audio_unet)
    saved = [u.attn_processors for u in unets]
    for attn in ("sdpa", "classic"):
        if attn == "classic":
            if b.left() < b.args.est_step * 6 * b.args.reps:
                b.out["skipped"].append("sampling classic attention"); continue
            for u in unets:
                u.set_attn_processor(AttnProcessor())  # diffusers' pre-SDPA attention (explicit softmax(QK^T)V)
        joint, base, video, audio = forwards(model, i, frames)
        with torch.no_grad(), b.autocast():
            tj, tb = b.time(joint), b.time(base)
            if attn == "sdpa":
                b.record("sampling", "step: video U-Net alone", b.time(video), "s")
                b.record("sampling", "step: audio U-Net alone", b.time(audio), "s")
        b.record("sampling", f"step: joint model ({attn})", tj, "s", "batch 2 (CFG)")
        b.record("sampling", f"step: base U-Nets ({attn})", tb, "s", "batch 2 (CFG)")
        b.record("sampling", f"step ratio joint / base ({attn})", tj / tb, "", "target <= 1.10")
    for u, s in zip(unets, saved):
        u.set_attn_processor(s)
    if b.left() < b.args.est_step * (b.args.steps + 10):
        b.out["skipped"].append("sampling per clip"); return
    run = lambda steps: generate(model, bases, [PROMPT], [0], T=steps, bar=False, amp=b.amp, seconds=frames / bases.fps)
    run(2)  # warm-up of the whole path (text encoders, DDIM update)
    b.sync()
    t = time.perf_counter()
    x_v, x_a = run(b.args.steps)
    b.sync()
    b.record("sampling", f"Alg. 1 per clip, {b.args.steps} steps", time.perf_counter() - t, "s", "CFG both modalities")
    for chunk in sorted({4, 16, frames}):
        b.reset_peak()
        b.record("sampling", f"VAE decode, chunk {chunk} frames", b.time(lambda: bases.decode_video(x_v, chunk), 2), "s",
                 f"peak {b.peak_gib()} GiB" if b.cuda else "")
    b.record("sampling", "vocoder (VAE + HiFi-GAN / Griffin-Lim)",
             b.time(lambda: bases.decode_audio(x_a, frames / bases.fps), 2), "s")


def section_train(b, model, bases, frames):
    """Each setting starts at --train-batch; after an OOM it halves the batch until a step fits, and measures there."""
    raw, cached = train_batch(b, bases, b.args.train_batch, frames)
    targs = train.parse_args(["--data", "synthetic", "--size", bases.size, "--device", str(b.dev)])
    opt = torch.optim.Adam(dict(model.trainable_parameters()).values(), lr=targs.lr)  # as train.py (in the peak)
    model.train()
    step, flops, res = [0], b.out["results"].get("flops", {}), {}

    def one(batch, n, sc):
        targs.p_self_cond = sc
        loss, _ = train.joint_loss(model, bases, {k: v[:n] for k, v in batch.items()}, step=step[0],
                                   **train.loss_settings(targs))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step[0] += 1
    for gc_on in (False, True):
        tag, n = "ckpt" if gc_on else "no ckpt", b.args.train_batch
        if gc_on:
            model.enable_gradient_checkpointing()
        for inputs in ("cached", "on the fly"):
            for sc in ("off", "on"):
                while n >= 1:
                    name = f"{tag}, {inputs}, self-cond {sc}, batch {n}"
                    if b.left() < b.args.est_step * n * (1 + b.args.reps) * 2:
                        b.out["skipped"].append(f"train {name}"); break
                    b.reset_peak()
                    try:
                        t = b.time(lambda: one(cached if inputs == "cached" else raw, n, float(sc == "on")))
                    except torch.OutOfMemoryError:
                        t = None
                    if t is None:  # outside the except clause: its traceback no longer holds the step's tensors
                        opt.zero_grad(set_to_none=True)
                        b.record("train", f"{name}: step", "OOM", "", f"peak before failing {b.peak_gib()} GiB")
                        b.reset_peak()
                        n //= 2  # every later variant of this setting needs at least as much memory
                        continue
                    res[tag, inputs, sc] = n, t
                    b.record("train", f"{name}: step", t, "s", f"{n / t:.2f} clips/s")
                    if b.cuda:
                        b.record("train", f"{name}: peak memory", b.peak_gib(), "GiB",
                                 "allocated; " + ("fits 80 GB" if b.peak_gib() < 78 else "over 78 GiB"))
                    key = f"train step per clip, self-cond {sc}"
                    if b.args.peak_tflops and key in flops and inputs == "cached":
                        b.record("train", f"{name}: MFU", flops[key] * 1e12 * n / t / (b.args.peak_tflops * 1e12), "",
                                 f"model FLOPs / {b.args.peak_tflops:.0f} TFLOP/s")
                    break
            pair = [res.get((tag, inputs, sc)) for sc in ("off", "on")]
            if None not in pair and pair[0][0] == pair[1][0]:
                t = statistics.mean(t for _, t in pair)
                res[tag, inputs] = pair[0][0], t
                b.record("train", f"{tag}, {inputs}, batch {pair[0][0]}: step at p_self_cond 0.5", t, "s",
                         f"{pair[0][0] / t:.2f} clips/s")
        fly, cac = res.get((tag, "on the fly")), res.get((tag, "cached"))
        if fly and cac and fly[0] == cac[0]:
            b.record("cache", f"step on the fly / cached ({tag}, batch {fly[0]})", fly[1] / cac[1], "", "target >= 2")
        b.save()
    with torch.no_grad():
        b.record("cache", f"encoding alone, batch {b.args.train_batch} (VAEs + text)", b.time(lambda: (
            bases.encode_video(raw["video"].to(b.dev)), bases.encode_audio(raw["mel"].to(b.dev)),
            bases.encode_text(raw["caption"]))), "s", "what the cache removes from each step")
    del opt
    model.zero_grad(set_to_none=True)


def section_cache_files(b, bases):
    """cache.py end to end on a few synthetic clips: encoding throughput, then the read time of one item."""
    n = b.args.cache_clips
    raw = build_dataset("synthetic", "train", size=bases.video_size, fps=bases.fps, num_clips=n)
    b.record("cache", "data.py item (synthetic clip + log-mel)", b.time(lambda: raw[0], 3), "s", "CPU")
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        cache.encode_dataset(bases, raw, d, batch_size=min(8, n))
        b.sync()
        b.record("cache", f"cache.py encode_dataset, {n} clips", n / (time.perf_counter() - t), "clips/s",
                 "incl. making the synthetic clips")
        ds = cache.CachedClips(d)
        b.record("cache", "CachedClips item (memory-mapped read)", b.time(lambda: ds[n - 1], 3), "s", "CPU")


def section_compile(b, model, bases, frames):
    if b.left() < b.args.est_compile:
        b.out["skipped"].append("compile"); return
    model.eval()
    for u in (model.video_unet, model.audio_unet):  # regional: each block compiled on its own (fast to compile)
        for blk in (*u.down_blocks, u.mid_block, *u.up_blocks):
            if blk is not None:
                blk.compile()
    for m in (model.connector_v, model.connector_a, *model.blocks_v, *model.blocks_a):
        m.compile()
    i = sampling_inputs(b, bases, frames)
    joint, base, _, _ = forwards(model, i, frames)
    with torch.no_grad(), b.autocast():
        t = time.perf_counter()
        joint(), base()
        b.sync()
        b.record("compile", "first call (compiling)", time.perf_counter() - t, "s")
        tj, tb = b.time(joint), b.time(base)
    b.record("compile", "step: joint model (compiled)", tj, "s", "batch 2 (CFG)")
    b.record("compile", "step: base U-Nets (compiled)", tb, "s", "batch 2 (CFG)")
    b.record("compile", "step ratio joint / base (compiled)", tj / tb, "", "target <= 1.10")


def main(argv=None):
    p = cli.Parser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="tiny", choices=["tiny", "full"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--budget-s", type=float, default=600, help="stop starting new measurements after this")
    p.add_argument("--sections", action=cli.Listing, default=["flops", "memory", "sampling", "train", "cache"],
                   help="spaces or commas; 'compile' is opt-in")
    p.add_argument("--compile", action="store_true", help="add the torch.compile section (last)")
    p.add_argument("--seconds", type=int, default=4)  # 4-s clips (Sec. 4.1.2)
    p.add_argument("--fps", type=int, default=8)  # GreatestHits (Sec. 4.1.2)
    p.add_argument("--video-size", type=int, default=None, help="override H = W (default: the size's, 256 full)")
    p.add_argument("--train-batch", type=int, default=16)  # Sec. 4.1.2
    p.add_argument("--steps", type=int, default=25)  # T = 25 (Sec. 4.1.2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--cache-clips", type=int, default=8)
    p.add_argument("--peak-tflops", type=float, default=None, help="for MFU; default 989 on H100/H200, else none")
    p.add_argument("--est-step", type=float, default=None, help="guess of seconds per clip-forward, for the budget")
    p.add_argument("--est-compile", type=float, default=150, help="guess of seconds the compile section takes")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and args.peak_tflops is None:
        name = torch.cuda.get_device_name(dev)
        args.peak_tflops = next((v / 1e12 for k, v in PEAKS.items() if k in name), None)
    args.est_step = args.est_step or (0.05 if args.size == "tiny" else 0.05 if dev.type == "cuda" else 60)
    b = Bench(args)
    t = time.perf_counter()
    model, bases = build_model(args.size, device=dev, fps=args.fps)
    if args.video_size:
        bases.video_size = args.video_size  # a reduced shape (checking the script on a CPU): latents scale with it
    b.record("setup", "build model (random weights)", time.perf_counter() - t, "s")
    count_params = lambda ps: sum(q.numel() for q in ps) / 1e6
    b.record("setup", "params: video U-Net / audio U-Net / added / trainable",
             " / ".join(f"{count_params(ps):.1f}" for ps in (model.video_unet.parameters(),
                        model.audio_unet.parameters(), (q for m in model.added_modules() for q in m.parameters()),
                        (q for _, q in model.trainable_parameters()))), "M")
    frames = args.seconds * args.fps
    sections = dict(flops=lambda: section_flops(b, model, bases, frames),
                    memory=lambda: section_activations(b, args.size, frames),
                    sampling=lambda: section_sampling(b, model, bases, frames),
                    train=lambda: section_train(b, model, bases, frames), cache=lambda: section_cache_files(b, bases),
                    compile=lambda: section_compile(b, model, bases, frames))
    todo = args.sections + (["compile"] if args.compile else [])
    for name in todo:
        if b.left() <= 0:
            b.out["skipped"].append(name); continue
        try:
            sections[name]()
        except Exception as e:  # keep measuring the other sections; the JSON says what failed
            traceback.print_exc()
            b.out["errors"][name] = f"{type(e).__name__}: {e}"[:500]
        b.save()
    print(f"\n### {args.size} size on {b.out['env'].get('gpu', 'CPU, %d threads' % torch.get_num_threads())}\n")
    print("| section | measurement | value | unit | note |\n|---|---|---|---|---|")
    for s, n, v, u, note in b.rows:
        print(f"| {s} | {n} | {v:.4g} | {u} | {note} |" if isinstance(v, float) else f"| {s} | {n} | {v} | {u} | {note} |")
    if b.out["skipped"] or b.out["errors"]:
        print(f"\nskipped: {b.out['skipped']}\nerrors: {b.out['errors']}")
    b.save()


if __name__ == "__main__":
    main()
