"""`dvc plots diff` of the pipeline's plots renders offline: the page made with the project's
template (.dvc/config plots.html_template: vega, vega-lite and vega-embed inlined) is opened in
headless Chromium with every network request refused, and each chart must have been drawn and
each picture must be a file next to the page. Skipped (with the reason) when Chromium is not
installed; `make test` installs it when it can (root + apt-get).

Reuses the pipeline repository of test_e2e.py (built once per session).
"""
from __future__ import annotations

import html.parser
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from test_e2e import ROOT, dvc_json, pipeline_repo, sh

CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
                 if Path(p).is_file()), None)
IMAGE_DIRS = ("plots/data", "plots/eval", "plots/explain")     # pictures (stage plots, top-level plots/eval)
# the charts: every top-level plot of dvc.yaml but the picture folder
CHARTS = [c for c in (next(iter(d)) if isinstance(d, dict) else d
                      for d in yaml.safe_load((ROOT / "dvc.yaml").read_text()).get("plots") or [])
          if c not in IMAGE_DIRS]
CDN = re.compile(r"""<script[^>]+src=["']?https?://|cdn\.jsdelivr|unpkg\.com""", re.I)


class _Dom(html.parser.HTMLParser):
    """Per element id: the tags inside it (with attributes); all <img> sources."""

    def __init__(self, ids):
        super().__init__()
        self.ids, self.inside, self.stack = set(ids), {i: [] for i in ids}, []
        self.images: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for open_id in {i for _, i in self.stack if i}:
            self.inside[open_id].append((tag, attrs))
        if tag == "img":
            self.images.append(attrs.get("src") or "")
        if tag not in ("img", "br", "meta", "link", "input", "hr", "path", "rect", "circle", "line"):
            self.stack.append((tag, attrs.get("id") if attrs.get("id") in self.ids else None))

    def handle_endtag(self, tag):
        for k in range(len(self.stack) - 1, -1, -1):
            if self.stack[k][0] == tag:
                del self.stack[k:]
                break


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> tuple[Path, dict]:
    repo = pipeline_repo(tmp_path_factory)
    out = tmp_path_factory.mktemp("plots")
    # workspace against the committed baseline: two revisions per chart when an experiment ran
    sh(repo, "dvc", "plots", "diff", "HEAD", "-o", str(out / "page"), timeout=120)
    defs = dvc_json(repo, "plots", "diff", "HEAD")
    return out / "page" / "index.html", defs


def test_every_plot_once_and_no_cdn(page):
    index, defs = page
    assert not defs.get("errors"), defs["errors"]
    ids = list(defs["data"])
    charts = [i for i in ids if any(r["type"] == "vega" for r in defs["data"][i])]
    images = [i for i in ids if all(r["type"] == "image" for r in defs["data"][i])]
    assert sorted(charts) == sorted(CHARTS), "a chart is missing, or a table is also drawn with default axes"
    for d in IMAGE_DIRS:
        assert any(i.startswith(d + "/") for i in images), f"no pictures of {d}"
    assert not [i for i in ids if i.endswith(".csv") and i not in CHARTS], ids
    text = index.read_text()
    assert not CDN.search(text), "the page loads scripts from the network"
    assert "vegaEmbed(" in text and "vega-lite" in text


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium; `make test` "
                                             "does it when run as root)")
def test_page_renders_offline_in_chromium(page, tmp_path):
    index, defs = page
    targets = re.findall(r"vegaEmbed\('#([^']+)'", index.read_text())
    assert len(targets) == len(CHARTS)
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", "--disable-extensions", f"--user-data-dir={tmp_path / 'profile'}",
           # no network: every host unresolvable, every proxied request to a closed port
           "--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
           "--virtual-time-budget=15000", "--window-size=1280,4000"]
    env = {**os.environ, "HOME": str(tmp_path)}
    dom = subprocess.run([*cmd, "--dump-dom", index.as_uri()], capture_output=True, text=True, timeout=120, env=env)
    assert dom.returncode == 0 and "<body" in dom.stdout, dom.stderr[-3000:]
    parsed = _Dom(targets)
    parsed.feed(dom.stdout)
    for target in targets:
        drawn = [a for tag, a in parsed.inside[target] if tag in ("canvas", "svg") and "marks" in (a.get("class") or "")]
        assert drawn, f"chart #{target} was not drawn (vega did not run?)"
        size = drawn[0]
        if "width" in size:
            assert float(size["width"]) > 50 and float(size["height"]) > 50, (target, size)
    srcs = [s for s in parsed.images if not s.startswith("${")]       # vega-embed's own template literal
    assert len(srcs) == sum(r["type"] == "image" for rs in defs["data"].values() for r in rs)
    for src in srcs:
        if src.startswith("data:image/"):
            continue
        path = index.parent / src
        assert not re.match(r"[a-z]+://", src) and path.is_file(), src
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", src

    # and the screenshot is not a blank page: charts and pictures put ink on it
    shot = tmp_path / "page.png"
    subprocess.run([*cmd, f"--screenshot={shot}", index.as_uri()], capture_output=True, timeout=120, env=env)
    if shot.is_file():
        from PIL import Image

        grey = Image.open(shot).convert("L")
        ink = sum(grey.histogram()[:200]) / (grey.width * grey.height)
        assert ink > 0.01, f"the page looks blank ({ink:.4f} of the pixels are dark)"
