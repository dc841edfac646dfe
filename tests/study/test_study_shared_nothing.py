"""A study on nodes that share nothing but the network: S3 storage, MLflow over HTTP, every node probed first.

The cluster (tests/study/shared_nothing.py) gives each node a private QSTUDY_HOME and Ray temp
dir at the same paths, so a file one node writes there is invisible to the other; what they
share is the S3 bucket (moto's server) and the session's MLflow server (PostgreSQL, artifacts in
S3). Drivers run on the head, submitted with `ray job submit`; trials run on the worker node.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from resume_checks import StudyFiles, assert_one_story, assert_resumed_without_repeats, optuna_states, trial_state
from servers import BIN, alive_nodes, finish, tiny_space, trial_process, wait_until
from shared_nothing import driver_pid, exists_on, ls_on, submit

from qstudy.tracking import schema, writer

pytestmark = pytest.mark.timeout(600)


def _in_a_third_directory(cluster, workspace: Path, *command: str) -> subprocess.CompletedProcess:
    """``command`` on a machine that saw neither node's disk: a mount namespace of its own, with an empty home at
    the nodes' path holding only the data and base every machine of the team has."""
    script = ('set -e; mount -t tmpfs third "$1"; mkdir "$1/home"; ln -s "$2/data" "$1/home/data"; '
              'ln -s "$2/base" "$1/home/base"; shift 2; exec "$@"')
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "third",
                           str(cluster.home.parent), str(workspace), *command],
                          env={**cluster.env, "QSTUDY_HOME": str(cluster.home)}, capture_output=True, text=True,
                          timeout=300)


def kill_driver(cluster, job, files: StudyFiles) -> tuple[dict, set[str]]:
    """SIGKILL the job's driver; once its trials have stopped, the trials' state and which trials Tune's saved
    state knew."""
    os.kill(driver_pid(cluster, job), signal.SIGKILL)
    job.process.communicate(timeout=120)
    wait_until(lambda: all(trial_process(cluster.worker_pid, trial_id) is None for trial_id in trial_state(files)),
               60, "the dead driver's trials to stop")
    return trial_state(files), {trial.trial_id for trial in files.tune_trials()}


def test_killed_driver_resumes_trials_from_their_checkpoints_and_repeats_nothing(
        shared_nothing, mlflow_server, tiny_workspace, tmp_path):
    """The study's storage in S3, its trials on the worker node: SIGKILL the driver once one trial has finished
    and another has two checkpoints, and the resumed driver once it has checkpointed an epoch more. Tune saves
    its experiment state every 10 s here, as Ray does by default, so it lags the trials, and the trials' own
    records in S3 carry the difference. The study ends with every run, metric and artifact in MLflow, and its
    adapters export and caption from a directory that saw neither node's disk. (That a resumed curve is the
    uninterrupted one is checked where the storage is local: the Ctrl-C and DeepSpeed tests.)"""
    cluster, name, epochs, trials = shared_nothing, "killed", 6, 3
    space = tiny_space(tmp_path, {"train.epochs": epochs}, trials=trials, concurrency=2, sampler="random", seed=4)
    files = StudyFiles(cluster.home, name, cluster)
    lagging = {"TUNE_GLOBAL_CHECKPOINT_S": "10"}
    job = submit(cluster, "qstudy", "study", str(space), "--name", name, "--mlflow-uri", mlflow_server.uri,
                 "--storage", cluster.storage_uri(), env=lagging)

    def one_trained_one_checkpointed():
        state = trial_state(files)
        return (any(trial["finished"] for trial in state.values())
                and any(len(trial["checkpoints"]) >= 2 and not trial["finished"] for trial in state.values()))

    wait_until(one_trained_one_checkpointed, 400, "a finished trial beside one with two checkpoints", job.process)
    first, first_saved = kill_driver(cluster, job, files)

    def resumable_and_trained_on():
        """A trial Tune's saved state knows, with a checkpoint the first driver's trials had not left, and an epoch
        to go."""
        known = {trial.trial_id for trial in files.tune_trials()}
        return any(trial_id in known and not trial["finished"] and trial["checkpoints"][-1] < epochs - 1
                   and set(trial["checkpoints"]) - set(first.get(trial_id, {}).get("checkpoints", []))
                   for trial_id, trial in trial_state(files).items() if trial["checkpoints"])

    job = submit(cluster, "qstudy", "study", "--resume", name, env=lagging)
    wait_until(resumable_and_trained_on, 400, "a known trial with a new checkpoint and an epoch to go", job.process)
    second, second_saved = kill_driver(cluster, job, files)

    summary = finish(submit(cluster, "qstudy", "study", "--resume", name).process)
    assert f"storage: s3://{cluster.storage.bucket}/studies/{name}" in summary, summary[-3000:]
    runs = assert_one_story(cluster.env, name, mlflow_server.uri, summary, tmp_path)
    for before, saved in [(first, first_saved), (second, second_saved)]:
        assert assert_resumed_without_repeats(before, saved, runs, files, epochs, mlflow_server.uri) >= 1
    states = optuna_states(files, tmp_path)
    assert [state for state, _ in states].count("COMPLETE") == trials and "RUNNING" not in dict(states)
    # Trials a dead driver had started but Tune's saved state never knew are not resumed: Tune
    # trains others in their place. Those that had trained stay FINISHED, the others close as LOST.
    ran = {trial.trial_id for trial in files.tune_trials()}
    assert len(ran) == trials and ran <= set(runs)
    for trial_id in set(runs) - ran:
        expected = ("FINISHED", "FINISHED") if second[trial_id]["finished"] else ("LOST", "KILLED")
        assert (runs[trial_id].data.tags[schema.STATUS_TAG], runs[trial_id].info.status) == expected, trial_id

    # Every trial trained on the worker node: its working files there, its record in S3, nothing on the head.
    client = MlflowClient(mlflow_server.uri)
    for trial_id in ran:
        assert runs[trial_id].data.tags[schema.NODE_TAG] == cluster.worker_node, trial_id
        assert {schema.WEIGHTS_ARTIFACT, schema.CONFIG_ARTIFACT} <= {
            artifact.path for artifact in client.list_artifacts(runs[trial_id].info.run_id)}, trial_id
        assert f"{name}/trials/{trial_id}/final_result.json" in cluster.s3_keys(f"{name}/trials/")
    assert "study.json" in ls_on(cluster.head_pid, files.study_dir)
    assert not exists_on(cluster.head_pid, files.study_dir / "trials")

    exports = tmp_path / "exports"
    exported = _in_a_third_directory(cluster, tiny_workspace, str(BIN / "qstudy"), "export", name, "--select", "best",
                                     "--out", str(exports), "--mlflow-uri", mlflow_server.uri)
    assert exported.returncode == 0, exported.stdout[-3000:] + exported.stderr[-3000:]
    (adapter,) = [path for path in exports.iterdir() if path.is_dir()]
    video = next((tiny_workspace / "data").rglob("*.mp4"))
    captioned = _in_a_third_directory(cluster, tiny_workspace, str(BIN / "qstudy"), "caption", "--adapter",
                                      str(adapter), str(video))
    assert captioned.returncode == 0, captioned.stdout[-3000:] + captioned.stderr[-3000:]
    (line,) = captioned.stdout.splitlines()
    assert line.startswith(f"{video}\t") and len(line.split("\t")[1].split()) >= 2


def test_the_same_cluster_with_the_study_directory_as_storage_fails_before_any_trial(
        shared_nothing, mlflow_server, tmp_path):
    job = submit(shared_nothing, "qstudy", "study", str(tiny_space(tmp_path)), "--name", "local-storage",
                 "--mlflow-uri", mlflow_server.uri)
    output, _ = job.process.communicate(timeout=300)
    assert job.process.returncode != 0, output[-3000:]
    # The job's failure message repeats its log: the set of lines is what the study said.
    lines = {line for line in output.splitlines() if line.startswith("qstudy: config error: ")}
    (worker,) = [node["node_ip"] for node in alive_nodes(shared_nothing.dashboard, shared_nothing.env["RAY_AUTH_TOKEN"])
                 if node["node_id"] == shared_nothing.worker_node]
    where = shared_nothing.home / "studies" / "local-storage"
    assert lines == {f"qstudy: config error: node {worker} ({shared_nothing.worker_node[:8]}): the study's storage "
                     f"{where} does not hold what the driver wrote there (a directory on one machine's disk is not "
                     "shared): give --storage an object store (s3://bucket/prefix, gs://...) or a filesystem mounted "
                     "on every node"}, output[-3000:]
    client = MlflowClient(mlflow_server.uri)
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    assert not client.search_runs(experiments, f"tags.`{schema.STUDY_TAG}` = 'local-storage'")  # nothing ran


class Outage:
    """A TCP relay to the MLflow server on a port of its own: ``cut()`` is an outage, ``restore()`` ends it."""

    def __init__(self, upstream: str):
        host, port = upstream.removeprefix("http://").split(":")
        self._upstream = (host, int(port))
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._listener = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restore(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def cut(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            server = socket.create_connection(self._upstream)
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


OUTBOX_JOB = '''
import json, os, sys, time
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from qstudy.study.tuner import deliver_everywhere
from qstudy.tracking import schema, writer

target, worker_node, server_back = writer.TrialTarget(**json.loads(sys.argv[1])), sys.argv[2], sys.argv[3]

@ray.remote(num_cpus=0, max_retries=0)
def a_trial_logs_during_the_outage():
    tracker = writer.TrialTracker(target, "outage-trial", "qadapter-outage-trial")
    tracker.log_params({"adapter.rank": 4})
    tracker.log_metrics({"val_cider": 0.25}, step=0)
    tracker.finish(schema.FINISHED)

ray.get(a_trial_logs_during_the_outage.options(
    scheduling_strategy=NodeAffinitySchedulingStrategy(worker_node, soft=False)).remote())
print("LOGGED", flush=True)
while not os.path.exists(server_back):
    time.sleep(0.2)
print("UNDELIVERED", deliver_everywhere(target, wait_s=0), flush=True)
'''


def test_an_outbox_written_on_the_worker_node_during_an_outage_is_delivered_once_the_server_is_back(
        shared_nothing, mlflow_server, tmp_path):
    outage = Outage(mlflow_server.uri)
    experiment = writer.ensure_experiment(mlflow_server.uri, "outage-shared-nothing", None)
    parent = writer.start_study_run(mlflow_server.uri, experiment, "outage", {})
    target = writer.TrialTarget(tracking_uri=outage.uri, experiment_id=experiment, parent_run_id=parent,
                                study="outage", outbox_root=str(shared_nothing.home / "studies" / "outage" / "outbox"))
    script, server_back = tmp_path / "outbox_job.py", tmp_path / "server_back"
    script.write_text(OUTBOX_JOB)
    job = submit(shared_nothing, "python", str(script), json.dumps(target.__dict__), shared_nothing.worker_node,
                 str(server_back))
    for line in job.process.stdout:
        if line.startswith("LOGGED"):
            break
    outbox = Path(target.outbox_root) / "outage-trial"
    assert "entries.jsonl" in ls_on(shared_nothing.worker_pid, outbox)  # kept on the worker's disk
    assert not exists_on(shared_nothing.head_pid, outbox)  # which the driver's node cannot see
    client = MlflowClient(mlflow_server.uri)
    assert [run.info.run_id for run in client.search_runs([experiment])] == [parent]

    outage.restore()
    server_back.touch()
    output = finish(job.process)
    assert "UNDELIVERED 0" in output, output[-3000:]
    (run,) = [run for run in client.search_runs([experiment]) if run.info.run_id != parent]
    assert (run.info.status, run.data.tags[schema.STATUS_TAG], run.data.tags[schema.TRIAL_ID_TAG]) == (
        "FINISHED", "FINISHED", "outage-trial")
    assert run.data.params == {"adapter.rank": "4"} and run.data.metrics == {"val_cider": 0.25}
    outage.cut()
