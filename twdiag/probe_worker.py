"""The probe's child process: TinyWorlds' own model classes, measured.

Run only by `probe.run` as `python -m twdiag.probe_worker`, with one job
(JSON) on stdin and one result (JSON) on stdout, under the parent's time and
address-space budget. Everything unsafe stays out:
- the only code imported from the user's checkout is its `models` package
  (checked to come from the path the user named);
- weights and optimizer state are read with `torch.load(weights_only=True)`,
  and only from files the parent certified (strict zip, allowlist);
- `state.pt` is never loaded here: its config and scheduler state arrive as
  plain JSON from the parent's allowlist reader.

Each stage is measured inside its own guard: an error there is that stage's
`error`, and the other stages are still measured.
"""
from __future__ import annotations

import json
import math
import sys
import time
import traceback
from pathlib import Path

import numpy as np

torch = None  # imported in main(): this module must be importable without torch


# --- TinyWorlds' classes, built from a saved config ---------------------------------------

def import_models(checkout: str):
    """TinyWorlds' model modules from the checkout the user named, and nothing else."""
    root = Path(checkout).resolve()
    sys.path.insert(0, str(root))
    import models.dynamics
    import models.latent_actions
    import models.video_tokenizer
    where = Path(models.video_tokenizer.__file__).resolve()
    if root not in where.parents:
        raise ImportError(f"`models` resolved to {where}, not under {root}")
    return models


def _frame(cfg: dict) -> tuple[int, int]:
    f = int(cfg.get("frame_size", 128))
    return f, f


def build(stage: str, cfg: dict, sd: dict, models):
    """The stage's class with the arguments TinyWorlds' own loaders pass
    (utils.utils.load_*_from_checkpoint: the same keys and defaults)."""
    common = dict(frame_size=_frame(cfg), patch_size=cfg.get("patch_size", 8), embed_dim=cfg.get("embed_dim", 128),
                  num_heads=cfg.get("num_heads", 8), hidden_dim=cfg.get("hidden_dim", 256),
                  num_blocks=cfg.get("num_blocks", 4))
    if stage == "video_tokenizer":
        return models.video_tokenizer.VideoTokenizer(**common, latent_dim=cfg.get("latent_dim", 6),
                                                     num_bins=cfg.get("num_bins", 4))
    if stage == "latent_actions":
        return models.latent_actions.LatentActionModel(**common, n_actions=cfg.get("n_actions", 8))
    cond = cfg.get("conditioning_dim")
    if cond is None:  # as upstream: inferred from the FiLM layer's input width
        cond = next((int(v.shape[1]) for k, v in sd.items() if k.endswith("to_gamma_beta.1.weight")), 3)
    return models.dynamics.DynamicsModel(**common, conditioning_dim=cond, latent_dim=cfg.get("latent_dim", 6),
                                         num_bins=cfg.get("num_bins", 4), use_moe=cfg.get("use_moe", False),
                                         num_experts=cfg.get("num_experts", 4),
                                         top_k_experts=cfg.get("top_k_experts", 2),
                                         moe_aux_loss_coeff=cfg.get("moe_aux_loss_coeff", 0.01))


def load_weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def strict_fit(model, sd: dict) -> dict:
    """What a strict load would say, key by key (TinyWorlds loads with
    strict=False, so a mismatch there silently leaves random weights)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(f"{k}: saved {tuple(sd[k].shape)}, class {tuple(own[k].shape)}"
                    for k in set(own) & set(sd) if tuple(sd[k].shape) != tuple(own[k].shape))
    ok = not (missing or unexpected or shapes)
    if ok:
        model.load_state_dict(sd, strict=True)
    return {"ok": ok, "missing": missing[:10], "unexpected": unexpected[:10], "mis_shaped": shapes[:10],
            "counts": {"missing": len(missing), "unexpected": len(unexpected), "mis_shaped": len(shapes)}}


def _groups(model, cfg: dict) -> list[list[str]]:
    """Parameter names per group of the optimizer TinyWorlds saves first
    (utils/optimizer_utils.py: optimizers[0] is optim_state_dict.pt): AdamW
    over decay / no-decay, or for Muon its 2-D non-embedding matrices."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.get("optimizer", "adamw") == "muon":
        muon = [n for n, p in named if p.ndim == 2 and "embed" not in n]
        if muon:
            return [muon]
        named = [(n, p) for n, p in named if not (p.ndim == 2 and "embed" not in n)]
    no_decay = [n for n, p in named if p.ndim == 1 or n.endswith(".bias") or "norm" in n]
    decay = [n for n, p in named if n not in set(no_decay)]
    return [decay, no_decay]


def optimizer_fit(model, cfg: dict, ck: dict) -> dict:
    """The saved optimizer state against the optimizer the config names,
    checked the way torch's Optimizer.load_state_dict checks it (as many
    groups, each as many parameters), plus what it does not check: every
    state tensor the shape of its parameter. (Building a torch optimizer
    would import torch._dynamo: over a second for nothing the check needs.)"""
    path = Path(ck["path"]) / "optim_state_dict.pt"
    if not path.is_file():
        return {"ok": False, "reason": "no optim_state_dict.pt"}
    saved = load_weights(path)
    kind = "Muon" if cfg.get("optimizer", "adamw") == "muon" else "AdamW"
    groups = _groups(model, cfg)
    got = saved.get("param_groups") if isinstance(saved, dict) else None
    state = saved.get("state") if isinstance(saved, dict) else None
    if not isinstance(got, list) or not isinstance(state, dict):
        return {"ok": False, "optimizer": kind, "reason": "not an optimizer state dict (no param_groups/state)"}
    if len(got) != len(groups):
        return {"ok": False, "optimizer": kind, "reason": f"{len(got)} parameter groups saved; {kind} over this "
                                                           f"model has {len(groups)}"}
    params = dict(model.named_parameters())
    wrong, steps = [], set()
    for i, (g, names) in enumerate(zip(got, groups)):
        ids = list(g.get("params", []))
        if len(ids) != len(names):
            return {"ok": False, "optimizer": kind, "reason": f"group {i} holds {len(ids)} parameters; {kind} "
                                                               f"over this model puts {len(names)} there"}
        for pid, name in zip(ids, names):
            st = state.get(pid, {})
            for key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
                if key in st and tuple(st[key].shape) != tuple(params[name].shape):
                    wrong.append(f"{key} of {name}: {tuple(st[key].shape)} for {tuple(params[name].shape)}")
            if "step" in st:
                steps.add(int(float(st["step"])))
    out = {"ok": not wrong, "optimizer": kind, "param_groups": len(got),
           "adam_step": max(steps) if steps else None, "lr_restored": [g.get("lr") for g in got][:4]}
    if wrong:
        out["reason"] = f"{len(wrong)} state tensors do not fit their parameters, e.g. {wrong[0]}"
    return out


# --- frames -----------------------------------------------------------------------------------

def sample_frames(src: dict, cfg: dict, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """(frames [B,T,H,W,3] uint8, true actions per transition [B,T-1] or None, how)."""
    T = int(cfg.get("context_length", 4))
    if src["kind"] == "h5":
        import h5py
        fps = cfg.get("fps") or src["fps_by_dataset"].get(str(cfg.get("dataset", "")).upper(), src["fps_default"])
        skip = max(1, 60 // int(fps))
        with h5py.File(src["path"], "r") as h5:
            if "frames" not in h5:
                raise ValueError(f"{src['path']} has no dataset `frames` (TinyWorlds' loaders read that key)")
            ds = h5["frames"]
            if ds.ndim != 4 or ds.shape[-1] != 3 or ds.dtype != np.uint8:
                raise ValueError(f"{src['path']}: `frames` is {ds.dtype} {tuple(ds.shape)}; TinyWorlds' loaders "
                                 "read N x H x W x 3 uint8")
            span = T * skip
            if len(ds) < span:
                raise ValueError(f"{src['path']} holds {len(ds)} frames; one sequence needs {span}")
            starts = np.sort(rng.choice(len(ds) - span + 1, size=min(n, len(ds) - span + 1), replace=False))
            idx = starts[:, None] + np.arange(T)[None, :] * skip
            frames = np.stack([ds[int(s):int(s) + span:skip] for s in starts])
            acts = None
            if "actions" in h5 and len(h5["actions"]) == len(ds):
                raw = np.asarray(h5["actions"][:], dtype=np.int64)
                # the action of a transition: the most frequent one applied between the two frames
                acts = np.array([[np.bincount(raw[a + 1:b + 1]).argmax() for a, b in zip(row[:-1], row[1:])]
                                 for row in idx])
        how = {"kind": "data", "source": f"data file {src['path']}", "sequences": len(frames), "frames_per_sequence": T,
               "frame_skip": skip, "fps": int(fps), "true_actions": acts is not None}
        return frames, acts, how
    grids = np.load(src["path"], allow_pickle=False)  # [B, 4, f, f, 3] uint8, from the bundle's grids
    t = min(T, grids.shape[1])  # make_grid shows at most 4 frames; the models take any length
    how = {"kind": "grids", "source": src["source"], "sequences": int(min(n, len(grids))),
           "frames_per_sequence": t, "true_actions": False}
    if t < T:
        how["note"] = f"context_length is {T}; the grids show {t} frames per sequence, so {t} were used"
    return grids[:n, :t], None, how


def to_tensor(frames: np.ndarray, cfg: dict):
    """uint8 [B,T,H,W,3] -> float [B,T,3,f,f] in [-1, 1], as TinyWorlds' transform gives."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).float().div(255.0).permute(0, 1, 4, 2, 3)
    B, T = x.shape[:2]
    f = _frame(cfg)
    if tuple(x.shape[-2:]) != f:
        x = torch.nn.functional.interpolate(x.reshape(B * T, *x.shape[2:]), size=f, mode="area").reshape(B, T, 3, *f)
    return x * 2 - 1


# --- measures ---------------------------------------------------------------------------------

def psnr(a, b) -> float:
    """Mean over frames of per-frame PSNR, pixels in [0, 1]."""
    a = ((a.clamp(-1, 1) + 1) / 2).reshape(-1, *a.shape[-3:])
    b = ((b.clamp(-1, 1) + 1) / 2).reshape(-1, *b.shape[-3:])
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1 / mse)).mean())


def ssim(a, b) -> float:
    """Mean SSIM on grey frames, 7x7 uniform windows."""
    g = torch.tensor([0.299, 0.587, 0.114], device=a.device).view(1, 3, 1, 1)
    a = (((a.clamp(-1, 1) + 1) / 2).reshape(-1, 3, *a.shape[-2:]) * g).sum(1, keepdim=True)
    b = (((b.clamp(-1, 1) + 1) / 2).reshape(-1, 3, *b.shape[-2:]) * g).sum(1, keepdim=True)
    pool = lambda x: torch.nn.functional.avg_pool2d(x, 7, 1)  # noqa: E731
    ma, mb = pool(a), pool(b)
    va, vb, cov = pool(a * a) - ma ** 2, pool(b * b) - mb ** 2, pool(a * b) - ma * mb
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2))
    return float(s.mean())


def usage(idx: np.ndarray, size: int) -> dict:
    counts = np.bincount(idx.ravel(), minlength=size)
    p = counts[counts > 0] / counts.sum()
    return {"used": int((counts > 0).sum()), "of": int(size), "perplexity": round(float(np.exp(-(p * np.log(p)).sum())), 3),
            "counts": counts.tolist() if size <= 64 else None}


def mutual_information(a: np.ndarray, b: np.ndarray) -> float:
    """Plug-in mutual information in nats between two discrete samples."""
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    joint = np.zeros((ai.max() + 1, bi.max() + 1))
    np.add.at(joint, (ai, bi), 1)
    joint /= joint.sum()
    pa, pb = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log(joint[nz] / (pa @ pb)[nz])).sum())


def _entropy(a: np.ndarray) -> float:
    p = np.bincount(np.unique(a, return_inverse=True)[1]) / a.size
    return float(-(p * np.log(p)).sum())


def measure_tokenizer(model, x) -> tuple[dict, dict]:
    model.eval()
    latents = model.quantizer(model.encoder(x))  # VideoTokenizer.forward's steps, kept for the codes
    x_hat = model.decoder(latents)
    digits = torch.round(model.quantizer.scale_and_shift(latents)).clamp(0, model.quantizer.num_bins - 1)
    idx = model.quantizer.get_indices_from_latents(latents).cpu().numpy()
    bins_per_dim = [int(torch.unique(digits[..., d]).numel()) for d in range(digits.shape[-1])]
    mean_frame = x.mean(dim=(0, 1), keepdim=True).expand_as(x)
    out = {"psnr_db": round(psnr(x_hat, x), 3), "ssim": round(ssim(x_hat, x), 4),
           "reference_mean_frame_psnr_db": round(psnr(mean_frame, x), 3),
           "codes": usage(idx, model.codebook_size), "bins_used_per_dim": bins_per_dim,
           "dead_dims": [d for d, n in enumerate(bins_per_dim) if n <= 1], "num_bins": model.quantizer.num_bins}
    out["gain_over_mean_frame_db"] = round(out["psnr_db"] - out["reference_mean_frame_psnr_db"], 3)
    return out, {"recon": x_hat}


def _decode_as_trained(model, x, actions):
    """The action decoder as TinyWorlds trains it: every frame after the
    first masked (keep_rate 0, so deterministic), the actions carry the rest."""
    dec = model.decoder
    dec.train()
    try:
        return dec(x, actions, training=True)
    finally:
        dec.eval()


def measure_actions(model, x, true_actions: np.ndarray | None, gen: "torch.Generator") -> dict:
    model.eval()
    q = model.encode(x)  # [B, T-1, A] in {-1, 1}
    idx = model.quantizer.get_indices_from_latents(q).cpu().numpy()
    bits = (q > 0).float().reshape(-1, q.shape[-1]).mean(0).tolist()
    B = x.shape[0]
    shuffled = torch.roll(q, 1, dims=0) if B > 1 else q  # each sequence gets its neighbour's actions
    rand_idx = torch.randint(0, 2 ** q.shape[-1], q.shape[:2], generator=gen).to(q.device)
    rand = model.quantizer.get_latents_from_indices(rand_idx)
    target = x[:, 1:]
    p_inf = psnr(_decode_as_trained(model, x, q), target)
    p_shuf = psnr(_decode_as_trained(model, x, shuffled), target)
    p_rand = psnr(_decode_as_trained(model, x, rand), target)
    out = {"usage": usage(idx, 2 ** q.shape[-1]), "bit_one_share": [round(b, 4) for b in bits],
           "dead_bits": [i for i, b in enumerate(bits) if b in (0.0, 1.0)],
           "decoder_psnr_db": {"inferred": round(p_inf, 3), "shuffled": round(p_shuf, 3), "random": round(p_rand, 3)},
           "action_gain_db": round(p_inf - p_shuf, 3), "transitions": int(idx.size)}
    if true_actions is not None:
        mi = mutual_information(idx.ravel(), true_actions.ravel())
        perm = np.random.default_rng(0).permutation(true_actions.size)
        out["true_actions"] = {"mi_nats": round(mi, 4), "true_entropy_nats": round(_entropy(true_actions.ravel()), 4),
                               "mi_shuffled_nats": round(mutual_information(idx.ravel(), true_actions.ravel()[perm]), 4)}
    return out


def rollout(dyn, vt, first, actions, steps: int):
    """Genie-style generation from one real frame: each next frame decoded by
    the dynamics model's own forward_inference (MaskGIT, argmax), conditioned
    on `actions` [B, T-1, A]; returns the decoded frames [B, T, C, H, W]."""
    cur = first
    to_latents = lambda i: vt.quantizer.get_latents_from_indices(i, dim=-1)  # noqa: E731
    for t in range(1, actions.shape[1] + 1):
        cur = dyn.forward_inference(cur, 1, steps, to_latents, conditioning=actions[:, :t], temperature=0.0)
    return vt.detokenize(cur)


def measure_dynamics(dyn, vt, lam, x, steps: int, gen: "torch.Generator",
                     use_actions: bool = True) -> tuple[dict, dict]:
    """Next frame and ΔtPSNR. A model trained with use_actions: false saw no
    conditioning, so it gets none here and ΔtPSNR does not apply."""
    dyn.eval(), vt.eval(), lam.eval()
    tokens = vt.tokenize(x)
    latents = vt.quantizer.get_latents_from_indices(tokens, dim=-1)
    acts = lam.encode(x) if use_actions else None
    T = x.shape[1]
    # next frame, teacher-forced context of T-1 real frames
    to_latents = lambda i: vt.quantizer.get_latents_from_indices(i, dim=-1)  # noqa: E731
    nxt = dyn.forward_inference(latents[:, :T - 1], 1, steps, to_latents, conditioning=acts, temperature=0.0)
    pred_tokens = vt.quantizer.get_indices_from_latents(nxt[:, -1], dim=-1)
    pred_frame = vt.detokenize(nxt)[:, -1:]
    out = {"next_frame": {"token_accuracy": round(float((pred_tokens == tokens[:, -1]).float().mean()), 4),
                          "copy_last_token_accuracy": round(float((tokens[:, -2] == tokens[:, -1]).float().mean()), 4),
                          "psnr_db": round(psnr(pred_frame, x[:, -1:]), 3),
                          "copy_last_psnr_db": round(psnr(x[:, -2:-1], x[:, -1:]), 3),
                          "tokenizer_ceiling_psnr_db": round(psnr(vt.detokenize(latents[:, -1:]), x[:, -1:]), 3)}}
    if acts is None:
        out["delta_t_psnr"] = []
        out["delta_t_psnr_not_applicable"] = "trained with use_actions: false (no action conditioning)"
        return out, {}
    rand = lam.quantizer.get_latents_from_indices(
        torch.randint(0, 2 ** acts.shape[-1], acts.shape[:2], generator=gen).to(acts.device))
    gen_inf = rollout(dyn, vt, latents[:, :1], acts, steps)
    gen_rand = rollout(dyn, vt, latents[:, :1], rand, steps)
    per_t = []
    for t in range(1, T):
        a, b = psnr(gen_inf[:, t], x[:, t]), psnr(gen_rand[:, t], x[:, t])
        per_t.append({"t": t, "psnr_inferred_db": round(a, 3), "psnr_random_db": round(b, 3), "delta_db": round(a - b, 3)})
    out["delta_t_psnr"] = per_t
    return out, {"rollout_inferred": gen_inf, "rollout_random": gen_rand}


# --- one job ----------------------------------------------------------------------------------

def check_resumable(stage: str, ck: dict, cfg: dict, models) -> dict:
    sd = load_weights(Path(ck["path"]) / "model_state_dict.pt")
    model = build(stage, cfg, sd, models)
    w = strict_fit(model, sd)
    out = {"step": ck["step"], "path": ck["path"], "role": ck["role"], "weights": w}
    out["optimizer"] = optimizer_fit(model, cfg, ck) if w["ok"] else {"ok": False, "reason": "weights do not fit"}
    reasons = []
    if not w["ok"]:
        c = w["counts"]
        reasons.append(f"weights do not fit TinyWorlds' {type(model).__name__}: {c['missing']} missing, "
                       f"{c['unexpected']} unexpected, {c['mis_shaped']} mis-shaped keys")
    elif not out["optimizer"]["ok"]:
        reasons.append("optimizer state: " + out["optimizer"].get("reason", "does not load"))
    out["resumable"] = "verified" if not reasons else "no"
    if reasons:
        out["reason"] = reasons[0]
    return out


def _model(stage: str, ref: dict, models, cache: dict, device: str = "cpu"):
    key = (stage, ref["path"])
    if key not in cache:
        sd = load_weights(Path(ref["path"]) / "model_state_dict.pt")
        m = build(stage, ref["config"], sd, models)
        fit = strict_fit(m, sd)
        if not fit["ok"]:
            raise ValueError(f"{ref['path']} does not fit TinyWorlds' {type(m).__name__}")
        cache[key] = m.to(device).eval()
    return cache[key]


def run_stage(stage: str, job: dict, spec: dict, models, cache: dict, pictures: dict) -> dict:
    """Resumability of each planned checkpoint, then the measures on frames.
    A failure in either half is that half's error: the other half stands."""
    out: dict = {"checkpoints": []}
    try:
        for ck in spec["checkpoints"]:
            r = check_resumable(stage, ck, spec["config"], models)
            out["checkpoints"].append(r)
            if "fallback" in ck["role"] and r["resumable"] == "verified":
                break  # the first verified candidate is the fallback: older ones need not be tried
    except Exception as exc:
        out["error"] = _error(exc, "resumability")
    target = spec.get("measure")
    if target and job.get("frames"):
        try:
            _measure_stage(stage, job, spec, target, models, cache, pictures, out)
        except Exception as exc:
            out["measure_error"] = _error(exc, "measures")
    return out


def _error(exc: Exception, part: str) -> str:
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f" ({Path(frame.filename).name}:{frame.lineno})" if frame else ""
    return f"{part}: {type(exc).__name__}: {exc}"[:400] + where


def _measure_stage(stage: str, job: dict, spec: dict, target: dict, models, cache: dict, pictures: dict,
                   out: dict) -> None:
    gen = torch.Generator().manual_seed(job["seed"])
    key = (spec["config"].get("context_length"), spec["config"].get("fps"), spec["config"].get("dataset"))
    sampled = cache.setdefault("frames", {})  # stages with the same sampling share one read of the data
    if key not in sampled:
        sampled[key] = sample_frames(job["frames"], spec["config"], job["sequences"], np.random.default_rng(job["seed"]))
    frames, true_actions, how = sampled[key]
    dev = job.get("device") or "cpu"
    x = to_tensor(frames, spec["config"]).to(dev)
    out["frames"] = how
    out["measured_checkpoint"] = {"step": target["step"], "path": target["path"]}
    pictures.setdefault("real", x[:4])
    with torch.no_grad():
        if stage == "video_tokenizer":
            out["measures"], pics = measure_tokenizer(_model(stage, target, models, cache, dev), x)
            pictures["tokenizer_recon"] = pics["recon"][:4]
        elif stage == "latent_actions":
            out["measures"] = measure_actions(_model(stage, target, models, cache, dev), x, true_actions, gen)
        else:
            vt = _model("video_tokenizer", spec["tokenizer"], models, cache, dev)
            lam = _model("latent_actions", spec["latent_actions"], models, cache, dev)
            out["inputs"] = {"video_tokenizer": spec["tokenizer"]["path"], "latent_actions": spec["latent_actions"]["path"]}
            out["measures"], pics = measure_dynamics(_model(stage, target, models, cache, dev), vt, lam, x,
                                                     job["maskgit_steps"], gen,
                                                     spec["config"].get("use_actions", True) is not False)
            pictures["dynamics_real"] = x[:4]
            pictures.update({k: v[:4] for k, v in pics.items()})


def _save_pictures(pictures: dict, path: str | None) -> None:
    if not path or not pictures:
        return
    arrays = {k: (((v.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 1, 3, 4, 2).cpu().numpy())
              for k, v in pictures.items()}
    np.savez(path, **arrays)


def main() -> int:
    """argv[1]: the checkout. torch and the models are imported before the
    job is read, so the parent can start this process early and finish its
    own analyses meanwhile (the imports take about a second)."""
    global torch
    started = time.perf_counter()
    import torch as _torch
    torch = _torch
    result = {"torch": torch.__version__, "stages": {}}
    try:
        models = import_models(sys.argv[1])
        failure = None
    except Exception as exc:  # the checkout itself: nothing can be measured
        failure = f"could not import TinyWorlds' models from {sys.argv[1]}: {type(exc).__name__}: {exc}"[:500]
    text = sys.stdin.read()
    if not text.strip():  # the parent needed no probe after all
        return 0
    job = json.loads(text)
    if failure:
        result["error"] = failure
        print(json.dumps(result))
        return 0
    torch.set_num_threads(max(1, int(job.get("threads", 1))))
    torch.manual_seed(job["seed"])
    cache, pictures = {}, {}
    for stage, spec in job["stages"].items():
        t0 = time.perf_counter()
        try:
            result["stages"][stage] = run_stage(stage, job, spec, models, cache, pictures)
        except Exception as exc:  # run_stage guards its parts; this is anything else
            result["stages"][stage] = {"error": _error(exc, stage)}
        result["stages"][stage]["seconds"] = round(time.perf_counter() - t0, 3)
    try:
        _save_pictures(pictures, job.get("pictures"))
    except Exception as exc:
        result["pictures_error"] = f"{type(exc).__name__}: {exc}"[:200]
    result["seconds"] = round(time.perf_counter() - started, 3)
    print(json.dumps(_finite(result), allow_nan=False, default=str))
    return 0


def _finite(obj):
    """NaN and infinities as null: the JSON stays strict."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


if __name__ == "__main__":
    sys.exit(main())
