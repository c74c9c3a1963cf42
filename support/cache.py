"""Cache what is frozen: every training clip's VAE latent distribution and its caption's text embeddings, once.

Not in the paper: an engineering step. The official code re-encodes every clip through both VAEs and both
text encoders at every step, although those networks never train (App. A.2): their outputs depend on the clip alone.
We store the latent distribution's mean and std, not a sample, so training still draws x_0 = mean + std * noise with
its own seeded noise per step, exactly as on the fly (train.joint_loss); and the text embeddings of each distinct
caption plus of the empty caption "", which classifier-free-guidance caption dropout (p = 0.1: the official code, not
the paper) substitutes per sample.

  python -m support.cache --data synthetic --size tiny --out cache/synthetic-tiny
  python train.py --data synthetic --size tiny --cache cache/synthetic-tiny

Layout of the folder: shard_00000.safetensors, ... (video_mean, video_std (N, 4, F, h, w); mel_mean, mel_std
(N, 8, 100, 16)), text.safetensors (text_v (U, 77, D_clip), text_a (U, D_clap), row 0 = ""), index.json (clip names,
captions, settings); index.json is written last, so its presence marks a complete cache. No pickles.
Left out: caching augmented views (the paper uses none), random-start crops, compression.
"""
import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from base_models import load_base_models
from data import build_dataset
from support import cli
from support.files import DiskFull, atomic_write, write_text
from support.synthetic import MAX_CLIPS

KEYS = ("video_mean", "video_std", "mel_mean", "mel_std")  # per clip, as BaseModels.encode_video / encode_audio give


def _save(tensors, path):
    """Atomic (files.atomic_write): a crash never leaves a half-written file under the final name."""
    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp))


@torch.no_grad()
def encode_dataset(bases, dataset, out, batch_size=8, shard_size=256, num_workers=0, dtype=torch.float32):
    """Encodes every item of `dataset` (data.build_dataset items) with the frozen encoders of `bases` into `out`."""
    os.makedirs(out, exist_ok=True)
    if os.path.lexists(os.path.join(out, "index.json")):  # an older cache here: incomplete until the new index
        os.remove(os.path.join(out, "index.json"))
    dev, clips, shards, buf = bases.device, [], [], {k: [] for k in KEYS}

    def flush(final=False):  # writes full shards of exactly shard_size clips (and the rest at the end)
        rows = {k: torch.cat(v) for k, v in buf.items()} if buf[KEYS[0]] else {}  # (n, ...) per key
        while rows and (len(rows[KEYS[0]]) >= shard_size or final and len(rows[KEYS[0]])):
            _save({k: v[:shard_size].to(dtype).cpu() for k, v in rows.items()},
                  os.path.join(out, f"shard_{len(shards):05d}.safetensors"))
            shards.append(len(rows[KEYS[0]][:shard_size]))
            rows = {k: v[shard_size:] for k, v in rows.items()}
        for k in KEYS:
            buf[k][:] = [rows[k]] if rows else []
    loader = torch.utils.data.DataLoader(dataset, batch_size, num_workers=num_workers)  # in order: item i = clip i
    for batch in tqdm(loader, desc=f"encoding clips -> {out}"):
        for k, z in zip(KEYS, (*bases.encode_video(batch["video"].to(dev)), *bases.encode_audio(batch["mel"].to(dev)))):
            buf[k].append(z)
        clips += [dict(name=n, caption=c) for n, c in zip(batch["name"], batch["caption"])]
        if len(clips) - sum(shards) >= shard_size:
            flush()
    flush(final=True)
    captions = [""] + sorted({c["caption"] for c in clips} - {""})  # row 0: the dropout caption
    text = [bases.encode_text(captions[i: i + 64]) for i in tqdm(range(0, len(captions), 64), desc="encoding captions")]
    _save({"text_v": torch.cat([t[0] for t in text]).to(dtype).cpu(),  # (U, 77, D_clip)
           "text_a": torch.cat([t[1] for t in text]).to(dtype).cpu()},  # (U, D_clap)
          os.path.join(out, "text.safetensors"))
    info = dict(size=bases.size, fps=bases.fps, video_size=bases.video_size, dtype=str(dtype).split(".")[-1],
                shards=shards, captions=captions, clips=clips)
    write_text(os.path.join(out, "index.json"), json.dumps(info))
    return info


class CachedClips(torch.utils.data.Dataset):
    """Serves a cache folder: items dict(video_mean, video_std, mel_mean, mel_std, text_v, text_a, null_v, null_a,
    caption, name) in the dataset's order (float32 whatever the stored dtype). null_*: the embeddings of "", which
    cached_inputs puts in place of a dropped caption's. size / fps: checked against the cache's, when given."""

    def __init__(self, folder, size=None, fps=None):
        path = os.path.join(folder, "index.json")
        if not os.path.isfile(path):
            raise ValueError(f"no complete cache at {folder} (no index.json): make one with python cache.py --out ...")
        self.folder, self.info = folder, json.load(open(path))
        for key, want in (("size", size), ("fps", fps)):
            if want is not None and self.info[key] != want:
                raise ValueError(f"cache {folder} was made with {key}={self.info[key]}, not {want}")
        self.text = {k: v.float() for k, v in load_file(os.path.join(folder, "text.safetensors")).items()}  # small
        self.row = {c: i for i, c in enumerate(self.info["captions"])}
        self.where = [(s, j) for s, n in enumerate(self.info["shards"]) for j in range(n)]  # clip -> (shard, row)
        self.files = {}  # shard -> safe_open handle, opened lazily (so also inside each DataLoader worker)

    def __len__(self):
        return len(self.where)

    def __getitem__(self, i):
        s, j = self.where[i]
        if s not in self.files:
            self.files[s] = safe_open(os.path.join(self.folder, f"shard_{s:05d}.safetensors"), "pt")
        item = {k: self.files[s].get_slice(k)[j].float() for k in KEYS}  # memory-mapped: reads this clip only
        clip = self.info["clips"][i]
        r = self.row[clip["caption"]]
        return dict(item, text_v=self.text["text_v"][r], text_a=self.text["text_a"][r], null_v=self.text["text_v"][0],
                    null_a=self.text["text_a"][0], caption=clip["caption"], name=clip["name"])


def cached_inputs(batch, captions, device):
    """A cached batch -> (text_v, text_a, mu_v, sd_v, mu_a, sd_a) on `device`, what train.joint_loss would encode.
    captions: the batch's captions after CFG dropout; a dropped one ("") takes the empty caption's embeddings."""
    drop = torch.tensor([c == "" for c in captions])

    def pick(text, null):  # per sample: the caption's embedding, or the empty caption's
        return torch.where(drop.view(-1, *[1] * (text.dim() - 1)), null, text).to(device)
    return (pick(batch["text_v"], batch["null_v"]), pick(batch["text_a"], batch["null_a"]),
            *(batch[k].to(device) for k in KEYS))


def main(argv=None):
    p = cli.Parser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="greatesthits", choices=["greatesthits", "landscape", "vggsound", "synthetic"])
    p.add_argument("--root", default=None, help="folder of prepared clips (as train.py)")
    p.add_argument("--flist", default=None, help="official file list (as train.py)")
    p.add_argument("--size", default="pretrained", choices=["tiny", "full", "pretrained"])
    cli.add_base_args(p, schedules=False)  # as train.py; what the encoders give does not depend on the schedules
    p.add_argument("--fps", type=cli.number(int, 1, 60), default=None,
                   help="8 GreatestHits (4.1.2), 4 Landscape/VGGSound")
    p.add_argument("--num-clips", type=cli.number(int, 1, MAX_CLIPS), default=None,
                   help="synthetic: number of training clips")
    p.add_argument("--out", required=True, help="cache folder")
    p.add_argument("--batch-size", type=cli.number(int, 1, 1024), default=8, help="clips per encoder call")
    p.add_argument("--shard-size", type=cli.number(int, 1, 65536), default=256, help="clips per safetensors file")
    p.add_argument("--num-workers", type=cli.number(int, 0, 64), default=0, help="DataLoader workers decoding clips")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="stored precision")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    fps = a.fps or (4 if a.data in ("landscape", "vggsound") else 8)  # train.py's default
    cli.writable_dir(a.out, "--out")
    if a.size == "pretrained":
        cli.check_weights(a.video_base, a.motion_adapter, a.audio_base)
    try:  # the data first: a bad --root fails in seconds, not after minutes of loading weights
        dataset = build_dataset(a.data, "train", root=a.root, flist=a.flist, fps=fps,
                                size=64 if a.size == "tiny" else 256, num_clips=a.num_clips)
        bases = load_base_models(a.size, device=a.device, fps=fps, video_base=a.video_base,
                                 motion_adapter=a.motion_adapter, audio_base=a.audio_base)
    except (RuntimeError, ValueError) as e:  # weights offline, missing data folder: one line
        cli.fail(str(e))
    try:
        info = encode_dataset(bases, dataset, a.out, a.batch_size, a.shard_size, a.num_workers,
                              {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.precision])
    except DiskFull as e:
        cli.fail(str(e))
    print(f"cached {len(info['clips'])} clips ({len(info['captions'])} distinct captions incl. \"\") in {a.out}; "
          f"train with: python train.py --data {a.data} --size {a.size} --cache {a.out}")


if __name__ == "__main__":
    main()
