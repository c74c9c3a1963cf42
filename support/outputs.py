"""sample.py's checks, the clip given to a conditional run and its files (clips, manifest, page). Not in the paper."""
import html
import json
import os

import numpy as np
from PIL import Image

from av_align import read_audio, read_video
from data import read_captions
from support import cli, official_grid, released
from support.loading import run_config
from support.media import save_clips, write_atomic


def check(args):
    """Complete and check sample.py's arguments before any model loads. -> args"""
    args.steps, args.negative_prompt = official_grid.defaults(args.grid, args.steps, args.negative_prompt)
    args.gamma = list(dict.fromkeys(args.gamma))  # a gamma given twice is sampled once
    try:  # a damaged or foreign run, caption list or clip (a CheckpointError is a ValueError)
        captions = read_captions(args.captions, clips=False) if args.captions else []
        trained = run_config(args.ckpt, not args.no_ema)[1] if args.ckpt and not released.is_pipe(args.ckpt) else {}
        given = args.video or args.audio
        args.given = read_given(given, args.video, trained.get("fps", 8), args.seconds) if given else None
    except ValueError as e:
        cli.fail(str(e))
    args.stems = [None] * len(args.prompt) + [stem for stem, _ in captions]
    args.prompt += [caption for _, caption in captions]
    if not args.prompt:
        cli.fail("give --prompt TEXT (repeatable) or --captions FILE")
    if trained.get("size", None if args.ckpt else args.size) == "pretrained":
        cli.check_weights(*[trained.get(k, v) for k, v in cli.BASES.items()])
    cli.writable_dir(args.out, "--out")
    if not args.overwrite and any(f.endswith((".jsonl", ".html", ".mp4")) for f in os.listdir(args.out)):
        cli.fail(f"{args.out} already holds clips of an earlier run; choose another --out or pass --overwrite")
    manifest = os.path.join(args.out, "manifest.jsonl")
    try:  # --overwrite removes only the files the earlier manifest lists (names inside --out), and the page
        rows = [json.loads(line) for line in open(manifest)] if os.path.isfile(manifest) else []
        listed = {r[k] for r in rows for k in ("file", "wav", "poster")} | {"manifest.jsonl", "index.html"}
    except (ValueError, TypeError, KeyError):
        cli.fail(f"{manifest} is not sample.py's; delete the earlier clips yourself or choose another --out")
    args.stale = [p for f in listed if os.path.basename(f) == f and os.path.isfile(p := os.path.join(args.out, f))]
    return args


def read_given(path, video, fps, seconds):
    """--video's frames at fps (frame k: shown at k / fps), --audio's (waveform, rate); ValueError: bad or < 0.5 s."""
    try:
        clip, rate = read_video(path) if video else read_audio(path)
    except (ValueError, RuntimeError) as e:  # soundfile's errors are RuntimeErrors
        raise ValueError(f"{path}: not a readable {'video' if video else 'sound'} ({e})") from None
    if len(clip) < 0.5 * rate:
        raise ValueError(f"{path} lasts {len(clip) / rate:.2f} s; give at least 0.5 s")
    how = "cut to" if len(clip) > seconds * rate else "padded to" if len(clip) < seconds * rate else "used whole:"
    print(f"{path}: {len(clip) / rate:.2f} s, {how} {seconds:g} s")
    return clip[(np.arange(int(len(clip) / rate * fps)) * rate / fps).astype(int)] if video else (clip, rate)


def clip_name(k, prompt, stem, seed, tag, args):
    """<number>_<prompt slug><tag>, or the reference clip's stem (with _s<seed> and the tag only where they tell
    clips apart) for a --captions list."""
    if stem is None:
        slug = "-".join("".join(c if c.isalnum() else " " for c in prompt).split())[:60]
        return f"{k:04d}_{slug}{tag}"
    return stem + (f"_s{seed}" if args.num_per_prompt > 1 else "") + (tag if len(args.gamma) > 1 else "")


def save(args, res, gamma, rows, source):
    """One gamma's clips and posters, then manifest.jsonl and index.html (rows: clips, columns: gammas) -> the rows."""
    tag, stems = f"_g{gamma!r}", [s for s in args.stems for _ in range(args.num_per_prompt)]  # repr: never alike
    clips = zip(res["prompts"], stems, res["seeds"])
    names = [clip_name(k, p, stem, s, tag, args) for k, (p, stem, s) in enumerate(clips)]
    save_clips(args.out, res, names)
    for name, video in zip(names, res["frames"]):  # the poster: the first frame, shown until the clip plays
        write_atomic(os.path.join(args.out, name + ".jpg"), lambda t, v=video[0]: Image.fromarray(v).save(t, "JPEG"))
    keys = ("steps", "guidance_video", "guidance_audio", "grid", "negative_prompt", "seconds", "video", "audio")
    settings = dict({k: getattr(args, k) for k in keys}, **source)
    rows += [dict(file=n + ".mp4", wav=n + ".wav", poster=n + ".jpg", prompt=p, stem=stem, seed=s, gamma=gamma,
                  **settings) for n, p, stem, s in zip(names, res["prompts"], stems, res["seeds"])]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    write_atomic(os.path.join(args.out, "manifest.jsonl"), lambda tmp: open(tmp, "w").write(text))
    gammas, e = list(dict.fromkeys(r["gamma"] for r in rows)), html.escape
    K = len(rows) // len(gammas)  # clips per gamma, in the same order at each: rows[k::K] is clip k at every gamma
    body = "".join(f"<tr><td>{e(r['prompt'])}</td><td>{r['seed']}</td>" + "".join(
        f'<td><video controls preload="metadata" poster="{e(c["poster"])}" src="{e(c["file"])}"></video></td>'
        for c in rows[k::K]) + "</tr>\n" for k, r in enumerate(rows[:K]))
    head = '<!doctype html>\n<meta charset="utf-8">\n<title>sounding videos</title><style>video{width:256px}</style>\n'
    page = (head + f"<p>{e(json.dumps(settings))}</p>\n<table>\n<tr><th>prompt</th><th>seed</th>"
            + "".join(f"<th>gamma = {g}</th>" for g in gammas) + f"</tr>\n{body}</table>\n")
    write_atomic(os.path.join(args.out, "index.html"), lambda tmp: open(tmp, "w").write(page))
    return rows
