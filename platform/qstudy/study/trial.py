"""The per-trial driver, a Ray Tune function: sampled config in, trained on Ray Train workers, reported to Tune.

One trial: take the sampler's validated run config, open the trial's MLflow child
run, skip configs over the parameter budget (reported infeasible, never trained), then
train. With several workers (or ``force_trainer``) the driver starts a ``TorchTrainer``, Ray
Train V2's pattern for Train inside Tune; a single worker trains in this actor instead,
which saves the controller, worker group and placement group a ``TorchTrainer`` costs per
trial (bench/study_overhead.py shows both). A trial that runs out of memory (host or GPU, on
any rank) is closed OUT_OF_MEMORY and reported like an infeasible one, never as a failure:
the searcher tells Optuna its region is infeasible, and the trial ends without Tune retrying
a config that would run out again. Any other exception marks the trial FAILED in MLflow and is
re-raised so Tune and Optuna record it too. A trial Tune starts again (its actor died,
or a resumed study's saved state is older than the trial), on whichever node, continues
from the newest checkpoint it persisted, and one that had already trained reports its
result again without training: both are read from the trial's record in the study's
storage (study/storage.py). Imports no torch.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from qstudy.study.space import SampledConfig, SearchSpace
from qstudy.study.storage import StudyStorage
from qstudy.study.worker import (RanOutOfMemory, WorkerTask, final_result, mark_failed, mark_out_of_memory,
                                 newest_checkpoint, out_of_memory, out_of_memory_reason, raise_if_failed_before,
                                 train, train_loop_per_worker)
from qstudy.tracking import schema
from qstudy.tracking.schema import FAILED, INFEASIBLE, OUT_OF_MEMORY
from qstudy.tracking.writer import TrialTarget, TrialTracker

# Keys of a trial's single report when it trained nothing to the end (with the two objectives, so
# Optuna records it complete; the searcher and the live table read these keys).
INFEASIBLE_KEY = "infeasible"  # over the parameter budget: never trained
OUT_OF_MEMORY_KEY = "out_of_memory"  # ran out of memory while training


@dataclass(frozen=True)
class StudyContext:
    """What every trial of a study shares; handed to Tune once with ``tune.with_parameters``."""

    study_dir: str  # on every node: the trials' outputs and outboxes, each on its node's disk
    space: SearchSpace
    tracking: TrialTarget
    storage: StudyStorage
    force_trainer: bool = False  # a TorchTrainer even for one worker (the bench's stock path)
    replay_table: str | None = None  # recorded curves replayed instead of training (study/replay.py)

    @property
    def in_actor(self) -> bool:
        return self.space.settings.workers_per_trial == 1 and not self.force_trainer

    def worker_resources(self) -> dict[str, float]:
        settings = self.space.settings
        return {"CPU": settings.cpus_per_worker, **({"GPU": 1} if settings.use_gpu else {})}

    def driver_resources(self) -> dict[str, float]:
        """The Tune trial's own request: the whole worker when it trains in-actor, a sliver otherwise."""
        return self.worker_resources() if self.in_actor else {"CPU": 0.01}  # Tune rejects 0


def run_name(method: str, trial_id: str) -> str:
    """A trial's MLflow run name."""
    return f"{method}-{trial_id}"


def worker_task(sampled: SampledConfig, context: StudyContext, trial_id: str) -> WorkerTask:
    """The sampler's run config, given the trial's output directory, and where the worker logs it."""
    run_config = dataclasses.replace(sampled.run_config, output_dir=str(Path(context.study_dir) / "trials" / trial_id))
    return WorkerTask(trial_id=trial_id, run_name=run_name(sampled.method, trial_id), run_config=run_config,
                      predicted_trainable=sampled.trainable_params, tracking=context.tracking,
                      storage=context.storage, replay_table=context.replay_table)


def untrained_report(sampled: SampledConfig, why: str) -> dict:
    """The one report of a trial that ended untrained, flagged ``why`` (INFEASIBLE_KEY or OUT_OF_MEMORY_KEY)."""
    return {"cider": 0.0, "trainable_params": sampled.trainable_params, why: True}


def run_trial(config: dict, context: StudyContext) -> None:
    """Tune's trainable: one trial from the sampler's ``config`` to a final report."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    sampled = SampledConfig.from_tune_config(config)
    task = worker_task(sampled, context, trial_id)
    run_config = task.run_config
    trained = final_result(task)
    if trained is not None:  # trained before a killed driver's last saved state knew it
        tune.report(trained)
        return
    try:
        raise_if_failed_before(task)  # Tune's restart is for killed actors: what raised stays failed as logged
    except RanOutOfMemory:  # a resumed study's older state: the same verdict again
        tune.report(untrained_report(sampled, OUT_OF_MEMORY_KEY))
        return
    given = tune.get_checkpoint()
    newest = newest_checkpoint(task, given.path if given is not None else None)
    checkpoint = context.storage.checkpoint(newest) if newest is not None else None
    tracker = TrialTracker(context.tracking, trial_id, task.run_name)
    tracker.start()

    if checkpoint is None:  # a restarted trial logged all this the first time
        tracker.set_tags({schema.METHOD_TAG: sampled.method})
        tracker.log_params(schema.trial_params(
            sampled.method, sampled.values, over_budget=sampled.over_budget,
            workers=context.space.settings.workers_per_trial, deepspeed=run_config.train.deepspeed,
            zero_stage=run_config.train.zero_stage))
        tracker.log_metrics({schema.TRAINABLE_PARAMS: sampled.trainable_params})  # known before training
        with tempfile.TemporaryDirectory() as scratch:
            config_file = Path(scratch) / schema.CONFIG_ARTIFACT
            config_file.write_text(yaml.safe_dump(run_config.to_dict(), sort_keys=False))
            tracker.log_artifact(config_file)
    else:
        tracker.set_tags({schema.RESTARTED_FROM_TAG: Path(checkpoint.path).name})

    if sampled.over_budget:
        tracker.finish(INFEASIBLE)
        # Optuna records it as complete with its budget constraint violated (set when sampled).
        tune.report(untrained_report(sampled, INFEASIBLE_KEY))
        return

    try:
        if context.in_actor:
            _train_in_actor(task, checkpoint)
        else:
            _train_with_torch_trainer(task, context)
    except Exception as error:
        if lost_to_ray(error):  # no failure of the code: a resume or Tune's restart continues the trial
            raise
        if out_of_memory(error) is not None:
            mark_out_of_memory(task, error)
            tracker.set_tags({schema.ERROR_TAG: out_of_memory_reason(context.storage, trial_id)})
            tracker.finish(OUT_OF_MEMORY)
            # The searcher tells Optuna it is infeasible (study/search.py); returning spares it Tune's retries.
            tune.report(untrained_report(sampled, OUT_OF_MEMORY_KEY))
            return
        mark_failed(task, error)
        tracker.set_tags({schema.ERROR_TAG: f"{type(error).__name__}: {error}"[:schema.ERROR_TAG_LIMIT]})
        tracker.finish(FAILED)
        raise


def lost_to_ray(error: BaseException) -> bool:
    """Ray lost a process, an actor or a node under the trial (a killed driver takes its trials' Train
    controllers with it): restarting is what helps, unlike an error the training code raised."""
    from ray.exceptions import NodeDiedError, RayActorError, WorkerCrashedError

    return isinstance(error, (RayActorError, WorkerCrashedError, NodeDiedError))


def _train_in_actor(task: WorkerTask, checkpoint) -> None:
    from ray import tune

    def report(metrics: dict, directory: Path | None) -> str | None:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory) if directory else None)
        return tune.get_checkpoint().path if directory else None  # Tune's copy in storage, once persisted

    if checkpoint is None:
        train(task, report, None)
        return
    with checkpoint.as_directory() as directory:
        train(task, report, Path(directory))


def _train_with_torch_trainer(task: WorkerTask, context: StudyContext) -> None:
    """Ray Train V2 inside Tune: a TorchTrainer whose reports reach Tune through TuneReportCallback."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    settings = context.space.settings
    trainer = TorchTrainer(
        train_loop_per_worker=train_loop_per_worker,
        train_loop_config={"task": task},
        scaling_config=ray.train.ScalingConfig(num_workers=settings.workers_per_trial, use_gpu=settings.use_gpu,
                                               resources_per_worker=context.worker_resources()),
        run_config=ray.train.RunConfig(
            # A fixed name per trial: a restarted driver finds and resumes the same Train run.
            name=f"train-{task.trial_id}",
            **context.storage.ray_storage("train"),
            callbacks=[TuneReportCallback()],
            failure_config=ray.train.FailureConfig(max_failures=settings.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    trainer.fit()
