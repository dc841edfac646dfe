"""A study's storage reads and writes alike on a local disk and on an object store (S3 on loopback, moto's server)."""

from __future__ import annotations

import json
import logging

import pytest

from qstudy.study.storage import EPOCH_METRICS, LAST_CHECKPOINT, StudyStorage
from qstudy.study.worker import WorkerTask, newest_checkpoint


@pytest.fixture(scope="module")
def s3_uri():
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1", aws_access_key_id="moto",
                 aws_secret_access_key="moto").create_bucket(Bucket="studies")
    with pytest.MonkeyPatch.context() as env:  # pyarrow takes credentials from the environment, as on a node
        for key, value in (("AWS_ACCESS_KEY_ID", "moto"), ("AWS_SECRET_ACCESS_KEY", "moto"),
                           ("AWS_DEFAULT_REGION", "us-east-1")):
            env.setenv(key, value)
        yield f"s3://studies/team?endpoint_override={host}:{port}&scheme=http"
    server.stop()


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path) -> StudyStorage:
    uri = str(tmp_path / "studies") if request.param == "local" else request.getfixturevalue("s3_uri")
    return StudyStorage(uri, f"study-{request.param}-{tmp_path.name}")


def test_a_file_reads_back_as_written_and_a_missing_one_is_none(storage):
    path = storage.trial_file("t1", "final_result.json")
    assert storage.read_text(path) is None
    storage.write_text(path, '{"cider": 1.5}')
    storage.write_text(path, '{"cider": 2.5}')  # replaced whole
    assert storage.read_text(path) == '{"cider": 2.5}'
    assert storage.where("trials") == (storage.root + "/trials" if storage.local else f"s3://{storage.root}/trials")
    assert ("storage_filesystem" in storage.ray_storage("tune")) == (not storage.local)
    storage.delete(path)
    assert storage.read_text(path) is None


def test_a_restart_resumes_from_the_newer_of_tunes_checkpoint_and_the_recorded_one(storage, tmp_path):
    """Tune's saved state may lag the trial (a killed driver): the record of the newest checkpoint wins then,
    and a recorded checkpoint that never finished persisting (no metrics) is no candidate."""
    task = WorkerTask(trial_id="t1", run_name="qadapter-t1", run_config=None, predicted_trainable=0, tracking=None,
                      storage=storage)
    checkpoints = {epoch: storage.path("tune", "trial_t1", f"checkpoint_{epoch:06d}") for epoch in range(3)}
    for epoch in (0, 1):
        storage.write_text(f"{checkpoints[epoch]}/{EPOCH_METRICS}", json.dumps({"epoch": epoch}))
        storage.write_text(f"{checkpoints[epoch]}/weights.bin", "w" * (epoch + 1))
    assert newest_checkpoint(task, None) is None
    assert newest_checkpoint(task, checkpoints[0]) == checkpoints[0]
    storage.write_text(storage.trial_file("t1", LAST_CHECKPOINT), checkpoints[1])
    assert newest_checkpoint(task, checkpoints[0]) == checkpoints[1]
    storage.write_text(storage.trial_file("t1", LAST_CHECKPOINT), checkpoints[2])  # persisting when killed
    assert newest_checkpoint(task, checkpoints[1]) == checkpoints[1]

    with storage.checkpoint(checkpoints[1]).as_directory() as directory:  # what a trial on any node then loads
        assert json.loads((tmp_path.joinpath(directory) / EPOCH_METRICS).read_text()) == {"epoch": 1}
        assert (tmp_path.joinpath(directory) / "weights.bin").read_text() == "ww"
