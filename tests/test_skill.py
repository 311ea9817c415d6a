"""SKILL.md and agents/openai.yaml follow the Agent Skills rules; every
script and flag SKILL.md names exists."""
import re
import subprocess
import sys

import yaml

from conftest import ROOT

SPEC_KEYS = {"name", "description", "license", "compatibility", "metadata", "allowed-tools"}


def frontmatter():
    text = (ROOT / "SKILL.md").read_text()
    m = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    assert m, "SKILL.md must start with YAML frontmatter"
    return yaml.safe_load(m.group(1)), text


def test_frontmatter_rules():
    fm, text = frontmatter()
    assert set(fm) <= SPEC_KEYS
    assert fm["name"] == "tinyworlds-training-diagnostics"
    assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", fm["name"]) and len(fm["name"]) <= 64
    d = fm["description"]
    assert 0 < len(d) <= 1024 and "<" not in d and ">" not in d
    assert "Use when" in d
    assert len(text.splitlines()) < 500


def test_scripts_and_flags_in_skill_exist():
    _, text = frontmatter()
    for script, rest in re.findall(r"python (scripts/\w+\.py)([^`\n]*)", text):
        path = ROOT / script
        assert path.is_file(), script
        help_text = subprocess.run([sys.executable, str(path), "--help"], capture_output=True,
                                   text=True).stdout
        for flag in re.findall(r"(--[a-z][a-z-]*)", rest):
            assert flag in help_text, f"{script} {flag}"


def test_every_flag_in_skill_is_a_real_flag():
    """Flags mentioned anywhere in SKILL.md, not only on command lines."""
    _, text = frontmatter()
    helps = ""
    for script in sorted((ROOT / "scripts").glob("*.py")):
        helps += subprocess.run([sys.executable, str(script), "--help"], capture_output=True,
                                text=True).stdout
    for flag in set(re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", text)):
        assert flag in helps, flag


def test_openai_yaml():
    doc = yaml.safe_load((ROOT / "agents" / "openai.yaml").read_text())["interface"]
    assert doc["display_name"]
    assert 25 <= len(doc["short_description"]) <= 64
    assert "$tinyworlds-training-diagnostics" in doc["default_prompt"]


def test_evals_match_what_diagnose_says(tmp_path):
    import json
    evals = json.loads((ROOT / "evals" / "evals.json").read_text())["evals"]
    assert len(evals) >= 3
    seen = {}
    for ev in evals:
        assert ev["prompt"] and len(ev["assertions"]) >= 3
        for f in ev["files"]:
            assert (ROOT / f).exists(), f
        bundle = ev["files"][0]
        if bundle not in seen:
            out = subprocess.run([sys.executable, str(ROOT / "scripts" / "diagnose.py"), str(ROOT / bundle),
                                  "--out-dir", str(tmp_path / bundle.replace("/", "_")),
                                  "--now", "1795856400"], capture_output=True, text=True)
            seen[bundle] = json.loads(out.stdout)
        doc, exp = seen[bundle], ev["expected"]
        if "overall" in exp:
            assert doc["overall"] == exp["overall"]
        for stage, verdict in exp.get("stages", {}).items():
            assert doc["stages"][stage]["verdict"] == verdict
        for stage, step in exp.get("fallback", {}).items():
            assert doc["stages"][stage]["fallback"]["step"] == step


def test_readme_has_two_setup_commands():
    text = (ROOT / "README.md").read_text()
    block = text.split("## Set-up", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [ln for ln in block.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    assert commands == ["python scripts/diagnose.py examples/bundle-unhealthy --out-dir /tmp/twdiag-example",
                        "python -m pytest"]
    assert "python -m pytest" in (ROOT / ".ci" / "run").read_text()


def test_every_script_has_help_with_examples_and_exit_codes():
    scripts = sorted((ROOT / "scripts").glob("*.py"))
    assert {s.name for s in scripts} == {"diagnose.py", "export_local_wandb_history.py", "stage_stats.py",
                                         "check_ckpts.py", "contact_sheet.py", "compare_runs.py"}
    for script in scripts:
        out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True)
        assert out.returncode == 0, script.name
        assert script.name in out.stdout and "examples:" in out.stdout and "exit codes:" in out.stdout
        assert "10  diagnose --fail-on" in out.stdout and out.stderr == ""
