"""Regenerates dashboards/screenshots/*.png from a small study run here: its terminal, its dashboards, MLflow's UI.

    python dashboards/screenshots.py            # replayed training: the study path in about a minute
    python dashboards/screenshots.py --train    # trains every trial for real (several minutes on a laptop)

Runs `qstudy study search_spaces/qadapter_tiny.yaml` in a tmux session of a fixed size, in a
fresh QSTUDY_HOME that borrows the tiny workspace (data and base) of ``$QSTUDY_HOME`` (built
first if missing, as `qstudy demo` does), then `qstudy report` on it, and photographs with
headless Chromium (selenium + chromedriver, as tests/analysis/test_browser.py drives them):

- ``terminal.png``: the study's live table as it ended and its summary (tmux's capture, drawn by rich);
- ``<view>.png``: every view `qstudy report` wrote (dashboards/*.yaml), at the view's size;
- ``mlflow_ui.png``: the Pareto view inside MLflow's UI, on the study's parent run.

Needs tmux, chromium and chromium-driver (``apt-get install -y tmux chromium chromium-driver``).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "dashboards" / "screenshots"
SPACE = REPO / "search_spaces" / "qadapter_tiny.yaml"
REPLAY = REPO / "bench" / "data" / "tiny_curves.json"
BIN = Path(sys.executable).parent
NAME = "qadapter-tiny-demo"
TERMINAL = (118, 46)  # columns, rows: the live table and the summary fit without scrolling
MLFLOW_UI = (1400, 850)
DONE = "screenshots-study-exit="


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise TimeoutError(f"{what}: not within {timeout_s:.0f} s")


def prepare_home(work: Path) -> Path:
    """A fresh QSTUDY_HOME whose data and base are the user's tiny workspace (built there first if missing)."""
    from qstudy.cli import prepare_tiny_workspace
    from qstudy.core.paths import qstudy_home

    workspace = qstudy_home()
    prepare_tiny_workspace(workspace)
    home = work / "home"
    home.mkdir()
    for name in ("data", "base", "cache"):  # the frame cache too, when the workspace has one
        if (workspace / name).exists():
            (home / name).symlink_to(workspace / name)
    return home


def run_study_in_tmux(home: Path, work: Path, train: bool) -> str:
    """The study's terminal, escape sequences included, from its first line to its summary's last."""
    env = {**os.environ, "QSTUDY_HOME": str(home), "RAY_TMPDIR": tempfile.mkdtemp(prefix="qsshot", dir="/tmp"),
           "OMP_NUM_THREADS": "1"}
    command = [str(BIN / "qstudy"), "study", str(SPACE), "--name", NAME, *([] if train else ["--replay", str(REPLAY)])]
    script = work / "study.sh"
    script.write_text("".join(f"export {key}={shlex.quote(value)}\n" for key, value in env.items() if key.isidentifier())
                      + f"{shlex.join(command)}; echo {DONE}$?; sleep 3600\n")
    server = f"qstudy-screenshots-{os.getpid()}"
    tmux = ["tmux", "-L", server]
    subprocess.run([*tmux, "new-session", "-d", "-x", str(TERMINAL[0]), "-y", str(TERMINAL[1]), f"bash {script}"],
                   check=True)
    try:
        def finished() -> str | None:
            screen = subprocess.run([*tmux, "capture-pane", "-p", "-e", "-J", "-S", "-"], capture_output=True,
                                    text=True, check=True).stdout
            return screen if DONE in screen else None

        screen = _wait(finished, 3600 if train else 900, "the study")
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
    code = re.search(rf"{DONE}(\d+)", screen)[1]
    if code != "0":
        raise SystemExit(f"the study exited {code}:\n{screen}")
    return screen[:screen.index(DONE)].rstrip() + "\n"


def terminal_svg(ansi: str, path: Path) -> None:
    """The captured terminal as an SVG terminal window (rich's export)."""
    from rich.console import Console
    from rich.text import Text

    console = Console(record=True, width=TERMINAL[0], file=open(os.devnull, "w"), force_terminal=True)
    console.print(Text.from_ansi(ansi.rstrip("\n")), crop=False)
    console.save_svg(str(path), title="qstudy study search_spaces/qadapter_tiny.yaml")


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = os.environ.get("BROWSER_PATH") or shutil.which("chromium") or shutil.which(
        "chromium-browser")
    for argument in ("--headless=new", "--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                     "--disable-background-networking", "--disable-component-update", "--no-first-run",
                     "--disable-sync", "--hide-scrollbars"):
        options.add_argument(argument)
    return webdriver.Chrome(options=options, service=Service(executable_path=shutil.which("chromedriver")))


def _size(driver, width: int, height: int) -> None:
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})


def shoot_svg(driver, svg: Path, png: Path) -> None:
    width, height = (round(float(v)) for v in re.search(r'viewBox="0 0 ([\d.]+) ([\d.]+)"', svg.read_text()).groups())
    _size(driver, width, height)
    driver.get(svg.as_uri())
    time.sleep(1)  # its web font
    driver.save_screenshot(str(png))


def shoot_views(driver, report_dir: Path) -> list[str]:
    """Each dashboard `qstudy report` wrote, at its view's size, once plotly has drawn it."""
    from selenium.webdriver.support.ui import WebDriverWait

    from qstudy.analysis.views import load_views

    names = []
    for view in load_views(REPO / "dashboards"):
        _size(driver, view.png.width, view.png.height)
        driver.get((report_dir / f"{view.name}.html").as_uri())
        WebDriverWait(driver, 60).until(lambda d: d.execute_script(
            "const p = document.querySelector('.js-plotly-plot'); return Boolean(p && p._fullLayout);"))
        time.sleep(1)  # transitions
        driver.save_screenshot(str(OUT / f"{view.name}.png"))
        names.append(f"{view.name}.png")
    return names


def shoot_mlflow_ui(driver, home: Path, work: Path) -> None:
    """The Pareto view in MLflow's UI: the study's parent run, its dashboards/ artifacts."""
    from mlflow.tracking import MlflowClient

    from qstudy.study.tuner import load_state

    state = load_state(home, NAME)
    port = _free_port()
    log = (work / "mlflow.log").open("w")
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", state.tracking_uri, "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def answers() -> bool:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    return response.status == 200
            except OSError:
                return False

        _wait(answers, 180, f"mlflow server ({work / 'mlflow.log'})")
        experiment = MlflowClient(state.tracking_uri).get_run(state.parent_run_id).info.experiment_id
        _size(driver, *MLFLOW_UI)
        driver.get(f"{url}/#/experiments/{experiment}/runs/{state.parent_run_id}/artifacts/dashboards/pareto.html")
        time.sleep(15)  # the single-page app, then the artifact's iframe and its plot
        # MLflow's assistant opens beside the run on a first visit: close it, it hides the plot.
        driver.execute_script("""
            for (const button of document.querySelectorAll('button[aria-label]')) {
                if (/close/i.test(button.getAttribute('aria-label'))
                    && button.getBoundingClientRect().left > arguments[0]) button.click();
            }""", MLFLOW_UI[0] * 0.7)
        time.sleep(3)
        driver.save_screenshot(str(OUT / "mlflow_ui.png"))
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", action="store_true", help="train the trials instead of replaying recorded curves")
    parser.add_argument("--no-mlflow-ui", action="store_true", help="keep the current mlflow_ui.png")
    args = parser.parse_args()
    for tool in ("tmux", "chromedriver"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (apt-get install -y tmux chromium chromium-driver)")
    with tempfile.TemporaryDirectory(prefix="qstudy-screenshots-") as scratch:
        work = Path(scratch)
        home = prepare_home(work)
        ansi = run_study_in_tmux(home, work, args.train)
        report_dir = work / "report"
        subprocess.run([str(BIN / "qstudy"), "report", NAME, "--out", str(report_dir)],
                       env={**os.environ, "QSTUDY_HOME": str(home)}, check=True, stdout=subprocess.DEVNULL)
        terminal_svg(ansi, work / "terminal.svg")
        driver = browser()
        try:
            shoot_svg(driver, work / "terminal.svg", OUT / "terminal.png")
            written = ["terminal.png", *shoot_views(driver, report_dir)]
            if not args.no_mlflow_ui:
                shoot_mlflow_ui(driver, home, work)
                written.append("mlflow_ui.png")
        finally:
            driver.quit()
    print(f"wrote {', '.join(written)} in {OUT}")


if __name__ == "__main__":
    main()
