"""diagnosis.html: the whole diagnosis in one self-contained file a person can
open or mail. Rendered from the JSON document alone (like diagnosis.md);
every plot and the contact sheet are inlined as data: URIs, so the page
needs no other file and no network."""
from __future__ import annotations

import base64
import html
from pathlib import Path

COLOURS = {"critical": "#c62828", "watch": "#e08600", "normal": "#2e7d32", "missing": "#757575",
           "insufficient_data": "#757575", "info": "#616161", None: "#757575"}
STYLE = """
body{font:15px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:0;color:#1b1b1b;background:#fafafa}
header{padding:18px 28px;color:#fff}
h1{margin:0;font-size:26px} h2{margin:28px 0 10px;font-size:20px;border-bottom:1px solid #ddd}
main{padding:0 28px 40px;max-width:1500px}
.badge{display:inline-block;padding:2px 9px;border-radius:10px;color:#fff;font-weight:600;font-size:13px}
table{border-collapse:collapse;margin:8px 0;background:#fff}
td,th{border:1px solid #ddd;padding:5px 9px;text-align:left;vertical-align:top;font-size:14px}
th{background:#f0f0f0} code{font-size:12.5px;word-break:break-all}
ol li{margin:6px 0} img{max-width:100%;border:1px solid #ddd;background:#fff;margin:8px 0}
.muted{color:#666;font-size:13px} .finding{margin:3px 0 3px 0}
"""


def _e(x) -> str:
    return html.escape("n/a" if x is None else str(x))


def _badge(level) -> str:
    return f'<span class="badge" style="background:{COLOURS.get(level, "#757575")}">{_e(level)}</span>'


def _img(outset, final_path: str | None, alt: str) -> str:
    """An image of this output set, inlined (read from the set's temp copy)."""
    if not final_path:
        return ""
    name = Path(final_path).name
    try:
        data = outset.path(name).read_bytes()
    except OSError:
        return f'<p class="muted">({_e(alt)}: image not available)</p>'
    return (f'<img alt="{_e(alt)}" src="data:image/png;base64,'
            f'{base64.b64encode(data).decode("ascii")}">')


def _numbers(n: dict) -> str:
    return ", ".join(f"{_e(k)} {_e(v)}" for k, v in n.items() if v is not None)


def render(doc: dict, outset) -> str:
    out = [f"<!doctype html><html lang=en><head><meta charset=utf-8>"
           f"<title>TinyWorlds diagnosis: {_e(doc['overall'])}</title><style>{STYLE}</style></head><body>",
           f'<header style="background:{COLOURS.get(doc["overall"], "#757575")}">'
           f"<h1>TinyWorlds training: {_e(doc['overall'])}</h1>"
           f"<div>{_e(doc['bundle'])} — judged {_e(doc.get('judged_at'))} by twdiag {_e(doc.get('version'))}"
           + (" — the bundle is a copy: file times were ignored" if doc.get("copied") else "")
           + "</div></header><main>"]
    out += (_stages_table(doc) + _attempts(doc) + _actions(doc) + _findings(doc) + _probe(doc, outset)
            + _pictures(doc, outset) + _checkpoints(doc))
    if doc.get("cross_stage"):
        out += ["<h2>Cross-stage</h2><ul>"] + [f"<li>{_e(x)}</li>" for x in doc["cross_stage"]] + ["</ul>"]
    if doc.get("skipped"):
        out += ["<h2>Skipped inputs</h2><ul>"] + [f"<li><code>{_e(s.get('path'))}</code>: {_e(s.get('reason'))}</li>"
                                                  for s in doc["skipped"][:50]] + ["</ul>"]
    if doc.get("errors"):
        out += ["<h2>Errors (the rest of the report still stands)</h2><ul>"] + [
            f"<li>{_e(x.get('step'))}: {_e(x.get('error'))}</li>" for x in doc["errors"][:30]] + ["</ul>"]
    out.append('<p class="muted">Full record: diagnosis.json beside this file.</p></main></body></html>')
    return "\n".join(out)


def _stages_table(doc: dict) -> list[str]:
    out = ["<h2>Verdict per stage</h2><table><tr><th>stage</th><th>verdict</th><th>run state</th>"
           "<th>fallback checkpoint</th><th>key numbers</th></tr>"]
    for stage, e in doc["stages"].items():
        fb = e.get("fallback") or {}
        if fb.get("path"):
            fb_cell = (f"step {_e(fb['step'])}: <code>{_e(Path(fb['path']).name)}</code><br>"
                       f"<span class=muted>{_e(fb.get('reason'))}</span>")
        elif fb.get("restart"):
            fb_cell = f"<b>none: restart</b><br><span class=muted>{_e(fb.get('reason'))}</span>"
        else:
            fb_cell = "<span class=muted>no checkpoints</span>"
        newest = fb.get("newest_intact") or {}
        if newest.get("why_not_fallback"):
            fb_cell += (f"<br><span class=muted>newest intact: step {_e(newest['step'])} "
                        f"({_e(newest['why_not_fallback'])})</span>")
        out.append(f"<tr><td><b>{_e(stage)}</b></td><td>{_badge(e['verdict'])}</td>"
                   f"<td>{_e(e['status'].get('state'))}</td><td>{fb_cell}</td>"
                   f"<td class=muted>{_numbers(e.get('numbers') or {})}</td></tr>")
    return out + ["</table>"]


def _attempts(doc: dict) -> list[str]:
    """Stages run more than once (a crash and a resume, a fresh start), or
    with an earlier run root: each attempt in a line."""
    from .report import lineage_lines
    out = []
    for stage, e in doc["stages"].items():
        lines = lineage_lines(e)
        if lines:
            out.append(f"<p><b>{_e(stage)}</b> <span class=muted>({_e(e['lineage'].get('steps_axis'))})</span></p><ul>")
            out += [f"<li>{_e(line)}</li>" for line in lines] + ["</ul>"]
    return (["<h2>Attempts</h2>"] + out) if out else []


def _actions(doc: dict) -> list[str]:
    out = ["<h2>Next actions, in priority order</h2>"]
    if not doc.get("next_actions"):
        return out + ["<p>None needed: keep training and re-run this check.</p>"]
    out.append("<ol>")
    for a in doc["next_actions"]:
        out.append(f"<li>{_badge(a['severity'])} <b>{_e(a['stage'])}</b> "
                   f"<code>{_e(a['rule_id'])}</code>: {_e(a['action'])}</li>")
    return out + ["</ol>"]


def _findings(doc: dict) -> list[str]:
    out = ["<h2>Findings</h2>"]
    for stage, e in doc["stages"].items():
        shown = [f for f in e["findings"] if f["severity"] != "info"]
        out.append(f"<h3>{_e(stage)} {_badge(e['verdict'])}</h3>")
        if not shown:
            out.append("<p class=muted>No watch or critical findings.</p>")
        for f in shown:
            out.append(f'<div class="finding">{_badge(f["severity"])} <code>{_e(f["rule_id"])}</code> '
                       f"{_e(f['message'])} <span class=muted>[value {_e(f['value'])}, threshold "
                       f"{_e(f['threshold'])}] <code>{_e(f.get('evidence_path'))}</code></span></div>")
    return out


def _probe(doc: dict, outset) -> list[str]:
    """The models as measured (diagnose --tinyworlds): one line per stage,
    ΔtPSNR per horizon, and the probe sheet."""
    probe = doc.get("probe") or {}
    if not probe.get("ran"):
        return []
    from .report import probe_line
    out = [f"<h2>The models, measured (TinyWorlds' own classes from <code>{_e(probe.get('tinyworlds'))}</code>)</h2>",
           f"<p class=muted>frames: {_e(probe.get('frames_source'))}</p><ul>"]
    for stage, e in doc["stages"].items():
        if e.get("probe"):
            out.append(f"<li><b>{_e(stage)}</b>: {_e(probe_line(stage, e['probe']))}</li>")
    out.append("</ul>")
    dyn = ((doc["stages"].get("dynamics") or {}).get("probe") or {}).get("measures") or {}
    if dyn.get("delta_t_psnr"):
        out.append("<table><tr><th>t (frames ahead)</th><th>PSNR, inferred actions (dB)</th>"
                   "<th>PSNR, random actions (dB)</th><th>ΔtPSNR (dB)</th></tr>")
        out += [f"<tr><td>{_e(r['t'])}</td><td>{_e(r['psnr_inferred_db'])}</td><td>{_e(r['psnr_random_db'])}</td>"
                f"<td><b>{_e(r['delta_db'])}</b></td></tr>" for r in dyn["delta_t_psnr"]]
        out.append("</table>")
    files = doc.get("outputs", {})
    if files.get("probe_sheet"):
        out.append(_img(outset, files["probe_sheet"], "probe sheet"))
    return out


def _pictures(doc: dict, outset) -> list[str]:
    files = doc.get("outputs", {})
    out = ["<h2>Loss curves</h2>"]
    for stage, path in (files.get("loss_plots") or {}).items():
        out.append(_img(outset, path, f"{stage} loss"))
    if files.get("contact_sheet"):
        out += ["<h2>Image grids (first, middle, latest per stage)</h2>",
                _img(outset, files["contact_sheet"], "contact sheet")]
    if files.get("compare_sheet"):
        out += ["<h2>Current vs baseline</h2>", _img(outset, files["compare_sheet"], "comparison sheet")]
    return out


def _checkpoints(doc: dict) -> list[str]:
    out = ["<h2>Checkpoints</h2>"]
    for stage, e in doc["stages"].items():
        c = e.get("checkpoints")
        if not c:
            continue
        out.append(f"<h3>{_e(stage)}: {_e(c['valid'])} of {_e(c['total'])} valid</h3><table><tr><th>step</th>"
                   "<th>status</th><th>deep scan</th><th>loss near it</th><th>lr</th>"
                   "<th>weights vs earliest</th></tr>")
        for r in (c.get("table") or [])[:40]:
            out.append(f"<tr><td>{_e(r['step'])}</td><td>{_e(r['status'])}</td><td>{_e(r['deep_scan'])}</td>"
                       f"<td>{_e(r.get('loss'))}</td><td>{_e(r.get('learning_rate'))}</td>"
                       f"<td>{_e(r.get('weights_vs_earliest'))}</td></tr>")
        out.append("</table>")
    return out
