"""The per-worker training function: ``recipe.run`` reporting each epoch's metrics and checkpoint to Ray.

The same function runs on Ray Train workers (``TorchTrainer``, several processes, DeepSpeed
over gloo/NCCL) and, for single-worker trials, directly in the Tune trial's own actor; the
only difference is which ``report``/``get_checkpoint`` pair it is given. Every rank reports
its checkpoint directory (DeepSpeed writes a shard per rank; Ray merges them); only rank 0
logs to MLflow, and only after Ray has persisted the epoch's checkpoint: an epoch's metrics
are in MLflow only if a restart can resume after that epoch, so no epoch is trained (and
logged) twice. Rank 0 also keeps the trial's record in the study's storage (study/storage.py),
where a restart on any node reads it: the newest checkpoint Ray persisted and, once trained,
the final result, which a resumed study needs when Tune's experiment state (saved every few
seconds) is older than the trial's progress.

A rank that runs out of memory says so in the record before it raises, like rank 0 for an
error of the code: Ray Train restarts a failed worker group, and the restarted workers give
up at once with the same verdict instead of training into the same wall.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qstudy.config import RunConfig
from qstudy.core.errors import last_exception
from qstudy.metrics import ScorerProcessDied
from qstudy.model.quiet import quiet_weight_loading
from qstudy.study.storage import (EPOCH_METRICS, FAILED_MARKER, FINAL_RESULT, LAST_CHECKPOINT, OUT_OF_MEMORY_MARKER,
                                  StudyStorage)
from qstudy.tracking import schema
from qstudy.tracking.schema import FINISHED, NODE_TAG
from qstudy.tracking.writer import TrialTarget, TrialTracker


@dataclass(frozen=True)
class WorkerTask:
    """Everything a worker needs, picklable: the trial's full run config and where to log it."""

    trial_id: str
    run_name: str
    run_config: RunConfig  # as the sampler built and validated it, with the trial's output_dir on its node
    predicted_trainable: int
    tracking: TrialTarget
    storage: StudyStorage  # the study's, where the trial's record lives
    replay_table: str | None = None  # replay this table's curves (study/replay.py) instead of training


class ApplicationFailure(RuntimeError):
    """The training code itself raised before: restarting would raise again, so the trial fails now."""


class RanOutOfMemory(RuntimeError):
    """The trial ran out of memory before: restarting would run out again. Its message is the allocation that failed."""


# torch's CPU allocator raises a plain RuntimeError, and a CUDA call outside torch's caching
# allocator (cuBLAS, NCCL) the runtime's own error: only their messages say it is memory.
_ALLOCATION_FAILURES = ("DefaultCPUAllocator: can't allocate memory", "CUDA error: out of memory")


def _is_allocation_failure(error: BaseException) -> bool:
    torch = sys.modules.get("torch")  # an exception of torch's is only ever unpickled with torch imported
    from ray.exceptions import OutOfMemoryError as RayMemoryMonitorKill

    return (isinstance(error, (MemoryError, RanOutOfMemory, RayMemoryMonitorKill))
            or (torch is not None and isinstance(error, torch.OutOfMemoryError))
            or (isinstance(error, RuntimeError) and any(text in str(error) for text in _ALLOCATION_FAILURES)))


def out_of_memory(error: BaseException) -> BaseException | None:
    """The out-of-memory error ``error`` is, wraps or was raised from; None when it is none.

    Looked for by type through Ray's wrappers (a task's ``cause``, a Train worker group's
    ``worker_failures``, a controller's failure) and through chained exceptions, as DeepSpeed
    and other libraries re-raise it.
    """
    seen, pending = set(), [error]
    while pending:
        current = pending.pop(0)
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        if _is_allocation_failure(current):
            return current
        pending += [getattr(current, "cause", None), getattr(current, "controller_failure", None),
                    getattr(current, "_base_exc", None), current.__cause__, current.__context__,
                    *(getattr(current, "worker_failures", None) or {}).values()]
    return None


def raise_if_failed_before(task: WorkerTask) -> None:
    """Give up at once when an earlier run of the trial ran out of memory or raised (ranks fail in turn after one
    runs out, so running out comes first)."""
    oom = task.storage.read_text(task.storage.trial_file(task.trial_id, OUT_OF_MEMORY_MARKER))
    if oom is not None:
        raise RanOutOfMemory(last_exception(oom))
    failed = task.storage.trial_file(task.trial_id, FAILED_MARKER)
    if task.storage.read_text(failed) is not None:
        raise ApplicationFailure(f"trial {task.trial_id} raised before, not retried; see {task.storage.where(failed)}")


def _write_marker(task: WorkerTask, name: str, error: BaseException) -> None:
    marker = task.storage.trial_file(task.trial_id, name)
    if task.storage.read_text(marker) is None:  # the first error is the one to keep: later ones follow from it
        task.storage.write_text(marker, "".join(traceback.format_exception(error)))


def mark_failed(task: WorkerTask, error: BaseException) -> None:
    """Record that the training code raised, so a restart (meant for killed workers) gives up at once.

    Ray restarts a trial (Tune) or a worker group (Train) after any failure; only a killed
    process is worth restarting, a config that raised would raise again after a full rebuild.
    """
    _write_marker(task, FAILED_MARKER, error)


def mark_out_of_memory(task: WorkerTask, error: BaseException) -> None:
    """Record the allocation that failed (``error`` is or wraps it), so a restart gives up at once, as for
    :func:`mark_failed`."""
    _write_marker(task, OUT_OF_MEMORY_MARKER, out_of_memory(error) or error)


def out_of_memory_reason(storage: StudyStorage, trial_id: str) -> str:
    """The allocation a trial could not make, as one line (its record's last exception)."""
    text = storage.read_text(storage.trial_file(trial_id, OUT_OF_MEMORY_MARKER))
    return last_exception(text) if text is not None else "no error was recorded"


def newest_checkpoint(task: WorkerTask, given: str | None) -> str | None:
    """The newer of Tune's checkpoint (``given``, a path on the storage) and the one the trial last recorded
    persisting."""
    storage = task.storage
    recorded = storage.read_text(storage.trial_file(task.trial_id, LAST_CHECKPOINT))
    epochs = {path: json.loads(text)["epoch"] for path in (given, recorded) if path
              for text in [storage.read_text(f"{path}/{EPOCH_METRICS}")] if text is not None}
    return max(epochs, key=epochs.get, default=None)


def checkpoint_metrics(directory: Path) -> dict:
    return json.loads((directory / EPOCH_METRICS).read_text())


def final_result(task: WorkerTask) -> dict | None:
    """The result the trial reported last, once trained (recorded before its run closed FINISHED); else None."""
    text = task.storage.read_text(task.storage.trial_file(task.trial_id, FINAL_RESULT))
    return json.loads(text) if text is not None else None


def epoch_metrics(result, trainable_params: int) -> dict[str, float]:
    """What Tune, Optuna and the live table see after an epoch (``cider``: the objective)."""
    return {"epoch": result.epoch, "cider": result.val["cider"], "trainable_params": trainable_params,
            "loss": result.train_loss, "epoch_seconds": result.seconds,
            **{f"val_{name}": value for name, value in result.val.items()}}


def train(task: WorkerTask, report: Callable[[dict, Path | None], str | None], checkpoint_dir: Path | None) -> None:
    """Train one trial on this worker; ``report(metrics, checkpoint_dir)`` after every epoch.

    ``report`` returns where Ray persisted the checkpoint (None for none).
    """
    from qstudy.train.engine import rank

    if task.replay_table:
        from qstudy.study.replay import make_run

        run = make_run(task.replay_table)
    else:
        from qstudy.train.recipe import run

    raise_if_failed_before(task)
    quiet_weight_loading()
    config = task.run_config
    output = Path(config.output_dir)
    tracker = TrialTracker(task.tracking, task.trial_id, task.run_name) if rank() == 0 else None

    if tracker is not None:
        import ray

        # Which machine to read logs on when a trial misbehaves; a restart on another node overwrites it.
        tracker.set_tags({NODE_TAG: ray.get_runtime_context().get_node_id()})
        output.mkdir(parents=True, exist_ok=True)
        if checkpoint_dir is not None:  # killed after persisting this epoch, maybe before logging it
            tracker.log_epoch(checkpoint_metrics(checkpoint_dir))

    def on_epoch(result, checkpoint: Path) -> None:
        metrics = epoch_metrics(result, task.predicted_trainable)
        if tracker is not None:
            (checkpoint / EPOCH_METRICS).write_text(json.dumps(metrics))
        # An empty directory (plain torch, rank > 0) is no checkpoint.
        persisted = report(metrics, checkpoint if any(checkpoint.iterdir()) else None)
        if tracker is not None:
            if persisted is not None:
                task.storage.write_text(task.storage.trial_file(task.trial_id, LAST_CHECKPOINT), persisted)
            tracker.log_epoch(metrics)

    try:
        result = run(config, on_epoch=on_epoch, resume_from=checkpoint_dir, progress=False)
    except Exception as error:
        # Any rank may be the one that ran out of memory. A JVM killed with the trial is a kill,
        # which Tune restarts from the checkpoint; only what the run itself raised stays failed.
        if out_of_memory(error) is not None:
            mark_out_of_memory(task, error)
        elif rank() == 0 and not isinstance(error, ScorerProcessDied):
            mark_failed(task, error)
        raise
    last = epoch_metrics(result.epochs[-1], task.predicted_trainable) if result.epochs else None
    if last is None and checkpoint_dir is not None:
        # Restarted from the last epoch's checkpoint (killed before the trial closed): Tune still
        # needs a final result, and the checkpoint kept it.
        last = checkpoint_metrics(checkpoint_dir)
        report(last, None)
    if tracker is None:
        return
    # Restarted from the last epoch's checkpoint, the run trained no epoch: its final scores are that epoch's.
    final = result.final or {key.removeprefix(schema.VAL_PREFIX): value for key, value in (last or {}).items()
                              if key.startswith(schema.VAL_PREFIX)}
    tracker.log_metrics({schema.TRAINABLE_PARAMS: result.trainable_params, schema.TOTAL_PARAMS: result.total_params,
                         schema.SKIPPED_VIDEOS: len(result.skipped_videos), schema.WALL_SECONDS: result.wall_seconds,
                         **final}, step=last[schema.EPOCH] if last else 0)
    tracker.log_artifact(output / schema.WEIGHTS_ARTIFACT)
    tracker.log_artifact(output / schema.METRICS_ARTIFACT)
    task.storage.write_text(task.storage.trial_file(task.trial_id, FINAL_RESULT), json.dumps(last or {}))
    tracker.finish(FINISHED)


def train_loop_per_worker(config: dict) -> None:
    """``TorchTrainer``'s entry point (``config = {"task": WorkerTask}``); Ray Train set up the process group."""
    import ray.train

    task: WorkerTask = config["task"]
    checkpoint = ray.train.get_checkpoint()

    def report(metrics: dict, directory: Path | None) -> None:
        # Ray Train V2 persists the checkpoint and restarts its workers from it itself.
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory) if directory else None)

    os.environ.setdefault("LOCAL_RANK", str(ray.train.get_context().get_local_rank()))
    if checkpoint is None:
        train(task, report, None)
        return
    with checkpoint.as_directory() as directory:
        train(task, report, Path(directory))
