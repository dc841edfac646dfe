"""What a trial counts as its own failure: an error its code raised, not a process Ray lost, nor memory it ran out of."""

from __future__ import annotations

import pytest
import torch
from ray.exceptions import ActorDiedError, NodeDiedError, RayTaskError, WorkerCrashedError
from ray.train import WorkerGroupError
from ray.train.v2.api.exceptions import ControllerError

from qstudy.study.trial import lost_to_ray
from qstudy.study.worker import (ApplicationFailure, RanOutOfMemory, WorkerTask, mark_failed, mark_out_of_memory,
                                 out_of_memory, out_of_memory_reason, raise_if_failed_before)
from qstudy.tracking.writer import TrialTarget
from qstudy.study.storage import StudyStorage


@pytest.mark.parametrize("error, lost", [
    (ActorDiedError(), True),  # a killed driver removed the Train controller's placement group
    (WorkerCrashedError(), True),
    (NodeDiedError("node gone"), True),
    (ValueError("bad config"), False),
    (RayTaskError("train", "Traceback ...", ValueError("bad config")), False),
])
def test_only_errors_of_the_code_mark_a_trial_failed(error, lost):
    assert lost_to_ray(error) is lost


def cpu_allocation_failure() -> RuntimeError:
    """What torch's CPU allocator raises for an allocation the machine cannot give (a plain RuntimeError)."""
    try:
        torch.empty(2**50, dtype=torch.uint8)  # beyond any x86-64 or arm64 process's address space: touches nothing
    except RuntimeError as error:
        return error
    raise AssertionError("a 1 PiB allocation succeeded")


def raised_from(cause: BaseException, error: BaseException) -> BaseException:
    try:
        raise error from cause
    except BaseException as chained:  # noqa: BLE001 - the chained exception itself is the point
        return chained


CPU = cpu_allocation_failure()
CUDA = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
COLLATERAL = RuntimeError("Connection reset by peer")  # another rank's collective after one ran out


@pytest.mark.parametrize("error, found", [
    (CPU, CPU),
    (CUDA, CUDA),
    (MemoryError(), MemoryError),
    (RuntimeError("CUDA error: out of memory"), RuntimeError),  # the CUDA runtime's own, outside torch's allocator
    (RayTaskError("train", "Traceback ...", CPU), CPU),  # an error of a Ray task or actor, as Ray wraps it
    (RayTaskError("train", "Traceback ...", CPU).as_instanceof_cause(), RuntimeError),  # ... and raises it
    (WorkerGroupError("rank 1 ran out", {0: COLLATERAL, 1: CUDA}), CUDA),  # a Train worker group's
    (WorkerGroupError("restarted", {0: RanOutOfMemory("RuntimeError: ...")}), RanOutOfMemory),  # its restart's
    (ControllerError(WorkerGroupError("rank 0 ran out", {0: CPU})), CPU),
    (raised_from(CUDA, RuntimeError("DeepSpeed: step failed")), CUDA),  # a library re-raising it
    (ValueError("bad config"), None),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), None),
    (ApplicationFailure("raised before"), None),
    (WorkerGroupError("rank 0 raised", {0: ValueError("bad config")}), None),
    (ActorDiedError(), None),  # a killed process is Ray's to restart (lost_to_ray), not a verdict on the config
])
def test_out_of_memory_is_found_by_type_through_rays_wrappers_and_chained_errors(error, found):
    result = out_of_memory(error)
    if found is None or isinstance(found, BaseException):
        assert result is found
    else:
        assert isinstance(result, found)


def _task(tmp_path) -> WorkerTask:
    target = TrialTarget(tracking_uri="", experiment_id="", parent_run_id="", study="s", outbox_root=str(tmp_path))
    return WorkerTask(trial_id="t1", run_name="qadapter-t1", run_config=None, predicted_trainable=0, tracking=target,
                      storage=StudyStorage(str(tmp_path), "s"))


def test_a_restart_after_running_out_of_memory_gives_up_at_once_naming_the_allocation(tmp_path):
    task = _task(tmp_path)
    raise_if_failed_before(task)  # nothing recorded: trains
    # Ranks fail in turn after one ran out: rank 0's collateral error comes after, and loses.
    mark_out_of_memory(task, WorkerGroupError("rank 1 ran out", {1: CPU}))
    mark_failed(task, COLLATERAL)
    with pytest.raises(RanOutOfMemory) as raised:
        raise_if_failed_before(task)
    assert str(raised.value).startswith("RuntimeError: [enforce fail") and "can't allocate memory" in str(raised.value)
    assert out_of_memory(raised.value) is raised.value
    assert out_of_memory_reason(task.storage, "t1") == str(raised.value)
    mark_out_of_memory(task, CUDA)  # the first allocation that failed is the one kept
    assert out_of_memory_reason(task.storage, "t1") == str(raised.value)
    assert out_of_memory_reason(task.storage, "t2") == "no error was recorded"


def test_a_restart_after_the_code_raised_still_fails(tmp_path):
    task = _task(tmp_path)
    mark_failed(task, ValueError("bad config"))
    with pytest.raises(ApplicationFailure):
        raise_if_failed_before(task)
