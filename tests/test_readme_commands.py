"""Every `qstudy` command line the README shows runs and exits 0, in the README's order, in one QSTUDY_HOME.

Which lines: those in fenced code blocks tagged bash, sh, shell or console (an untagged block
too), with trailing-backslash continuations joined, an optional `$ ` prompt and a trailing
`# comment` removed; each segment of the line (split at `&&`, `||` and `;`) whose first word is
`qstudy` or a path ending in `/qstudy` (`.venv/bin/qstudy demo`) is one command.

Placeholders and heavy settings, substituted so the whole README runs in minutes on two cores:

- `qstudy demo` runs the demo's study path (`qstudy study` of search_spaces/qadapter_tiny.yaml,
  cut down as below, named `demo-readme`): the demo itself trains 6 trials of 10 epochs.
- `search_spaces/NAME.yaml` is a copy cut to seconds (1 epoch of 4 steps, 16 val clips, at most
  2 trials) keeping the space's `study`, so the names the README uses resolve; `--trials N`
  becomes at most 2.
- `SPACE` is search_spaces/qadapter_tiny.yaml with its own `study` (`readme-space`), uncut (a
  replayed study takes the recorded curves' 10 epochs, in seconds).
- `<study>`, `STUDY` and `NAME` name the first study a command made; `DIR` is a fresh directory;
  a relative path to a file of the checkout (`bench/data/...`) names that file, other relative
  paths resolve in a fresh working directory; `exported/01-...` is the first directory
  the export wrote, and `video.mp4` a clip of the tiny workspace.
- `qstudy dashboard` serves until stopped: it gets a free `--port`, must answer there, then is stopped.
- `qstudy report` gets `--no-png` where no Chromium is installed (PNGs need one).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SHELL_BLOCK = re.compile(r"^```(bash|sh|shell|console)?\s*$")
QSTUDY = re.compile(r"^(?:\S*/)?qstudy$")
CUT = {"train.epochs": 1, "train.max_steps_per_epoch": 4, "train.batch_size": 16, "data.max_val_clips": 16,
       "eval.max_new_tokens": 12, "eval.meteor": False}

pytestmark = pytest.mark.timeout(1500)


def readme_commands(text: str) -> list[list[str]]:
    """The `qstudy` commands of the README's shell blocks, as argument lists without the program."""
    commands, fence, shell, pending = [], False, False, ""
    for line in text.splitlines():
        if line.startswith("```"):
            fence, pending = not fence, ""
            shell = fence and bool(SHELL_BLOCK.match(line))
            continue
        if not shell:
            continue
        line = pending + line.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        line = line.removeprefix("$ ")
        for segment in re.split(r"&&|\|\||;", line):
            words = shlex.split(segment, comments=True)
            if words and QSTUDY.match(words[0]):
                commands.append(words[1:])
    return commands


def test_the_extraction_reads_the_readme_conventions():
    text = "\n".join([
        "```bash", "qstudy study a.yaml   # a comment", "python -m venv .venv && .venv/bin/qstudy demo", "```",
        "```console", "$ qstudy report x \\", "    --budget 1.5%", "$ echo qstudy not", "```",
        "```python", "qstudy = 1", "```", "```sh", "qstudy export x --out DIR; qstudy caption v.mp4", "```"])
    assert readme_commands(text) == [["study", "a.yaml"], ["demo"], ["report", "x", "--budget", "1.5%"],
                                     ["export", "x", "--out", "DIR"], ["caption", "v.mp4"]]


class Readme:
    """Runs the README's commands with the substitutions of the module docstring."""

    def __init__(self, home: Path, work: Path, env: dict):
        self.home, self.work, self.env = home, work, env
        self.first_study: str | None = None

    def space(self, name: str, cut: bool = True, study: str | None = None) -> str:
        space = yaml.safe_load((REPO / name).read_text())
        if cut:
            space["overrides"] = {**space.get("overrides", {}), **CUT}
            space["trials"] = min(space["trials"], 2)
        if study:
            space["study"] = study
        path = self.work / "spaces" / f"{study or space['study']}.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(yaml.safe_dump(space))
        return str(path)

    def substitute(self, args: list[str]) -> list[str]:
        if args[:1] == ["demo"]:
            return ["study", self.space("search_spaces/qadapter_tiny.yaml"), "--name", "demo-readme", *args[1:]]
        out = []
        for i, word in enumerate(args):
            if re.fullmatch(r"search_spaces/\w+\.yaml", word):
                word = self.space(word)
            elif word == "SPACE":
                word = self.space("search_spaces/qadapter_tiny.yaml", cut=False, study="readme-space")
            elif word in ("<study>", "STUDY", "NAME"):
                word = self.first_study
            elif word == "DIR":
                word = tempfile.mkdtemp(dir=self.work)
            elif word.startswith("exported/") and word.endswith("..."):
                word = str(sorted(path for path in (self.work / "exported").iterdir() if path.is_dir())[0])
            elif word == "video.mp4":
                word = str(sorted((self.home / "data" / "target" / "videos").glob("*.mp4"))[0])
            elif not word.startswith("-") and (REPO / word).is_file():  # the README runs in a checkout
                word = str(REPO / word)
            elif i > 0 and args[i - 1] == "--trials":
                word = str(min(int(word), 2))
            out.append(word)
        if out[0] == "report" and shutil.which("chromium") is None:
            out.append("--no-png")
        return out

    def run(self, args: list[str]) -> str:
        args = self.substitute(args)
        if args[0] == "dashboard":
            return self.serve(args)
        done = subprocess.run([str(BIN / "qstudy"), *args], cwd=self.work, env=self.env, capture_output=True,
                              text=True, timeout=900)
        assert done.returncode == 0, f"qstudy {shlex.join(args)}: exit {done.returncode}\n" \
                                     f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        if args[0] == "study" and self.first_study is None:
            self.first_study = re.search(r"^study (\S+): ", done.stdout, re.M)[1]
        return done.stdout

    def serve(self, args: list[str]) -> str:
        port = free_port()
        server = subprocess.Popen([str(BIN / "qstudy"), *args, "--port", str(port)], cwd=self.work, env=self.env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while not answers(f"http://127.0.0.1:{port}/"):
                assert server.poll() is None, f"qstudy {shlex.join(args)} exited {server.returncode}: " \
                                              f"{server.stdout.read()[-3000:]}"
                assert time.monotonic() < deadline, f"qstudy {shlex.join(args)}: nothing answers on port {port}"
                time.sleep(0.5)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(30)
        return ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def test_every_readme_command_runs(tiny_workspace, tmp_path):
    commands = readme_commands((REPO / "README.md").read_text())
    assert any(args[:1] in (["study"], ["demo"]) for args in commands) and any(args[:1] == ["report"] for args in commands)
    home = tmp_path / "home"
    home.mkdir()
    for name in ("data", "base"):
        (home / name).symlink_to(tiny_workspace / name)
    ray_dir = Path(tempfile.mkdtemp(prefix="qsrm", dir="/tmp"))  # Ray's socket paths must stay short
    env = {**os.environ, "QSTUDY_HOME": str(home), "RAY_TMPDIR": str(ray_dir), "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    work = tmp_path / "work"
    work.mkdir()
    readme = Readme(home, work, env)
    try:
        for args in commands:
            readme.run(args)
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
