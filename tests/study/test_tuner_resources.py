"""A trial shape the cluster can never place is refused before anything starts (Ray Train would wait forever)."""

from __future__ import annotations

import pytest
from servers import study, tiny_space

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize(("changes", "args", "message"), [
    ({}, ["--workers-per-trial", "3"],  # the worker node has 2 CPUs
     "workers_per_trial: 3 workers x cpus_per_worker 1.0 + 0.01 for the trial driver = 3.01 CPUs, "
     "but the cluster has 2"),
    ({}, ["--workers-per-trial", "2"],  # whole CPUs leave none for the trial's driver
     "workers_per_trial: 2 workers x cpus_per_worker 1.0 + 0.01 for the trial driver = 2.01 CPUs, "
     "but the cluster has 2"),
    ({"cpus_per_worker": 3}, [],  # one worker trains in the trial's own actor: no driver beside it
     "workers_per_trial: 1 workers x cpus_per_worker 3.0 = 3 CPUs, but the cluster has 2"),
    ({"use_gpu": True}, [], "use_gpu: 1 workers need 1 GPUs, the cluster has 0"),
], ids=["three-workers", "no-room-for-the-driver", "one-big-worker", "no-gpu"])
def test_unplaceable_trials_fail_naming_the_setting(ray_head, mlflow_server, study_home, tmp_path, changes, args,
                                                    message):
    driver = study(ray_head, study_home, str(tiny_space(tmp_path, **changes)), "--name", "unplaceable",
                   "--mlflow-uri", mlflow_server.uri, *args)
    output, _ = driver.communicate(timeout=240)
    assert driver.returncode == 2, output[-3000:]
    assert f"qstudy: config error: {message}" in output and "Traceback" not in output, output[-3000:]
    assert not (study_home / "studies" / "unplaceable").exists()  # no study directory, no trial
