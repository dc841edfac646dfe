"""The dashboards `qstudy report` logged to MLflow, opened in headless Chromium: points drawn, no console errors.

Drives Debian's chromium through chromedriver with selenium (no browser download: both
binaries come from apt, `apt-get install -y chromium chromium-driver`). The pictures the docs
show come from `python dashboards/screenshots.py`, not from this test.
"""

import os
import shutil
import struct
from pathlib import Path

import pytest

from qstudy.tracking.reader import client_for
from qstudy.analysis.views import load_views
from qstudy.cli import main

REPO_ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("BROWSER_PATH") or shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
VIEWS = {view.name: view for view in load_views(REPO_ROOT / "dashboards")}

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="no Chromium + ChromeDriver on this machine (apt-get install -y chromium chromium-driver)",
)

# What each view of "unit-study" (tests/analysis/conftest.py) must draw, worked out by hand:
# 6 finished trials (t6 failed, t7 infeasible), front t0 t1 t2 t5, knee t2, budget 1% of 120M.
EXPECTED = {
    "pareto": ("scatter points", 6 + 1 + 1),  # every finished trial, the knee star, the best-under-budget ring
    "hypervolume": ("scatter points", 8),  # one per trial in completion order, failed and infeasible too
    "epoch_curves": ("scatter points", 4 * 3),  # the 4 front trials' 3 epochs each
    # method, 7 hyperparameters (K, L, gating, rank, lr, alpha, target), log10 params, CIDEr
    "parallel_coordinates": ("parcoords axes", 10),
}
COUNT_SCRIPT = """
const plot = document.querySelector('.js-plotly-plot');
if (!plot || !plot._fullLayout) return null;
return {"scatter points": document.querySelectorAll('.scatterlayer .point').length,
        "parcoords axes": document.querySelectorAll('.parcoords g.axis').length,
        "no-webgl notices": document.querySelectorAll('.no-webgl').length};
"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        # Software WebGL for the parcoords view; without opting in, Chromium logs a deprecation
        # notice to the page console on every GPU-less machine.
        "--use-angle=swiftshader",
        "--enable-unsafe-swiftshader",
        # the network is closed: keep Chromium from trying
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path keeps Selenium Manager from trying to download one.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(120)
    yield driver
    driver.quit()


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", header[16:24])


def test_logged_dashboards_render_in_headless_chromium(browser, mlflow_store, tmp_path, capsys):
    from selenium.webdriver.support.ui import WebDriverWait

    uri, parents = mlflow_store
    assert (
        main(["report", "unit-study", "--mlflow-uri", uri, "--budget", "1%", "--out", str(tmp_path / "written")]) == 0
    )
    capsys.readouterr()
    # What the MLflow UI shows: the artifacts on the parent run, not the local copies. A combined
    # report another test ran on this store sits beside them in a folder of its own.
    downloaded = Path(client_for(uri).download_artifacts(parents["unit-study"], "dashboards", str(tmp_path)))
    assert sorted(path.name for path in downloaded.iterdir() if path.is_file()) == sorted(
        f"{name}.{suffix}" for name in VIEWS for suffix in ("html", "png")
    )
    for name, view in VIEWS.items():
        assert _png_size(downloaded / f"{name}.png") == (view.png.width, view.png.height)

    screenshot = tmp_path / "pareto-screenshot.png"
    for name, (what, expected) in EXPECTED.items():
        view = VIEWS[name]
        browser.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": view.png.width, "height": view.png.height, "deviceScaleFactor": 1, "mobile": False},
        )
        browser.get((downloaded / f"{name}.html").as_uri())
        counts = WebDriverWait(browser, 60).until(lambda driver: driver.execute_script(COUNT_SCRIPT))
        console = browser.get_log("browser")
        assert console == [], f"{name}.html logged to the console: {console}"
        assert counts[what] == expected, f"{name}.html: {counts}"
        assert counts["no-webgl notices"] == 0
        if name == "pareto":
            assert browser.save_screenshot(str(screenshot))
            assert _png_size(screenshot) == (view.png.width, view.png.height)

    # The console check above can fail: a page's error does reach the log.
    browser.execute_script("console.error('qstudy console probe')")
    assert any("qstudy console probe" in entry["message"] for entry in browser.get_log("browser"))
