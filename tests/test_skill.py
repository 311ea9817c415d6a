"""The skill as agents and teams hold it: SKILL.md and agents/openai.yaml
follow the Agent Skills rules, every script and flag SKILL.md names exists,
the skill installs into an agent's folder and runs from there, and a missing
dependency is one JSON error, not a traceback."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import EXAMPLES, ROOT, SCRIPTS, cli

SPEC_KEYS = {"name", "description", "license", "compatibility", "metadata", "allowed-tools"}
NOW = "1796169600"


def frontmatter():
    text = (ROOT / "SKILL.md").read_text()
    m = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    assert m, "SKILL.md must start with YAML frontmatter"
    return yaml.safe_load(m.group(1)), text


def _help(script) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True)


@pytest.mark.fast
def test_frontmatter_rules():
    fm, text = frontmatter()
    assert set(fm) <= SPEC_KEYS
    assert fm["name"] == "tinyworlds-training-diagnostics"
    assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", fm["name"]) and len(fm["name"]) <= 64
    d = fm["description"]
    assert 0 < len(d) <= 1024 and "<" not in d and ">" not in d
    assert "Use when" in d
    assert len(text.splitlines()) < 500


@pytest.mark.fast
def test_every_script_has_help_with_examples_and_exit_codes():
    scripts = sorted(SCRIPTS.glob("*.py"))
    assert {s.name for s in scripts} == {"diagnose.py", "export_local_wandb_history.py", "stage_stats.py",
                                         "check_ckpts.py", "contact_sheet.py", "compare_runs.py",
                                         "scan_bundles.py", "query.py", "dump_records.py", "probe_models.py"}
    helps = ""
    for script in scripts:
        out = _help(script)
        assert out.returncode == 0, script.name
        assert script.name in out.stdout and "examples:" in out.stdout and "exit codes:" in out.stdout
        assert "10  diagnose --fail-on" in out.stdout and "6   a required Python package" in out.stdout
        assert out.stderr == ""
        helps += out.stdout
    _, text = frontmatter()
    for flag in set(re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", text)):  # every flag SKILL.md names
        assert flag in helps, flag
    for script in re.findall(r"(scripts/\w+\.py)", text):
        assert (ROOT / script).is_file(), script


@pytest.mark.fast
def test_openai_yaml():
    doc = yaml.safe_load((ROOT / "agents" / "openai.yaml").read_text())["interface"]
    assert doc["display_name"]
    assert 25 <= len(doc["short_description"]) <= 64
    assert "$tinyworlds-training-diagnostics" in doc["default_prompt"]


@pytest.mark.fast
def test_evals_agree_with_the_examples_expectations():
    """evals.json's expectations are examples/expected.json's, which
    test_diagnose checks against diagnose.py itself (not run twice here)."""
    evals = json.loads((ROOT / "evals" / "evals.json").read_text())["evals"]
    expected = json.loads((EXAMPLES / "expected.json").read_text())
    assert len(evals) >= 5 and len({e["id"] for e in evals}) == len(evals)
    covered = set()
    for ev in evals:
        assert ev["prompt"] and len(ev["assertions"]) >= 3
        for f in ev["files"]:
            assert (ROOT / f).exists(), f
        want = expected[Path(ev["files"][0]).name]
        covered.add(Path(ev["files"][0]).name)
        exp = ev["expected"]
        if "overall" in exp:
            assert exp["overall"] == want["overall"], ev["id"]
        for stage, verdict in exp.get("stages", {}).items():
            assert want["stages"][stage] == verdict, (ev["id"], stage)
        for stage, step in exp.get("fallback", {}).items():
            assert want["fallback"][stage] == step, (ev["id"], stage)
    assert covered == set(expected)  # every example bundle has an eval


@pytest.mark.fast
def test_readme_has_two_setup_commands():
    text = (ROOT / "README.md").read_text()
    block = text.split("## Set-up", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [ln for ln in block.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    assert len(commands) == 2
    assert "pip install" in commands[0] and "scripts/diagnose.py examples/bundle-unhealthy" in commands[0]
    assert "pip install" in commands[1] and commands[1].endswith("python -m pytest")
    assert commands[1] in (ROOT / ".ci" / "run").read_text()  # CI runs the README's test command


def test_install_skill_copies_only_the_skill_and_it_runs_there(tmp_path):
    dest = tmp_path / "repo" / ".claude" / "skills"
    code, doc, _ = cli("install-skill", dest)
    skill = dest / "tinyworlds-training-diagnostics"
    assert code == 0 and doc["installed"] == str(skill)
    top = sorted(p.name for p in skill.iterdir())
    assert top == ["SKILL.md", "agents", "references", "requirements.txt", "scripts", "twdiag"]
    assert not list(skill.rglob("__pycache__")) and doc["bytes"] < 2_000_000
    code, doc, _ = cli("install-skill", dest)
    assert code == 5 and "--force" in doc["error"]
    assert cli("install-skill", dest, "--force")[0] == 0
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, str(skill / "scripts" / "diagnose.py"), str(EXAMPLES / "bundle-healthy"),
                        "--out-dir", str(tmp_path / "d"), "--now", NOW], capture_output=True, text=True,
                       env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["overall"] == "normal"


@pytest.mark.fast
def test_a_missing_dependency_is_one_json_error(tmp_path):
    """A copied skill in an environment without pandas: every script, even
    --help, prints one JSON document naming the package and the command."""
    shutil.copytree(ROOT / "twdiag", tmp_path / "skill" / "twdiag",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(SCRIPTS, tmp_path / "skill" / "scripts")
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\nclass _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'pandas' or name.startswith('pandas.'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, _Block())\n")
    env = {**os.environ, "PYTHONPATH": str(blocker)}
    for args in (["--help"], [str(EXAMPLES / "bundle-healthy")]):
        r = subprocess.run([sys.executable, str(tmp_path / "skill" / "scripts" / "diagnose.py"), *args],
                           capture_output=True, text=True, env=env)
        doc = json.loads(r.stdout)
        assert r.returncode == 6 and "pandas" in doc["error"] and "pip install pandas" in doc["install"]
        assert "Traceback" not in r.stderr


@pytest.mark.fast
def test_a_script_ends_with_its_code_its_atexit_handlers_and_its_files_complete(tmp_path):
    """entry.end skips Python's last garbage collections (the scripts' exit):
    the exit code, atexit handlers and an open file's buffered writes must
    survive that."""
    out = tmp_path / "left-open.txt"
    code = ("import atexit, sys\n"
            f"sys.path.insert(0, {str(ROOT)!r})\n"
            "from twdiag.entry import end\n"
            "atexit.register(print, 'atexit ran')\n"
            f"f = open({str(out)!r}, 'w')\n"
            "f.write('x' * 100_000)\n"
            "end(4)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 4 and r.stdout == "atexit ran\n", r.stderr
    assert out.read_text() == "x" * 100_000


def test_installed_package_serves_a_lone_script(tmp_path, runs):
    """With `pip install .` (CI does a non-editable install) a script copied
    away from the skill folder falls back to the installed library."""
    probe = subprocess.run([sys.executable, "-c", "import twdiag, sys; print(twdiag.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path)
    if probe.returncode != 0 or str(ROOT) in probe.stdout:
        pytest.skip("twdiag is not pip-installed (non-editable) here")
    lone = tmp_path / "diagnose.py"
    shutil.copy(SCRIPTS / "diagnose.py", lone)
    r = subprocess.run([sys.executable, str(lone), str(EXAMPLES / "bundle-unhealthy"), "--out-dir",
                        str(tmp_path / "d"), "--now", NOW], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["overall"] == "critical"
    assert shutil.which("twdiag") and subprocess.run(["twdiag", "--help"], capture_output=True).returncode == 0
    # the installed package can install the skill too (its files ship inside it)
    r = subprocess.run(["twdiag", "install-skill", str(tmp_path / "agents")], capture_output=True, text=True,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stdout
    assert (tmp_path / "agents" / "tinyworlds-training-diagnostics" / "SKILL.md").is_file()


@pytest.mark.fast
def test_every_threshold_is_explained_in_the_checklist():
    from twdiag import rules
    text = (ROOT / "references" / "diagnostic-checklist.md").read_text()

    def leaves(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield k
    missing = sorted({k for k in leaves(rules.load_thresholds()) if k != "version" and f"`{k}`" not in text
                      and f"{k}`" not in text})
    assert not missing, missing


@pytest.mark.fast
def test_every_grouped_action_names_what_it_folds_in():
    """A rule folded into its group's action is listed there ({also}), so an
    action never hides a finding."""
    actions = yaml.safe_load((ROOT / "twdiag" / "actions.yaml").read_text())["actions"]
    grouped = {r: s for r, s in actions.items() if s.get("group")}
    assert len(grouped) >= 5
    for rule, spec in grouped.items():
        for text in list((spec.get("variants") or {}).values()) + ([spec["action"]] if "action" in spec else []):
            assert "{also}" in text, rule


@pytest.mark.fast
def test_requirements_txt_lists_the_package_dependencies():
    """A copied skill folder installs from requirements.txt: it must name
    what pyproject.toml does, no more and no less; and the scripts' missing
    dependency check knows each of them (entry.REQUIRED, or OPTIONAL: used
    when installed)."""
    from twdiag import entry
    tomllib = pytest.importorskip("tomllib")
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    listed = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    assert sorted(filter(None, listed)) == sorted(declared)
    names = sorted(re.split(r"[<>=!~ ]", d)[0] for d in declared)
    assert sorted([*entry.REQUIRED.values(), *entry.OPTIONAL.values()]) == names
