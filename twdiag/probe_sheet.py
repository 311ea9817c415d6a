"""The probe sheet: what the probe measured, as a person would check it.

One labelled row per picture the child saved (real frames, the tokenizer's
reconstructions, dynamics rollouts with inferred and with random actions),
each row the first two sequences side by side, frames enlarged without
smoothing so single pixels stay visible.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

ROWS = (("real", "real frames (the probe's sample)"),
        ("tokenizer_recon", "video_tokenizer: reconstruction"),
        ("dynamics_real", "dynamics: real frames"),
        ("rollout_inferred", "dynamics: generated from frame 1, inferred actions"),
        ("rollout_random", "dynamics: generated from frame 1, random actions"))


def sheet(pictures: dict[str, np.ndarray], scale: int = 2, sequences: int = 2) -> Image.Image | None:
    from .visuals import _font
    same = "dynamics_real" in pictures and "real" in pictures and np.array_equal(pictures["real"], pictures["dynamics_real"])
    rows = [(label, pictures[key]) for key, label in ROWS
            if key in pictures and pictures[key].ndim == 5 and not (same and key == "dynamics_real")]
    if not rows:
        return None
    gap, label_h = 8, 26
    strips = [_strip(arr[:sequences], scale, gap) for _, arr in rows]
    width = max(s.width for s in strips) + 2 * gap
    out = Image.new("RGB", (width, sum(label_h + s.height + gap for s in strips) + gap), "white")
    draw, font = ImageDraw.Draw(out), _font(16)
    y = gap
    for (label, _), strip in zip(rows, strips):
        draw.text((gap, y + 3), label, fill="black", font=font)
        out.paste(strip, (gap, y + label_h))
        y += label_h + strip.height + gap
    return out


def _strip(seqs: np.ndarray, scale: int, gap: int) -> Image.Image:
    """Sequences [B,T,H,W,3] uint8 side by side, a wider gap between sequences."""
    B, T, H, W = seqs.shape[:4]
    w, h = W * scale, H * scale
    out = Image.new("RGB", (B * T * (w + 2) + (B - 1) * gap * 2, h), "white")
    x = 0
    for b in range(B):
        for t in range(T):
            out.paste(Image.fromarray(seqs[b, t]).resize((w, h), Image.NEAREST), (x, 0))
            x += w + 2
        x += gap * 2
    return out
