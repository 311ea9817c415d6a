"""diagnosis.html in a real browser: headless Chromium loads the page and
every inline image decodes. (.ci/run installs Debian's chromium.)"""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import EXAMPLES, diagnose

BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)),
               None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]
PROBE = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var bad = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  document.body.setAttribute('data-probe', 'images=' + imgs.length + ';broken=' + bad.length +
                             ';title=' + document.title);
});
</script>"""


@pytest.fixture(scope="module")
def browser():
    if BROWSER is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install chromium (see .ci/run)")
        pytest.skip("no chromium here")
    return BROWSER


def test_html_report_loads_with_every_image_decoded(tmp_path, browser, unhealthy):
    page = Path(unhealthy["out"]) / "diagnosis.html"
    html = page.read_text()
    assert "src=\"file:" not in html and "http" not in re.sub(r"<!doctype[^>]*>", "", html, flags=re.I)
    probe = tmp_path / "probe.html"  # the page as delivered, plus a script that reports on its images
    probe.write_text(html.replace("</body>", PROBE + "</body>"))
    alone = tmp_path / "alone"  # no other output beside it: the page must be self-contained
    alone.mkdir()
    shutil.move(str(probe), alone / "probe.html")
    r = subprocess.run([browser, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000",
                        "--dump-dom", (alone / "probe.html").as_uri()], capture_output=True, text=True, timeout=120)
    m = re.search(r'data-probe="images=(\d+);broken=(\d+);title=([^"]*)"', r.stdout)
    assert m, r.stderr[-2000:]
    images, broken, title = int(m.group(1)), int(m.group(2)), m.group(3)
    assert images >= 4 and broken == 0, (images, broken)
    assert title == "TinyWorlds diagnosis: critical"
    shot = tmp_path / "shot.png"
    subprocess.run([browser, *FLAGS, f"--user-data-dir={tmp_path / 'profile2'}", "--window-size=1400,1800",
                    f"--screenshot={shot}", (alone / "probe.html").as_uri()], capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 20_000
