"""`twdiag` console command: thin subcommands over the library.

Every subcommand prints exactly one JSON document on stdout (bounded: lists
are cut, and the document says what it cut); progress goes to stderr. The
scripts in `scripts/` call `main()` with their subcommand (through `entry`).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

from . import forking

forking.serial_blas()  # before numpy is imported (outputs imports it): see forking

from . import __version__, outputs  # noqa: E402
from .drawer import Drawer  # noqa: E402

# Exit codes, shared by every subcommand and script (documented in --help,
# SKILL.md and the README): `exits`.
from .exits import (EXIT_DEPENDENCY, EXIT_GATE, EXIT_INTERNAL, EXIT_NO_INPUT, EXIT_OK, EXIT_OUTPUT,  # noqa: E402
                    EXIT_UNREADABLE, EXIT_USAGE, GATES)

MAX_STDOUT_BYTES = 200_000

EXIT_CODES_HELP = f"""\
exit codes:
  {EXIT_OK}   success (whatever the verdict; bad files are reported, not fatal)
  {EXIT_INTERNAL}   internal error (a bug; the JSON has "error")
  {EXIT_USAGE}   usage error
  {EXIT_NO_INPUT}   input missing or holds nothing to analyse
  {EXIT_UNREADABLE}   input found but nothing in it was readable
  {EXIT_OUTPUT}   output dir unusable, or inside the run bundle outside docs/action/
  {EXIT_DEPENDENCY}   a required Python package is missing (the JSON names it)
  {EXIT_GATE}  diagnose --fail-on level reached
"""


class CliError(Exception):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def _default_input(value: str | None) -> Path:
    return Path(value or os.environ.get("RUN_BUNDLE_ROOT") or ".")


def _require_existing(paths: list[Path]) -> None:
    missing = [str(p) for p in paths if not p.exists() and not p.is_symlink()]
    if missing:
        raise CliError(f"input does not exist: {', '.join(missing)}", EXIT_NO_INPUT)


def _subparser(sub, name: str, help: str, description: str, examples: str):
    return sub.add_parser(name, help=help, description=description,
                          formatter_class=argparse.RawDescriptionHelpFormatter,
                          epilog=textwrap.dedent(examples) + EXIT_CODES_HELP)


def _thresholds(path: str | None) -> dict:
    from . import rules
    try:
        return rules.load_thresholds(path)
    except rules.ThresholdError as exc:
        raise CliError(str(exc), EXIT_USAGE)


def _explicit(values: list[str]) -> dict:
    from . import bundle
    try:
        return bundle.parse_run_args(values)
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE)


def _add_common(p, inputs_help: str, multi: bool = True) -> None:
    p.add_argument("paths", nargs="*" if multi else "?", help=f"{inputs_help} (default: $RUN_BUNDLE_ROOT or .)")
    p.add_argument("--thresholds", help="YAML merged over the default thresholds")


def _add_run(p) -> None:
    p.add_argument("--run", action="append", default=[], metavar="STAGE=PATH",
                   help="use this .wandb file for STAGE instead of the ones found (repeatable; "
                        "STAGE is video_tokenizer, latent_actions or dynamics)")


def _add_out(p, what: str) -> None:
    p.add_argument("--out-dir", help=f"where to write {what} (default: <bundle>/docs/action/ when the bundle "
                                     "is writable, else ./twdiag-<bundle name>/)")


def _add_probe(p, required: bool = False) -> None:
    g = p.add_argument_group("the model probe (TinyWorlds' own classes, in a child process; needs torch, einops)")
    g.add_argument("--tinyworlds", metavar="PATH", required=required,
                   help="a TinyWorlds checkout: build each stage's class from its saved config and measure it "
                        "(only its models/ package is imported; state.pt is never unpickled)")
    g.add_argument("--data", metavar="FILE.h5", help="frames to measure on: an .h5 with `frames` (N x H x W x 3 "
                   "uint8) and optionally `actions`, as TinyWorlds' loaders read (default: the bundle's own "
                   "grids' original panels)")
    g.add_argument("--device", default="cpu", help="torch device for the probe (default cpu)")
    g.add_argument("--probe-seconds", type=float, help="the probe's time budget (default: thresholds' probe.seconds)")


def _require_modules(modules: list[str], who: str, install: str) -> None:
    """A subcommand's optional dependencies: exit 6 naming what is missing."""
    lacking = [m for m in modules if importlib.util.find_spec(m) is None]
    if lacking:
        raise CliError(f"{who} needs {', '.join(lacking)}: {install}", EXIT_DEPENDENCY)


def _probe_options(args, t: dict):
    """ProbeOptions from the flags, or None; a bad checkout is a usage error,
    a missing torch/einops/h5py a dependency error (exit 6)."""
    path = getattr(args, "tinyworlds", None)
    if not path:
        return None
    import importlib.util
    from . import probe
    problem = probe.checkout_problem(Path(path))
    if problem:
        raise CliError(problem, EXIT_USAGE)
    _require_modules(["torch", "einops"] + (["h5py"] if args.data else []), "the probe",
                     "python -m pip install 'tinyworlds-training-diagnostics[probe]' (and torch, as TinyWorlds "
                     "trains with it)")
    if args.data:
        _require_existing([Path(args.data)])
    opts = probe.ProbeOptions(Path(path), Path(args.data) if args.data else None, args.device, args.probe_seconds)
    # started now, the child imports torch (about 1.5 s) while this process imports and reads the bundle
    opts.child = probe.spawn(opts, t)
    return opts


def _inputs(args, narrow: bool) -> tuple[list[Path], dict]:
    """Positional paths (or the default bundle) and --run mappings, checked."""
    explicit = _explicit(getattr(args, "run", []))
    paths = [Path(p) for p in args.paths] if args.paths else ([] if explicit else [_default_input(None)])
    _require_existing(paths + list(explicit))
    return paths, explicit


def _discover(paths: list[Path], explicit: dict, thresholds: dict, results: Path | None = None,
              root: Path | None = None):
    from . import bundle
    b = bundle.discover(paths, explicit, results=results, root=root,
                        max_entries=int(thresholds["limits"]["max_dir_entries"]))
    for note in b.notes:
        outputs.log(f"note: {note}")
    return b


def _guarded_roots(root: Path, others=()) -> list[Path]:
    """Every bundle an invocation reads (the main one, --baseline, --results
    and --run sources): outputs may go inside none of them but docs/action/."""
    from . import bundle
    return [root, *(bundle.bundle_root_of(Path(p)) for p in others)]


def _out_dir(args, root: Path, others=(), notes: list | None = None, sub: str | None = None) -> Path:
    """The chosen output dir, checked against every input bundle (not
    created), said on stderr; a redirect's reason joins `notes`."""
    if args.out_dir:
        out = Path(args.out_dir)
    else:
        out, note = outputs.choose_out_dir(root)
        out = out / sub if sub else out
        if note:
            outputs.log(f"note: {note}")
            if notes is not None:
                notes.append(note)
    outputs.check_out_dir(out, _guarded_roots(root, others))
    outputs.log(f"outputs: {out}")
    return out


# --- export -----------------------------------------------------------------

def _add_export(sub) -> None:
    p = _subparser(
        sub, "export", "export W&B history to CSV/JSON/Parquet per stage",
        "Export each stage's W&B history plus run metadata, config, replayed summary, "
        "system stats and console output. --source local decodes the local .wandb "
        "transaction logs (no network, no wandb datastore); --source api reads the run "
        "through wandb's public API; auto (default) uses the API only when credentials "
        "are configured and the run is identified, and falls back to the local files.", """\
            examples:
              %(prog)s RUN_BUNDLE_ROOT                       # -> <bundle>/docs/action/Logs/
              %(prog)s RUN_BUNDLE_ROOT --out-dir Logs --suffix latest
              %(prog)s --run video_tokenizer=wandb/run-A/run-A.wandb \\
                  --run dynamics=wandb/run-B/run-B.wandb --out-dir Logs --suffix latest
              %(prog)s wandb/ --out-dir Logs --format csv,parquet
              %(prog)s RUN_BUNDLE_ROOT --source api --api-run ENTITY/PROJECT/RUN_ID

            files written to --out-dir (per stage / per run):
              {stage}_history_{runid}_{suffix}.csv|.json|.parquet
              {stage}_run_{runid}_{suffix}.json     meta, config, summary, damage
              {stage}_system_{runid}_{suffix}.csv   system metrics
              {stage}_console_{runid}_{suffix}.tsv  console output
            """)
    _add_common(p, "bundle root, wandb/ dir, run dir or .wandb file")
    _add_run(p)
    p.add_argument("--out-dir", help="output directory (default: Logs/ under the default output dir: "
                                     "<bundle>/docs/action/Logs when the bundle is writable, else "
                                     "./twdiag-<bundle name>/Logs)")
    p.add_argument("--suffix", default="latest", help="file name suffix (default: latest)")
    p.add_argument("--format", default="csv,json",
                   help="comma list of csv,json,parquet (default: csv,json)")
    p.add_argument("--workers", type=int, default=None,
                   help="decode processes for large files (default: auto)")
    p.add_argument("--source", choices=("auto", "local", "api"), default="auto",
                   help="where the history comes from (default: auto; see above)")
    p.add_argument("--api-run", action="append", default=[], metavar="[STAGE=]ENTITY/PROJECT/RUN_ID",
                   help="identify a run for --source api/auto (default: the ids in the local run files)")
    p.set_defaults(func=_run_export)


def _run_export(args) -> tuple[dict, int]:
    from . import export
    formats = tuple(f.strip() for f in args.format.split(",") if f.strip())
    bad = [f for f in formats if f not in export.FORMATS]
    if bad:
        raise CliError(f"unknown format(s): {', '.join(bad)}", EXIT_USAGE)
    if "parquet" in formats and importlib.util.find_spec("pyarrow") is None:
        raise CliError("--format parquet needs pyarrow (pip install pyarrow)", EXIT_USAGE)
    t = _thresholds(args.thresholds)
    paths, explicit = _inputs(args, narrow=True)
    b = _discover(paths, explicit, t)
    out = _out_dir(args, b.root, others=list(explicit), notes=b.notes, sub="Logs")
    with outputs.OutputSet(out, order_last=()) as outset:
        doc = export.run(b, outset, args.suffix, formats, args.workers, args.source, args.api_run)
    doc["out_dir"] = str(out)
    if not doc["stages"]:
        return doc, EXIT_UNREADABLE if doc["skipped"] else EXIT_NO_INPUT
    return doc, EXIT_OK


# --- the analysis subcommands ---------------------------------------------------

def _analysis(args, parts, narrow: bool = True):
    t = _thresholds(args.thresholds)
    probe = _probe_options(args, t)  # first: the probe's child imports torch while this process works
    from . import pipeline
    paths, explicit = _inputs(args, narrow)
    b = _discover(paths, explicit, t)
    return pipeline.run(b, t, parts, deep=getattr(args, "deep", "auto"), now=getattr(args, "now", None),
                        count=getattr(args, "count", None),
                        read_outside=getattr(args, "read_outside_bundle", False), probe=probe), t


def _add_stats(sub) -> None:
    p = _subparser(
        sub, "stats", "numeric diagnostics and findings per stage",
        "Loss windows and trend, spikes, blow-ups and divergence (with their onset "
        "step), non-finite values, stage scale (dynamics vs chance ln(codes) on the real "
        "scale, latent-action variance penalty), action diversity, learning rate, "
        "correlations, throughput and the run state from the log's own records, with "
        "findings and a verdict per stage.", """\
            examples:
              %(prog)s RUN_BUNDLE_ROOT
              %(prog)s Logs/dynamics_history_2pghxx71_latest.csv
              %(prog)s wandb/run-20260206_004434-2pghxx71/run-2pghxx71.wandb --details windows.csv
              %(prog)s RUN_BUNDLE_ROOT --thresholds my-thresholds.yaml
              %(prog)s RUN_BUNDLE_ROOT --out-dir docs/action   # + stats.json, stage_windows.csv
            """)
    _add_common(p, "bundle root, wandb dir, .wandb file or exported {stage}_history_* CSV/JSON/Parquet")
    _add_run(p)
    p.add_argument("--details", metavar="FILE", help="write the full per-window table (CSV) to FILE")
    p.add_argument("--out-dir", help="write stats.json (this document) and stage_windows.csv "
                   "(the per-window table) to this directory")
    p.add_argument("--now", type=float, help="unix time to judge the run state against (default: now)")
    p.set_defaults(func=_run_stats)


def _run_stats(args) -> tuple[dict, int]:
    from . import rules
    a, t = _analysis(args, ("stats",))
    doc = {"thresholds": args.thresholds or str(rules.DEFAULT_THRESHOLDS), **a.stats,
           "copied": a.copy.get("copied"), "skipped": a.bundle.skipped, "errors": a.errors}
    for stage, body in doc["stages"].items():
        body["state"] = a.states.get(stage)
        body["findings"] = body["findings"] + [f.to_dict() for f in a.state_findings.get(stage, [])]
        body["verdict"] = rules.verdict_of(body["findings"], body["verdict"] != "insufficient_data")
    doc["overall"] = rules.overall_of(doc["stages"], t)
    if args.details:
        target = Path(args.details)
        outputs.check_out_dir(target.parent, _guarded_roots(a.bundle.root, a.bundle.explicit))
        with outputs.OutputSet(target.parent, order_last=()) as outset:
            _write_details(outset, target.name, a.histories, doc)
        doc["details"] = str(target)
    if args.out_dir:
        out = _out_dir(args, a.bundle.root, others=list(a.bundle.explicit))
        with outputs.OutputSet(out, order_last=("stats.json",)) as outset:
            if not args.details:
                _write_details(outset, "stage_windows.csv", a.histories, doc)
            doc["stats_json"] = str(outset.write_json("stats.json", doc))
    if not a.histories:
        return doc, EXIT_UNREADABLE if doc["skipped"] else EXIT_NO_INPUT
    return doc, EXIT_OK


def _write_details(outset, name: str, histories: dict, doc: dict) -> None:
    import pandas as pd

    from . import stats
    frames = [stats.details_table(h.frame, doc["stages"][s]["metrics"]["loss_key"]).assign(stage=s)
              for s, h in histories.items() if doc["stages"][s]["metrics"].get("loss_key")]
    if frames:
        pd.concat(frames).to_csv(outset.path(name), index=False)


def _add_ckpts(sub) -> None:
    p = _subparser(
        sub, "ckpts", "checkpoint integrity, resumability and the safe fallback",
        "Check every <stage>_step_<N> checkpoint without running its pickle: torch's zip "
        "layout and CRCs, every pickle global against an allowlist of what a TinyWorlds "
        "checkpoint holds (anything else is unsafe_pickle), size budgets, an inert read of "
        "keys, shapes, optimizer groups and saved step; then deep scans (every CRC, each "
        "tensor read with numpy from the certified archive: NaN/Inf, weight norms; no torch) where they "
        "decide the answer. Names "
        "the fallback per stage: the newest intact checkpoint saved before the onset of a "
        "critical problem in the stage's own training (read from its W&B log when the "
        "bundle has one), or restart: true with the reason; and checks the upstream "
        "checkpoints dynamics depends on.", """\
            examples:
              %(prog)s RUN_BUNDLE_ROOT
              %(prog)s results/2026_02_06_00_44_34/dynamics/checkpoints --deep all
              %(prog)s results/RUN/dynamics/checkpoints/dynamics_step_52000
              %(prog)s RUN_BUNDLE_ROOT --out-dir docs/action   # + checkpoints.json (every checkpoint)
              %(prog)s RUN_BUNDLE_ROOT --tinyworlds ~/tinyworlds   # + load them into TinyWorlds' classes

            "resumable": without --tinyworlds a fallback is intact (certified archive,
            allowlisted pickles, finite tensors) but was never loaded into TinyWorlds'
            classes (fallback.resumable: "not verified (no probe)"); with it, "verified"
            means its weights loaded strictly into the stage's class built from its own
            config and its optimizer state fits the configured optimizer.
            """)
    _add_common(p, "bundle root, run root, stage dir, checkpoints dir or one checkpoint")
    p.add_argument("--deep", choices=("auto", "all", "torch", "none"), default="auto",
                   help="tensor scans (numpy, no torch): auto = where they decide the fallback (default), "
                        "all, none; torch = all, plus torch.load(weights_only=True) as a second opinion")
    p.add_argument("--now", type=float, help="unix time to judge the run state against (default: now)")
    p.add_argument("--read-outside-bundle", action="store_true",
                   help="also look at upstream paths recorded in configs that lie outside the bundle")
    _add_out(p, "checkpoints.json")
    _add_probe(p)
    p.set_defaults(func=_run_ckpts)


def _run_ckpts(args) -> tuple[dict, int]:
    from . import report, rules
    a, t = _analysis(args, ("stats", "checkpoints"))
    stages = {}
    for stage, res in a.checkpoints.items():
        body = report.stage_checkpoints(res, a.fallbacks.get(stage))
        # a checkpoint that does not load into TinyWorlds' class (--tinyworlds) is a checkpoint finding
        findings = [f.to_dict() for f in res.findings] + \
                   [f.to_dict() for f in a.dependency_findings if f.stage == stage] + \
                   [f.to_dict() for f in a.probe_findings.get(stage, []) if f.rule_id == "probe_not_resumable"]
        fb = a.fallbacks.get(stage) or {}
        stages[stage] = {"verdict": rules.verdict_of(findings, bool(res.checkpoints)), **body,
                         "fallback": {k: v for k, v in fb.items() if k != "checkpoints"},
                         "findings": sorted(findings, key=lambda f: rules.SEVERITY_ORDER[f["severity"]])}
        probed = ((a.probe or {}).get("stages") or {}).get(stage)
        if probed:
            stages[stage]["probe"] = report.probe_line(stage, probed)
    doc = {"torch": _torch_version(), "deep_mode": args.deep, "stages": stages,
           "resumable_means": report.RESUMABLE_WITHOUT_PROBE if not (a.probe or {}).get("ran") else
           report.RESUMABLE_WITH_PROBE, "probe": report.probe_summary(a),
           "dependencies": a.dependencies, "copied": a.copy.get("copied"),
           "skipped": a.bundle.skipped, "errors": a.errors, "seconds": a.timings.get("total_s")}
    doc["overall"] = rules.overall_of(stages, t)
    if args.out_dir:
        out = _out_dir(args, a.bundle.root, others=list(a.bundle.explicit))
        with outputs.OutputSet(out, order_last=()) as outset:
            details = {s: [c.details() for c in r.checkpoints] for s, r in a.checkpoints.items()}
            doc["details"] = str(outset.write_json("checkpoints.json", {**doc, "checkpoints": details}))
    if not any(v["total"] for v in stages.values()):
        return doc, EXIT_NO_INPUT
    return doc, EXIT_OK  # invalid checkpoints are a verdict, not an input error


def _torch_version():
    from . import checkpoints
    return checkpoints.torch_version()


def _add_probe_cmd(sub) -> None:
    p = _subparser(
        sub, "probe", "measure the models with TinyWorlds' own classes (resumability, fidelity, control)",
        "Build each stage's class from the checkpoint's saved config with the models/ package of a "
        "TinyWorlds checkout, in a child process under a time and memory budget, and measure: "
        "whether the fallback and the newest checkpoint load strictly (weights into the class, "
        "optimizer state into the optimizer the config names); the tokenizer's reconstruction PSNR/SSIM "
        "against the sample's mean frame, codes used and dead quantiser dimensions; how much the action "
        "decoder depends on the inferred actions (and their mutual information with true actions when "
        "the data has them); dynamics' next-frame accuracy against copying the last frame, and "
        "ΔtPSNR (inferred minus random actions, Genie's controllability measure). state.pt is read "
        "through the allowlist only; weights with torch.load(weights_only=True).", """\
            examples:
              %(prog)s RUN_BUNDLE_ROOT --tinyworlds ~/tinyworlds
              %(prog)s RUN_BUNDLE_ROOT --tinyworlds ~/tinyworlds --data ~/tinyworlds/data/pong_frames.h5
              %(prog)s RUN_BUNDLE_ROOT --tinyworlds ~/tinyworlds --out-dir /tmp/probe   # + probe.json, probe_sheet.png
              %(prog)s RUN_BUNDLE_ROOT --tinyworlds ~/tinyworlds --device cuda --probe-seconds 900

            Without --data the frames are the "original" panels of the bundle's own
            latent_actions (else video_tokenizer) grids: 4 sequences of 4 frames.
            """)
    _add_common(p, "bundle root (or run root, stage dir)")
    _add_out(p, "probe.json and probe_sheet.png")
    _add_probe(p, required=True)
    p.set_defaults(func=_run_probe)


def _run_probe(args) -> tuple[dict, int]:
    from . import report, rules
    a, t = _analysis(args, ("stats", "checkpoints", "visuals"))
    if not a.checkpoints:
        return {"error": "no checkpoints found to probe", "skipped": a.bundle.skipped}, EXIT_NO_INPUT
    probe = a.probe or {}
    stages = {}
    for stage, doc in (probe.get("stages") or {}).items():
        found = [f.to_dict() for f in a.probe_findings.get(stage, [])]
        fb = a.fallbacks.get(stage) or {}
        stages[stage] = {"verdict": rules.verdict_of(found, True), "summary": report.probe_line(stage, doc),
                         "fallback": {k: fb.get(k) for k in ("step", "path", "restart", "reason", "resumable",
                                                             "moved_by_probe") if k in fb},
                         "findings": found, "probe": doc}
    out = {"ran": probe.get("ran", False), "reason": probe.get("reason"),
           **{k: probe.get(k) for k in ("tinyworlds", "torch", "seconds", "frames_source", "notes", "how")},
           "stages": stages, "skipped": a.bundle.skipped, "errors": a.errors}
    out["overall"] = rules.overall_of(stages, t) if stages else None
    if args.out_dir:
        outdir = _out_dir(args, a.bundle.root, others=list(a.bundle.explicit))
        with outputs.OutputSet(outdir, order_last=()) as outset:
            if a.probe_pictures:
                from . import probe_sheet
                pic = probe_sheet.sheet(a.probe_pictures)
                if pic is not None:
                    out["probe_sheet"] = str(outset.write_image("probe_sheet.png", pic))
            out["details"] = str(outset.final("probe.json"))
            outset.write_json("probe.json", out)
    return out, EXIT_OK if out["ran"] else EXIT_UNREADABLE


def _add_visuals(sub) -> None:
    p = _subparser(
        sub, "visuals", "image-grid metrics, visual findings and a contact sheet",
        "Find each stage's visualizations/*_step_<N>.png, split TinyWorlds' two "
        "panels (originals | outputs) into grid cells and measure what a person "
        "would see: flat colour, stripes, output that ignores its input, "
        "PSNR/SSIM where cells align, and the trend over all images. Writes one "
        "labelled contact sheet (long side <= 2000 px) and visuals.json.", """\
            examples:
              %(prog)s RUN_BUNDLE_ROOT
              %(prog)s results/RUN/dynamics --count 6 --out-dir /tmp/sheets
              %(prog)s results/RUN/dynamics/visualizations/dynamics_prediction_step_50000.png

            files written to --out-dir:
              contact_sheet.png   first, middle and latest images per stage, labelled
              visuals.json        every image's metrics and flags
            """)
    _add_common(p, "bundle root, run root, stage dir, visualizations dir or one PNG")
    _add_out(p, "contact_sheet.png and visuals.json")
    p.add_argument("--count", type=int, help="images per stage on the sheet (default: 4)")
    p.set_defaults(func=_run_visuals)


def _run_visuals(args) -> tuple[dict, int]:
    from . import report_files, rules, visuals
    if args.count is not None and args.count < 1:
        raise CliError("--count must be at least 1", EXIT_USAGE)
    a, t = _analysis(args, ("visuals",))
    res = a.visuals or {"doc": {"stages": {}}, "sheet_rows": [], "details": {}}
    doc = {**res["doc"], "skipped": a.bundle.skipped, "errors": a.errors}
    doc["overall"] = rules.overall_of(doc["stages"], t)
    if any(v["analysed"] for v in doc["stages"].values()):
        out = _out_dir(args, a.bundle.root, others=list(a.bundle.explicit))
        with outputs.OutputSet(out, order_last=()) as outset:
            image = visuals.sheet(res, t)
            if image is not None:
                doc["contact_sheet"] = str(outset.write_image("contact_sheet.png", image))
            doc["details"] = str(outset.write_json("visuals.json", {**report_files.visuals_document(a),
                                                                    "errors": a.errors}))
    if not any(v["images"] for v in doc["stages"].values()):
        return doc, EXIT_NO_INPUT
    if not any(v["analysed"] for v in doc["stages"].values()):
        return doc, EXIT_UNREADABLE
    return doc, EXIT_OK


# --- diagnose -----------------------------------------------------------------------

def _add_diagnose(sub) -> None:
    p = _subparser(
        sub, "diagnose", "one-shot answer: verdicts, evidence, fallback, next actions",
        "Run stats, checkpoint checks and visual checks on a TinyWorlds bundle and "
        "combine them into a verdict per stage and overall (normal / watch / critical), "
        "the run state (from the logs' own records), evidence paths, the fallback "
        "checkpoint per stage and next actions in priority order. Writes diagnosis.json, "
        "diagnosis.md, diagnosis.html, loss plots and a contact sheet; prints a compact "
        "JSON summary that is enough to answer from.", """\
            examples:
              %(prog)s RUN_BUNDLE_ROOT
              %(prog)s RUN_BUNDLE_ROOT --out-dir /tmp/diag --fail-on critical
              %(prog)s . --results results/2026_02_06_00_44_34 --run dynamics=wandb/run-X/run-X.wandb
              %(prog)s wandb/run-X/run-X.wandb          # one log: that stage's --run
              %(prog)s RUN_BUNDLE_ROOT --follow --interval 60   # watch a live run (NDJSON)
              RUN_BUNDLE_ROOT=/data/run %(prog)s --deep all
              %(prog)s RUN_BUNDLE_ROOT --tinyworlds ~/tinyworlds --data frames.h5   # measure the models

            files written to --out-dir (default: <bundle>/docs/action/ when the bundle is
            writable, else ./twdiag-<bundle name>/):
              diagnosis.json   everything (stdout gets the compact version)
              diagnosis.md     the report, in the checklist's template, images linked
              diagnosis.html   the same, self-contained: open or mail one file
              loss_<stage>.png loss, lr, checkpoints and fallback; action panel for latent_actions
              contact_sheet.png  first/middle/latest image grids per stage
              probe_sheet.png  with --tinyworlds: real frames, reconstructions, rollouts
              checkpoints.json, visuals.json  per-checkpoint and per-image details

            --follow: one JSON object per line on stdout whenever a stage's verdict,
            state, fallback or newest finding changes; a heartbeat on stderr each
            poll; the files above rewritten when something changed. Stops when every
            stage finished or the run is judged crashed, on Ctrl-C, or (exit 10) at
            the first poll that reaches --fail-on.
            """)
    p.add_argument("bundle", nargs="?", help="bundle root holding results/ and/or wandb/; wandb/, results/, "
                   "a run root or a stage dir step up to it; one .wandb file is its stage's --run "
                   "(default: $RUN_BUNDLE_ROOT or .)")
    _add_run(p)
    p.add_argument("--results", metavar="DIR",
                   help="read checkpoints and images from this run root (results/<ts>) instead "
                        "of the newest one per stage")
    _add_out(p, "the report files")
    p.add_argument("--fail-on", choices=sorted(GATES),
                   help=f"exit {EXIT_GATE} when the overall verdict reaches this level (CI/cron)")
    p.add_argument("--deep", choices=("auto", "all", "torch", "none"), default="auto",
                   help="checkpoint tensor scans (numpy, no torch): auto = where they decide the fallback "
                        "(default), all, none; torch = all plus torch's own loader as a second opinion")
    p.add_argument("--count", type=int, help="images per stage on the contact sheet (default: 4)")
    p.add_argument("--thresholds", help="YAML merged over the default thresholds")
    p.add_argument("--now", type=float, help="unix time to judge the run state against (default: now)")
    p.add_argument("--baseline", action="append", default=[], metavar="PATH",
                   help="a healthy run to compare against; drift findings join the verdict (repeatable)")
    p.add_argument("--read-outside-bundle", action="store_true",
                   help="also look at upstream paths recorded in configs that lie outside the bundle")
    p.add_argument("--follow", action="store_true", help="keep watching a live run (see below)")
    p.add_argument("--interval", type=float, default=30.0, help="seconds between --follow polls (default 30)")
    p.add_argument("--max-polls", type=int, help="--follow: stop after this many polls")
    _add_probe(p)
    p.set_defaults(func=_run_diagnose)


def resolve_diagnose_input(arg: str | None, explicit: dict) -> tuple[Path, dict, Path | None, list[str]]:
    """(bundle root, --run map, --results override, notes) for diagnose's one
    positional input: wandb/, results/, a run root or stage dir step up to the
    bundle root; one .wandb file becomes its stage's --run."""
    from . import bundle, safefs
    given = _default_input(arg)
    _require_existing([given])
    notes, results = [], None
    if given.suffix == ".wandb" and not safefs.is_dir(given):
        root = bundle.bundle_root_of(given)
        notes.append(f"{given} is one W&B log: it is used as its stage's --run, with the bundle at {root}")
        explicit = {**explicit, given: bundle.ANY_STAGE}
        return root, explicit, None, notes
    if not safefs.is_dir(given):
        raise CliError(f"not a directory or .wandb file: {given} (give the bundle root)", EXIT_USAGE)
    real = safefs.resolve(given)
    root = bundle.bundle_root_of(real)
    if root != real:
        if bundle.is_run_root(real) or bundle.locate_stage(real)[0]:
            results = given
        notes.append(f"{given} is inside the bundle {root}: using the bundle root"
                     + (f", with checkpoints and images from {given}" if results else ""))
    return (root if root != real else given), explicit, results, notes


def _run_diagnose(args) -> tuple[dict, int]:
    t = _thresholds(args.thresholds)
    if args.follow and args.tinyworlds:
        raise CliError("--tinyworlds measures the models once: run it without --follow (a live run's newest "
                       "checkpoint changes under it)", EXIT_USAGE)
    probe = None if args.follow else _probe_options(args, t)  # first: its child imports torch meanwhile
    where = _diagnose_inputs(args)  # a usage error returns before any heavy import
    if args.follow:
        from . import follow
        return None, follow.run(where.root, where.explicit, where.results, t, args, where.out)
    b = _discover([where.root], where.explicit, t, results=where.results, root=where.root)
    # Two processes forked to use the second core from the start: the images'
    # analysis (it needs only the files), while this process imports pandas and
    # reads logs and checkpoints; then the drawer (after pandas, which it inherits).
    images = None
    if any(art.images for art in b.stages.values()):
        from . import visuals  # PIL: imported once, inherited by the images' child
        images = visuals.SharedImages(b, t, args.count)
    drawer = None
    try:
        from . import pipeline  # noqa: F401  (pandas, numpy, PIL: imported once, inherited by the drawer)
        drawer = Drawer.start()  # imports matplotlib meanwhile, then draws
        return _diagnose(args, t, probe, drawer, where, b, images)
    finally:
        if images is not None:
            images.cancel()  # nothing to do once its result was read
        if drawer is not None:
            drawer.close()


@dataclass
class _Inputs:
    """What diagnose reads and where it writes, checked before any work."""
    root: Path
    explicit: dict  # path -> stage, from --run
    results: Path | None
    baselines: list
    out: Path
    notes: list


def _diagnose_inputs(args) -> _Inputs:
    explicit = _explicit(args.run)
    root, explicit, auto_results, notes = resolve_diagnose_input(args.bundle, explicit)
    baselines = [Path(b) for b in args.baseline]
    results = Path(args.results) if args.results else auto_results
    _require_existing([*[p for p in explicit], *baselines, *([results] if results else [])])
    notes_out: list = []
    out = _out_dir(args, root, others=[*explicit, *baselines, *([results] if results else [])], notes=notes_out)
    return _Inputs(root, explicit, results, baselines, out, notes + notes_out)


def _diagnose(args, t: dict, probe, drawer: Drawer | None, where: _Inputs, b,
              images: forking.Pending | None) -> tuple[dict, int]:
    from . import pipeline, report, report_files
    root = where.root
    b.notes[:0] = where.notes
    for note in where.notes:
        outputs.log(f"note: {note}")
    if b.empty:
        return {"error": f"no TinyWorlds logs, checkpoints or images under {root}",
                "skipped": b.skipped, "notes": b.notes}, EXIT_NO_INPUT
    a = pipeline.run(b, t, deep=args.deep, now=args.now, count=args.count,
                     read_outside=args.read_outside_bundle, probe=probe, images=images)
    cmp = None
    if where.baselines:
        from . import compare
        cmp = _guarded_compare(a, compare, where.baselines, t, args.count)
    doc = report_files.write_report(a, cmp, where.out, drawer=drawer)
    if all(e["verdict"] == "missing" for e in doc["stages"].values()):
        return {"error": f"no TinyWorlds logs, checkpoints or images could be read under {root}",
                "skipped": doc["skipped"], "outputs": doc.get("outputs")}, EXIT_UNREADABLE
    code = EXIT_GATE if args.fail_on and doc["overall"] in GATES[args.fail_on] else EXIT_OK
    return report.compact(doc), code


def _guarded_compare(a, compare, baselines, t, count):
    from . import logs
    try:
        decoded = {s: logs.StageRuns(s, h.logs) for s, h in a.histories.items()}
        return compare.compare(a.bundle.root, baselines, t, count or t["visuals"]["sheet_count"],
                               current_runs=decoded)
    except Exception as exc:  # the comparison is an extra: the diagnosis stands without it
        a.errors.append({"step": "compare", "error": f"{type(exc).__name__}: {exc}"[:500]})
        return None


# --- compare -------------------------------------------------------------------------

def _add_compare(sub) -> None:
    p = _subparser(
        sub, "compare", "drift from a healthy baseline, config diff, side-by-side visuals",
        "First check that the baseline is comparable (model dims, dataset, batch size, "
        "n_actions, number of codes); if not, give the config diff only. Otherwise align the "
        "current run with one or more baselines by step and report, per stage: the step "
        "where the loss leaves the baseline envelope and stays out (onset) and the "
        "current/baseline ratio, action statistics and throughput against the baseline, the "
        "config keys that differ (those known to move training first) and checkpoint counts "
        "and sizes. With no --baseline, the newest run of each stage is compared with the "
        "earlier runs in the same wandb/ folder.", """\
            examples:
              %(prog)s RUN_BUNDLE_ROOT --baseline /data/last_week_bundle
              %(prog)s wandb/run-B/run-B.wandb --baseline wandb/run-A/run-A.wandb --out-dir /tmp/cmp
              %(prog)s wandb/      # newest run per stage vs the runs before it

            files written to --out-dir:
              compare.json          everything, with the per-window ratios
              overlay_<stage>.png   current vs baseline loss, envelope shaded, onset marked
              compare_sheet.png     the same steps from both runs, side by side
            """)
    p.add_argument("current", nargs="?", help="bundle root, wandb/ run dir or .wandb file of the "
                   "run to check (default: $RUN_BUNDLE_ROOT or .)")
    p.add_argument("--baseline", action="append", default=[], metavar="PATH",
                   help="a healthy run to compare against (repeatable)")
    _add_out(p, "compare.json and the overlays")
    p.add_argument("--count", type=int, default=4, help="steps on the side-by-side sheet (default: 4)")
    p.add_argument("--thresholds", help="YAML merged over the default thresholds")
    p.set_defaults(func=_run_compare)


def _run_compare(args) -> tuple[dict, int]:
    from . import bundle, compare, plots
    t = _thresholds(args.thresholds)
    current = _default_input(args.current)
    baselines = [Path(b) for b in args.baseline]
    _require_existing([current, *baselines])
    root = bundle.bundle_root_of(current)
    out = _out_dir(args, root, others=baselines)
    res = compare.compare(current, baselines, t, args.count)
    doc = res["doc"]
    with outputs.OutputSet(out, order_last=("compare.json",)) as outset:
        files = {}
        for name, fig in res["figures"].items():
            files[name] = str(outset.write_image(name, fig))
            plots.close(fig)
        if res["sheet"] is not None:
            files["compare_sheet"] = str(outset.write_image("compare_sheet.png", res["sheet"]))
        files["compare_json"] = str(outset.final("compare.json"))
        doc["outputs"] = files
        outset.write_json("compare.json", doc)
    if not doc["stages"]:
        return doc, EXIT_UNREADABLE if doc["skipped"] else EXIT_NO_INPUT
    return doc, EXIT_OK


# --- scan, query, records ---------------------------------------------------------------

def _add_scan(sub) -> None:
    p = _subparser(
        sub, "scan", "diagnose every bundle under some roots into one Parquet dataset",
        "Find every bundle under the roots (a folder with wandb/ or results/), diagnose each "
        "exactly as diagnose.py would, in a bounded pool of workers, and write one Parquet "
        "dataset partitioned by bundle (tables bundles, stages, findings, checkpoints, images, "
        "history), each bundle's own report files and an index.html. A second scan re-diagnoses "
        "only bundles whose content signature changed (sizes and hashes of each file's head and "
        "tail; never mtimes). --shard i/n takes a deterministic share, so any scheduler can run "
        "the shards into the same dataset.", """\
            examples:
              %(prog)s /backups --out /tmp/scan
              %(prog)s /backups/20261122_101500 /backups/20261128_093000 --out /tmp/scan --workers 2
              %(prog)s /backups --out /shared/scan --shard 3/8     # one task of a SLURM array
              then: twdiag query /tmp/scan "SELECT bundle, stage, verdict FROM stages ORDER BY bundle"
            """)
    p.add_argument("roots", nargs="+", help="folders holding bundles (or bundles themselves)")
    p.add_argument("--out", required=True, help="the dataset folder (created; reused by the next scan)")
    p.add_argument("--workers", type=int, help="worker processes (default: the CPUs, at most 4)")
    p.add_argument("--shard", default="0/1", help="i/n: scan the bundles whose path hashes to i mod n (default 0/1)")
    p.add_argument("--thresholds", help="YAML merged over the default thresholds")
    p.set_defaults(func=_run_scan)


def _run_scan(args) -> tuple[dict, int]:
    _require_modules(["pyarrow"], "scan (it writes Parquet)", "python -m pip install pyarrow")
    from . import scan
    t = _thresholds(args.thresholds)
    m = re.fullmatch(r"(\d+)/(\d+)", args.shard or "")
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise CliError(f"--shard must be i/n with 0 <= i < n, not {args.shard!r}", EXIT_USAGE)
    roots = [Path(r) for r in args.roots]
    _require_existing(roots)
    out = Path(args.out)
    outputs.check_out_dir(out, roots)
    if args.workers is not None and args.workers < 1:
        raise CliError("--workers must be at least 1", EXIT_USAGE)
    doc = scan.run(roots, out, t, args.workers, (int(m.group(1)), int(m.group(2))))
    if not doc["bundles_found"]:
        return doc, EXIT_NO_INPUT
    return doc, EXIT_OK


def _add_query(sub) -> None:
    p = _subparser(
        sub, "query", "SQL over a scan's dataset or one bundle's tables (DuckDB, read-only)",
        "Run one SELECT (or WITH ... SELECT) with DuckDB over the tables bundles, stages, findings, "
        "checkpoints, images and history: those of a scan's dataset, or of one bundle diagnosed "
        "on the fly. history is wide: bundle, stage, step, source and every numeric column "
        "(quote names with slashes: \"train/loss\"). Nothing else runs: no other statement, no "
        "file or network access.", """\
            examples:
              %(prog)s RUN_BUNDLE_ROOT "SELECT step, \"train/loss\" FROM history WHERE stage='dynamics' AND step BETWEEN 100 AND 120"
              %(prog)s RUN_BUNDLE_ROOT "SELECT max(\"train/loss\") AS peak, arg_max(step, \"train/loss\") AS at FROM history WHERE stage='dynamics'"
              %(prog)s RUN_BUNDLE_ROOT "SELECT step, status, loss, weights_vs_earliest FROM checkpoints WHERE stage='dynamics'"
              %(prog)s /tmp/scan "SELECT bundle, verdict, fallback_step FROM stages WHERE stage='dynamics' ORDER BY bundle"
              %(prog)s /tmp/scan "SELECT * FROM findings WHERE severity='critical'" --format csv
            """)
    p.add_argument("target", help="a scan's output folder, or a bundle root")
    p.add_argument("sql", help="one SELECT statement")
    p.add_argument("--format", choices=("json", "csv"), default="json", help="json (default) or csv on stdout")
    p.add_argument("--limit", type=int, default=1000, help="rows printed at most (default 1000; the JSON says when it cuts)")
    p.add_argument("--thresholds", help="YAML merged over the default thresholds (bundle targets)")
    p.set_defaults(func=_run_query)


def _run_query(args) -> tuple[dict, int]:
    _require_modules(["duckdb"], "query", "python -m pip install duckdb")
    from . import query
    target = Path(args.target)
    _require_existing([target])
    if args.limit < 1:
        raise CliError("--limit must be at least 1", EXIT_USAGE)
    t = _thresholds(args.thresholds)
    try:
        doc = query.run(target, args.sql, t, args.limit)
    except query.QueryError as exc:
        raise CliError(str(exc), EXIT_USAGE)
    if args.format == "csv":
        import csv
        w = csv.writer(sys.stdout)
        w.writerow(doc["columns"])
        for row in doc["rows"]:
            w.writerow([row[c] for c in doc["columns"]])
        if doc["cut"]:
            outputs.log(doc["cut_note"])
        return None, EXIT_OK
    return {"target": str(target), "sql": args.sql, **doc}, EXIT_OK


def _add_records(sub) -> None:
    p = _subparser(
        sub, "records", "the raw records of one .wandb log, one JSON object a line",
        "Decode one .wandb file with our framing and wandb's own protobuf classes and print each "
        "record as a JSON line: its offset, type and content (history: step and items; config "
        "and summary: items set and removed; others: wandb's message). The last line is the scan "
        "report (damage as values). The independent check of any number, without a reader of "
        "your own.", """\
            examples:
              %(prog)s wandb/run-X/run-X.wandb --type history --steps 100:110
              %(prog)s wandb/run-X/run-X.wandb --type config --type exit
              %(prog)s wandb/run-X/run-X.wandb --type output_raw --limit 50
            """)
    p.add_argument("file", help="a .wandb file")
    p.add_argument("--type", action="append", default=[], metavar="TYPE",
                   help="keep only these record types (repeatable): history, config, summary, exit, stats, "
                        "output, output_raw, run, ...")
    p.add_argument("--steps", help="a:b keeps history records with a <= step < b (either side may be empty)")
    p.add_argument("--limit", type=int, default=1000, help="records printed at most (default 1000)")
    p.set_defaults(func=_run_records)


def _run_records(args) -> tuple[dict | None, int]:
    from . import records, safefs
    path = Path(args.file)
    _require_existing([path])
    if not safefs.is_regular(path):
        raise CliError(f"not a regular file: {path}", EXIT_USAGE)
    steps = None
    if args.steps:
        m = re.fullmatch(r"(-?\d*):(-?\d*)", args.steps)
        if not m:
            raise CliError(f"--steps must be a:b, not {args.steps!r}", EXIT_USAGE)
        steps = (int(m.group(1)) if m.group(1) else None, int(m.group(2)) if m.group(2) else None)
    if args.limit < 1:
        raise CliError("--limit must be at least 1", EXIT_USAGE)
    shown, cut = 0, 0
    for rec in records.iter_records(path, set(args.type) or None, steps):
        if rec["type"] == "scan_report":
            print(outputs.dumps({**rec, "records_shown": shown, "records_not_shown": cut}, indent=None), flush=True)
            if not rec.get("header_ok"):
                outputs.log(f"error: not a readable .wandb log: {rec.get('header_error')}")
                return None, EXIT_UNREADABLE
            break
        if shown < args.limit:
            print(outputs.dumps(rec, indent=None), flush=True)
            shown += 1
        else:
            cut += 1
    return None, EXIT_OK


# --- install-skill ---------------------------------------------------------------------

def _add_install(sub) -> None:
    p = _subparser(
        sub, "install-skill", "copy the skill's files into an agent's skills folder",
        "Copy only what the skill needs (SKILL.md, agents/, references/, scripts/, the twdiag "
        "library and requirements.txt) into DEST/tinyworlds-training-diagnostics/. Creates "
        "DEST; refuses to overwrite an existing copy without --force.", """\
            examples:
              %(prog)s .claude/skills      # Claude Code
              %(prog)s .agents/skills      # Codex and other agents
              %(prog)s ~/.claude/skills --force
            """)
    p.add_argument("dest", help="the skills folder (created if missing)")
    p.add_argument("--force", action="store_true", help="replace an existing copy")
    p.set_defaults(func=_run_install)


def _run_install(args) -> tuple[dict, int]:
    from . import install
    try:
        return install.install_skill(Path(args.dest), args.force), EXIT_OK
    except install.InstallError as exc:
        raise CliError(str(exc), exc.code)


# --- entry point --------------------------------------------------------------

SUBCOMMANDS = [_add_diagnose, _add_export, _add_stats, _add_ckpts, _add_probe_cmd, _add_visuals, _add_compare, _add_scan,
               _add_query, _add_records, _add_install]


def build_parser(prog: str = "twdiag") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="TinyWorlds training diagnostics: is my training healthy?",
        epilog=EXIT_CODES_HELP)
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run a subcommand; print its JSON; return the exit code. Never a traceback
    unless TWDIAG_DEBUG is set."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if prog and argv:  # a script: show its own name in --help and errors
        sub_parser = parser._subparsers._group_actions[0].choices[argv[0]]
        sub_parser.prog = prog
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or usage error (2)
        code = int(exc.code or 0)
        if code:  # argparse explained on stderr; stdout still gets its JSON
            outputs.emit({"tool": "twdiag", "version": __version__,
                          "error": "usage error (see stderr or --help)", "exit_code": code})
        return code
    outputs.install_sigterm_handler()
    command = args.command
    try:
        doc, code = args.func(args)
    except CliError as exc:
        doc, code = {"error": str(exc)}, exc.code
        outputs.log(f"error: {exc}")
    except outputs.OutputError as exc:
        doc, code = {"error": str(exc)}, EXIT_OUTPUT
        outputs.log(f"error: {exc}")
    except KeyboardInterrupt:
        outputs.log("interrupted")
        return 130
    except Exception as exc:  # a bug: say so plainly, keep stdout JSON
        if os.environ.get("TWDIAG_DEBUG"):
            raise
        doc = {"error": f"internal error: {type(exc).__name__}: {exc}"[:1000],
               "hint": "rerun with TWDIAG_DEBUG=1 for a traceback and report it"}
        code = EXIT_INTERNAL
        outputs.log(f"internal error: {type(exc).__name__}: {exc}")
    if doc is None:  # --follow printed its own lines
        return code
    doc = {"tool": f"twdiag {command}", "version": __version__, **doc, "exit_code": code}
    outputs.emit(doc, MAX_STDOUT_BYTES)
    return code


if __name__ == "__main__":
    sys.exit(main())
