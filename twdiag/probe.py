"""The model probe: TinyWorlds' own classes, measured on real frames.

Opt-in (`diagnose --tinyworlds PATH`, `probe_models.py`). The parent side,
here, never imports torch or the user's code. It plans one job from what the
bundle already certified (configs read through the allowlist, checkpoints
whose archives passed the strict reader), runs `probe_worker` in a child
process under a time and address-space budget, and turns the child's numbers
into findings. A crash, hang or memory blow-up in model code costs only the
probe: `probe.ran` is false with the reason, and the rest of the report stands.

What a probe result means for the fallback: a fallback whose weights do not
load strictly into the stage's class (or whose optimizer state does not load)
is not a fallback; the next older candidate the child verified is taken.
"""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import bundle as bundle_mod, forking
from .rules import Finding

MODEL_FILES = ("models/video_tokenizer.py", "models/latent_actions.py", "models/dynamics.py")


@dataclass
class ProbeOptions:
    tinyworlds: Path
    data: Path | None = None       # an .h5 with `frames` (and optionally `actions`)
    device: str = "cpu"
    seconds: float | None = None   # budget; default from thresholds
    child: object = None           # a worker `spawn` started early (subprocess.Popen), or None


def checkout_problem(path: Path) -> str | None:
    """Why `path` is not a TinyWorlds checkout (None when it is one)."""
    if not path.is_dir():
        return f"{path} is not a directory"
    missing = [m for m in MODEL_FILES if not (path / m).is_file()]
    return f"{path} is not a TinyWorlds checkout: no {', '.join(missing)}" if missing else None


def find_checkout(bundle_root: Path, cwd: Path) -> Path | None:
    """A TinyWorlds checkout beside the bundle or in the current directory:
    only named in a note, never imported unless the user asks."""
    for cand in (cwd, cwd / "tinyworlds", bundle_root, bundle_root.parent, bundle_root.parent / "tinyworlds"):
        if checkout_problem(cand) is None:
            return cand
    return None


# --- the job ------------------------------------------------------------------------------

def _ref(ck, role: str) -> dict:
    from .checkpoints import config_of
    return {"step": ck.step, "path": str(ck.path), "role": role, "config": config_of(ck)}


def _candidates(res, fb: dict, tries: int) -> list:
    """Newest intact, the fallback, then older intact candidates (for when
    the fallback does not verify)."""
    intact = [c for c in res.judged if c.intact and not c.single_file and c.step > 0]
    if not intact:
        return []
    out = [_ref(intact[-1], "newest")]
    fstep = (fb or {}).get("step")
    older = [c for c in intact if fstep is not None and c.step <= fstep]
    for i, c in enumerate(reversed(older[-tries:])):
        role = "fallback" if i == 0 else "fallback_candidate"
        if c.step == intact[-1].step:
            out[0]["role"] = "newest_and_fallback"
            continue
        out.append(_ref(c, role))
    return out


def _measured(refs: list) -> dict | None:
    """The checkpoint whose model is measured: the fallback, else the newest."""
    return next((r for r in refs if "fallback" in r["role"]), refs[0] if refs else None)


def _upstream(a, stage: str, key: str) -> dict | None:
    """The tokenizer / action checkpoint dynamics trained on: the path its config
    records when it resolves to an intact file, else the stage's own choice."""
    from . import ptfile
    from .checkpoints import check_one, find_checked
    dep = next((d for d in a.dependencies if d.get("key") == key and d.get("status") == "valid"), None)
    res = a.checkpoints.get(stage)
    if dep:  # it may lie in an older run root than the stage's own checkpoints
        path = Path(dep["resolved"])
        ck = find_checked(res, path) or check_one(stage, path, ptfile.Limits.from_thresholds(a.thresholds))
        if ck.intact:
            return _ref(ck, "dependency")
    refs = _candidates(res, a.fallbacks.get(stage), 1) if res is not None else []
    return _measured(refs)


def grid_frames(a, out: Path) -> dict | None:
    """Real frames recovered from the bundle's own grids ("original" panels):
    4 sequences of 4 frames, pixel-exact when the grid was drawn on make_grid's
    lattice. Note: make_grid(normalize=True) stretched them to the grid's own
    min..max, so they are close to, not exactly, the training frames."""
    from . import visuals
    t = a.thresholds["visuals"]
    for stage in ("latent_actions", "video_tokenizer"):
        art = a.bundle.stages.get(stage)
        for img in sorted(art.images if art else [], key=lambda i: -i.step):
            try:
                im = visuals.load(img.path, t)
            except visuals.ImageError:
                continue
            with im:
                boxes = visuals.find_panels(im, t)
                if len(boxes) != 2:
                    continue
                f, got = visuals.frame_size(im, boxes, t)
                grid = visuals.sample_grid(im, boxes[0], f, t, got[0])
            cols = t["grid_columns"]
            if len(grid.cells) % cols or len(grid.cells) < cols:
                continue
            seqs = grid.cells.reshape(-1, cols, f, f, 3).round().clip(0, 255).astype(np.uint8)
            np.save(out, seqs)
            return {"kind": "npy", "path": str(out), "source":
                    f"the 'original' panel of {img.path} ({len(seqs)} sequences of {cols} frames, "
                    f"{f}x{f}, {'pixel-exact' if grid.exact else 'area-resampled'}; min-max stretched by make_grid)"}
    return None


def implausible(cfg: dict, p: dict) -> str | None:
    """Config values that would make the class allocate more than any
    TinyWorlds model: the architecture check matches the saved tensors to the
    config, but positional encodings are built from frame_size and
    patch_size alone, so a forged state.pt could ask for gigabytes."""
    try:
        frame, patch = int(cfg.get("frame_size", 128)), int(cfg.get("patch_size", 8))
        context = int(cfg.get("context_length", 4))
    except (TypeError, ValueError):
        return "a frame_size, patch_size or context_length that is not a number"
    if not 0 < frame <= p["max_frame_size"] or not 0 < patch <= frame:
        return f"frame_size {frame}, patch_size {patch} (probe.max_frame_size = {p['max_frame_size']})"
    if (frame // patch) ** 2 > p["max_patches"] or not 0 < context <= p["max_context"]:
        return (f"{(frame // patch) ** 2} patches per frame and context_length {context} "
                f"(probe.max_patches = {p['max_patches']}, probe.max_context = {p['max_context']})")
    return None


def plan(a, opts: ProbeOptions, work: Path) -> tuple[dict, list[str]]:
    """The child's job, and notes on what could not be planned."""
    p = a.thresholds["probe"]
    notes, stages = [], {}
    for stage in bundle_mod.STAGES:
        res = a.checkpoints.get(stage)
        refs = _candidates(res, a.fallbacks.get(stage), int(p["fallback_tries"])) if res else []
        if not refs:
            if res is not None:
                notes.append(f"{stage}: no intact checkpoint directory after step 0 to probe")
            continue
        odd = implausible(refs[0]["config"], p)
        if odd:  # buffers the class builds from these (positional encodings) would not fit any budget
            notes.append(f"{stage}: not probed: its config says {odd}")
            continue
        spec = {"config": refs[0]["config"], "checkpoints": refs, "measure": _measured(refs)}
        if stage == "dynamics":
            spec["tokenizer"] = _upstream(a, "video_tokenizer", "video_tokenizer_path")
            spec["latent_actions"] = _upstream(a, "latent_actions", "latent_actions_path")
            if not spec["tokenizer"] or not spec["latent_actions"]:
                notes.append("dynamics: measured only for resumability (no intact tokenizer and action "
                             "checkpoint to generate frames with)")
                spec["measure"] = None
        stages[stage] = spec
    if opts.data is not None:
        frames = {"kind": "h5", "path": str(opts.data), "fps_default": p["loader_fps"]["default"],
                  "fps_by_dataset": {k: v for k, v in p["loader_fps"].items() if k != "default"}}
    else:
        frames = grid_frames(a, work / "grid_frames.npy")
        if frames is None:
            notes.append("no --data and no readable latent_actions or video_tokenizer grid: the models are "
                         "checked for resumability only, not measured")
    job = {"device": opts.device, "seed": int(p["seed"]), "threads": _threads(p), "sequences": int(p["sequences"]),
           "maskgit_steps": int(p["maskgit_steps"]), "frames": frames, "stages": stages}
    return job, notes


# --- the child ----------------------------------------------------------------------------

def _threads(p: dict) -> int:
    return int(p["threads"]) or os.cpu_count() or 1  # 0 = every CPU


def _limit(address_space: int):
    def apply() -> None:  # in the child, before exec
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    return apply


def spawn(opts: ProbeOptions, thresholds: dict) -> subprocess.Popen:
    """Start the child now: it imports torch and the checkout's models while
    the parent reads the bundle, then waits for its job on stdin."""
    p = thresholds["probe"]
    env = forking.child_env()  # the probe's torch keeps its own threads
    here = str(Path(__file__).resolve().parent.parent)  # twdiag's parent: a copied skill folder works too
    env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", str(_threads(p)))
    return subprocess.Popen([sys.executable, "-m", "twdiag.probe_worker", str(opts.tinyworlds)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            preexec_fn=_limit(int(p["max_address_space_bytes"])), start_new_session=True)


def dismiss(proc: subprocess.Popen | None) -> None:
    """A started child that gets no job: close its stdin (it exits), or kill it."""
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.communicate(b"", timeout=5)
    except (subprocess.TimeoutExpired, OSError):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def run_child(job: dict, seconds: float, proc: subprocess.Popen) -> tuple[dict | None, str | None]:
    """(result, None) or (None, why the probe failed). The budget counts from
    here, the job's start (the imports before it overlap the parent's work)."""
    try:
        out, err = proc.communicate(json.dumps(job).encode(), timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return None, f"the probe took longer than its budget of {seconds:g} s and was stopped"
    tail = err.decode("utf-8", "replace").strip().splitlines()[-3:]
    if proc.returncode != 0:
        how = (f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}")
        mem = " (memory budget reached?)" if "MemoryError" in " ".join(tail) or proc.returncode < 0 else ""
        return None, f"the probe's process failed ({how}){mem}: {' | '.join(tail)[-400:]}"
    try:
        return json.loads(out), None
    except ValueError:
        return None, f"the probe's process printed no result: {' | '.join(tail)[-400:]}"


# --- findings -----------------------------------------------------------------------------

def _resumable_findings(stage: str, doc: dict, p: dict) -> list[Finding]:
    cks = doc.get("checkpoints") or []
    bad = [c for c in cks if c.get("resumable") != "verified"]
    good = [c for c in cks if c.get("resumable") == "verified"]
    out = []
    for c in bad:
        sev = p["not_resumable_severity"] if not good else "watch"
        out.append(Finding("probe_not_resumable", sev, stage, "resumable", "no", "verified", [c["step"]], c["path"],
                           f"{Path(c['path']).name} is not resumable into TinyWorlds' classes: {c.get('reason')}"
                           + ("" if good else "; no probed checkpoint of this stage verified")))
    return out


def _tokenizer_findings(m: dict, path: str, step: int, p: dict, frames: dict) -> list[Finding]:
    out = []
    gain = m["gain_over_mean_frame_db"]
    if gain < p["tokenizer_min_gain_db"]:
        # grid panels are make_grid's min-max stretch of 16 frames: near, not equal, to the data
        sev = p["grid_frames_fidelity_severity"] if frames.get("kind") == "grids" else "watch"
        out.append(Finding("probe_tokenizer_fidelity_low", sev, "video_tokenizer", "gain_over_mean_frame_db",
                           gain, p["tokenizer_min_gain_db"], [step], path,
                           f"measured reconstruction PSNR {m['psnr_db']:.2f} dB (SSIM {m['ssim']:.3f}) against "
                           f"{m['reference_mean_frame_psnr_db']:.2f} dB for the sample's mean frame: a gain of "
                           f"{gain:+.2f} dB, below {p['tokenizer_min_gain_db']} dB"))
    if m["dead_dims"]:
        out.append(Finding("probe_codebook_dead_dims", "watch", "video_tokenizer", "dead_dims", len(m["dead_dims"]),
                           0, [step], path,
                           f"{len(m['dead_dims'])} of {len(m['bins_used_per_dim'])} quantiser dimensions use one bin "
                           f"on every measured patch (bins used per dimension {m['bins_used_per_dim']}); "
                           f"{m['codes']['used']} of {m['codes']['of']} codes used, perplexity {m['codes']['perplexity']}"))
    return out


def _action_findings(m: dict, path: str, step: int, p: dict, frames: dict) -> list[Finding]:
    gain = m["action_gain_db"]
    ta = m.get("true_actions")
    excess = None
    if ta and ta["true_entropy_nats"] > 0:
        excess = round((ta["mi_nats"] - ta["mi_shuffled_nats"]) / ta["true_entropy_nats"], 4)
    weak_gain = gain < p["action_min_gain_db"]
    weak_mi = excess is not None and excess < p["action_min_mi_fraction"]
    if not (weak_gain or weak_mi):
        return []
    d = m["decoder_psnr_db"]
    text = (f"the action decoder reconstructs {d['inferred']:.2f} dB with the inferred actions and "
            f"{d['shuffled']:.2f} dB with them shuffled across the sample: a gain of {gain:+.3f} dB "
            f"(threshold {p['action_min_gain_db']} dB)")
    if ta:
        text += (f"; mutual information with the true actions {ta['mi_nats']:.3f} nats against "
                 f"{ta['mi_shuffled_nats']:.3f} nats by chance (shuffled), {excess:.1%} of their "
                 f"{ta['true_entropy_nats']:.3f} nats (threshold {p['action_min_mi_fraction']:.0%})")
    metric, value, thr = (("action_gain_db", gain, p["action_min_gain_db"]) if weak_gain else
                          ("mi_excess_fraction", excess, p["action_min_mi_fraction"]))
    used = m["usage"]["used"]
    collapsed = used < p["min_actions_used"]
    if collapsed:  # one action for every transition: no control at all, whatever the decoder does
        text = f"every one of the {m['transitions']} measured transitions gets the same action; " + text
    return [Finding("probe_actions_uninformative", "critical" if collapsed else p["actions_uninformative_severity"],
                    "latent_actions", metric, value, thr, [step], path,
                    "the latent actions carry (almost) no information: " + text)]


def _dynamics_findings(m: dict, path: str, step: int, p: dict, frames: dict) -> list[Finding]:
    out = []
    per_t = m["delta_t_psnr"]
    if per_t:
        last = per_t[-1]
        if last["delta_db"] < p["min_delta_t_psnr_db"]:
            out.append(Finding("probe_not_controllable", p["not_controllable_severity"], "dynamics",
                               f"delta_t_psnr_db_t{last['t']}", last["delta_db"], p["min_delta_t_psnr_db"], [step],
                               path, "generated frames do not depend on the actions: ΔtPSNR (inferred minus random "
                               "actions) " + ", ".join(f"t={r['t']}: {r['delta_db']:+.3f} dB" for r in per_t)
                               + f", below {p['min_delta_t_psnr_db']} dB at t={last['t']}"))
    nf = m["next_frame"]
    margin = p["next_frame_below_copy_db"]
    if nf["tokenizer_ceiling_psnr_db"] >= nf["copy_last_psnr_db"] and nf["psnr_db"] < nf["copy_last_psnr_db"] - margin:
        out.append(Finding("probe_dynamics_below_copy", "watch", "dynamics", "next_frame_psnr_db", nf["psnr_db"],
                           round(nf["copy_last_psnr_db"] - margin, 3), [step], path,
                           f"the predicted next frame scores {nf['psnr_db']:.2f} dB; copying the last context frame "
                           f"scores {nf['copy_last_psnr_db']:.2f} dB (the tokenizer alone reaches "
                           f"{nf['tokenizer_ceiling_psnr_db']:.2f} dB)"))
    return out


_MEASURE_RULES = {"video_tokenizer": _tokenizer_findings, "latent_actions": _action_findings,
                  "dynamics": _dynamics_findings}


def findings(result: dict, thresholds: dict) -> dict[str, list[Finding]]:
    p = thresholds["probe"]
    out = {}
    for stage, doc in (result.get("stages") or {}).items():
        found = _resumable_findings(stage, doc, p)
        m, where = doc.get("measures"), doc.get("measured_checkpoint") or {}
        if m and stage in _MEASURE_RULES:
            found += _MEASURE_RULES[stage](m, where.get("path"), where.get("step"), p, doc.get("frames") or {})
        out[stage] = found
    return out


_GRID_FIDELITY = ("low_fidelity", "recon_fidelity_low")


def overrule_grid_fidelity(visual_stages: dict, doc: dict | None, thresholds: dict) -> None:
    """Measured facts replace the heuristics they measure better: when the
    probe measured the tokenizer on real frames (--data) above its reference,
    the grid-based tokenizer fidelity findings become `info`, saying so."""
    tok = ((doc or {}).get("stages") or {}).get("video_tokenizer") or {}
    m, frames = tok.get("measures"), tok.get("frames") or {}
    vis = visual_stages.get("video_tokenizer")
    if not m or frames.get("kind") != "data" or not vis:
        return
    if m["gain_over_mean_frame_db"] < thresholds["probe"]["tokenizer_min_gain_db"]:
        return  # the probe's own finding says it, with the measured numbers
    for f in vis.get("findings", []):
        if f["rule_id"] in _GRID_FIDELITY and f["severity"] != "info":
            f["severity"] = "info"
            f["message"] += (f" — overruled by the probe: measured on {frames['sequences']} sequences of real "
                             f"frames, the tokenizer reconstructs at {m['psnr_db']:.2f} dB, "
                             f"{m['gain_over_mean_frame_db']:+.2f} dB over the mean frame")


def verified_fallback(doc: dict) -> dict | None:
    """The newest probed fallback candidate that verified (None when none did)."""
    return next((c for c in doc.get("checkpoints") or [] if "fallback" in c.get("role", "")
                 and c.get("resumable") == "verified"), None)


# --- in the pipeline ------------------------------------------------------------------------

@dataclass
class ProbeResult:
    doc: dict                                  # diagnosis.json's `probe`
    findings: dict[str, list[Finding]]         # per stage
    pictures: dict[str, np.ndarray]            # sample frames for the probe sheet, uint8 [B,T,H,W,3]


def analyse(a, opts: ProbeOptions, progress=None, proc: subprocess.Popen | None = None) -> ProbeResult:
    """The probe as one analysis; `proc` is a child `spawn` started earlier."""
    try:
        return _analyse(a, opts, progress, proc)
    finally:
        dismiss(proc)


def _analyse(a, opts: ProbeOptions, progress, proc: subprocess.Popen | None) -> ProbeResult:
    p = a.thresholds["probe"]
    problem = checkout_problem(opts.tinyworlds)
    if problem:
        return ProbeResult({"ran": False, "reason": problem}, {}, {})
    if opts.data is not None and not opts.data.is_file():
        return ProbeResult({"ran": False, "reason": f"--data {opts.data} is not a file"}, {}, {})
    pictures = {}
    with tempfile.TemporaryDirectory(prefix="twdiag-probe-") as tmp:
        opts_pics = Path(tmp) / "pictures.npz"
        job, notes = plan(a, opts, Path(tmp))
        job["pictures"] = str(opts_pics)
        if not job["stages"]:
            return ProbeResult({"ran": False, "reason": "no intact checkpoint to probe", "notes": notes}, {}, {})
        if progress:
            progress(f"probe: TinyWorlds' classes from {opts.tinyworlds}, in a child process "
                     f"(budget {opts.seconds or p['seconds']:g} s)")
        result, why = run_child(job, float(opts.seconds or p["seconds"]), proc or spawn(opts, a.thresholds))
        if result is not None and opts_pics.is_file():
            with np.load(opts_pics, allow_pickle=False) as z:
                pictures = {k: z[k] for k in z.files}
    if result is None or result.get("error"):
        why = why or result["error"]
        return ProbeResult({"ran": False, "reason": why, "notes": notes}, {}, {})
    doc = {"ran": True, "tinyworlds": str(opts.tinyworlds), "torch": result.get("torch"),
           "seconds": result.get("seconds"), "frames_source": (job["frames"] or {}).get("source") or
           (job["frames"] or {}).get("path"), "notes": notes, "stages": result["stages"],
           "how": HOW}
    return ProbeResult(doc, findings(result, a.thresholds), pictures)


HOW = {
    "psnr": "mean over frames of per-frame PSNR, pixels in [0, 1]",
    "ssim": "mean SSIM on grey frames, 7x7 uniform windows",
    "tokenizer": "frames -> encoder -> quantizer -> decoder (VideoTokenizer.forward's steps, eval); reference: "
                 "the sample's mean frame",
    "latent_actions": "actions from LatentActionModel.encode; the decoder run as trained (every frame after "
                      "the first masked); gain = PSNR with inferred minus with shuffled actions",
    "dynamics": "DynamicsModel.forward_inference (MaskGIT, argmax); next frame from T-1 real frames; "
                "ΔtPSNR = PSNR of frames generated from one real frame with inferred minus random actions",
    "resumable": "weights load strictly into the stage's class built from state.pt's config, and the optimizer "
                 "state loads into the optimizer the config names (TinyWorlds' checkpoint= restores weights only)",
}
