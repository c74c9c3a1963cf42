"""sample.py's input checks: everything that can be wrong with a sampling command is found here, before any model
loads, and reported in one line with exit code 2 (support/cli.py). Not in the paper.
"""
import glob
import os

import torch

from data import read_captions
from support import checkpoint, cli, official_grid, outputs
from support.loading import read_run_config
from support.released_folder import is_pipe


def check(args):
    """Complete and check parsed sample.py arguments; take --out for this run (outputs.claim). -> args"""
    args.gamma, args.stems = list(dict.fromkeys(args.gamma)), [None] * len(args.prompt)  # a gamma twice: once
    args.steps, args.negative_prompt = official_grid.defaults(args.grid, args.steps, args.negative_prompt)
    try:
        captions = read_captions(args.captions, clips=False) if args.captions else []
    except ValueError as e:
        cli.fail(str(e))
    args.prompt, args.stems = args.prompt + [c for _, c in captions], args.stems + [s for s, _ in captions]
    if not args.prompt:
        cli.fail("give --prompt TEXT (repeatable) or --captions FILE")
    if dup := next((s for s in args.stems if s is not None and args.stems.count(s) > 1), None):
        cli.fail(f"--captions lists the clip {dup} twice; the clips are named by it: list each clip once")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        cli.fail(f"--device {args.device}: no CUDA device here (use --device cpu)")
    if args.ckpt:
        cli.run_folder(args.ckpt, "--ckpt")
        try:
            args.trained = {} if is_pipe(args.ckpt) else read_run_config(args.ckpt)
        except checkpoint.CheckpointError as e:
            cli.fail(str(e))
    if args.seconds * (fps := args.trained.get("fps", 8) if args.ckpt else 8) < 1:  # one frame; 8 fps: Sec. 4.1.2
        cli.fail(f"--seconds {args.seconds} is shorter than one video frame; give at least {1 / fps:g} s ({fps} fps)")
    bases = args.trained if args.ckpt else dict(cli.BASES, size=args.size)
    runs = sorted(os.path.dirname(os.path.dirname(p)) for p in glob.glob("runs/*/joint/COMPLETE"))
    args.hint = f"; a trained run is at {runs[0]}: --ckpt {runs[0]}" if runs and not args.ckpt else ""
    if bases and bases["size"] == "pretrained":
        cli.check_weights(bases["video_base"], bases["motion_adapter"], bases["audio_base"], args.hint)
    args.precision = args.precision or ("bf16" if args.device.startswith("cuda") else "fp32")
    args.lock, args.stale = outputs.claim(args.out, args.overwrite)  # the lock is held until the process ends
    return args
