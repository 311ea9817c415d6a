"""Every bundle under some roots, diagnosed into one Parquet dataset.

    OUT/tables/<table>/bundle=<id>/part.parquet   the `tables` schema, one partition per bundle
    OUT/bundles/<id>/diagnosis.{json,md,html}, loss plots, contact sheet
    OUT/manifest/<shard>.json                     signatures of what each shard diagnosed
    OUT/index.html                                one row per bundle and stage, for a person

A bundle is a folder with `wandb/` or `results/` (as diagnose recognises
one); the walk does not descend into a bundle. Each is diagnosed exactly as
`diagnose.py` would (the same pipeline, the same report files), in a bounded
pool of forked workers; one bundle's failure is its `bundles` row with the
error, never the end of the scan.

Incremental: a bundle whose content signature (every file's size, plus a
hash of its first and last 64 KiB) matches the manifest and whose partition
is present is reused, not diagnosed again. File times are never used.

Past one machine: `--shard i/n` takes the bundles whose path hashes to i
modulo n, so any scheduler can run the shards; they write disjoint
partitions of the same dataset, which DuckDB, pandas or Spark read as one.
"""
from __future__ import annotations

import hashlib
import html
import json
import re
import time
from pathlib import Path

from . import bundle as bundle_mod, forking, outputs, safefs, tables
from .fingerprint import signature

MAX_DEPTH = 4          # folders below a root searched for bundles


def find_bundles(roots: list[Path], max_entries: int) -> list[Path]:
    """Bundle folders under the roots (a root may be a bundle itself)."""
    found: list[Path] = []
    seen: set = set()

    def walk(d: Path, depth: int) -> None:
        real = safefs.resolve(d)
        if real in seen or depth > MAX_DEPTH:
            return
        seen.add(real)
        if safefs.is_dir(d / "wandb") or safefs.is_dir(d / "results"):
            found.append(d)
            return
        entries, _ = safefs.entries(d, max_entries)
        for e in entries:
            if safefs.is_dir(e) and not e.is_symlink():
                walk(e, depth + 1)

    for root in roots:
        walk(Path(root), 0)
    return sorted(found, key=lambda p: str(p))


def bundle_id(path: Path) -> str:
    """A partition name: the folder's name (made safe) and a hash of its resolved path."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.name)[:60] or "bundle"
    return f"{name}-{hashlib.sha1(str(safefs.resolve(path)).encode()).hexdigest()[:8]}"


def shard_of(path: Path, n: int) -> int:
    return int(hashlib.sha1(str(safefs.resolve(path)).encode()).hexdigest(), 16) % n


def _write_tables(out: Path, bid: str, tbls: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    for name, frame in tbls.items():
        if not len(frame):  # an empty partition would only add a typeless schema
            continue
        folder = out / "tables" / name / f"bundle={bid}"
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / ".part.parquet.tmp"
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp)
        tmp.replace(folder / "part.parquet")


def _diagnose_one(path: str, bid: str, out: str, thresholds: dict) -> dict:
    """One bundle, as diagnose.py would; in a worker. Never raises."""
    from . import pipeline, report, report_files
    t0 = time.perf_counter()
    out_dir = Path(out)
    try:
        p = Path(path)
        b = bundle_mod.discover([p], {}, root=p, max_entries=int(thresholds["limits"]["max_dir_entries"]))
        if b.empty:
            raise ValueError("no TinyWorlds logs, checkpoints or images")
        a = pipeline.run(b, thresholds, progress=lambda m: None)
        doc = report_files.write_report(a, None, out_dir / "bundles" / bid, save_tables=False)
        if all(e["verdict"] == "missing" for e in doc["stages"].values()):  # as diagnose.py's exit 4
            raise ValueError("no TinyWorlds logs, checkpoints or images could be read: "
                             + "; ".join(f"{x.get('path')}: {x.get('reason')}" for x in doc["skipped"][:3]))
        tbls = tables.from_analysis(a, doc, path)
        _write_tables(out_dir, bid, tbls)
        return {"bundle": path, "id": bid, "overall": doc.get("overall"), "error": None,
                "seconds": round(time.perf_counter() - t0, 2)}
    except Exception as exc:  # one bundle's failure is its row
        return _failed(path, bid, out_dir, f"{type(exc).__name__}: {exc}"[:500], time.perf_counter() - t0)


def _failed(path: str, bid: str, out_dir: Path, error: str, seconds: float | None) -> dict:
    """A bundle that could not be diagnosed: its row says why."""
    try:
        _write_tables(out_dir, bid, tables.error_tables(path, error))
    except Exception:
        pass
    return {"bundle": path, "id": bid, "overall": None, "error": error,
            "seconds": None if seconds is None else round(seconds, 2)}


def _lost(path: str, bid: str, out: str, thresholds: dict) -> dict:
    """The row of a bundle whose worker died while diagnosing it."""
    return _failed(path, bid, Path(out), "its diagnosis ended the worker process (killed: out of memory?); "
                                         "diagnose it alone to see where", None)


def run(roots: list[Path], out: Path, thresholds: dict, workers: int | None = None,
        shard: tuple[int, int] = (0, 1), progress=outputs.log) -> dict:
    """Scan; returns the stdout document."""
    i, n = shard
    max_entries = int(thresholds["limits"]["max_dir_entries"])
    every = find_bundles(roots, max_entries)
    mine = [p for p in every if shard_of(p, n) == i]
    manifest_path = out / "manifest" / f"shard-{i}-of-{n}.json"
    old = _read_json(manifest_path).get("bundles", {})
    jobs, reused, entries = [], [], {}
    for p in mine:
        bid, sig = bundle_id(p), signature(p)
        entries[str(p)] = {"id": bid, "signature": sig}
        prev = old.get(str(p))
        if prev and prev.get("signature") == sig and (out / "tables" / "bundles" / f"bundle={bid}").is_dir():
            reused.append(str(p))
            entries[str(p)].update({k: prev.get(k) for k in ("overall", "error")})
        else:
            jobs.append((str(p), bid, str(out), thresholds))
    progress(f"scan: {len(every)} bundles found, {len(mine)} in shard {i}/{n}: "
             f"{len(jobs)} to diagnose, {len(reused)} unchanged")
    results = forking.starmap(_diagnose_one, jobs, workers=workers, on_death=_lost)
    for r in results:
        entries[r["bundle"]].update({"overall": r["overall"], "error": r["error"], "seconds": r["seconds"]})
    manifest_path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(manifest_path, {"roots": [str(r) for r in roots], "shard": [i, n], "bundles": entries})
    index = out / "index.html"
    if jobs or not index.is_file():  # unchanged: the page already says it
        index = write_index(out)
    return {"roots": [str(r) for r in roots], "out": str(out), "shard": f"{i}/{n}",
            "bundles_found": len(every), "in_shard": len(mine),
            "diagnosed": [{k: r[k] for k in ("bundle", "overall", "error", "seconds")} for r in results],
            "reused": reused, "errors": [r for r in results if r["error"]],
            "dataset": str(out / "tables"), "index_html": str(index) if index else None}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)


# --- index.html ----------------------------------------------------------------------------

_CHIP = {"normal": "#2e7d32", "watch": "#ef6c00", "critical": "#c62828", "unverified": "#6a1b9a",
         "missing": "#757575", "insufficient_data": "#757575"}


def _cell(x) -> str:
    """Table text: nothing for a missing value (None or NaN)."""
    return "" if x is None or (isinstance(x, float) and x != x) else html.escape(str(x))


def write_index(out: Path) -> Path | None:
    """index.html over the whole dataset (every shard): verdict chips per
    bundle and stage, links to each bundle's diagnosis.html, and key numbers
    across backups in time order. Self-contained: no CDN, no script."""
    from . import query
    t = query.dataset_tables(out)
    if "bundles" not in t:
        return None
    bundles = t["bundles"].to_pandas()
    stages = t["stages"].to_pandas() if "stages" in t else None
    bundles["order"] = bundles["folder_time"].fillna(bundles["newest_record_time"]).fillna(bundles["bundle"])
    bundles = bundles.sort_values("order")
    rows = []
    for _, b in bundles.iterrows():
        bid = bundle_id(Path(b["bundle"]))
        link = f"bundles/{html.escape(bid)}/diagnosis.html"
        chips = ""
        if stages is not None:
            for _, s in stages[stages["bundle"] == b["bundle"]].iterrows():
                colour = _CHIP.get(s["verdict"], "#757575")
                fb = "" if s.get("fallback_step") is None or s["fallback_step"] != s["fallback_step"] \
                    else f" · fallback {int(s['fallback_step'])}"
                chips += (f'<span class="chip" style="background:{colour}">{html.escape(str(s["stage"]))}: '
                          f'{html.escape(str(s["verdict"]))}{fb}</span> ')
        overall = b["overall"] if isinstance(b["overall"], str) else "error"
        rows.append(f'<tr><td><a href="{link}">{html.escape(str(b["bundle"]))}</a></td>'
                    f'<td>{_cell(b["folder_time"])}</td><td>{_cell(b["newest_record_time"])}</td>'
                    f'<td><span class="chip" style="background:{_CHIP.get(overall, "#424242")}">'
                    f'{html.escape(overall)}</span></td><td>{chips}'
                    f'{_cell(b["error"])}</td></tr>')
    plot = _trend_png(bundles, stages)
    page = ("<!doctype html><html lang=en><head><meta charset=utf-8><title>TinyWorlds backups</title><style>"
            "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}td,th{border-bottom:1px solid #ddd;"
            "padding:.3em .6em;text-align:left;vertical-align:top}.chip{color:#fff;border-radius:.8em;padding:.1em .6em;"
            "font-size:.85em;white-space:nowrap;display:inline-block;margin:.1em}</style></head><body>"
            f"<h1>TinyWorlds backups: {len(bundles)} bundles</h1>"
            "<table><tr><th>bundle</th><th>folder time</th><th>newest record</th><th>overall</th><th>stages</th></tr>"
            + "".join(rows) + "</table>"
            + (f'<h2>Key numbers across backups</h2><img alt="key numbers across backups" '
               f'src="data:image/png;base64,{plot}">' if plot else "")
            + "</body></html>")
    path = out / "index.html"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path


def _trend_png(bundles, stages) -> str | None:
    """Final loss, fraction of chance and actions used per stage, across the
    bundles in time order (one panel each), as base64 PNG."""
    import base64
    import io
    if stages is None or not len(stages):
        return None
    from . import plots
    order = list(bundles["bundle"])
    fig = plots.new_figure(figsize=(11, 7), dpi=90)
    axes = fig.subplots(3, 1, sharex=True)
    specs = (("loss_final", "final loss (as logged)"), ("late_fraction_of_chance", "dynamics: late loss / chance"),
             ("unique_actions_late", "actions used (late mean)"))
    for ax, (col, title) in zip(axes, specs):
        for stage, part in stages.groupby("stage"):
            ys = [part[part["bundle"] == b][col].iloc[0] if (part["bundle"] == b).any() else float("nan")
                  for b in order]
            if any(y == y for y in ys):
                ax.plot(range(len(order)), ys, marker="o", label=stage)
        ax.set_title(title, loc="left", fontsize=10)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    axes[-1].set_xticks(range(len(order)))
    axes[-1].set_xticklabels([Path(b).name[:24] for b in order], rotation=30, ha="right", fontsize=8)
    fig.subplots_adjust(left=0.07, right=0.82, bottom=0.18, top=0.95, hspace=0.45)
    return base64.b64encode(plots.png_bytes(fig)).decode("ascii")
