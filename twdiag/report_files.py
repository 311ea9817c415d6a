"""A diagnosis as files: diagnosis.json, .md and .html, loss plots, the
contact sheet and the comparison pictures, written as one set (the old set
or the new one). `cli`, `follow` and any other front end write through here.

The loss figures are drawn in forked children, one figure each, when the
process may fork (`forking`): drawing text is most of a figure's cost and it
is independent per stage. Each child returns its PNG's bytes; the parent
writes them, and the HTML embeds those same bytes (nothing is encoded twice).
"""
from __future__ import annotations

import os
from pathlib import Path

from . import forking, outputs

def _render(a, doc: dict, name: str) -> bytes:
    """One loss figure's PNG (in a child, or here)."""
    from . import plots
    return plots.png_bytes(plots.loss_figure(a, doc, name))


def _send_figures(a, doc: dict, drawer) -> bool:
    """Hand the loss figures' inputs to the drawer, which draws them while
    the other outputs are written; False without one."""
    from . import plots
    if drawer is None:
        return False
    return drawer.send([plots.figure_inputs(a, doc, n) for n in plots.loss_figure_names(a)])


def _loss_pngs(a, doc: dict, drawer=None) -> dict[str, bytes]:
    """The loss figures' PNGs: from the drawer they were sent to, else drawn
    here (in forked children when that is worth it)."""
    from . import plots
    names = plots.loss_figure_names(a)
    if drawer is not None:
        pngs = drawer.receive()
        if pngs is not None:
            return dict(zip(names, pngs))
    if len(names) > 1 and forking.can_fork():
        plots.prepare()  # import matplotlib once, before the children inherit it
    return dict(zip(names, forking.starmap(_render, [(a, doc, n) for n in names])))


def _write_tables(a, doc: dict, outset) -> str | None:
    """The diagnosis as the query tables (tables/<name>.parquet) with the
    bundle's content signature, so `twdiag query BUNDLE` answers from them
    instead of decoding again while the bundle is unchanged. Needs pyarrow;
    without it, query decodes on the fly."""
    import importlib.util
    if importlib.util.find_spec("pyarrow") is None:
        return None
    import pyarrow as pa
    import pyarrow.parquet as pq

    from . import tables
    from .fingerprint import signature
    for name, frame in tables.from_analysis(a, doc, str(a.bundle.root)).items():
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), outset.path(f"tables/{name}.parquet"))
    outset.write_json("tables/signature.json", {"bundle": str(a.bundle.root),
                                                "signature": signature(a.bundle.root)})
    return str(outset.final("tables"))


def visuals_document(a) -> dict:
    """visuals.json: one shape whoever writes it (contact_sheet.py too): the
    per-stage documents as they stand after crossstage, plus every image."""
    res = a.visuals or {"doc": {"stages": {}}, "details": {}}
    return {**res["doc"], "skipped": a.bundle.skipped, "images": res.get("details", {})}


def write_report(a, cmp: dict | None, out: Path, save_tables: bool = True, drawer=None) -> dict:
    """Every output of a diagnosis, as one set; returns the diagnosis document.
    `save_tables=False`: no tables/ (a scan writes them into its dataset).
    `drawer`: a `drawer.Drawer` forked earlier, which draws the loss figures
    while the other outputs are written here."""
    from . import html_report, plots, report, visuals
    doc = None
    with outputs.OutputSet(out) as outset:
        files = {"diagnosis_json": str(outset.final("diagnosis.json")),
                 "diagnosis_md": str(outset.final("diagnosis.md")),
                 "diagnosis_html": str(outset.final("diagnosis.html"))}
        try:
            doc = report.combine(a, cmp["doc"] if cmp else None)
            sent = _send_figures(a, doc, drawer)
            files["loss_plots"] = {}  # drawn meanwhile; written below
            image = visuals.sheet(a.visuals, a.thresholds) if a.visuals else None
            if image is not None:  # drawn now: after crossstage has reconciled the image findings
                files["contact_sheet"] = str(outset.write_image("contact_sheet.png", image))
            if a.probe_pictures:
                from . import probe_sheet
                pic = probe_sheet.sheet(a.probe_pictures)
                if pic is not None:
                    files["probe_sheet"] = str(outset.write_image("probe_sheet.png", pic))
            if cmp:
                for name, fig in cmp["figures"].items():
                    files[name] = str(outset.write_image(name, fig))
                    plots.close(fig)
                if cmp["sheet"] is not None:
                    files["compare_sheet"] = str(outset.write_image("compare_sheet.png", cmp["sheet"]))
            tables_dir = _write_tables(a, doc, outset) if save_tables else None
            if tables_dir:
                files["tables"] = tables_dir
            files["checkpoints"] = str(outset.write_json(
                "checkpoints.json", {s: [c.details() for c in r.checkpoints] for s, r in a.checkpoints.items()}))
            files["visuals"] = str(outset.write_json("visuals.json", visuals_document(a)))
            for name, data in _loss_pngs(a, doc, drawer if sent else None).items():
                files["loss_plots"][name.removeprefix("loss_").removesuffix(".png")] = str(outset.write_bytes(name, data))
            if not files["loss_plots"]:
                del files["loss_plots"]
            doc["outputs"] = files
            outset.write_text("diagnosis.md", report.markdown(doc))
            outset.write_text("diagnosis.html", html_report.render(doc, outset))
        except outputs.OutputError:
            raise  # the disk, not the analysis: nothing more can be written
        except Exception as exc:  # still leave a diagnosis.json saying what was done
            if os.environ.get("TWDIAG_DEBUG"):
                raise
            a.errors.append({"step": "report", "error": f"{type(exc).__name__}: {exc}"[:500]})
            doc = doc or {"overall": None, "bundle": str(a.bundle.root), "stages": {}, "skipped": a.bundle.skipped,
                          "notes": a.bundle.notes, "next_actions": [], "run_status": {}, "cross_stage": []}
            doc["errors"] = a.errors
            if not files.get("loss_plots"):
                files.pop("loss_plots", None)
            doc["outputs"] = files
        finally:
            if drawer is not None:
                drawer.close()
        outset.write_json("diagnosis.json", doc)
    return doc
