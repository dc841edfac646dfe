"""What a trial counts as its own failure: an error its code raised, not a process Ray lost under it."""

from __future__ import annotations

import pytest
from ray.exceptions import ActorDiedError, NodeDiedError, RayTaskError, WorkerCrashedError

from qstudy.study.trial import lost_to_ray


@pytest.mark.parametrize("error, lost", [
    (ActorDiedError(), True),  # a killed driver removed the Train controller's placement group
    (WorkerCrashedError(), True),
    (NodeDiedError("node gone"), True),
    (ValueError("bad config"), False),
    (RayTaskError("train", "Traceback ...", ValueError("bad config")), False),
])
def test_only_errors_of_the_code_mark_a_trial_failed(error, lost):
    assert lost_to_ray(error) is lost
