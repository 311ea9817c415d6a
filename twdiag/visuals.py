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

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from . import bundle
from .rules import Finding

# File-name stems per stage (TinyWorlds' own names).
NAME_STAGE = (("video_tokenizer_recon", "video_tokenizer"),
              ("reconstructions_latent_actions", "latent_actions"),
              ("dynamics_prediction", "dynamics"))
_STEP = re.compile(r"_step_(\d+)\.png$", re.IGNORECASE)
FLAGS = ("flat_color", "striping", "input_independent_output", "low_fidelity")
MAX_LISTED = 30  # per-image entries on stdout; the details file lists all


@dataclass
class ImageFile:
    stage: str
    step: int
    path: Path


@dataclass
class ImageResult:
    image: ImageFile
    size: tuple | None = None
    layout: str = "unknown"  # two_panel | two_panel_approx | unknown
    metrics: dict = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)
    error: str | None = None
    thumb: Image.Image | None = None  # reduced image, kept only for sheet steps

    def to_dict(self) -> dict:
        return {"step": self.image.step, "path": str(self.image.path), "size": self.size,
                "layout": self.layout, "flags": self.flags, "error": self.error,
                "metrics": self.metrics}


# --- discovery ---------------------------------------------------------------------

def stage_of_name(name: str) -> str | None:
    low = name.lower()
    for stem, stage in NAME_STAGE:
        if low.startswith(stem):
            return stage
    return None


def _images_in(folder: Path, stage: str | None) -> list[ImageFile]:
    out = []
    for p in folder.iterdir():
        m = _STEP.search(p.name)
        if m and p.is_file():
            out.append(ImageFile(stage or stage_of_name(p.name) or "unknown", int(m.group(1)), p))
    return out


def discover(path: Path) -> dict[str, list[ImageFile]]:
    """Images per stage, sorted by step, under a bundle root, run root, stage
    dir or any folder of `*_step_<N>.png` files. With several run roots, each
    stage comes from the newest one that has images for it."""
    out: dict[str, list[ImageFile]] = {}
    for img in sorted(_found(Path(path)), key=lambda i: (i.stage, i.step)):
        out.setdefault(img.stage, []).append(img)
    return {s: out[s] for s in sorted(out, key=_stage_order)}


def _found(path: Path) -> list[ImageFile]:
    if path.is_file():
        m = _STEP.search(path.name)
        return [ImageFile(stage_of_name(path.name) or bundle.locate_stage(path)[0] or "unknown",
                          int(m.group(1)) if m else 0, path)]
    if not path.is_dir():
        return []
    stage, sdir = bundle.locate_stage(path)
    if stage and sdir is not None and (sdir / "visualizations").is_dir():
        return _images_in(sdir / "visualizations", stage)
    roots = [] if path.name == "visualizations" else bundle.find_run_roots(path)
    if not roots:
        return _images_in(path, stage)
    by_stage: dict[str, list[ImageFile]] = {}
    for root in roots:  # oldest first: a newer run root's images replace
        for st, sd in bundle.stage_dirs(root).items():
            imgs = _images_in(sd / "visualizations", st) if (sd / "visualizations").is_dir() else []
            if imgs:
                by_stage[st] = imgs
    return [i for v in by_stage.values() for i in v]


def _stage_order(stage: str) -> int:
    return bundle.STAGES.index(stage) if stage in bundle.STAGES else len(bundle.STAGES)


# --- decoding and layout ---------------------------------------------------------------

class ImageError(Exception):
    pass


def load(path: Path, t: dict) -> Image.Image:
    """Open and decode, refusing decompression bombs before decoding."""
    try:
        im = Image.open(path)
        w, h = im.size
        if w * h > t["max_pixels"]:
            im.close()
            raise ImageError(f"decompression bomb guard: {w}x{h} pixels > {t['max_pixels']}; "
                             "not decoded")
        im.load()
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not an image Pillow can identify (zero bytes or not a PNG)")
    except Image.DecompressionBombError as exc:
        raise ImageError(f"decompression bomb guard: {exc}")
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"cannot decode: {exc}")
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


def input_dependence(orig: np.ndarray, pred: np.ndarray) -> float:
    """How much better each output cell matches its own input than the other
    inputs: mean diagonal minus mean off-diagonal of the output x input
    correlation matrix. ~0 when outputs ignore their inputs (one texture for
    all, noise), 0.3-0.7 for faithful reconstructions."""
    def unit(c: np.ndarray) -> np.ndarray:
        g = _gray(c).reshape(len(c), -1)
        g = g - g.mean(axis=1, keepdims=True)
        return g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-6)
    corr = unit(pred) @ unit(orig).T
    n = len(corr)
    if n < 2:
        return float("nan")
    diag = float(np.trace(corr)) / n
    off = float(corr.sum() - np.trace(corr)) / (n * n - n)
    return diag - off


def fidelity(orig: np.ndarray, pred: np.ndarray, mask_grey: bool) -> dict:
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
    sq = _gray((orig - pred) ** 2)
    mse = (sq * keep).sum(axis=(1, 2))[use] / counts[use]
    psnr = np.where(mse < 1e-10, 99.0, 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10)))
    ssim = _block_ssim(_gray(orig[use]), _gray(pred[use]))
    return {"psnr_db": round(float(np.median(psnr)), 3), "ssim": round(float(np.nanmean(ssim)), 4),
            "input_dependence": round(input_dependence(orig, pred), 4),
            "cells_compared": int(use.sum())}


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
        res.metrics["fidelity"] = fidelity(*pairs, mask_grey=img.stage == "dynamics")
    res.flags = image_flags(m_in, m_out, res.metrics.get("fidelity", {}), t)
    res.metrics["output"]["flat_share"] = m_out["flat_share"]
    return res


def _thumbnail(im: Image.Image, t: dict) -> Image.Image:
    thumb = im.convert("RGB") if im.mode != "RGB" else im.copy()
    thumb.thumbnail((t["thumb_width"], t["thumb_width"]), Image.BOX)
    return thumb


def _strip(m: dict) -> dict:
    return {k: v for k, v in m.items() if k != "cell_std"}


def image_flags(m_in: dict, m_out: dict, fid: dict, t: dict) -> list[str]:
    flags = []
    flat_level = max(t["flat_cell_std"], t["flat_relative"] * m_in["cell_std_median"])
    flat_share = float((m_out["cell_std"] < flat_level).mean())
    m_out["flat_share"] = round(flat_share, 3)
    if flat_share >= t["flat_share"]:
        flags.append("flat_color")
    if (m_out["stripe_score"] >= t["stripe_score"]
            and m_out["stripe_score"] >= t["stripe_vs_input"] * m_in["stripe_score"]):
        flags.append("striping")
    identical = (m_in["cross_cell_spread"] >= t["min_input_spread"]
                 and m_out["cross_cell_spread"] < t["independent_ratio"] * m_in["cross_cell_spread"])
    ignores = bool(fid) and fid.get("input_dependence", 1.0) < t["min_input_dependence"]
    if "flat_color" not in flags and (identical or ignores):
        flags.append("input_independent_output")
    if fid and not flags and (fid["psnr_db"] < t["psnr_min_db"] or fid["ssim"] < t["ssim_min"]):
        flags.append("low_fidelity")
    return flags


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
    """Early third vs late third: PSNR where cells align, and collapse flags."""
    ok = [r for r in results if r.error is None and r.layout.startswith("two_panel")]
    if len(ok) < t["trend_min_images"]:
        return {"trend": "unknown", "reason": f"{len(ok)} analysable images"}
    k = max(1, len(ok) // 3)
    early, late = ok[:k], ok[-k:]
    collapse = ("flat_color", "striping", "input_independent_output")
    bad_early = sum(any(f in r.flags for f in collapse) for r in early) / k
    bad_late = sum(any(f in r.flags for f in collapse) for r in late) / k
    q_early = [quality(r) for r in early if quality(r) is not None]
    q_late = [quality(r) for r in late if quality(r) is not None]
    out = {"early_steps": [r.image.step for r in early], "late_steps": [r.image.step for r in late],
           "collapse_share_early": round(bad_early, 3), "collapse_share_late": round(bad_late, 3)}
    delta = None
    if q_early and q_late:
        delta = float(np.mean(q_late) - np.mean(q_early))
        out.update(psnr_early_db=round(float(np.mean(q_early)), 3),
                   psnr_late_db=round(float(np.mean(q_late)), 3), psnr_delta_db=round(delta, 3))
    if bad_late > bad_early or (delta is not None and delta <= -t["trend_db"]):
        out["trend"] = "degrading"
    elif bad_late < bad_early or (delta is not None and delta >= t["trend_db"]):
        out["trend"] = "improving"
    else:
        out["trend"] = "flat"
    return out


def stage_findings(stage: str, results: list[ImageResult], tr: dict, t: dict) -> list[Finding]:
    ok = [r for r in results if r.error is None]
    out: list[Finding] = []
    if not ok:
        return out
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
        out.append(Finding(flag, sev, stage, _flag_metric(flag), _flag_value(flag, ev),
                           _flag_threshold(flag, t), [r.image.step for r in hit], str(ev.image.path),
                           f"{_FLAG_TEXT[flag]} {when}"))
    if tr.get("trend") == "degrading":
        out.append(Finding("visual_degrading", t["severity"]["degrading"], stage, "trend",
                           tr.get("psnr_delta_db", tr.get("collapse_share_late")), t["trend_db"],
                           tr["late_steps"], str(latest.image.path),
                           "late images look worse than early ones"))
    return out


_FLAG_TEXT = {
    "flat_color": "output cells are flat colour blocks",
    "striping": "output is dominated by one spatial frequency (stripes or a repeated pattern)",
    "input_independent_output": "output cells are near-identical while the inputs differ: "
                                "the model ignores its input",
    "low_fidelity": "reconstructions are far from the originals (low PSNR/SSIM)",
}


def _flag_metric(flag: str) -> str:
    return {"flat_color": "output.flat_share", "striping": "output.stripe_score",
            "input_independent_output": "fidelity.input_dependence (or output/original cross_cell_spread)",
            "low_fidelity": "fidelity.psnr_db"}[flag]


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
    return (m.get("fidelity") or {}).get("psnr_db")


def _flag_threshold(flag: str, t: dict):
    return {"flat_color": t["flat_share"], "striping": t["stripe_score"],
            "input_independent_output": t["min_input_dependence"], "low_fidelity": t["psnr_min_db"]}[flag]


# --- contact sheet ---------------------------------------------------------------------------

def contact_sheet(rows: list[tuple[str, list[ImageResult]]], t: dict) -> Image.Image | None:
    """One row per stage, thumbnails labelled `stage step N`, long side capped."""
    rows = [(s, [r for r in rs if r.thumb is not None]) for s, rs in rows]
    rows = [(s, rs) for s, rs in rows if rs]
    if not rows:
        return None
    ncols = max(len(rs) for _, rs in rows)
    gap, label_h = 8, 28
    thumb_w = int(min(t["thumb_width"], (t["sheet_max_side"] - gap * (ncols + 1)) / ncols))
    ratio = max(r.thumb.height / r.thumb.width for _, rs in rows for r in rs)
    thumb_h = int(thumb_w * ratio)
    sheet = Image.new("RGB", (gap + ncols * (thumb_w + gap), gap + len(rows) * (thumb_h + label_h + gap)),
                      "white")
    draw = ImageDraw.Draw(sheet)
    font = _font(18)
    for i, (stage, rs) in enumerate(rows):
        y = gap + i * (thumb_h + label_h + gap)
        for j, r in enumerate(rs):
            x = gap + j * (thumb_w + gap)
            thumb = r.thumb.copy()
            thumb.thumbnail((thumb_w, thumb_h))
            sheet.paste(thumb, (x, y + label_h))
            flags = f"  [{', '.join(r.flags)}]" if r.flags else ""
            draw.text((x, y + 4), f"{stage} step {r.image.step}{flags}", fill="black", font=font)
    if max(sheet.size) > t["sheet_max_side"]:
        sheet.thumbnail((t["sheet_max_side"], t["sheet_max_side"]))
    return sheet


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


# --- whole input ------------------------------------------------------------------------------

def analyse(paths: list[Path], thresholds: dict, count: int | None = None,
            progress=None) -> dict:
    """Analyse every stage's images; returns the compact document, per-image
    details and the contact sheet (a PIL image, not yet written)."""
    t = thresholds["visuals"]
    count = count or t["sheet_count"]
    found: dict[str, list[ImageFile]] = {}
    for p in paths:
        for stage, imgs in discover(p).items():
            found[stage] = imgs
    doc: dict = {"stages": {}, "skipped": []}
    details, sheet_rows = {}, []
    for stage, imgs in found.items():
        picks = set(sheet_steps(len(imgs), count))
        results = []
        for i, img in enumerate(imgs):
            results.append(analyse_image(img, t, keep_thumb=i in picks))
            if progress and (i + 1) % 50 == 0:
                progress(f"{stage}: {i + 1}/{len(imgs)} images")
        tr = trend(results, t)
        findings = stage_findings(stage, results, tr, t)
        doc["stages"][stage] = stage_document(stage, results, tr, findings)
        bad = [{"path": str(r.image.path), "reason": r.error} for r in results if r.error]
        doc["skipped"] += bad[:MAX_LISTED]
        if len(bad) > MAX_LISTED:
            doc["skipped"].append({"path": str(imgs[0].path.parent),
                                   "reason": f"{len(bad) - MAX_LISTED} more unreadable images (see visuals.json)"})
        details[stage] = [r.to_dict() for r in results]
        sheet_rows.append((stage, [r for r in results if r.thumb is not None]))
    return {"doc": doc, "details": details, "sheet": contact_sheet(sheet_rows, t)}


def stage_document(stage: str, results: list[ImageResult], tr: dict, findings: list[Finding]) -> dict:
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
            "trend": tr, "findings": findings_dicts(findings)}
