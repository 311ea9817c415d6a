#!/usr/bin/env python3
"""The raw records of one .wandb log as NDJSON. Run with --help."""
import sys
from pathlib import Path

# Prefer the library beside this script (a copied skill folder), else the
# installed package. twdiag.entry needs no third-party package, so a missing
# dependency is reported as JSON, not a traceback.
_SKILL = Path(__file__).resolve().parent.parent
if (_SKILL / "twdiag" / "__init__.py").is_file():
    sys.path.insert(0, str(_SKILL))

from twdiag.entry import script  # noqa: E402

if __name__ == "__main__":
    script("records")
