"""Exit codes shared by every subcommand and script (documented in --help,
SKILL.md and the README), and diagnose's --fail-on gates."""
from __future__ import annotations

EXIT_OK = 0           # ran; the verdict (if any) is in the JSON
EXIT_INTERNAL = 1     # a bug: report it (the JSON says what failed)
EXIT_USAGE = 2        # bad flags or arguments
EXIT_NO_INPUT = 3     # the input path does not exist or holds nothing to analyse
EXIT_UNREADABLE = 4   # input found, but none of it could be read
EXIT_OUTPUT = 5       # the output dir cannot be used (or is inside the bundle, outside docs/action)
EXIT_DEPENDENCY = 6   # a required Python package is missing (entry.py reports it)
EXIT_GATE = 10        # diagnose --fail-on: the verdict reached the gate level

# --fail-on LEVEL: the overall verdicts that reach it
GATES = {"watch": ("watch", "critical"), "critical": ("critical",)}
