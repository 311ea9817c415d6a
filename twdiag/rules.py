"""Thresholds, the finding record, and verdicts derived from findings only."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
import functools
from pathlib import Path

import yaml

DEFAULT_THRESHOLDS = Path(__file__).with_name("thresholds.yaml")
SEVERITIES = ("info", "watch", "critical")
VERDICTS = ("normal", "insufficient_data", "watch", "critical", "missing")
# "unverified" (a stage known only from checkpoints) ranks with normal in the
# overall verdict, which then says that it rests on it (report.unverified_note).
_RANK = {"normal": 0, "unverified": 0, "insufficient_data": 1, "missing": 2, "watch": 2, "critical": 3}
MAX_STEPS_LISTED = 20
SEVERITY_ORDER = {"critical": 0, "watch": 1, "info": 2}
# Findings read off the image grids (visuals), which show a symptom whose
# cause the loss and the upstream stages usually name better.
IMAGE_RULES = ("flat_color", "striping", "input_independent_output", "low_fidelity", "visual_degrading")


class ThresholdError(Exception):
    pass


def read_yaml(fh):
    """yaml.safe_load, by libyaml's C parser where PyYAML has it (6-10x
    faster: the three YAML files were about 40 ms of every run)."""
    return yaml.load(fh, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def load_thresholds(path: str | Path | None = None) -> dict:
    """The default YAML, with an override file merged on top (deeply)."""
    with open(DEFAULT_THRESHOLDS, encoding="utf-8") as fh:
        base = read_yaml(fh)
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                override = read_yaml(fh) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ThresholdError(f"cannot read thresholds {path}: {exc}") from exc
        if not isinstance(override, dict):
            raise ThresholdError(f"thresholds {path}: expected a mapping")
        _deep_merge(base, override)
    return base


@functools.lru_cache(maxsize=1)
def default_limits() -> dict:
    """The `limits` section of the default thresholds, for layers that take no
    thresholds argument (the log framing and decoder)."""
    return dict(load_thresholds()["limits"])


def _deep_merge(base: dict, override: dict) -> None:
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_merge(base[k], v)
        else:
            base[k] = v


@dataclass
class Finding:
    """One observation with its rule and evidence. Verdicts come only from these."""

    rule_id: str
    severity: str  # info | watch | critical
    stage: str
    metric: str | None
    value: object
    threshold: object
    steps: list = field(default_factory=list)
    evidence_path: str | None = None
    message: str = ""

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"bad severity {self.severity}")
        self.steps = [int(s) for s in list(self.steps)[:MAX_STEPS_LISTED]]

    def to_dict(self) -> dict:
        return asdict(self)


def stage_verdict(findings: list[Finding], enough_data: bool) -> str:
    """critical > watch > (insufficient_data | normal)."""
    return verdict_of([{"severity": f.severity} for f in findings], enough_data)


def verdict_of(findings: list[dict], enough_data: bool) -> str:
    """stage_verdict for findings already turned into dicts."""
    levels = {f["severity"] for f in findings}
    if "critical" in levels:
        return "critical"
    if "watch" in levels:
        return "watch"
    return "normal" if enough_data else "insufficient_data"


def overall_verdict(stage_verdicts: dict[str, str], thresholds: dict) -> str:
    """The worst stage; a missing stage counts as the configured level."""
    missing_as = thresholds.get("verdict", {}).get("missing_stage", "watch")
    worst = "normal"
    for v in stage_verdicts.values():
        v = missing_as if v == "missing" else v
        if _RANK[v] > _RANK[worst]:
            worst = v
    return worst


def overall_of(stages: dict[str, dict], thresholds: dict) -> str | None:
    """Overall verdict of a document's `stages` ({stage: {"verdict": ...}}),
    None when there are none."""
    if not stages:
        return None
    return overall_verdict({s: v["verdict"] for s, v in stages.items()}, thresholds)


def worse(a: str, b: str) -> str:
    return a if _RANK[a] >= _RANK[b] else b


def findings_dicts(findings: list[Finding]) -> list[dict]:
    return [f.to_dict() for f in sorted(findings, key=lambda f: SEVERITY_ORDER[f.severity])]
