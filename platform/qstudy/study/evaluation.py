"""``qstudy evaluate``: chosen trials' adapters scored on a held-out split on Ray, logged beside their val metrics.

A separate, explicit step after the study: trials are chosen (``--select``, as ``qstudy
export`` chooses them) from their validation results alone, and what this step measures is
logged as ``test_*`` metrics on each trial's own MLflow run, where nothing that ranks or
selects trials reads it (:mod:`qstudy.records`). Before anything is evaluated, every chosen
trial's run config and adapter weights are read from MLflow and its held-out split is checked
(``data.test_split``, from ``data.test_annotations`` when set); a missing split is a one-line
error. Each trial is then one Ray task, on the cluster at ``--address`` or a local instance
bound to loopback: it rebuilds the trial's model with :func:`qstudy.train.reload.load_trained`,
reads the split through the node's frame cache as trials read theirs, and scores BLEU@4,
METEOR, ROUGE-L and CIDEr. The driver logs each result as it arrives. This module imports no
torch; :func:`score_trial` imports it in its Ray worker.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from qstudy.analysis.report import StudySelection
from qstudy.analysis.selection import Selection, select_trials
from qstudy.config import RunConfig
from qstudy.core.errors import EXIT_TRIALS_FAILED, ConfigError, QstudyError, one_line, REASON_LIMIT
from qstudy.data.annotations import SPLIT_FIELDS
from qstudy.data.check import check_data
from qstudy.records import TrialRecord
from qstudy.tracking import schema, writer
from qstudy.tracking.reader import client_for, download_artifact


class EvaluationFailed(QstudyError):
    """Some chosen trials could not be scored; the others' scores were logged."""

    exit_code = EXIT_TRIALS_FAILED


@dataclass(frozen=True)
class EvaluationTask:
    """One trial's evaluation, picklable: its run config set to the held-out split and beams, and its weights."""

    trial_id: str
    run_config: RunConfig  # data.test_split: the split scored; eval.num_beams: the beams decoded with
    weights: bytes  # the trial's adapter.safetensors


@dataclass(frozen=True)
class HeldOutResult:
    """What one trial scored on the held-out split."""

    record: TrialRecord
    split: str
    beams: int
    scores: dict[str, float]  # by metric name: bleu4, meteor, rouge_l, cider
    clips: int
    skipped: int

    def metrics(self) -> dict[str, float]:
        """As logged on the trial's run."""
        return {**{schema.TEST_PREFIX + name: value for name, value in self.scores.items()},
                schema.TEST_CLIPS: self.clips, schema.TEST_SKIPPED_VIDEOS: self.skipped}


def held_out_config(config: RunConfig, split: str | None, beams: int | None) -> RunConfig:
    """The trial's run config reading ``split`` as its held-out split (default: its own data.test_split), decoding
    with ``beams`` (default: its eval.num_beams). Its val and train splits cannot be the held-out split."""
    data = dataclasses.replace(config.data, test_split=split) if split is not None else config.data
    for field in ("train_split", "val_split"):
        if getattr(data, field) == data.test_split:
            raise ConfigError(f"data.test_split {data.test_split!r}: that is the trial's data.{field}; held-out "
                              "scores need a split the trials neither trained nor were selected on")
    evaluation = dataclasses.replace(config.eval, num_beams=beams) if beams is not None else config.eval
    return dataclasses.replace(config, data=data, eval=evaluation)


def _task(client, record: TrialRecord, split: str | None, beams: int | None) -> EvaluationTask:
    """A chosen trial's run config and weights from MLflow, its held-out split checked: every problem before Ray."""
    where = f"trial {record.trial_id} (run {record.run_id})"
    with tempfile.TemporaryDirectory() as scratch:
        try:
            config_path = download_artifact(client, record.run_id, schema.CONFIG_ARTIFACT, Path(scratch))
            weights_path = download_artifact(client, record.run_id, schema.WEIGHTS_ARTIFACT, Path(scratch))
        except Exception as error:  # noqa: BLE001 - MLflow raises several types for a missing artifact
            raise QstudyError(f"{where}: cannot download its {schema.CONFIG_ARTIFACT} and {schema.WEIGHTS_ARTIFACT} "
                              f"artifacts: {one_line(str(error), REASON_LIMIT)}") from None
        try:
            config = held_out_config(RunConfig.from_dict(yaml.safe_load(config_path.read_text())), split, beams)
            # All three splits: a held-out video that is also a train or val video is a leak, refused here.
            check_data(config.data, SPLIT_FIELDS)
        except ConfigError as error:
            raise error.prefixed(f"{where}: ") from None
        return EvaluationTask(record.trial_id, config, weights_path.read_bytes())


def score_trial(task: EvaluationTask) -> tuple[dict[str, float], int, int]:
    """A Ray task: ``(scores, clips scored, videos skipped)`` of the trial's trained model on its held-out split."""
    from qstudy.metrics import CaptionScorer
    from qstudy.model.quiet import quiet_weight_loading
    from qstudy.train.device import autocast
    from qstudy.train.recipe import evaluate, load_split
    from qstudy.train.reload import load_trained

    quiet_weight_loading()
    config = task.run_config
    with tempfile.TemporaryDirectory() as scratch:
        weights = Path(scratch) / schema.WEIGHTS_ARTIFACT
        weights.write_bytes(task.weights)
        captioner = load_trained(config, weights)
    split = load_split(config.data, config.data.test_split, config.data.image_size or captioner.image_size,
                       progress=False)
    # METEOR whatever the trial's eval.meteor (which spares concurrent trials its JVM): the papers print it.
    with CaptionScorer(meteor=True) as scorer, autocast(captioner.device, config.train.precision):
        scores, _ = evaluate(captioner, split, scorer, config.eval)
    return scores, len(split.clips), len(split.skipped)


def _task_resources() -> dict:
    """One CPU per trial, and a GPU where the cluster has any."""
    import ray

    return {"num_cpus": 1, "num_gpus": 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0}


def evaluate_selection(selection: StudySelection, choice: Selection, split: str | None, beams: int | None,
                       address: str | None, verbose: int = 1, on_result=None) -> list[HeldOutResult]:
    """Score the chosen trials on their held-out split on Ray and log each to its run; ``on_result(result)`` as each
    arrives. Raises :class:`EvaluationFailed` after logging the others when some trial could not be scored."""
    from qstudy.study.tuner import connect_ray

    chosen = [record for record, _ in select_trials(selection, choice)]
    client = client_for(selection.tracking_uri)
    tasks = {record.run_id: _task(client, record, split, beams) for record in chosen}

    connect_ray(address, verbose)
    import ray

    remote = ray.remote(score_trial).options(**_task_resources(), max_retries=1)
    pending = {remote.remote(tasks[record.run_id]): record for record in chosen}
    results, failures = [], []
    while pending:
        (done,), _ = ray.wait(list(pending))
        record = pending.pop(done)
        config = tasks[record.run_id].run_config
        try:
            scores, clips, skipped = ray.get(done)
        except ray.exceptions.RayError as error:
            cause = getattr(error, "cause", None) or error
            failures.append(f"trial {record.trial_id}: {type(cause).__name__}: {one_line(str(cause), REASON_LIMIT)}")
            continue
        result = HeldOutResult(record, config.data.test_split, config.eval.num_beams, scores, clips, skipped)
        writer.log_held_out(selection.tracking_uri, record.run_id, result.metrics(),
                            {schema.TEST_SPLIT_TAG: result.split, schema.TEST_BEAMS_TAG: result.beams})
        results.append(result)
        if on_result is not None:
            on_result(result)
    if failures:
        raise EvaluationFailed(f"{len(failures)} of {len(chosen)} trials could not be scored; the first, "
                               f"{failures[0]}")
    return results
