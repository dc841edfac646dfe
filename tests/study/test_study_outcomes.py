"""What a study's exit code, output and summary say happened: failures, nothing to train, bad data, names a user types.

A study whose trials all fail is a real one on the test cluster (its trials raise when they
start: a batch larger than the training split); a space that cannot train (every config over
the budget) and data that cannot be read are refused before Ray starts and before any MLflow
store or run exists, so those run in this process and check that nothing was started.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from servers import BIN, SPACES, finish, mlflow_runs, study, tiny_space

from qstudy.cli import main
from qstudy.core.errors import EXIT_BAD_INPUT, EXIT_NOTHING_TRAINED, EXIT_TRIALS_FAILED
from qstudy.methods import adapter_config_from_mapping
from qstudy.tracking import schema

pytestmark = pytest.mark.timeout(600)

FAILED_LINE = re.compile(r"^trial (\S+) \((\w+)\) failed: (.+); full log: (\S+)$")


def test_a_study_whose_trials_all_fail_exits_3_one_line_per_trial(ray_head, mlflow_server, study_home, tmp_path):
    space = tiny_space(tmp_path, {"train.epochs": 1, "train.batch_size": 1000}, trials=2, concurrency=2,
                       sampler="random", seed=0)
    output = finish(study(ray_head, study_home, str(space), "--name", "all-fail", "--mlflow-uri", mlflow_server.uri),
                    code=EXIT_TRIALS_FAILED)

    failed = [FAILED_LINE.match(line) for line in output.splitlines() if FAILED_LINE.match(line)]
    assert len(failed) == 2, output[-5000:]
    for line in failed:
        assert line[2] == "qadapter" and line[3].startswith("ConfigError: train.batch_size 1000")
        assert "train.batch_size 1000" in Path(line[4]).read_text()  # the full log: Tune's error file, in the study dir
    # Tracebacks, Tune's error tables and its restore hint only with -v.
    for noise in ("Traceback", "Trial task failed", "Number of errored trials", "Tuner.restore"):
        assert noise not in output, noise
    # The summary: how many failed, the first one's reason and log, then the next commands.
    summary = output[output.index("study all-fail: "):]
    assert "2 failed" in summary.splitlines()[0]
    assert re.search(r"^2 of 2 trials failed; the first, trial \S+ \(qadapter\): ConfigError: train\.batch_size 1000",
                     summary, re.M)
    log = re.search(r"^  full log: (\S+)$", summary, re.M)[1]
    assert log in {line[4] for line in failed} and Path(log).is_file()
    next_commands = summary[summary.index("\nnext:\n"):].splitlines()[2:]
    assert next_commands[:3] == [
        f"  qstudy report all-fail --mlflow-uri {mlflow_server.uri}",
        f"  qstudy export all-fail --select front --out {study_home / 'exports' / 'all-fail'} "
        f"--mlflow-uri {mlflow_server.uri}",
        "  qstudy dashboard all-fail"]
    _, children = mlflow_runs(mlflow_server.uri, "qadapter-tiny")
    assert sorted(run.data.tags[schema.STATUS_TAG] for run in children
                  if run.data.tags[schema.STUDY_TAG] == "all-fail") == ["FAILED", "FAILED"]

    # The names a user types: the space's study (the MLflow experiment) reads its latest study and says which one.
    env = {**ray_head.env, "QSTUDY_HOME": str(study_home)}
    report = subprocess.run([str(BIN / "qstudy"), "report", "qadapter-tiny", "--mlflow-uri", mlflow_server.uri,
                             "--no-png", "--out", str(tmp_path / "report")], env=env, capture_output=True, text=True,
                            timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    assert "'qadapter-tiny' is an MLflow experiment; reading its latest study, " in report.stderr
    unknown = subprocess.run([str(BIN / "qstudy"), "report", "no-such-study", "--mlflow-uri", mlflow_server.uri],
                             env=env, capture_output=True, text=True, timeout=300)
    assert unknown.returncode == EXIT_BAD_INPUT, unknown.stderr
    (line,) = unknown.stderr.strip().splitlines()
    assert line.startswith("qstudy: no study 'no-such-study'") and "all-fail" in line

    from qstudy.study.tuner import resolve_study

    assert resolve_study(study_home, "all-fail") == ("all-fail", None)
    assert resolve_study(study_home, "qadapter-tiny") == (
        "all-fail", "'qadapter-tiny' is the study family of 1 studies here; using the latest, all-fail")


def _write_space(path: Path, **changes) -> Path:
    space = yaml.safe_load((SPACES / "qadapter_tiny.yaml").read_text())
    space.update(trials=2, **changes)
    path.write_text(yaml.safe_dump(space))
    return path


def _nothing_started(home: Path) -> None:
    assert not (home / "mlflow").exists()  # no MLflow store, so no experiment and no run
    assert not (home / "cache").exists()  # no video decoded
    assert not (home / "studies").exists()
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


def test_every_config_over_the_budget_exits_4_before_anything_starts(study_home, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QSTUDY_HOME", str(study_home))
    space = _write_space(tmp_path / "space.yaml", parameter_budget="2%")
    # The smallest config of the space, counted here from its choices.
    from qstudy.study.space import load_space

    dims = load_space(space).dims
    choices = {key.removeprefix("adapter."): spec["choices"]
               for key, spec in yaml.safe_load(space.read_text())["arms"]["qadapter"].items() if "choices" in spec}
    smallest = min(adapter_config_from_mapping({"method": "qadapter", **dict(zip(choices, values))}).count_trainable(dims)
                   for values in itertools.product(*choices.values()))
    assert 100 * smallest / dims.total_params > 2

    assert main(["study", str(space)]) == EXIT_NOTHING_TRAINED
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("qstudy: nothing to train: every sampled config is over parameter_budget 2% "
                           f"(smallest in this space: {100 * smallest / dims.total_params:.1f}%, {smallest:,} of ")
    _nothing_started(study_home)


def test_a_bad_split_exits_2_naming_field_and_file_before_anything_starts(tiny_workspace, study_home, tmp_path,
                                                                          monkeypatch, capsys):
    data = tmp_path / "data"  # a small copy: a few clips of each split, their videos linked
    annotations = json.loads((tiny_workspace / "data" / "target" / "annotations.json").read_text())
    keep = {video["video_id"] for split in ("train", "val")
            for video in [v for v in annotations["videos"] if v["split"] == split][:4]}
    annotations = {**annotations, "videos": [v for v in annotations["videos"] if v["video_id"] in keep],
                   "sentences": [s for s in annotations["sentences"] if s["video_id"] in keep]}
    (data / "videos").mkdir(parents=True)
    (data / "annotations.json").write_text(json.dumps(annotations))
    for video_id in keep:
        shutil.copy(tiny_workspace / "data" / "target" / "videos" / f"{video_id}.mp4", data / "videos")
    space = _write_space(tmp_path / "space.yaml")
    raw = yaml.safe_load(space.read_text())
    raw["overrides"].update({"data.annotations": str(data / "annotations.json"), "data.video_dir": str(data / "videos"),
                             "data.val_split": "no-such-split"})
    space.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("QSTUDY_HOME", str(study_home))

    assert main(["study", str(space)]) == EXIT_BAD_INPUT
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("qstudy: config error: ") and "data.val_split" in line
    assert str(data / "annotations.json") in line and "'no-such-split'" in line
    _nothing_started(study_home)
