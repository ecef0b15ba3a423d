"""The one-page report, loaded in a real headless Chromium with no network."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

import allknn
from conftest import clustered_with_duplicates

pytest.importorskip("matplotlib")

CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(name)), None)
if CHROMIUM is None and os.environ.get("CI"):
    raise RuntimeError("CI needs Chromium for the report tests: .ci/run installs Debian's chromium package")
browser = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (apt install chromium)")

OFFLINE = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
           "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9", "--window-size=1200,2400"]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    X = clustered_with_duplicates(1500, 16, seed=9)
    result = allknn.neighbors(X, 8, method="approx", cells=6, probes=3)
    path = folder / "report.html"
    result.report(path, ids=[f"item-{i}" for i in range(X.shape[0])], title="test run")
    return path, result


def _chromium(*args, cwd):
    return subprocess.run([CHROMIUM, *OFFLINE, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_the_page_is_self_contained(page):
    text = page[0].read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)  # nothing to fetch
    assert "<link" not in text and "@import" not in text
    for expected in ("Recall", "Hubs", "Duplicate groups", "Examples", "item-", "test run"):
        assert expected in text


@browser
def test_chromium_renders_every_plot_without_console_errors(page, tmp_path):
    path, _ = page
    dom = _chromium("--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--dump-dom",
                    path.as_uri(), cwd=tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    sizes = json.loads(re.search(r'<pre id="layout" hidden="">(.*?)</pre>', dom.stdout).group(1))
    assert len(sizes) == 2 and all(width > 100 and height > 50 for width, height in sizes)
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console


@browser
def test_the_screenshot_is_not_blank(page, tmp_path):
    import matplotlib.image

    shot = tmp_path / "shot.png"
    done = _chromium(f"--screenshot={shot}", page[0].as_uri(), cwd=tmp_path)
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    pixels = matplotlib.image.imread(shot)[..., :3]
    dark = (pixels.mean(axis=2) < 0.5).mean()
    assert 0.01 < dark < 0.5  # text and bars on a white page
    assert pixels.std() > 0.05


def test_cli_report(tmp_path, page):
    import allknn.cli

    result = page[1]
    result.save(tmp_path / "n.npz")
    assert allknn.cli.main(["report", str(tmp_path / "n.npz"), "-o", str(tmp_path / "r.html")]) == 0
    assert "Similarity of the 1st and the k-th neighbour" in (tmp_path / "r.html").read_text()
    assert allknn.cli.main(["report", str(tmp_path / "n.npz"), "-o", str(tmp_path / "r.txt")]) == 1
    with pytest.raises(ValueError, match="ids has 3 entries but the result has 1500"):
        result.report(tmp_path / "x.html", ids=np.arange(3))
