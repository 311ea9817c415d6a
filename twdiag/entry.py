"""The scripts' entry point, importable without any third-party package, so a
missing dependency gives one JSON error with the install command instead of
a traceback (even for --help)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import NoReturn

# import name -> distribution to install
REQUIRED = {"numpy": "numpy", "pandas": "pandas", "yaml": "pyyaml", "PIL": "pillow",
            "matplotlib": "matplotlib", "google.protobuf": "protobuf", "wandb": "wandb"}
# Declared dependencies the scripts run without (the export is slower):
# an environment that lacks them is not stopped.
# isal: the deep scan's CRC-32 at 5-6x zlib's speed (zlib's without it).
OPTIONAL = {"orjson": "orjson", "duckdb": "duckdb",  # duckdb: only `query` needs it (exit 6 there)
            "isal": "isal"}
from .exits import EXIT_DEPENDENCY  # noqa: E402  (exits imports nothing third-party)


def missing() -> list[str]:
    out = []
    for module, dist in REQUIRED.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package is missing
            found = False
        if not found:
            out.append(dist)
    return out


def run(command: str, argv: list[str], prog: str) -> int:
    lacking = missing()
    if lacking:
        doc = {"tool": f"twdiag {command}", "error": f"missing Python package(s): {', '.join(lacking)}",
               "install": f"python -m pip install {' '.join(lacking)}   # or: python -m pip install -r "
                          "requirements.txt (in the skill folder)",
               "exit_code": EXIT_DEPENDENCY}
        print(json.dumps(doc, indent=2))
        print(f"error: missing Python package(s): {', '.join(lacking)}; install with: "
              f"python -m pip install {' '.join(lacking)}", file=sys.stderr)
        return EXIT_DEPENDENCY
    from .cli import main
    return main([command, *argv], prog=prog)


def script(command: str) -> NoReturn:
    """A script's whole process: `command` with the command line's
    arguments, then the exit (`end`)."""
    end(run(command, sys.argv[1:], prog=Path(sys.argv[0]).name))


def console() -> NoReturn:
    """The `twdiag` command's process (the package's console script)."""
    from .cli import main
    end(main())


def end(code: int) -> NoReturn:
    """Exit with `code`, without Python's last garbage collections. At
    shutdown Python runs full collections that walk every object still
    alive, and pandas' and the protobuf classes' are hundreds of thousands:
    0.2-0.3 s, an eighth of a diagnosis. The process is ending, so they are
    frozen first (`gc.freeze`): those passes skip them, while reference
    counting still frees the rest, closing files and running finalizers,
    and atexit handlers still run (what is lost: finalizers of objects kept
    alive only by a reference cycle; our files are closed by `with`). Only
    for a process that ends here, never in a caller's (a test's) process."""
    import gc
    gc.freeze()
    sys.exit(code)
