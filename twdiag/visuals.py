"""What a person sees in TinyWorlds' image grids, as numbers, plus a contact sheet.

Each PNG is a matplotlib figure with two titled panels: originals (left) and
reconstructions / predictions (right), each a `make_grid` of 64x64 frames.
We decode once, find the panels on the white figure background, sample each
panel back onto make_grid's own pixel lattice (one `resize` with NEAREST on
the panel box: frames are drawn ~4x enlarged), cut it into cells and measure
each panel: pixel spread, distinct colours, a stripe score from the
2-D spectrum, cross-cell similarity (does the output ignore its input?) and,
where cells line up with originals, PSNR and SSIM.
"""
from __future__ import annotations

import io
import struct
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from . import bundle as bundle_mod, forking, safefs
from .bundle import ImageFile
from .rules import SEVERITY_ORDER, Finding

FLAGS = ("flat_color", "striping", "input_independent_output", "low_fidelity")
MAX_LISTED = 30  # per-image entries on stdout; the details file lists all


@dataclass
class ImageResult:
    image: ImageFile
    size: tuple | None = None
    layout: str = "unknown"  # two_panel | two_panel_approx | unknown
    metrics: dict = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)
    why: dict = field(default_factory=dict)  # flag -> which test fired, in words
    error: str | None = None
    thumb: Image.Image | None = None  # reduced image, kept only for sheet steps

    def to_dict(self) -> dict:
        return {"step": self.image.step, "path": str(self.image.path), "size": self.size,
                "layout": self.layout, "flags": self.flags, "why": self.why, "error": self.error,
                "metrics": self.metrics}


# --- decoding and layout ---------------------------------------------------------------

class ImageError(Exception):
    pass


def load(path, t: dict) -> Image.Image:
    """Open and decode a regular file, refusing decompression bombs before decoding."""
    try:
        with safefs.open_regular(path) as fh:
            data = fh.read(t["max_file_bytes"] + 1)
        if len(data) > t["max_file_bytes"]:
            raise ImageError(f"file larger than {t['max_file_bytes']:,} bytes; not decoded")
        im = Image.open(io.BytesIO(data))
        w, h = im.size
        if w * h > t["max_pixels"]:
            im.close()
            raise ImageError(f"decompression bomb guard: {w}x{h} pixels > {t['max_pixels']}; "
                             "not decoded")
        if min(w, h) < 1 or max(w, h) > t["max_aspect"] * min(w, h):
            im.close()  # a 1x100000 PNG is 470 bytes, but its thumbnail would be 640x64,000,000
            raise ImageError(f"declared {w}x{h} pixels: an aspect beyond {t['max_aspect']}:1 is no image grid; "
                             "not decoded")
        im.load()
    except ImageError:
        raise
    except safefs.Unreadable as exc:
        raise ImageError(f"not readable: {exc}")
    except UnidentifiedImageError:
        raise ImageError("not an image Pillow can identify (zero bytes or not a PNG)")
    except Image.DecompressionBombError as exc:
        raise ImageError(f"decompression bomb guard: {exc}")
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, MemoryError) as exc:
        raise ImageError(f"cannot decode: {type(exc).__name__}: {exc}"[:300])
    if im.mode not in ("RGB", "RGBA", "L"):
        im = im.convert("RGBA")
    return im


def _runs(mask: np.ndarray, min_len: int) -> list[tuple[int, int]]:
    edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.astype(np.int8), [0]))))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2]) if b - a >= min_len]


def find_panels(im: Image.Image, t: dict) -> list[tuple[int, int, int, int]]:
    """Image panels on the white figure: (x0, y0, x1, y1), left to right.

    Found on every 4th pixel of the luminance, then each edge is refined to
    the exact full-resolution pixel (the lattice sampling needs it)."""
    lum = np.asarray(im.convert("L"))
    nonwhite = lum[::_STRIDE, ::_STRIDE] < t["background_level"]
    h, w = nonwhite.shape
    boxes = []
    for x0, x1 in _runs(nonwhite.mean(axis=0) > t["panel_fill"], int(w * t["panel_min_size"])):
        rows = _runs(nonwhite[:, x0:x1].mean(axis=1) > 0.5, int(h * t["panel_min_size"]))
        if rows:
            y0, y1 = max(rows, key=lambda r: r[1] - r[0])
            boxes.append(_refine(lum, t["background_level"], x0 * _STRIDE, y0 * _STRIDE,
                                 x1 * _STRIDE, y1 * _STRIDE))
    return boxes


_STRIDE = 4


def _refine(lum: np.ndarray, level: int, x0: int, y0: int, x1: int, y1: int) -> tuple[int, int, int, int]:
    """Move each coarse edge to the first/last full-res line that is mostly
    panel, looking within one stride of it."""
    H, W = lum.shape
    ym, xm = slice(y0 + (y1 - y0) // 4, y1 - (y1 - y0) // 4), slice(x0 + (x1 - x0) // 4, x1 - (x1 - x0) // 4)

    def first(band: np.ndarray, axis: int, lo: int) -> int:
        hits = np.flatnonzero((band < level).mean(axis=axis) > 0.5)
        return lo + int(hits[0]) if hits.size else lo + _STRIDE

    def last(band: np.ndarray, axis: int, lo: int) -> int:
        hits = np.flatnonzero((band < level).mean(axis=axis) > 0.5)
        return lo + int(hits[-1]) + 1 if hits.size else lo

    lx = max(0, x0 - _STRIDE)
    rx = min(W, x1 + _STRIDE)
    ty = max(0, y0 - _STRIDE)
    by = min(H, y1 + _STRIDE)
    return (first(lum[ym, lx:x0 + _STRIDE], 0, lx),
            first(lum[ty:y0 + _STRIDE, xm], 1, ty),
            last(lum[ym, x1 - _STRIDE:rx], 0, x1 - _STRIDE),
            last(lum[y1 - _STRIDE:by, xm], 1, y1 - _STRIDE))


@dataclass
class Grid:
    cells: np.ndarray  # (n, f, f, 3) float32, 0..255
    frame: int
    rows: int
    exact: bool  # sampled on make_grid's own pixel lattice (padding verified)


def _lattice(im: Image.Image, box: tuple, f: int, t: dict):
    """Sample a panel on the lattice of frame size f: (grid, rows, padding
    spread), or None if the panel is too small for f."""
    x0, y0, x1, y1 = box
    cols, pad = t["grid_columns"], 2
    gw = pad + cols * (f + pad)
    scale = (x1 - x0) / gw
    if scale < 1.5:
        return None
    rows = max(1, int(round(((y1 - y0) / scale - pad) / (f + pad))))
    gh = pad + rows * (f + pad)
    g = np.asarray(im.resize((gw, gh), Image.NEAREST, box=box).convert("RGB"), dtype=np.float32)
    lines = np.arange(0, gw, f + pad)
    pad_px = np.concatenate([g[:, lines].reshape(-1, 3), g[:, lines + 1].reshape(-1, 3),
                             g[np.arange(0, gh, f + pad)].reshape(-1, 3)])
    return g, rows, float(pad_px.std(axis=0).max())


def frame_size(im: Image.Image, boxes: list[tuple], t: dict) -> tuple[int, list]:
    """The frame size whose padding lines come out most uniform relative to
    the panels' contrast, with each panel's lattice sample. The usual size is
    taken at once when its padding is exactly uniform in every panel."""
    scores, samples = {}, {}
    for f in t["frame_sizes"]:
        got = [_lattice(im, box, f, t) for box in boxes]
        if any(g is None for g in got):
            continue
        if f == t["frame_sizes"][0] and all(g[2] <= t["pad_exact"] for g in got):
            return f, got
        samples[f] = got
        scores[f] = sum(g[2] / max(float(g[0].reshape(-1, 3).std(axis=0).max()), 1e-6) for g in got)
    if not scores:
        return t["frame_sizes"][0], [None] * len(boxes)
    best = min(scores, key=scores.get)
    return best, samples[best]


def sample_grid(im: Image.Image, box: tuple, f: int, t: dict, got=None) -> Grid:
    """Recover make_grid's pixels from the enlarged drawing.

    matplotlib draws each grid pixel as a block (nearest-neighbour from ~3x
    enlargement up), so sampling block centres gives the grid back exactly:
    the padding lines then come out uniform. Smoothed drawings (below ~3x,
    e.g. 128 px frames) are area-averaged onto the same lattice instead."""
    cols, pad = t["grid_columns"], 2
    got = got if got is not None else _lattice(im, box, f, t)
    if got is not None and got[2] <= t["pad_uniformity"]:
        g, rows = got[0], got[1]
        return Grid(_cells(g, f, rows, cols, pad), f, rows, True)
    x0, y0, x1, y1 = box
    gw = pad + cols * (f + pad)
    rows = max(1, int(round(((y1 - y0) * gw / (x1 - x0) - pad) / (f + pad))))
    g = np.asarray(im.resize((gw, pad + rows * (f + pad)), Image.BOX, box=box).convert("RGB"),
                   dtype=np.float32)
    return Grid(_cells(g, f, rows, cols, pad), f, rows, False)


def _cells(g: np.ndarray, f: int, rows: int, cols: int, pad: int) -> np.ndarray:
    return np.stack([g[pad + r * (f + pad):pad + r * (f + pad) + f,
                       pad + c * (f + pad):pad + c * (f + pad) + f]
                     for r in range(rows) for c in range(cols)])


# --- metrics ------------------------------------------------------------------------------

def _gray(cells: np.ndarray) -> np.ndarray:
    # explicit channel sum: numpy reductions over a length-3 last axis are ~10x slower
    return (cells[..., 0] + cells[..., 1] + cells[..., 2]) / 3


def stripe_score(gray_cells: np.ndarray) -> float:
    """Median over cells of the share of non-DC spectral power in the single
    strongest frequency: ~0.5-0.9 for stripes or one repeated pattern, low
    for natural frames whose power spreads over many frequencies."""
    g = gray_cells - gray_cells.mean(axis=(1, 2), keepdims=True)
    p = np.abs(np.fft.rfft2(g)) ** 2
    p[:, 0, 0] = 0.0
    total = p.sum(axis=(1, 2))
    share = np.where(total > 1e-6, p.max(axis=(1, 2)) / np.maximum(total, 1e-12), 0.0)
    return float(np.median(share))


def cross_cell_spread(gray_cells: np.ndarray) -> float:
    """How different the cells are from each other, relative to the panel's
    contrast: 0 when every cell is the same picture."""
    total = gray_cells.std()
    if total < 1e-6:
        return 0.0
    return float(gray_cells.std(axis=0).mean() / total)


def distinct_colors(cells: np.ndarray) -> int:
    q = (cells.astype(np.uint16) >> 3)  # 32 levels per channel: ignore dither noise
    codes = (q[..., 0] << 10) | (q[..., 1] << 5) | q[..., 2]
    return int(np.unique(codes).size)


def panel_metrics(cells: np.ndarray) -> dict:
    g = _gray(cells)
    cell_std = g.std(axis=(1, 2))
    return {"cells": int(len(cells)), "pixel_std": round(float(g.std()), 3),
            "cell_std_median": round(float(np.median(cell_std)), 3),
            "cell_std": cell_std,
            "distinct_colors": distinct_colors(cells),
            "stripe_score": round(stripe_score(g), 4),
            "cross_cell_spread": round(cross_cell_spread(g), 4)}


def _block_ssim(a: np.ndarray, b: np.ndarray, block: int = 8) -> np.ndarray:
    """SSIM per cell on non-overlapping 8x8 windows (gray, 0..255), averaged
    over windows. a, b: (n, h, w)."""
    n, h, w = a.shape
    h, w = (h // block) * block, (w // block) * block
    if h == 0 or w == 0:
        return np.full(n, np.nan)
    shape = (n, h // block, block, w // block, block)
    a = a[:, :h, :w].reshape(shape)
    b = b[:, :h, :w].reshape(shape)
    ma, mb = a.mean(axis=(2, 4)), b.mean(axis=(2, 4))
    va = (a * a).mean(axis=(2, 4)) - ma * ma
    vb = (b * b).mean(axis=(2, 4)) - mb * mb
    cov = (a * b).mean(axis=(2, 4)) - ma * mb
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2))
    return s.mean(axis=(1, 2))


def input_dependence(orig: np.ndarray, pred: np.ndarray, keep: np.ndarray | None = None) -> float:
    """How much better each output cell matches its own input than the other
    inputs: mean diagonal minus mean off-diagonal of the output x input
    correlation matrix. ~0 when outputs ignore their inputs (one texture for
    all, noise), 0.3-0.7 for faithful reconstructions. With `keep` (dynamics:
    the input's unmasked pixels), each input is compared only where it shows
    the frame, never its grey mask pattern."""
    n = len(orig)
    if n < 2:
        return float("nan")
    o = _gray(orig).reshape(n, -1).astype(np.float64)
    p = _gray(pred).reshape(n, -1).astype(np.float64)
    k = np.ones_like(o) if keep is None else keep.reshape(n, -1).astype(np.float64)
    cnt = np.maximum(k.sum(axis=1), 1.0)                       # pixels kept per input j
    o_mean = (o * k).sum(axis=1) / cnt
    o_var = (o * o * k).sum(axis=1) - cnt * o_mean ** 2        # per j
    s1 = p @ k.T                                                # sum_k p_i k_j
    s2 = (p * p) @ k.T
    cross = p @ (k * o).T                                       # sum_k p_i k_j o_j
    cov = cross - s1 * o_mean[None, :]
    p_var = s2 - s1 ** 2 / cnt[None, :]
    corr = cov / np.sqrt(np.maximum(p_var * o_var[None, :], 1e-12))
    diag = float(np.trace(corr)) / n
    off = float(corr.sum() - np.trace(corr)) / (n * n - n)
    return diag - off


def fidelity(orig: np.ndarray, pred: np.ndarray, mask_grey: bool, cols: int = 4) -> dict:
    """PSNR and SSIM, cell by cell, for aligned cells. With `mask_grey`
    (dynamics), the grey masked patches of the input are left out of PSNR."""
    keep = np.ones(orig.shape[:3], bool)
    if mask_grey:
        r, g, b = orig[..., 0], orig[..., 1], orig[..., 2]
        spread = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)
        v = _gray(orig)
        keep = ~((spread < 6) & (v > 100) & (v < 156))
    counts = keep.sum(axis=(1, 2))
    use = counts >= 0.05 * keep[0].size
    if not use.any():
        return {}
    def psnr_of(guess: np.ndarray) -> float:
        sq = _gray((orig - guess) ** 2)
        mse = (sq * keep).sum(axis=(1, 2))[use] / counts[use]
        return float(np.median(np.where(mse < 1e-10, 99.0, 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10)))))

    psnr = psnr_of(pred)
    ssim = _block_ssim(_gray(orig[use]), _gray(pred[use]))
    # References from the same grid: what a model that learned nothing about
    # the frames would score on these pixels. Fidelity is read as a gain over them.
    refs = {"mean_frame": psnr_of(np.broadcast_to(orig.mean(axis=0), orig.shape)),
            "background": psnr_of(np.broadcast_to(np.median(orig, axis=0), orig.shape)),
            "black_frame": psnr_of(np.zeros_like(orig))}
    if mask_grey and len(orig) >= cols and len(orig) % cols == 0:
        prev = orig.copy()
        prev[1:] = orig[:-1]
        prev[::cols] = orig[::cols]  # a row's first frame has no earlier one: itself
        refs["copy_previous_frame"] = psnr_of(prev)
    best = max(refs, key=refs.get)
    return {"psnr_db": round(psnr, 3), "ssim": round(float(np.nanmean(ssim)), 4),
            "input_dependence": round(input_dependence(orig, pred, keep if mask_grey else None), 4),
            "cells_compared": int(use.sum()),
            "reference_psnr_db": {k: round(v, 3) for k, v in refs.items()},
            "best_reference": best, "gain_over_best_reference_db": round(psnr - refs[best], 3)}


def _aligned(stage: str, orig: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Pairs of (original, prediction) cells that show the same frame."""
    if len(orig) == len(pred):
        return orig, pred
    if stage == "latent_actions" and len(orig) == 16 and len(pred) == 12:
        # predictions are frames 1..3 of each 4-frame sequence, row-major
        idx = [(i // 3) * 4 + i % 3 + 1 for i in range(12)]
        return orig[idx], pred
    return None


def analyse_image(img: ImageFile, t: dict, keep_thumb: bool = False) -> ImageResult:
    res = ImageResult(img)
    try:
        im = load(img.path, t)
    except ImageError as exc:
        res.error = str(exc)
        return res
    with im:
        res.size = im.size
        if keep_thumb:
            res.thumb = _thumbnail(im, t)
        boxes = find_panels(im, t)
        if len(boxes) != 2:
            whole = np.asarray(im.convert("RGB").reduce(t["reduce"]), dtype=np.float32)
            res.metrics = {"image": _strip(panel_metrics(whole[None])), "panels_found": len(boxes)}
            return res
        f, lattices = frame_size(im, boxes, t)
        left, right = (sample_grid(im, box, f, t, got) for box, got in zip(boxes, lattices))
    res.layout = "two_panel" if left.exact and right.exact else "two_panel_approx"
    orig, pred = left.cells, right.cells
    m_in, m_out = panel_metrics(orig), panel_metrics(pred)
    res.metrics = {"grid": {"frame": left.frame, "original_cells": len(orig),
                            "output_cells": len(pred), "exact": left.exact and right.exact},
                   "original": _strip(m_in), "output": _strip(m_out)}
    pairs = _aligned(img.stage, orig, pred)
    if pairs is not None and pairs[0].shape == pairs[1].shape:
        res.metrics["fidelity"] = fidelity(*pairs, mask_grey=img.stage == "dynamics", cols=t["grid_columns"])
    res.flags, res.why = image_flags(m_in, m_out, res.metrics.get("fidelity", {}), t)
    res.metrics["output"]["flat_share"] = m_out["flat_share"]
    return res


def _thumbnail(im: Image.Image, t: dict) -> Image.Image:
    thumb = im.convert("RGB") if im.mode != "RGB" else im.copy()
    thumb.thumbnail((t["thumb_width"], t["thumb_width"]), Image.BOX)
    return thumb


def _strip(m: dict) -> dict:
    return {k: v for k, v in m.items() if k != "cell_std"}


def image_flags(m_in: dict, m_out: dict, fid: dict, t: dict) -> tuple[list[str], dict]:
    """Flags, and for each the test that fired (in words, with its numbers)."""
    flags, why = [], {}
    flat_level = max(t["flat_cell_std"], t["flat_relative"] * m_in["cell_std_median"])
    flat_share = float((m_out["cell_std"] < flat_level).mean())
    m_out["flat_share"] = round(flat_share, 3)
    if flat_share >= t["flat_share"]:
        flags.append("flat_color")
        why["flat_color"] = f"{flat_share:.0%} of output cells are flat (gray std < {flat_level:.3g})"
    if (m_out["stripe_score"] >= t["stripe_score"]
            and m_out["stripe_score"] >= t["stripe_vs_input"] * m_in["stripe_score"]):
        flags.append("striping")
        why["striping"] = (f"one spatial frequency holds {m_out['stripe_score']:.0%} of the output's power "
                           f"({m_in['stripe_score']:.0%} in the inputs)")
    ratio = m_out["cross_cell_spread"] / max(m_in["cross_cell_spread"], 1e-9)
    identical = (m_in["cross_cell_spread"] >= t["min_input_spread"] and ratio < t["independent_ratio"])
    dep = fid.get("input_dependence") if fid else None
    ignores = dep is not None and dep < t["min_input_dependence"]
    if "flat_color" not in flags and (identical or ignores):
        flags.append("input_independent_output")
        parts = []
        if identical:
            parts.append(f"output cells are near-identical (cross-cell spread {ratio:.2f}x the inputs')")
        if ignores:
            parts.append(f"each output matches its own input no better than the others "
                         f"(input dependence {dep:.3f} < {t['min_input_dependence']})")
        why["input_independent_output"] = "; ".join(parts)
    if fid and not flags and (fid["gain_over_best_reference_db"] < t["min_gain_db"] or fid["ssim"] < t["ssim_min"]):
        flags.append("low_fidelity")
        why["low_fidelity"] = (f"PSNR {fid['psnr_db']:.1f} dB, SSIM {fid['ssim']:.2f}; on the same pixels the "
                               f"{fid['best_reference'].replace('_', ' ')} scores "
                               f"{fid['reference_psnr_db'][fid['best_reference']]:.1f} dB "
                               f"(gain {fid['gain_over_best_reference_db']:+.1f} dB)"
                               if fid.get("best_reference") else f"PSNR {fid['psnr_db']:.1f} dB, SSIM {fid['ssim']:.2f}")
    return flags, why


# --- per stage -----------------------------------------------------------------------------

def sheet_steps(n: int, count: int) -> list[int]:
    """Indexes spread evenly: always the first and the latest, then the middle."""
    if n <= count:
        return list(range(n))
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, count)})


def quality(r: ImageResult) -> float | None:
    fid = r.metrics.get("fidelity") or {}
    return fid.get("psnr_db")


def trend(results: list[ImageResult], t: dict) -> dict:
    """How the images moved over all of them, not just first against last:
    PSNR per image (where cells align) and the share of collapse flags.

    improving: better than the start (the last third against the first), and
    not flat over the last `plateau_min_images` images;
    plateau: better than the start, but flat since `plateau_since_step` for at
    least `plateau_min_images` images (one flat interval is not a plateau);
    degrading: the last third `degrade_db` worse than the first or middle
    one, or collapse flags grew (each grid shows a different random batch, so
    a small drop is sampling noise); flat: no real change."""
    ok = [r for r in results if r.error is None and r.layout.startswith("two_panel")]
    if len(ok) < t["trend_min_images"]:
        return {"trend": "unknown", "reason": f"{len(ok)} analysable images"}
    parts = [list(p) for p in np.array_split(np.arange(len(ok)), 3)]
    early, late = [ok[i] for i in parts[0]], [ok[i] for i in parts[-1]]
    collapse = ("flat_color", "striping", "input_independent_output")
    bad_early = sum(any(f in r.flags for f in collapse) for r in early) / len(early)
    bad_late = sum(any(f in r.flags for f in collapse) for r in late) / len(late)
    out = {"steps": [r.image.step for r in ok], "early_steps": [r.image.step for r in early],
           "late_steps": [r.image.step for r in late],
           "collapse_share_early": round(bad_early, 3), "collapse_share_late": round(bad_late, 3)}
    q = [quality(r) for r in ok]
    recent = overall = None
    if all(x is not None for x in q):
        out["psnr_db"] = [round(x, 2) for x in q]
        means = [float(np.mean([q[i] for i in part])) for part in parts]
        overall, recent = means[-1] - means[0], means[-1] - means[1]
        since = next(i for i in range(len(q)) if all(abs(x - q[-1]) < t["trend_db"] for x in q[i:]))
        out.update(psnr_early_db=round(means[0], 3), psnr_mid_db=round(means[1], 3),
                   psnr_late_db=round(means[-1], 3), psnr_delta_db=round(overall, 3),
                   psnr_recent_delta_db=round(recent, 3), plateau_since_step=ok[since].image.step)
    if bad_late > bad_early or (recent is not None and recent <= -t["degrade_db"]) or \
            (overall is not None and overall <= -t["degrade_db"]):
        out["trend"] = "degrading"
    elif overall is not None and overall >= t["trend_db"] and \
            len(ok) - ok.index(next(r for r in ok if r.image.step == out["plateau_since_step"])) \
            >= t["plateau_min_images"]:
        out["trend"] = "plateau"
    elif (overall is not None and overall >= t["trend_db"]) or (recent is not None and recent >= t["trend_db"]) \
            or (overall is None and bad_late < bad_early):
        out["trend"] = "improving"
    else:
        out["trend"] = "flat"
    return out


def _onset(ok: list[ImageResult], flag: str) -> int:
    """First step of the run of images, up to the latest, that carry `flag`."""
    i = len(ok) - 1
    while i > 0 and flag in ok[i - 1].flags:
        i -= 1
    return ok[i].image.step


def stage_findings(stage: str, results: list[ImageResult], tr: dict, t: dict) -> tuple[list[Finding], dict]:
    """(findings, onsets of the critical ones)."""
    ok = [r for r in results if r.error is None]
    out: list[Finding] = []
    onsets: dict[str, int] = {}
    if not ok:
        return out, onsets
    latest = ok[-1]
    first, last = ok[0].image.step, latest.image.step
    late = [r for r in ok if r.image.step >= first + (1 - t["late_fraction"]) * (last - first)]
    for flag in FLAGS:
        hit = [r for r in ok if flag in r.flags]
        if not hit:
            continue
        share = sum(flag in r.flags for r in late) / len(late)
        if flag in latest.flags and share >= t["persist_share"]:
            sev = t["severity"][flag]
            when = f"in {share:.0%} of late images, including the latest"
            if tr.get("trend") == "improving" and flag in t["improving_downgrades"]:
                sev, when = "info", when + ", but images are improving (still learning)"
        elif flag in latest.flags:
            sev, when = "watch", "in the latest image"
        else:
            sev, when = "info", "only in earlier images (typical early in training)"
        ev = hit[-1]
        if sev == "critical":
            onsets[flag] = _onset(ok, flag)
        out.append(Finding(flag, sev, stage, _flag_metric(flag), _flag_value(flag, ev),
                           _flag_threshold(flag, t), [r.image.step for r in hit], str(ev.image.path),
                           f"{_FLAG_TEXT[flag]} {when}: {ev.why.get(flag, '')} (step {ev.image.step})"))
    if tr.get("trend") == "degrading":
        out.append(Finding("visual_degrading", t["severity"]["degrading"], stage, "trend",
                           tr.get("psnr_recent_delta_db", tr.get("collapse_share_late")), t["trend_db"],
                           tr["late_steps"], str(latest.image.path),
                           "late images look worse than earlier ones"
                           + (f" (PSNR by image {tr['psnr_db']} dB)" if tr.get("psnr_db") else "")))
    return out, onsets


_FLAG_TEXT = {
    "flat_color": "output cells are flat colour blocks",
    "striping": "output is dominated by one spatial frequency (stripes or a repeated pattern)",
    "input_independent_output": "outputs do not follow their inputs",
    "low_fidelity": "outputs score below what painting the grid's mean frame, background or black scores (or low SSIM)",
}


def _flag_metric(flag: str) -> str:
    return {"flat_color": "output.flat_share", "striping": "output.stripe_score",
            "input_independent_output": "fidelity.input_dependence (or output/original cross_cell_spread)",
            "low_fidelity": "fidelity.gain_over_best_reference_db"}[flag]


def _flag_value(flag: str, r: ImageResult):
    m = r.metrics
    if flag == "flat_color":
        return m["output"].get("flat_share")
    if flag == "striping":
        return m["output"]["stripe_score"]
    if flag == "input_independent_output":
        fid = m.get("fidelity") or {}
        if "input_dependence" in fid:
            return fid["input_dependence"]
        return round(m["output"]["cross_cell_spread"] / max(m["original"]["cross_cell_spread"], 1e-9), 4)
    return (m.get("fidelity") or {}).get("gain_over_best_reference_db")


def _flag_threshold(flag: str, t: dict):
    return {"flat_color": t["flat_share"], "striping": t["stripe_score"],
            "input_independent_output": t["min_input_dependence"], "low_fidelity": t["min_gain_db"]}[flag]


# --- contact sheet ---------------------------------------------------------------------------

SEVERITY_COLOURS = {"critical": (200, 30, 30), "watch": (225, 140, 0), "info": (90, 90, 90),
                    None: (40, 140, 60)}


def contact_sheet(rows: list[tuple[str, list[ImageResult], dict]], t: dict) -> Image.Image | None:
    """One row per stage: a header band coloured by the stage's worst image
    finding, then thumbnails labelled with step, PSNR and flags (each label
    in its flag's severity colour). Long side capped for image viewers."""
    rows = [(s, [r for r in rs if r.thumb is not None], sev) for s, rs, sev in rows]
    rows = [(s, rs, sev) for s, rs, sev in rows if rs]
    if not rows:
        return None
    ncols = max(len(rs) for _, rs, _ in rows)
    gap, header_h, label_h = 10, 34, 48
    thumb_w = int(min(t["thumb_width"], (t["sheet_max_side"] - gap * (ncols + 1)) / ncols))
    ratio = max(r.thumb.height / r.thumb.width for _, rs, _ in rows for r in rs)
    thumb_h = int(thumb_w * ratio)
    row_h = header_h + label_h + thumb_h + gap
    sheet = Image.new("RGB", (gap + ncols * (thumb_w + gap), gap + len(rows) * row_h), "white")
    draw = ImageDraw.Draw(sheet)
    head, small = _font(22), _font(17)
    for i, (stage, rs, severity) in enumerate(rows):
        y = gap + i * row_h
        worst = _worst(severity.values())  # flags and stage-level image findings (recon_fidelity_low)
        colour = SEVERITY_COLOURS[worst]
        draw.rectangle([gap, y, sheet.width - gap, y + header_h - 4], fill=colour)
        draw.text((gap + 8, y + 4), f"{stage}: worst image finding {worst or 'none'}",
                  fill="white", font=head)
        for j, r in enumerate(rs):
            x = gap + j * (thumb_w + gap)
            psnr = quality(r)
            sev = _worst(severity.get(f) for f in r.flags)
            # Two lines (step and PSNR, then flags), each cut to the thumbnail's
            # width so that a long flag list never runs into the next cell.
            lines = [f"step {r.image.step}" + (f" · PSNR {psnr:.1f} dB" if psnr is not None else ""),
                     ", ".join(r.flags)]
            for k, line in enumerate(lines):
                draw.text((x, y + header_h + k * (label_h // 2)), _fit(draw, line, small, thumb_w),
                          fill=SEVERITY_COLOURS[sev] if r.flags else "black", font=small)
            thumb = r.thumb.copy()
            thumb.thumbnail((thumb_w, thumb_h))
            ty = y + header_h + label_h
            sheet.paste(thumb, (x, ty))
            if sev in ("critical", "watch"):
                draw.rectangle([x - 3, ty - 3, x + thumb.width + 2, ty + thumb.height + 2],
                               outline=SEVERITY_COLOURS[sev], width=4)
    if max(sheet.size) > t["sheet_max_side"]:
        sheet.thumbnail((t["sheet_max_side"], t["sheet_max_side"]))
    return sheet


def _worst(severities) -> str | None:
    """The most severe of these (None entries ignored), or None."""
    return min((s for s in severities if s), key=SEVERITY_ORDER.__getitem__, default=None)


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _font(size: int):
    for name in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


# --- whole bundle ------------------------------------------------------------------------------

def _cached(img: ImageFile, t: dict, keep_thumb: bool, cache: dict | None) -> ImageResult:
    """analyse_image, reusing an earlier result for an unchanged file. Only
    the contact sheet's picks keep a thumbnail (memory stays flat)."""
    if cache is None:
        return analyse_image(img, t, keep_thumb)
    try:
        st = safefs.check_regular(img.path)
        sig = (st.st_size, st.st_mtime_ns, st.st_ino)
    except safefs.Unreadable:
        sig = None
    hit = cache.get(str(img.path))
    if hit is None or hit[0] != sig:
        res = analyse_image(img, t, keep_thumb)
        cache[str(img.path)] = (sig, res)
        return res
    res = hit[1]
    if keep_thumb and res.thumb is None and res.error is None:
        try:
            with load(img.path, t) as im:
                res.thumb = _thumbnail(im, t)
        except ImageError:
            pass
    elif not keep_thumb:
        res.thumb = None
    return res


def _guarded(img: ImageFile, t: dict, keep_thumb: bool, cache: dict | None) -> ImageResult:
    try:
        return _cached(img, t, keep_thumb, cache)
    except Exception as exc:  # one odd image never stops the report
        return ImageResult(img, error=f"analysis failed: {type(exc).__name__}: {exc}"[:300])


def _attach(b: bundle_mod.Bundle, analysed: dict) -> bool:
    """Point results computed in another process at this bundle's own image
    records (whose steps the pipeline may have placed on a resumed run's
    global axis since); False when they do not match image for image."""
    for stage, results in analysed.items():
        imgs = b.stages[stage].images if stage in b.stages else []
        if [str(r.image.path) for r in results] != [str(i.path) for i in imgs]:
            return False
    for stage, results in analysed.items():
        for r, img in zip(results, b.stages[stage].images):
            r.image = img
    return True


def _analysed(b: bundle_mod.Bundle, t: dict, count: int, progress, cache: dict | None,
              parallel: bool = True) -> dict:
    """stage -> [ImageResult], in image order. Without a cache (one-shot
    runs) the images are analysed in forked workers: PNG decoding is most of
    the time, and each core decodes at its own pace (0.58 -> 0.40 s on the
    unhealthy example). This was slower until OpenBLAS's spinning thread
    pool was kept out (`forking.serial_blas`)."""
    jobs = _jobs(b, count)
    results = []
    if parallel and cache is None and len(jobs) > 1 and forking.can_fork():
        if progress:
            progress(f"{len(jobs)} images, in {min(len(jobs), forking.cpus(), forking.MAX_WORKERS)} workers")
        results = forking.starmap(_guarded, [(img, t, keep, None) for _, img, keep in jobs])
    else:
        for k, (stage, img, keep) in enumerate(jobs):
            results.append(_guarded(img, t, keep, cache))
            if progress and (k + 1) % 50 == 0:
                progress(f"{k + 1}/{len(jobs)} images")
    return _by_stage(jobs, results)


def _jobs(b: bundle_mod.Bundle, count: int) -> list[tuple]:
    """(stage, image, keep a thumbnail?) of every image, in stage and image order."""
    jobs = []
    for stage in b.ordered_stages():
        imgs = b.stages[stage].images
        picks = set(sheet_steps(len(imgs), count)) if imgs else set()
        jobs += [(stage, img, i in picks) for i, img in enumerate(imgs)]
    return jobs


def _by_stage(jobs: list[tuple], results: list) -> dict:
    out: dict = {}
    for (stage, _, _), res in zip(jobs, results):
        out.setdefault(stage, []).append(res)
    return out


def analyse_taken(jobs: list[tuple], t: dict, take) -> dict[int, ImageResult]:
    """The jobs (`_jobs`) whose numbers `take()` hands out, until it hands
    out None: {number: result}. Each image needs nothing but its file, so a
    process can take some while another takes the rest."""
    out = {}
    while (i := take()) is not None:
        _, img, keep = jobs[i]
        out[i] = _guarded(img, t, keep, None)
    return out


class SharedImages:
    """diagnose's images, analysed by a child forked at discovery (the other
    core is free while this process imports and reads logs and checkpoints)
    and by this process once its own analyses are done: both take the next
    image from one count in shared memory (`forking.Counter`), so neither
    waits while images are left. `result()` is what `analyse` takes as
    `analysed`: stage -> [ImageResult]; an image the child took but never
    answered for (it died) is analysed here."""

    def __init__(self, b: bundle_mod.Bundle, thresholds: dict, count: int | None):
        self.t = thresholds["visuals"]
        self.jobs = _jobs(b, count or self.t["sheet_count"])
        self.taken = forking.Counter(shared=True)
        self.child = forking.Pending(analyse_taken, self.jobs, self.t, self._take, here=False)

    def _take(self) -> int | None:
        return self.taken.claim(1, len(self.jobs))

    def result(self) -> dict:
        mine = analyse_taken(self.jobs, self.t, self._take)  # first: help while the child works
        done = {**(self.child.result() or {}), **mine}
        return _by_stage(self.jobs, [done[i] if i in done else _guarded(img, self.t, keep, None)
                                     for i, (_, img, keep) in enumerate(self.jobs)])

    def cancel(self) -> None:
        self.child.cancel()


def analyse(b: bundle_mod.Bundle, thresholds: dict, count: int | None = None, progress=None,
            cache: dict | None = None, analysed: dict | None = None) -> dict:
    """Analyse every stage's images; returns the compact document, per-image
    details and the contact sheet's rows (drawn by `sheet`). `analysed`:
    `analyse_images`' result for this bundle, computed elsewhere."""
    t = thresholds["visuals"]
    count = count or t["sheet_count"]
    doc: dict = {"stages": {}, "skipped": []}
    details, sheet_rows = {}, []
    if analysed is None or not _attach(b, analysed):
        analysed = _analysed(b, t, count, progress, cache)
    for stage, results in analysed.items():
        imgs = b.stages[stage].images
        tr = trend(results, t)
        findings, onsets = stage_findings(stage, results, tr, t)
        doc["stages"][stage] = stage_document(stage, results, tr, findings, onsets)
        bad = [{"path": str(r.image.path), "reason": r.error} for r in results if r.error]
        doc["skipped"] += bad[:MAX_LISTED]
        if len(bad) > MAX_LISTED:
            doc["skipped"].append({"path": str(imgs[0].path.parent),
                                   "reason": f"{len(bad) - MAX_LISTED} more unreadable images (see visuals.json)"})
        details[stage] = [r.to_dict() for r in results]
        sheet_rows.append((stage, [r for r in results if r.thumb is not None]))
    b.skipped += doc["skipped"]
    return {"doc": doc, "details": details, "sheet_rows": sheet_rows}


def sheet(res: dict, thresholds: dict) -> Image.Image | None:
    """The contact sheet of an `analyse` result, coloured by its stage
    documents' findings as they stand when it is drawn: diagnose first
    reconciles them with the other stages (crossstage), so the sheet never
    shows red where the verdict says the images do not count."""
    stages = res["doc"]["stages"]
    rows = [(stage, rs, {f["rule_id"]: f["severity"] for f in stages[stage]["findings"]})
            for stage, rs in res["sheet_rows"]]
    return contact_sheet(rows, thresholds["visuals"])


def stage_document(stage: str, results: list[ImageResult], tr: dict, findings: list[Finding],
                   onsets: dict) -> dict:
    from .rules import findings_dicts, stage_verdict
    ok = [r for r in results if r.error is None]
    latest = ok[-1] if ok else None
    return {"verdict": stage_verdict(findings, enough_data=bool(ok)),
            "images": len(results), "analysed": len(ok), "errors": len(results) - len(ok),
            "steps": [results[0].image.step, results[-1].image.step] if results else None,
            "layouts": sorted({r.layout for r in ok}),
            "latest": latest.to_dict() if latest else None,
            # bounded for stdout: the latest flagged steps (visuals.json has all)
            "flags_by_step": {r.image.step: r.flags for r in [r for r in ok if r.flags][-MAX_LISTED:]},
            "flagged_images": sum(bool(r.flags) for r in ok),
            "trend": tr, "onsets": onsets, "findings": findings_dicts(findings)}
