"""The offline stand-in for GreatestHits (Sec. 4.1.1; not in the paper): a stick hits an object and each hit sounds at
its frame, the material setting the sound, the caption naming it ("A person is hitting a red wooden box with a stick."):
an alignment the tiny CPU demo can learn and av_align.py measure. Left out: people, camera motion, backgrounds."""
import math
import os

import numpy as np
from tqdm import tqdm

from support.media import SR, write_mp4, write_wav

TEST_SEED = 10 ** 6  # synthetic clips: train seeds 0.., held-out test seeds 10**6..
MAX_CLIPS = TEST_SEED  # per split: more training seeds would reach the test seeds
FPS = (2, 60)  # frame rates the clips can take: at 1 fps a 4-s clip has no room for 2 hits 0.5 s apart

COLOURS = dict(red=(215, 45, 40), green=(50, 170, 60), blue=(45, 85, 215), yellow=(235, 205, 40), white=(235, 235, 230))
SHAPES = ("box", "ball", "bowl")
# material -> (f0 range Hz, partial ratios, decays s, click): wood low, short; metal ringing; glass high; plastic dull
MATERIALS = dict(wooden=((150, 350), (1, 2.76, 5.4), (0.08, 0.04, 0.02), 0.5),
                 metal=((500, 1100), (1, 2.76, 5.4, 8.93), (0.9, 0.6, 0.35, 0.2), 0.2),
                 glass=((1800, 3000), (1, 2.32, 4.25), (0.4, 0.25, 0.12), 0.1),
                 plastic=((250, 500), (1, 1.6, 2.3), (0.025, 0.015, 0.01), 0.8))
# stick lowering in px (at 64x64; 14: on the object) at frames k-3 .. k+3 of a hit at k: fast down, slower up, so the
# optical flow peaks strictly at k even for hits 4 frames apart; steps <= 8 px, which Farneback tracks (10 px: lost)
STROKE = (1, 3, 6, 14, 9, 5, 2)

def synthetic_clip(seed, size=64, fps=8, seconds=4.0, sr=SR):
    """A seeded sounding video: a <colour> <material> <shape> hit by a stick; a hit at frame k sounds at k / fps."""
    rng = np.random.default_rng(seed)
    colour, shape, material = (rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(MATERIALS)))
    n_f, n_a, s = round(fps * seconds), round(sr * seconds), size
    n, gap = int(rng.integers(2, 6)), max(1, math.ceil(0.5 * fps))  # 2-5 hits, >= 0.5 s apart, at frames 2..F-2
    slots = np.sort(rng.choice(n_f - 3 - (n - 1) * (gap - 1), n, replace=False))  # (flow can't peak at 0, 1, F-1)
    hits = [int(slot + i * (gap - 1) + 2) for i, slot in enumerate(slots)]
    # --- picture: background, table, object (material shows as texture), stick lowered by `low[f]`
    y, x = np.mgrid[0:s, 0:s] / s  # (H, W) coordinates in [0, 1)
    img = np.ones((s, s, 3)) * rng.uniform(150, 220, 3)  # light wall: the dark stick must stand out in grey levels
    img[y > 0.8] = rng.uniform(60, 120, 3)  # table top
    cx, r = 0.5 + rng.uniform(-0.12, 0.12), rng.uniform(0.18, 0.26)  # large: the tiny latent is only 8x8
    top = 0.8 - dict(box=r, ball=1.5 * r, bowl=r)[shape]
    mask = dict(box=(abs(x - cx) < r) & (y > top) & (y <= 0.8), ball=(x - cx) ** 2 + (y - 0.8 + 0.75 * r) ** 2 < (
        0.75 * r) ** 2, bowl=((x - cx) ** 2 + (y - top) ** 2 < r * r) & (y > top))[shape]
    shade = dict(wooden=0.85 + 0.15 * np.sin(40 * y + 6 * x) ** 2, metal=0.6 + 0.6 * (x - cx + r) / (2 * r),
                 glass=0.7 + 0.3 * ((x - cx) ** 2 + (y - top) ** 2 < (r / 3) ** 2), plastic=np.ones_like(x))[material]
    img[mask] = np.array(COLOURS[colour]) * shade[mask, None]
    img += rng.uniform(-30, 30, (s, s, 1))  # grain: Farneback flow of flat areas turns to noise after H.264
    low = np.zeros(n_f + 6)  # low[f + 3] belongs to frame f
    for k in hits:
        low[k: k + 7] = np.maximum(low[k: k + 7], STROKE)
    frames = np.repeat(np.clip(img, 0, 255)[None].astype(np.uint8), n_f, 0)  # (F, H, W, 3)
    grain, x0 = rng.uniform(-30, 30, (2 * s, s, 1)), int(round(cx * s))  # the stick's grain moves with it
    # a head of 3 x 1.5 latent cells (24 x 12 px at 64x64): its strike survives the tiny codec's 8x8 averaging
    hw, head_w, head_h, top_px = max(1, s // 16), 3 * s // 8, max(2, 3 * s // 16), int(round(top * s))
    rest = min(14 * s / 64, top_px - head_h - 1)  # head 14/64 above the object at rest (less above a tall ball)
    for f in range(n_f):
        bottom = top_px - int(round(rest * (1 - low[f + 3] / 14)))  # head's lower edge; on the object at a hit
        b0 = max(0, bottom - head_h)
        frames[f, :b0, x0 - hw: x0 + hw] = np.clip(grain[s - b0: s, :2 * hw] + (95, 60, 30), 0, 255)  # dark brown
        frames[f, b0:bottom, x0 - head_w // 2: x0 + head_w // 2] = np.clip(
            grain[s: s + bottom - b0, : head_w // 2 * 2] + (45, 45, 50), 0, 255)
    # --- sound: per hit an onset noise burst plus modal decaying sinusoids starting exactly at k / fps
    (f_lo, f_hi), ratios, decays, click = MATERIALS[material]
    f0, audio = rng.uniform(f_lo, f_hi), np.zeros(n_a)
    for k in hits:
        s0 = round(k / fps * sr)
        t = np.arange(n_a - s0, dtype=np.float32) / sr  # float32: twice as fast, plenty for audio
        jit = rng.uniform(0.97, 1.03, len(ratios)).astype(np.float32)
        modes = sum(np.exp(-t / d) * np.sin(2 * np.pi * f0 * q * j * t) / (1 + i) for i, (q, d, j)
                    in enumerate(zip(ratios, decays, jit)) if f0 * q * j < 0.45 * sr)  # no partial above Nyquist
        burst = click * rng.standard_normal(len(t), np.float32) * np.exp(-t / 0.004)
        audio[s0:] += rng.uniform(0.6, 1.0) * (modes + burst)
    audio = (0.8 * audio / np.abs(audio).max()).astype(np.float32)
    caption = f"A person is hitting a {colour} {material} {shape} with a stick."
    return dict(frames=frames, audio=audio, caption=caption, hit_times=[k / fps for k in hits])

def write_synthetic(out, num, fps=8, size=64, split="test"):
    """Clips as <name>.mp4 (with sound) + .wav and captions.txt (the official list format), e.g. metrics.py --ref."""
    os.makedirs(out, exist_ok=True)
    first, lines = TEST_SEED if split == "test" else 0, []
    for s in tqdm(range(first, first + num), desc=f"writing {num} synthetic clips"):
        c, name = synthetic_clip(s, size, fps), f"synth_{s:07d}"
        write_wav(os.path.join(out, name + ".wav"), c["audio"])
        write_mp4(os.path.join(out, name + ".mp4"), c["frames"], fps, c["audio"])
        lines.append(f'{name}.mp4,"{c["caption"]}"\n')
    open(os.path.join(out, "captions.txt"), "w").write("".join(lines))
    print(f"wrote {num} clips (.mp4 + .wav) and captions.txt to {out}")
