"""Our PNG writer (`twdiag.png`): the pixels Pillow and savefig would write."""
from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
from PIL import Image

from twdiag import png

pytestmark = pytest.mark.fast


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "P", "1"])
def test_every_image_mode_reads_back_as_the_same_pixels(mode):
    rng = np.random.default_rng(7)
    rgba = Image.fromarray(rng.integers(0, 256, (37, 53, 4), dtype=np.uint8), "RGBA")
    image = rgba.convert(mode)
    back = Image.open(io.BytesIO(png.image_bytes(image)))
    back.load()
    expected = image if mode in ("L", "LA", "RGB", "RGBA") else image.convert("RGB")
    assert back.mode == expected.mode and back.size == image.size
    assert np.array_equal(np.asarray(back), np.asarray(expected))


def test_every_chunk_checks_and_the_rows_are_unfiltered():
    data = png.encode(np.full((4, 5, 3), 200, dtype=np.uint8), dpi=100)
    assert data.startswith(png.SIGNATURE)
    pos, tags, idat = len(png.SIGNATURE), [], b""
    while pos < len(data):
        n = int.from_bytes(data[pos:pos + 4], "big")
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        assert int.from_bytes(data[pos + 8 + n:pos + 12 + n], "big") == zlib.crc32(tag + body)
        tags.append(tag)
        idat += body if tag == b"IDAT" else b""
        pos += 12 + n
    assert tags == [b"IHDR", b"pHYs", b"IDAT", b"IEND"]
    rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(4, 1 + 5 * 3)
    assert (rows[:, 0] == 0).all() and (rows[:, 1:] == 200).all()
    assert Image.open(io.BytesIO(data)).info["dpi"] == pytest.approx((100, 100), abs=0.01)


def test_a_figure_is_written_as_savefig_draws_it():
    from twdiag import plots
    fig = plots.new_figure(figsize=(4, 2), dpi=100)
    ax = fig.add_subplot()
    ax.plot(np.arange(50), np.sin(np.arange(50) / 5), label="sin")
    ax.set_yscale("symlog")
    ax.legend()
    ax.set_title("a title, some text: 1e-3")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    theirs = np.asarray(Image.open(buf))
    ours = np.asarray(Image.open(io.BytesIO(png.figure_bytes(fig))))
    assert ours.shape == theirs.shape == (200, 400, 4)
    assert np.array_equal(ours, theirs)


def test_without_isal_zlib_writes_the_same_pixels():
    """A copied skill folder without `isal`: zlib deflates the same rows."""
    import json
    import subprocess
    import sys

    from conftest import ROOT
    code = f"""
import sys, io, json
class Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "isal":
            raise ImportError("hidden")
sys.meta_path.insert(0, Hide())
sys.path.insert(0, {str(ROOT)!r})
import numpy as np
from PIL import Image
from twdiag import png
a = np.random.default_rng(3).integers(0, 256, (30, 40, 3), dtype=np.uint8)
back = np.asarray(Image.open(io.BytesIO(png.encode(a))))
print(json.dumps({{"same": bool(np.array_equal(a, back)), "deflate": png._deflate.__module__}}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out == {"same": True, "deflate": "zlib"}
