"""The HTML reports (``optimize --html``, ``explain --html``) in a real browser: headless Chromium loads
each page, logs no console message, takes a screenshot, and the figures the page shows under
``data-key`` equal those of the JSON report. Skipped, with the reason, where no Chromium is installed
(Debian: ``apt-get install chromium``). The page itself is checked without a browser too: one file, no
script, nothing fetched from the network."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import onnx
import pytest

from tests.explain_models import ort_quantize, outlier_cnn, samples, write_samples
from tests.reliability_helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (Debian: apt-get install chromium)")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run"]


class KeyedText(HTMLParser):
    """{data-key: the element's text} of a page, and the tags it uses."""

    def __init__(self):
        super().__init__()
        self.values: dict = {}
        self.tags: set = set()
        self.srcs: list = []
        self._open: list = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        self.srcs += [v for k, v in attrs if k in ("src", "href") and v]
        self._open.append(a.get("data-key"))
        if a.get("data-key"):
            self.values[a["data-key"]] = ""

    def handle_endtag(self, tag):
        if self._open:
            self._open.pop()

    def handle_data(self, data):
        for k in self._open:
            if k:
                self.values[k] += data


def keyed(html: str) -> KeyedText:
    p = KeyedText()
    p.feed(html)
    return p


def lookup(d, key: str):
    for part in key.split("."):
        d = d[int(part)] if isinstance(d, list) else d[part]
    return d


def assert_matches(values: dict, report: dict, keys: dict) -> None:
    """Each key's text on the page is the JSON value at the shown precision ``keys[key]`` (decimals;
    ``%`` for a percentage with that many decimals; ``str`` for text)."""
    for key, spec in keys.items():
        assert key in values, f"{key} not on the page"
        shown = values[key].strip()
        want = lookup(report, key)
        if spec == "str":
            assert shown == str(want), (key, shown, want)
        elif isinstance(spec, str) and spec.endswith("%"):
            assert abs(float(shown.rstrip("%")) / 100 - want) <= 0.5 * 10 ** -(int(spec[:-1]) + 2) + 1e-12, \
                (key, shown, want)
        else:
            assert abs(float(shown) - want) <= 0.5 * 10 ** -spec + 1e-12, (key, shown, want)


def chromium(page: Path, tmp: Path, screenshot: Path | None = None) -> tuple[str, list[str]]:
    """The DOM Chromium built from ``page`` and its console messages (stderr lines of --enable-logging)."""
    url = page.resolve().as_uri()
    r = subprocess.run([CHROMIUM, *FLAGS, "--enable-logging=stderr", "--v=0", f"--user-data-dir={tmp / 'profile'}",
                        "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    console = [ln for ln in r.stderr.splitlines() if "CONSOLE" in ln]
    if screenshot is not None:
        s = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp / 'profile'}", "--window-size=1280,1800",
                            f"--screenshot={screenshot}", url], capture_output=True, text=True, timeout=120)
        assert s.returncode == 0, s.stderr[-2000:]
    return r.stdout, console


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1280, 1800)
    assert len(data) > 20_000  # a blank page compresses to a few kB


def assert_self_contained(html: str) -> None:
    p = keyed(html)
    assert "script" not in p.tags and "link" not in p.tags and "img" not in p.tags
    assert not p.srcs
    assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", html)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The README's demo command with --report and --html."""
    d = tmp_path_factory.mktemp("demo")
    r = run_cli("optimize", ROOT / "models/demo/demo_cnn.onnx", d / "demo_small.onnx", "--passes",
                "cleanup,prune,quantize", "-o", "prune.mode=importance", "-o", "prune.ratio=0.1", "--calib",
                ROOT / "models/demo/calib", "--budget", "cosine>=0.98", "--report", d / "demo_report.json",
                "--html", d / "demo_report.html", "-q")
    assert r.code == 0, r.err
    return d


@pytest.fixture(scope="module")
def explained(tmp_path_factory):
    d = tmp_path_factory.mktemp("explain_html")
    onnx.save(outlier_cnn(), str(d / "orig.onnx"))
    cal = samples(16, seed=1)
    calib = write_samples(d / "calib", cal)
    ort_quantize(d / "orig.onnx", d / "ort.onnx", cal)
    r = run_cli("explain", d / "orig.onnx", d / "ort.onnx", "--calib", calib, "--json", d / "ex.json",
                "--html", d / "ex.html", "--apply", d / "fixed.onnx", "-q")
    assert r.code == 0, r.err
    return d


DEMO_KEYS = {"fidelity.cosine": 5, "fidelity.cosine_min": 5, "fidelity.sqnr": 2, "selection_fidelity.cosine": 5,
             "passes.0.name": "str", "passes.2.name": "str", "passes.1.status": "str", "passes.1.fidelity.cosine": 5,
             "after.nodes": 0, "before.nodes": 0, "timings_s.passes": 2, "timings_s.total": 2}
EXPLAIN_KEYS = {"before.cosine": 5, "before.cosine_min": 5, "after.cosine": 5, "ranking.0.node": "str",
                "ranking.0.share": "1%", "ranking.1.node": "str", "ranking.0.sqnr_db": 1, "matched_tensors": 0}


def test_pages_are_self_contained_and_show_the_json_figures(demo, explained):
    for page, js, keys in ((demo / "demo_report.html", demo / "demo_report.json", DEMO_KEYS),
                           (explained / "ex.html", explained / "ex.json", EXPLAIN_KEYS)):
        html = page.read_text()
        assert_self_contained(html)
        assert_matches(keyed(html).values, json.loads(js.read_text()), keys)
    assert "@media print" in (demo / "demo_report.html").read_text()


def test_key_check_can_fail(explained):
    res = json.loads((explained / "ex.json").read_text())
    values = keyed((explained / "ex.html").read_text()).values
    res["before"]["cosine"] -= 1e-3
    with pytest.raises(AssertionError):
        assert_matches(values, res, {"before.cosine": 5})


@needs_chromium
def test_chromium_renders_reports_without_console_errors(demo, explained, tmp_path):
    for page, js, keys in ((demo / "demo_report.html", demo / "demo_report.json", DEMO_KEYS),
                           (explained / "ex.html", explained / "ex.json", EXPLAIN_KEYS)):
        shot = tmp_path / (page.stem + ".png")
        dom, console = chromium(page, tmp_path, shot)
        assert console == [], console
        assert_png(shot)
        assert_matches(keyed(dom).values, json.loads(js.read_text()), keys)


@needs_chromium
def test_chromium_console_check_can_fail(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text("<!DOCTYPE html><html><body><script>console.error('broken report')</script></body></html>")
    _, console = chromium(page, tmp_path)
    assert any("broken report" in ln for ln in console)
