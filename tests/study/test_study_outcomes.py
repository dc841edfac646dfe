"""What a study's exit code, output and summary say happened: failures, memory run out, nothing to train, bad data,
names a user types.

A study whose trials all fail is a real one on the test cluster (its trials raise when they
start: a batch larger than the training split), and so is one whose trial runs out of memory
(an allocation no machine can give); a space that cannot train (every config over the budget)
and data that cannot be read are refused before Ray starts and before any MLflow store or run
exists, so those run in this process and check that nothing was started.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from ray.tune import ExperimentAnalysis
from servers import BIN, SPACES, finish, mlflow_runs, study, tiny_space

from qstudy.cli import main
from qstudy.core.errors import EXIT_BAD_INPUT, EXIT_NOTHING_TRAINED, EXIT_OK, EXIT_TRIALS_FAILED
from qstudy.methods import adapter_config_from_mapping
from qstudy.records import TrialRecord
from qstudy.study.progress import EVENT_LINE
from qstudy.study.search import OUT_OF_MEMORY_CONSTRAINT
from qstudy.study.tuner import StudySummary, format_summary
from qstudy.tracking import schema
from qstudy.study.storage import StudyStorage

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


# A Q-Adapter with 2**46 query tokens of rank 16: one 4 PiB parameter, beyond any machine's address space, so torch's
# allocator refuses it at once (nothing is touched, nothing swaps) on any CI machine, as it would a config too large.
HUGE_QUERIES = 2**46
ALLOCATOR_FAILURE = "DefaultCPUAllocator: can't allocate memory"


def test_a_trial_out_of_memory_is_its_own_state_avoided_by_the_sampler_and_not_a_failure(
        ray_head, mlflow_server, study_home, tmp_path):
    arms = {"frozen": {}, "qadapter": {"adapter.num_query_tokens": HUGE_QUERIES}}
    space = tiny_space(tmp_path, {"train.epochs": 1}, trials=2, concurrency=2, sampler="random", seed=0, arms=arms)
    output = finish(study(ray_head, study_home, str(space), "--name", "oom", "--mlflow-uri", mlflow_server.uri),
                    code=EXIT_OK)  # a trial finished; the other ran out of memory, which is no failure

    _, children = mlflow_runs(mlflow_server.uri, "qadapter-tiny")
    runs = {run.data.params["method"]: run for run in children if run.data.tags[schema.STUDY_TAG] == "oom"}
    assert set(runs) == {"frozen", "qadapter"}  # each arm once: the study enqueues every arm first
    oom, trained = runs["qadapter"], runs["frozen"]
    oom_id = oom.data.tags[schema.TRIAL_ID_TAG]
    assert oom.data.tags[schema.STATUS_TAG] == schema.OUT_OF_MEMORY and oom.info.status == "KILLED"
    reason = oom.data.tags[schema.ERROR_TAG]
    assert reason.startswith("RuntimeError: ") and ALLOCATOR_FAILURE in reason and "\n" not in reason
    assert "cider" not in oom.data.metrics
    assert trained.data.tags[schema.STATUS_TAG] == schema.FINISHED and "cider" in trained.data.metrics

    # The event line and the summary name it; nothing calls it failed.
    (line,) = [EVENT_LINE.match(line) for line in output.splitlines() if line.startswith(f"trial {oom_id} ")
               and not line.startswith(f"trial {oom_id} (qadapter) started: ")]
    assert line and line["event"] == "out of memory" and line["detail"].startswith(f"{reason}; params ")
    assert not any(FAILED_LINE.match(line) for line in output.splitlines()) and "trials failed" not in output
    summary = output[output.index("study oom: "):]
    assert "1 finished, 1 out of memory in " in summary.splitlines()[0]
    assert (f"1 of 2 trials ran out of memory (told to the sampler as infeasible, not failed); the first, "
            f"trial {oom_id} (qadapter): {reason}") in summary
    traceback_file = Path(re.search(r"^  traceback: (\S+)$", summary, re.M)[1])
    assert ALLOCATOR_FAILURE in traceback_file.read_text() and "torch.randn" in traceback_file.read_text()

    # Tune ended it without retrying it; Optuna has it complete with its constraint violated, off the front.
    study_dir = study_home / "studies" / "oom"
    statuses = {trial.trial_id: (trial.status, trial.num_failures) for trial in ExperimentAnalysis(
        str(study_dir / "tune")).trials}
    assert statuses[oom_id] == ("TERMINATED", 0)
    optuna_study = optuna.load_study(study_name="oom", storage=f"sqlite:///{study_dir / 'optuna.db'}")
    by_method = {trial.user_attrs["method"]: trial for trial in optuna_study.trials}
    assert by_method["qadapter"].state == optuna.trial.TrialState.COMPLETE
    assert by_method["qadapter"].constraints == {OUT_OF_MEMORY_CONSTRAINT: 1.0}
    assert by_method["frozen"].constraints == {}
    assert [trial.number for trial in optuna_study.best_trials] == [by_method["frozen"].number]


def _summary(tmp_path: Path, statuses: list[str]) -> StudySummary:
    records = [TrialRecord(trial_id=f"t{order}", study="s", method="qadapter", params={},
                           cider=1.0 if status == schema.FINISHED else None, trainable_params=10, total_params=None,
                           status=status, order=order, error="RuntimeError: out" if status != schema.FINISHED else None)
               for order, status in enumerate(statuses)]
    return StudySummary(name="s", study_dir=tmp_path, storage=StudyStorage(str(tmp_path), "s"),
                        tracking_uri="sqlite:///x.db", experiment="e", parent_run_id="p",
                        wall_seconds=1.0, records=records)


@pytest.mark.parametrize("statuses, code, nothing_trained", [
    ([schema.FINISHED, schema.OUT_OF_MEMORY], EXIT_OK, None),
    ([schema.FINISHED, schema.INFEASIBLE, schema.STOPPED, schema.OUT_OF_MEMORY], EXIT_OK, None),
    ([schema.OUT_OF_MEMORY, schema.OUT_OF_MEMORY], EXIT_NOTHING_TRAINED,
     "nothing trained: no trial finished (a smaller config or a larger machine is what helps one out of memory)"),
    ([schema.OUT_OF_MEMORY, schema.INFEASIBLE], EXIT_NOTHING_TRAINED,
     "nothing trained: no trial finished (an infeasible trial is over the space's parameter_budget and is never "
     "trained; a smaller config or a larger machine is what helps one out of memory)"),
    ([schema.FINISHED, schema.OUT_OF_MEMORY, schema.FAILED], EXIT_TRIALS_FAILED, None),
])
def test_trials_out_of_memory_are_counted_apart_and_never_as_failed(tmp_path, statuses, code, nothing_trained):
    summary = _summary(tmp_path, statuses)
    assert summary.exit_code == code
    lines = format_summary(summary).splitlines()
    out = statuses.count(schema.OUT_OF_MEMORY)
    assert f"{out} out of memory" in lines[0]
    assert any(line.startswith(f"{out} of {len(statuses)} trials ran out of memory") for line in lines)
    assert any(line.startswith("1 of ") and " failed;" in line for line in lines) == (schema.FAILED in statuses)
    assert [line for line in lines if line.startswith("nothing trained")] == ([nothing_trained] if nothing_trained
                                                                             else [])


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
