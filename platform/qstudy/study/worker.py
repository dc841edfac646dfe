"""The per-worker training function: ``recipe.run`` reporting each epoch's metrics and checkpoint to Ray.

The same function runs on Ray Train workers (``TorchTrainer``, several processes, DeepSpeed
over gloo/NCCL) and, for single-worker trials, directly in the Tune trial's own actor; the
only difference is which ``report``/``get_checkpoint`` pair it is given. Every rank reports
its checkpoint directory (DeepSpeed writes a shard per rank; Ray merges them); only rank 0
logs to MLflow, and only after Ray has persisted the epoch's checkpoint: an epoch's metrics
are in MLflow only if a restart can resume after that epoch, so no epoch is trained (and
logged) twice. Rank 0 also keeps the trial's own record beside its outputs: the newest
checkpoint Ray persisted and, once trained, the final result, which a resumed study needs
when Tune's experiment state (saved every few seconds) is older than the trial's progress.

A rank that runs out of memory says so in a marker file before it raises, like rank 0 for
an error of the code: Ray Train restarts a failed worker group, and the restarted workers
give up at once with the same verdict instead of training into the same wall.
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
from qstudy.tracking import schema
from qstudy.tracking.schema import FINISHED, NODE_TAG
from qstudy.tracking.writer import TrialTarget, TrialTracker

FAILED_MARKER = "failed.txt"
OUT_OF_MEMORY_MARKER = "out_of_memory.txt"
EPOCH_METRICS = "epoch_metrics.json"  # beside the engine's files in every checkpoint
LAST_CHECKPOINT = "last_checkpoint.txt"  # in the trial's output dir: the newest persisted checkpoint
FINAL_RESULT = "final_result.json"  # in the trial's output dir: the last result, once the trial is trained


@dataclass(frozen=True)
class WorkerTask:
    """Everything a worker needs, picklable: the trial's full run config and where to log it."""

    trial_id: str
    run_name: str
    run_config: RunConfig  # as the sampler built and validated it, with the trial's output_dir
    predicted_trainable: int
    tracking: TrialTarget
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


def failed_marker(task: WorkerTask) -> Path:
    return Path(task.tracking.outbox_root) / task.trial_id / FAILED_MARKER


def out_of_memory_marker(outbox_root: str | Path, trial_id: str) -> Path:
    return Path(outbox_root) / trial_id / OUT_OF_MEMORY_MARKER


def raise_if_failed_before(task: WorkerTask) -> None:
    """Give up at once when an earlier run of the trial ran out of memory or raised (ranks fail in turn after one
    runs out, so running out comes first)."""
    oom = out_of_memory_marker(task.tracking.outbox_root, task.trial_id)
    if oom.exists():
        raise RanOutOfMemory(last_exception(oom.read_text()))
    if failed_marker(task).exists():
        raise ApplicationFailure(f"trial {task.trial_id} raised before, not retried; see {failed_marker(task)}")


def _write_marker(marker: Path, error: BaseException) -> None:
    marker.parent.mkdir(parents=True, exist_ok=True)
    if not marker.exists():  # the first error is the one to keep: later ones follow from it
        marker.write_text("".join(traceback.format_exception(error)))


def mark_failed(task: WorkerTask, error: BaseException) -> None:
    """Record that the training code raised, so a restart (meant for killed workers) gives up at once.

    Ray restarts a trial (Tune) or a worker group (Train) after any failure; only a killed
    process is worth restarting, a config that raised would raise again after a full rebuild.
    """
    _write_marker(failed_marker(task), error)


def mark_out_of_memory(task: WorkerTask, error: BaseException) -> None:
    """Record the allocation that failed (``error`` is or wraps it), so a restart gives up at once, as for
    :func:`mark_failed`."""
    _write_marker(out_of_memory_marker(task.tracking.outbox_root, task.trial_id), out_of_memory(error) or error)


def out_of_memory_reason(outbox_root: str | Path, trial_id: str) -> str:
    """The allocation a trial could not make, as one line (its marker's last exception)."""
    marker = out_of_memory_marker(outbox_root, trial_id)
    return last_exception(marker.read_text()) if marker.exists() else "no error was recorded"


def newest_checkpoint(output_dir: Path, given: str | None) -> str | None:
    """The newer of Tune's checkpoint (``given``) and the one this trial last recorded persisting."""
    record = output_dir / LAST_CHECKPOINT
    candidates = [path for path in (given, record.read_text() if record.exists() else None)
                  if path and (Path(path) / EPOCH_METRICS).exists()]
    return max(candidates, key=lambda path: checkpoint_metrics(Path(path))["epoch"], default=None)


def checkpoint_metrics(directory: Path) -> dict:
    return json.loads((directory / EPOCH_METRICS).read_text())


def final_result(output_dir: Path) -> dict:
    """The result a trained trial reported last (written before its run closed FINISHED)."""
    return json.loads((output_dir / FINAL_RESULT).read_text())


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
                (output / LAST_CHECKPOINT).write_text(persisted)
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
    final = result.final or {}
    tracker.log_metrics({schema.TRAINABLE_PARAMS: result.trainable_params, schema.TOTAL_PARAMS: result.total_params,
                         schema.SKIPPED_VIDEOS: len(result.skipped_videos), schema.WALL_SECONDS: result.wall_seconds,
                         **final}, step=last[schema.EPOCH] if last else 0)
    tracker.log_artifact(output / schema.WEIGHTS_ARTIFACT)
    tracker.log_artifact(output / schema.METRICS_ARTIFACT)
    (output / FINAL_RESULT).write_text(json.dumps(last or {}))
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
