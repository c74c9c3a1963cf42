"""What sample.py leaves in --out besides the clips' bytes: their names, a poster frame per clip, manifest.jsonl (one
JSON row per clip), index.html (prompts x gamma, the clips playing with their sound), and the clean-up that
--overwrite does (only this program's own files). Not in the paper: file layout.
"""
import html
import json
import os
import re
import time
import urllib.parse

import numpy as np
from PIL import Image

from support import checkpoint, cli
from support.files import atomic_write, write_text

MANIFEST, INDEX = "manifest.jsonl", "index.html"
EXTS = (".mp4", ".wav", ".jpg")  # a clip, its sound, its poster frame
GAMMA = r"(_g[0-9e.+-]+)"  # the gamma tag of a name: 1.5, or 1.0000001 where two gammas print alike
PROMPT_NAME = re.compile(r"\d{4,}_[A-Za-z0-9-]{0,60}" + GAMMA)  # <clip number>_<prompt slug>_g<gamma>


def gamma_tags(gammas):
    """-> one tag per gamma for the clip names: "1.5" (format g), or the full repr where two would print alike."""
    tags = [format(g, "g") for g in gammas]
    return tags if len(set(tags)) == len(tags) else [repr(float(g)) for g in gammas]


def clip_names(prompts, stems, seeds, tag, several_gammas, several_per_stem):
    """One name per clip: its reference clip's stem where --captions gave one (plus _s<seed> / _g<gamma> only where
    there are several per stem), else <number>_<prompt slug>_g<gamma>."""
    return [f"{k:04d}_{re.sub(r'[^A-Za-z0-9]+', '-', p)[:60].strip('-')}_g{tag}" if stem is None else
            stem + (f"_s{s}" if several_per_stem else "") + (f"_g{tag}" if several_gammas else "")
            for k, (p, stem, s) in enumerate(zip(prompts, stems, seeds))]


def claim(out, overwrite):
    """Before any model loads: take `out` for this run (a lock like train.py's: two sample.py never write into one
    folder), refuse an earlier run's folder unless `overwrite`, and list what it deletes. -> (lock, stale files)"""
    cli.writable_dir(out, "--out")
    try:
        held = checkpoint.lock(out)
    except checkpoint.CheckpointError as e:
        cli.fail(str(e))
    try:
        if earlier_run(out) and not overwrite:
            raise ValueError(f"{out} already holds clips of an earlier run; choose another --out or pass --overwrite")
        return held, stale_files(out) if overwrite else []
    except ValueError as e:
        held.close()  # released at once, also for a caller that keeps the exception
        cli.fail(str(e))


def rows(names, result, stems, gamma, args, source):
    """manifest.jsonl rows of one generate_clips result: files, prompt (and the reference clip's stem and caption
    where --captions gave them), the seed that regenerates the clip alone, the settings (sample.py's args) and what
    was loaded (support/loading.load's source)."""
    settings = dict(gamma=gamma, steps=args.steps, guidance_video=args.guidance_video, grid=args.grid,
                    guidance_audio=args.guidance_audio, negative_prompt=args.negative_prompt, seconds=args.seconds,
                    checkpoint=source["checkpoint"], kind=source["kind"], trained_steps=source.get("steps"),
                    ema=not args.no_ema, created=time.strftime("%Y-%m-%dT%H:%M:%S"))
    return [dict(file=n + ".mp4", wav=n + ".wav", poster=n + ".jpg", prompt=p, stem=stem,
                 caption=p if stem is not None else None, seed=s, **settings)
            for n, p, stem, s in zip(names, result["prompts"], stems, result["seeds"])]


def earlier_run(out):
    """Whether `out` holds a manifest or clips (os.listdir: an --out with glob characters is checked too)."""
    return any(f == MANIFEST or f.endswith(".mp4") for f in os.listdir(out))


def own_files(row):
    """The files of one manifest row that this program's naming would have written; nothing for a row whose names
    do not fit the scheme (a crafted manifest deletes no notes.txt, no ../x, no .bashrc)."""
    name = str(row.get("file", ""))[:-len(".mp4")] if str(row.get("file", "")).endswith(".mp4") else ""
    stem = row.get("stem")
    plain = name and os.path.basename(name) == name and not name.startswith(".")
    ours = PROMPT_NAME.fullmatch(name) or (isinstance(stem, str) and re.fullmatch(re.escape(stem) + r"(_s\d+)?" +
                                                                                  GAMMA + "?", name))
    return [name + e for e in EXTS] if plain and ours else []


def stale_files(out):
    """--overwrite: the files of the earlier run in `out`: what its manifest lists (own_files), the manifest and page,
    and what a killed run left unlisted (.tmp-* files, clips named by the scheme). ValueError: a damaged manifest."""
    files = {MANIFEST, INDEX}
    if os.path.isfile(os.path.join(out, MANIFEST)):
        with open(os.path.join(out, MANIFEST), errors="replace") as f:  # not UTF-8: the line fails below
            for i, line in enumerate(f, 1):
                try:
                    row = json.loads(line)
                except ValueError:
                    raise ValueError(f"{out}/{MANIFEST} line {i} is not JSON: delete the folder's clips yourself or "
                                     "choose another --out") from None
                files.update(own_files(row) if isinstance(row, dict) else [])
    for f in os.listdir(out):
        name, ext = os.path.splitext(f)
        if (f.startswith(".tmp-") and ext in EXTS + (".jsonl", ".html")) or (ext in EXTS and
                                                                              PROMPT_NAME.fullmatch(name)):
            files.add(f)
    return sorted(os.path.join(out, f) for f in files if os.path.lexists(os.path.join(out, f)))


def write_posters(out, names, frames):
    """<name>.jpg: each clip's first frame, which index.html shows until a clip is played."""
    for name, video in zip(names, frames):
        image = Image.fromarray(np.ascontiguousarray(video[0], np.uint8))
        atomic_write(os.path.join(out, name + ".jpg"), lambda tmp, im=image: im.save(tmp, format="JPEG", quality=90))


def write_manifest(out, rows):
    write_text(os.path.join(out, MANIFEST), "".join(json.dumps(r) + "\n" for r in rows))


def _cell(r):
    """One clip: its poster until played, then the video with its sound (loaded only then); its wav linked."""
    if r is None:
        return "<td></td>"
    e, q = html.escape, lambda f: html.escape(urllib.parse.quote(f))
    return (f'<td><video controls preload="metadata" poster="{q(r["poster"])}" src="{q(r["file"])}"></video><br>'
            f'<a href="{q(r["wav"])}">{e(r["wav"])}</a></td>')


def write_index(out, rows):
    """index.html: one row per prompt and seed, one column per gamma, the shared settings on top. preload="metadata"
    and a poster frame: a page of 2,000 clips opens without loading them."""
    gammas, grid, e, r0 = list(dict.fromkeys(r["gamma"] for r in rows)), {}, html.escape, rows[0]
    for r in rows:
        grid.setdefault((r.get("stem") or r["prompt"], r["seed"]), {})[r["gamma"]] = r
    source = f"checkpoint {e(r0['checkpoint'])}" if r0["checkpoint"] else "no checkpoint"
    trained = (f", trained steps {e(json.dumps(r0['trained_steps']))}, {'EMA' if r0['ema'] else 'raw'} weights"
               if r0["trained_steps"] else "")
    head = (f"T = {r0['steps']} steps ({e(str(r0.get('grid', 'paper')))} grid), guidance video {r0['guidance_video']} "
            f"/ audio {r0['guidance_audio']}, negative prompt {e(json.dumps(r0['negative_prompt']))}, "
            f"{r0['seconds']} s; {source} ({e(r0['kind'])}{trained})")
    body = ""
    for (_, seed), by_gamma in grid.items():
        first = next(iter(by_gamma.values()))
        stem = f"<br><small>{e(first['stem'])}</small>" if first.get("stem") else ""
        body += (f"<tr><td>{e(first['prompt'])}{stem}</td><td>{seed}</td>"
                 f"{''.join(_cell(by_gamma.get(g)) for g in gammas)}</tr>\n")
    style = ("body{font-family:sans-serif}td,th{padding:4px 8px;vertical-align:top;text-align:left}"
             "video{width:256px;background:#000}")
    columns = "".join(f"<th>gamma = {g}</th>" for g in gammas)
    write_text(os.path.join(out, INDEX), f'<!doctype html>\n<meta charset="utf-8">\n<title>sounding videos</title>\n'
                f"<style>{style}</style>\n<h1>sounding videos</h1>\n<p>{head}</p>\n<table>\n"
                f"<tr><th>prompt</th><th>seed</th>{columns}</tr>\n{body}</table>\n")
