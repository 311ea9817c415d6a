"""`twdiag` console command: thin subcommands over the library.

Every subcommand prints exactly one JSON document on stdout; progress goes to
stderr. The scripts in `scripts/` call `main()` with their subcommand.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import textwrap
from pathlib import Path

from . import __version__, outputs

# Exit codes, shared by every subcommand and script (documented in --help,
# SKILL.md and the README).
EXIT_OK = 0           # ran; the verdict (if any) is in the JSON
EXIT_INTERNAL = 1     # a bug: report it (the JSON says what failed)
EXIT_USAGE = 2        # bad flags or arguments
EXIT_NO_INPUT = 3     # the input path does not exist or holds nothing to analyse
EXIT_UNREADABLE = 4   # input found, but none of it could be read
EXIT_OUTPUT = 5       # the output dir cannot be used (or lies inside the bundle)
EXIT_GATE = 10        # diagnose --fail-on: the verdict reached the gate level

EXIT_CODES_HELP = f"""\
exit codes:
  {EXIT_OK}   success (whatever the verdict)
  {EXIT_INTERNAL}   internal error (a bug; the JSON has "error")
  {EXIT_USAGE}   usage error
  {EXIT_NO_INPUT}   input missing or holds nothing to analyse
  {EXIT_UNREADABLE}   input found but nothing in it was readable
  {EXIT_OUTPUT}   output dir unusable or inside the run bundle
  {EXIT_GATE}  diagnose --fail-on level reached
"""


class CliError(Exception):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def _paths(values: list[str] | None) -> list[Path]:
    if values:
        return [Path(v) for v in values]
    return [Path(os.environ.get("RUN_BUNDLE_ROOT") or ".")]


def _require_existing(paths: list[Path]) -> None:
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise CliError(f"input does not exist: {', '.join(missing)}", EXIT_NO_INPUT)


def _subparser(sub, name: str, help: str, description: str, examples: str):
    return sub.add_parser(name, help=help, description=description,
                          formatter_class=argparse.RawDescriptionHelpFormatter,
                          epilog=textwrap.dedent(examples) + EXIT_CODES_HELP)


def _add_inputs(p, what: str) -> None:
    p.add_argument("paths", nargs="*", help=f"{what} (default: $RUN_BUNDLE_ROOT or .)")
    p.add_argument("--run", action="append", default=[], metavar="STAGE=PATH",
                   help="map a .wandb file to a stage explicitly (repeatable)")


def _inputs(args) -> tuple[list[Path], dict]:
    """Positional paths (or the default bundle) and --run mappings, checked."""
    explicit = _explicit(args.run)
    paths = [] if (args.run and not args.paths) else _paths(args.paths)
    _require_existing(paths + list(explicit))
    return paths, explicit


# --- export -----------------------------------------------------------------

def _add_export(sub) -> None:
    p = _subparser(
        sub, "export", "export local .wandb logs to CSV/JSON/Parquet per stage",
        "Decode local .wandb transaction logs (no network, no wandb datastore) into "
        "per-stage history tables plus run metadata, config, replayed summary, "
        "system stats and console output.", """\
            examples:
              %(prog)s RUN_BUNDLE_ROOT --out-dir Logs
              %(prog)s --run video_tokenizer=wandb/run-A/run-A.wandb \\
                  --run dynamics=wandb/run-B/run-B.wandb --out-dir Logs --suffix latest
              %(prog)s wandb/ --out-dir Logs --format csv,parquet

            files written to --out-dir (per stage / per run):
              {stage}_history_{runid}_{suffix}.csv|.json|.parquet
              {stage}_run_{runid}_{suffix}.json     meta, config, summary, damage
              {stage}_system_{runid}_{suffix}.csv   system metrics
              {stage}_console_{runid}_{suffix}.tsv  console output
            """)
    _add_inputs(p, "bundle root, wandb/ dir, run dir or .wandb file")
    p.add_argument("--out-dir", default="Logs", help="output directory (default: Logs)")
    p.add_argument("--suffix", default="latest", help="file name suffix (default: latest)")
    p.add_argument("--format", default="csv,json",
                   help="comma list of csv,json,parquet (default: csv,json)")
    p.add_argument("--workers", type=int, default=None,
                   help="decode processes for large files (default: auto)")
    p.set_defaults(func=_run_export)


def _run_export(args) -> tuple[dict, int]:
    from . import export
    formats = tuple(f.strip() for f in args.format.split(",") if f.strip())
    bad = [f for f in formats if f not in export.FORMATS]
    if bad:
        raise CliError(f"unknown format(s): {', '.join(bad)}", EXIT_USAGE)
    if "parquet" in formats and importlib.util.find_spec("pyarrow") is None:
        raise CliError("--format parquet needs pyarrow (pip install "
                       "'tinyworlds-training-diagnostics[parquet]')", EXIT_USAGE)
    paths, explicit = _inputs(args)
    out = outputs.prepare_out_dir(args.out_dir, _bundle_roots(paths + list(explicit)))
    doc = export.export(paths, out, explicit, args.suffix, formats, args.workers)
    if not doc["stages"]:
        return doc, EXIT_UNREADABLE if doc["skipped"] else EXIT_NO_INPUT
    return doc, EXIT_OK


def _bundle_roots(paths: list[Path]) -> list[Path]:
    from . import bundle
    return [bundle.bundle_root_of(p) for p in paths if p.exists()]


# --- stats ------------------------------------------------------------------

def _add_stats(sub) -> None:
    p = _subparser(
        sub, "stats", "numeric diagnostics and findings per stage",
        "Loss windows and trend, spikes, non-finite values, stage scale (dynamics vs "
        "chance ln(codes), latent-action variance penalty), action diversity, "
        "learning rate, correlations, throughput and liveness, with findings and a "
        "verdict per stage.", """\
            examples:
              %(prog)s RUN_BUNDLE_ROOT
              %(prog)s Logs/dynamics_history_2pghxx71_latest.csv
              %(prog)s wandb/run-20260206_004434-2pghxx71/run-2pghxx71.wandb --details windows.csv
              %(prog)s RUN_BUNDLE_ROOT --thresholds my-thresholds.yaml
              %(prog)s RUN_BUNDLE_ROOT --out-dir docs/action   # + stats.json, stage_windows.csv
            """)
    _add_inputs(p, "bundle root, wandb dir, .wandb file or exported "
                   "{stage}_history_* CSV/JSON/Parquet")
    p.add_argument("--thresholds", help="YAML merged over the default thresholds")
    p.add_argument("--details", metavar="FILE",
                   help="write the full per-window table (CSV) to FILE")
    p.add_argument("--out-dir", help="write stats.json (this document) and stage_windows.csv "
                   "(the per-window table) to this directory")
    p.add_argument("--now", type=float, help="unix time to judge liveness against (default: now)")
    p.set_defaults(func=_run_stats)


def _run_stats(args) -> tuple[dict, int]:
    from . import rules, stats
    thresholds = _thresholds(args.thresholds)
    paths, explicit = _inputs(args)
    body, histories = stats.analyse_paths(paths, explicit, thresholds, args.now)
    doc = {"thresholds": args.thresholds or str(rules.DEFAULT_THRESHOLDS), **body}
    if args.details:
        _write_details(Path(args.details), histories, doc, paths)
    if args.out_dir:
        out = outputs.prepare_out_dir(args.out_dir, _bundle_roots(paths))
        if not args.details:
            _write_details(out / "stage_windows.csv", histories, doc, paths)
        doc["stats_json"] = str(outputs.write_json(out / "stats.json", doc))
    if not histories:
        return doc, EXIT_UNREADABLE if doc["skipped"] else EXIT_NO_INPUT
    return doc, EXIT_OK


def _write_details(target: Path, histories: dict, doc: dict, paths: list[Path]) -> None:
    import pandas as pd

    from . import stats
    frames = [stats.details_table(h.frame, doc["stages"][s]["metrics"]["loss_key"]).assign(stage=s)
              for s, h in histories.items() if doc["stages"][s]["metrics"].get("loss_key")]
    if not frames:
        return
    outputs.prepare_out_dir(target.parent.resolve(), _bundle_roots(paths))
    with outputs.atomic_path(target) as tmp:
        pd.concat(frames).to_csv(tmp, index=False)
    doc["details"] = str(target)


# --- checkpoints ----------------------------------------------------------------

def _add_ckpts(sub) -> None:
    p = _subparser(
        sub, "ckpts", "checkpoint integrity, resumability and the safe fallback",
        "Check every <stage>_step_<N> checkpoint without running its pickle: zip "
        "structure and CRCs, pickle globals (unsafe ones are refused), an inert read "
        "of keys, shapes, optimizer groups and saved step; then a deep scan "
        "(torch.load weights_only+mmap, NaN/Inf per tensor) of the newest valid "
        "checkpoint. Names the recommended fallback per stage and checks that the "
        "dynamics stage's tokenizer/action checkpoints exist and are valid.", """\
            examples:
              %(prog)s RUN_BUNDLE_ROOT
              %(prog)s results/2026_02_06_00_44_34/dynamics/checkpoints --deep all
              %(prog)s results/RUN/dynamics/checkpoints/dynamics_step_52000
              %(prog)s RUN_BUNDLE_ROOT --out-dir docs/action   # + checkpoints.json (every checkpoint)

            statuses: valid, empty, truncated, corrupt, non_finite, unsafe_pickle,
            inconsistent, missing_files. Without torch: structural checks only.
            """)
    p.add_argument("paths", nargs="*", help="bundle root, run root, stage dir, checkpoints "
                   "dir or one checkpoint (default: $RUN_BUNDLE_ROOT or .)")
    p.add_argument("--deep", choices=("auto", "all", "none"), default="auto",
                   help="tensor scans: auto = newest valid + suspicious ones (default), "
                        "all = every checkpoint, none = structure only")
    p.add_argument("--thresholds", help="YAML merged over the default thresholds")
    p.add_argument("--out-dir", help="also write checkpoints.json with every checkpoint's details")
    p.set_defaults(func=_run_ckpts)


def _run_ckpts(args) -> tuple[dict, int]:
    from . import checkpoints, rules
    thresholds = _thresholds(args.thresholds)
    paths = _paths(args.paths)
    _require_existing(paths)
    out = outputs.prepare_out_dir(args.out_dir, _bundle_roots(paths)) if args.out_dir else None
    res = checkpoints.analyse(paths, thresholds, args.deep, progress=outputs.log)
    doc = res["doc"]
    doc["overall"] = rules.overall_of(doc["stages"], thresholds)
    if out is not None:
        doc["details"] = str(outputs.write_json(out / "checkpoints.json",
                                                {**doc, "checkpoints": res["details"]}))
    if not any(v["total"] for v in doc["stages"].values()):
        return doc, EXIT_NO_INPUT
    return doc, EXIT_OK  # invalid checkpoints are a verdict, not an input error


# --- visuals ----------------------------------------------------------------------

def _add_visuals(sub) -> None:
    p = _subparser(
        sub, "visuals", "image-grid metrics, visual findings and a contact sheet",
        "Find each stage's visualizations/*_step_<N>.png, split TinyWorlds' two "
        "panels (originals | outputs) into grid cells and measure what a person "
        "would see: flat colour, stripes, output that ignores its input, "
        "PSNR/SSIM where cells align, and the early->late trend. Writes one "
        "labelled contact sheet (long side <= 2000 px) to --out-dir.", """\
            examples:
              %(prog)s RUN_BUNDLE_ROOT --out-dir docs/action
              %(prog)s results/RUN/dynamics --count 6 --out-dir /tmp/sheets
              %(prog)s results/RUN/dynamics/visualizations/dynamics_prediction_step_50000.png

            files written to --out-dir:
              contact_sheet.png   first, middle and latest images per stage, labelled
              visuals.json        every image's metrics and flags
            """)
    p.add_argument("paths", nargs="*", help="bundle root, run root, stage dir, visualizations "
                   "dir or one PNG (default: $RUN_BUNDLE_ROOT or .)")
    p.add_argument("--out-dir", help="where to write contact_sheet.png and visuals.json "
                   "(default: docs/action beside the bundle)")
    p.add_argument("--count", type=int, help="images per stage on the sheet (default: 4)")
    p.add_argument("--thresholds", help="YAML merged over the default thresholds")
    p.set_defaults(func=_run_visuals)


def _run_visuals(args) -> tuple[dict, int]:
    from . import rules, visuals
    thresholds = _thresholds(args.thresholds)
    if args.count is not None and args.count < 1:
        raise CliError("--count must be at least 1", EXIT_USAGE)
    paths = _paths(args.paths)
    _require_existing(paths)
    roots = _bundle_roots(paths)
    out = outputs.prepare_out_dir(args.out_dir or default_out_dir(roots[0]), roots)
    res = visuals.analyse(paths, thresholds, args.count, progress=outputs.log)
    doc = res["doc"]
    doc["overall"] = rules.overall_of(doc["stages"], thresholds)
    if res["sheet"] is not None:
        doc["contact_sheet"] = str(outputs.write_image(out / "contact_sheet.png", res["sheet"]))
    doc["details"] = str(outputs.write_json(out / "visuals.json", {**doc, "images": res["details"]}))
    if not any(v["images"] for v in doc["stages"].values()):
        return doc, EXIT_NO_INPUT
    if not any(v["analysed"] for v in doc["stages"].values()):
        return doc, EXIT_UNREADABLE
    return doc, EXIT_OK


# --- diagnose -----------------------------------------------------------------------

GATES = {"watch": ("watch", "critical"), "critical": ("critical",)}


def _add_diagnose(sub) -> None:
    p = _subparser(
        sub, "diagnose", "one-shot answer: verdicts, evidence, fallback, next actions",
        "Run stats, checkpoint checks and visual checks on a TinyWorlds bundle and "
        "combine them into a verdict per stage and overall (normal / watch / critical), "
        "the run status, evidence paths, the recommended fallback checkpoint and next "
        "actions in priority order. Writes diagnosis.json, diagnosis.md, loss plots "
        "and a contact sheet; prints a compact JSON summary.", """\
            examples:
              %(prog)s RUN_BUNDLE_ROOT
              %(prog)s RUN_BUNDLE_ROOT --out-dir /tmp/diag --fail-on critical
              %(prog)s . --results results/2026_02_06_00_44_34 --run dynamics=wandb/run-X/run-X.wandb
              RUN_BUNDLE_ROOT=/data/run %(prog)s --deep all

            files written to --out-dir (default: docs/action beside the bundle):
              diagnosis.json   everything (stdout gets the compact version)
              diagnosis.md     the report, in the checklist's template
              loss_<stage>.png loss curves with windows, spikes, non-finite steps
              contact_sheet.png  first/middle/latest image grids per stage
              checkpoints.json, visuals.json  per-checkpoint and per-image details
            """)
    p.add_argument("bundle", nargs="?", help="bundle root holding results/ and/or wandb/ "
                   "(default: $RUN_BUNDLE_ROOT or .)")
    p.add_argument("--run", action="append", default=[], metavar="STAGE=PATH",
                   help="use this .wandb file for a stage instead of the newest found (repeatable)")
    p.add_argument("--results", metavar="DIR",
                   help="read checkpoints and images from this run root (results/<ts>) instead "
                        "of the newest one per stage")
    p.add_argument("--out-dir", help="output directory (default: docs/action beside the bundle)")
    p.add_argument("--fail-on", choices=sorted(GATES),
                   help=f"exit {EXIT_GATE} when the overall verdict reaches this level (CI/cron)")
    p.add_argument("--deep", choices=("auto", "all", "none"), default="auto",
                   help="checkpoint tensor scans (default: auto = newest valid per stage)")
    p.add_argument("--count", type=int, help="images per stage on the contact sheet (default: 4)")
    p.add_argument("--thresholds", help="YAML merged over the default thresholds")
    p.add_argument("--now", type=float, help="unix time to judge liveness against (default: now)")
    p.add_argument("--baseline", action="append", default=[], metavar="PATH",
                   help="a healthy run to compare against; drift findings join the verdict (repeatable)")
    p.set_defaults(func=_run_diagnose)


def _run_diagnose(args) -> tuple[dict, int]:
    from . import plots, report
    thresholds = _thresholds(args.thresholds)
    explicit = _explicit(args.run)
    root = Path(args.bundle or os.environ.get("RUN_BUNDLE_ROOT") or ".")
    baselines = [Path(b) for b in args.baseline]
    results = Path(args.results) if args.results else None
    _require_existing([root, *explicit, *baselines, *([results] if results else [])])
    if not root.is_dir():
        raise CliError(f"not a directory: {root} (give the bundle root)", EXIT_USAGE)
    out = outputs.prepare_out_dir(args.out_dir or default_out_dir(root), _bundle_roots([root]))
    res = report.diagnose(root, thresholds, explicit, args.now, args.deep, args.count,
                          baselines=baselines, results=results)
    doc = res["doc"]
    if all(e["verdict"] == "missing" for e in doc["stages"].values()):
        from . import bundle
        found = bundle.find_wandb_files(root) or bundle.find_run_roots(root)
        return {"error": f"no TinyWorlds logs, checkpoints or images under {root}",
                "skipped": doc["skipped"]}, EXIT_UNREADABLE if found else EXIT_NO_INPUT
    files = {"loss_plots": plots.write_loss_plots(res["histories"],
                                                  {s: e["stats"] for s, e in doc["stages"].items()}, out)}
    if res["sheet"] is not None:
        files["contact_sheet"] = str(outputs.write_image(out / "contact_sheet.png", res["sheet"]))
    files.update(_write_figures(res["figures"], out))
    if res["compare_sheet"] is not None:
        files["compare_sheet"] = str(outputs.write_image(out / "compare_sheet.png", res["compare_sheet"]))
    files["checkpoints"] = str(outputs.write_json(out / "checkpoints.json", res["checkpoint_details"]))
    files["visuals"] = str(outputs.write_json(out / "visuals.json", res["image_details"]))
    files["diagnosis_md"] = str(out / "diagnosis.md")
    files["diagnosis_json"] = str(out / "diagnosis.json")
    doc["outputs"] = files
    outputs.write_text(out / "diagnosis.md", report.markdown(doc))
    outputs.write_json(out / "diagnosis.json", doc)
    code = EXIT_GATE if args.fail_on and doc["overall"] in GATES[args.fail_on] else EXIT_OK
    return report.compact(doc), code


# --- compare -------------------------------------------------------------------------

def _add_compare(sub) -> None:
    p = _subparser(
        sub, "compare", "drift from a healthy baseline, config diff, side-by-side visuals",
        "Align the current run with one or more baselines by step and report, per "
        "stage: the step where the loss leaves the baseline envelope and stays out "
        "(onset) and the current/baseline ratio, action statistics and throughput "
        "against the baseline, the config keys that differ (those known to move "
        "training first) and checkpoint counts and sizes. With no --baseline, the "
        "newest run of each stage is compared with the earlier runs in the same "
        "wandb/ folder.", """\
            examples:
              %(prog)s RUN_BUNDLE_ROOT --baseline /data/last_week_bundle
              %(prog)s wandb/run-B/run-B.wandb --baseline wandb/run-A/run-A.wandb --out-dir /tmp/cmp
              %(prog)s wandb/      # newest run per stage vs the runs before it

            files written to --out-dir (default: docs/action beside the bundle):
              compare.json          everything, with the per-window ratios
              overlay_<stage>.png   current vs baseline loss, envelope shaded, onset marked
              compare_sheet.png     the same steps from both runs, side by side
            """)
    p.add_argument("current", nargs="?", help="bundle root, wandb/ run dir or .wandb file of the "
                   "run to check (default: $RUN_BUNDLE_ROOT or .)")
    p.add_argument("--baseline", action="append", default=[], metavar="PATH",
                   help="a healthy run to compare against (repeatable)")
    p.add_argument("--out-dir", help="output directory (default: docs/action beside the bundle)")
    p.add_argument("--count", type=int, default=4, help="steps on the side-by-side sheet (default: 4)")
    p.add_argument("--thresholds", help="YAML merged over the default thresholds")
    p.set_defaults(func=_run_compare)


def _run_compare(args) -> tuple[dict, int]:
    from . import compare
    thresholds = _thresholds(args.thresholds)
    current = Path(args.current or os.environ.get("RUN_BUNDLE_ROOT") or ".")
    baselines = [Path(b) for b in args.baseline]
    _require_existing([current, *baselines])
    roots = _bundle_roots([current, *baselines])
    out = outputs.prepare_out_dir(args.out_dir or default_out_dir(roots[0]), roots)
    res = compare.compare(current, baselines, thresholds, args.count)
    doc = res["doc"]
    files = _write_figures(res["figures"], out)
    if res["sheet"] is not None:
        files["compare_sheet"] = str(outputs.write_image(out / "compare_sheet.png", res["sheet"]))
    files["compare_json"] = str(out / "compare.json")
    doc["outputs"] = files
    outputs.write_json(out / "compare.json", doc)
    if not doc["stages"]:
        return doc, EXIT_UNREADABLE if doc["skipped"] else EXIT_NO_INPUT
    return doc, EXIT_OK


def _write_figures(figures: dict, out: Path) -> dict:
    import matplotlib.pyplot as plt
    written = {}
    for name, fig in figures.items():
        written[name] = str(outputs.write_image(out / name, fig))
        plt.close(fig)
    return written


def default_out_dir(bundle_root: Path) -> Path:
    """`docs/action/` beside the bundle: never inside results/ or wandb/."""
    return Path(bundle_root).resolve().parent / "docs" / "action"


def _thresholds(path: str | None) -> dict:
    from . import rules
    try:
        return rules.load_thresholds(path)
    except rules.ThresholdError as exc:
        raise CliError(str(exc), EXIT_USAGE)


def _explicit(values: list[str]) -> dict:
    from . import export
    try:
        return export.parse_run_args(values)
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE)


# --- entry point --------------------------------------------------------------

SUBCOMMANDS = [_add_diagnose, _add_export, _add_stats, _add_ckpts, _add_visuals, _add_compare]


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
        return 130
    except Exception as exc:  # a bug: say so plainly, keep stdout JSON
        if os.environ.get("TWDIAG_DEBUG"):
            raise
        doc = {"error": f"internal error: {type(exc).__name__}: {exc}",
               "hint": "rerun with TWDIAG_DEBUG=1 for a traceback and report it"}
        code = EXIT_INTERNAL
        outputs.log(f"internal error: {type(exc).__name__}: {exc}")
    doc = {"tool": f"twdiag {command}", "version": __version__, **doc, "exit_code": code}
    outputs.emit(doc)
    return code


if __name__ == "__main__":
    sys.exit(main())
