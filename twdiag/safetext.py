"""Text from a bundle, made safe to show.

Run-root names, paths, config values and console lines come from whoever made
the bundle. On a terminal, an escape sequence in them can rewrite what a
person sees; in Markdown, a newline and `**normal**` can forge a verdict
section, and `<img onerror=...>` is raw HTML. So:

- `terminal(s)`: escape sequences removed, other control characters shown as
  `\\xNN`, newlines as `\\n` (one log line stays one line);
- `markdown(s)`: the same, on one line, with backticks turned into `ˋ` (they
  would close our code spans), a `<` that could open a tag as `&lt;` (no raw
  HTML; "loss < 2" stays as it is), and `*`,
  `|` escaped (no forged emphasis, no broken table cells).

The JSON keeps every value exactly; only what is shown is changed.
"""
from __future__ import annotations

import re

# CSI (ESC [ ... final byte), OSC (ESC ] ... BEL or ST), and two-byte ESC sequences
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-_]?|\x9b[0-?]*[ -/]*[@-~]")
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_TAG_START = re.compile(r"<(?=[A-Za-z/!?])")  # only a "<" that could open an HTML tag or comment


def _controls(s: str) -> str:
    s = _ESCAPES.sub("", s)
    return _CONTROLS.sub(lambda m: f"\\x{ord(m.group()):02x}", s)


def terminal(s: str) -> str:
    return _controls(s).replace("\n", "\\n")


def markdown(s: str) -> str:
    s = _controls(s).replace("\r", " ").replace("\n", " ").replace("\t", " ")
    s = _TAG_START.sub("&lt;", s.replace("`", "ˋ"))
    return s.replace("*", "\\*").replace("|", "\\|")


def markdown_doc(obj):
    """Every string (keys too) of a JSON-like document through `markdown`."""
    if isinstance(obj, str):
        return markdown(obj)
    if isinstance(obj, dict):
        return {markdown(k) if isinstance(k, str) else k: markdown_doc(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [markdown_doc(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(markdown_doc(v) for v in obj)
    return obj
