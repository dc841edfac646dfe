"""Exported adapters: chosen trials written from MLflow as config + weights + metrics, loaded back to caption videos.

``qstudy export`` picks trials (the front, its knee, the best CIDEr, or the best under a
parameter budget) and writes one directory per trial:

- ``config.yaml``: the trial's complete run config (base model paths, data, method and
  hyperparameters, training settings); it loads with ``RunConfig.from_yaml``, so it seeds
  ``qstudy train`` or a search space's ``base:``;
- ``adapter.safetensors``: the trained parameters only (adapter + projector), no pickle;
- ``metrics.json``: the trial's final metrics and per-epoch val CIDEr from MLflow;

plus ``index.yaml`` saying what was exported, from where, and why. :func:`load_adapter`
rebuilds the trial's model from such a directory with :func:`qstudy.train.reload.load_trained`,
so it captions exactly as the trial did.
Torch is imported only when loading a model back.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from qstudy.analysis.report import StudySelection
from qstudy.analysis.selection import Selection, select_trials
from qstudy.core.dims import numel, safetensors_shapes
from qstudy.core.errors import QstudyError
from qstudy.config import RunConfig
from qstudy.records import TrialRecord
from qstudy.tracking.reader import client_for, download_artifact, final_metrics
from qstudy.tracking.schema import CONFIG_ARTIFACT, METRICS_ARTIFACT, WEIGHTS_ARTIFACT
from qstudy.train.reload import load_trained

if TYPE_CHECKING:
    from qstudy.model.captioner import Captioner

# An exported trial's files are named as the trial's own artifacts.
CONFIG_FILE = CONFIG_ARTIFACT
WEIGHTS_FILE = WEIGHTS_ARTIFACT
METRICS_FILE = METRICS_ARTIFACT
INDEX_FILE = "index.yaml"


class ExportError(QstudyError):
    """A trial's artifacts are missing or do not match its record, or ``--out`` cannot take the export."""


def _directory_name(position: int, record: TrialRecord) -> str:
    """One path component: the method and trial id come from MLflow tags, which anyone may have written."""
    return f"{position:02d}-" + re.sub(r"[^A-Za-z0-9_.-]", "_", f"{record.method}-{record.trial_id}")


def _check_out_dir(out_dir: Path) -> None:
    """An export replaces nothing: ``--out`` must be a new or empty directory, so its index lists all it holds."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"--out {out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise ExportError(f"--out {out_dir}: not empty; export into a new directory")


def _weights_parameter_count(path: Path) -> int:
    """Parameters in a safetensors file, read from its header (no tensors loaded, no torch)."""
    return sum(numel(shape) for shape in safetensors_shapes(path).values())


def _export_trial(client, record: TrialRecord, reason: str, directory: Path) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        try:
            config_path = download_artifact(client, record.run_id, CONFIG_FILE, scratch)
            weights_path = download_artifact(client, record.run_id, WEIGHTS_FILE, scratch)
        except Exception as error:  # noqa: BLE001 - MLflow raises several types for a missing artifact
            raise ExportError(f"trial {record.trial_id} (run {record.run_id}): cannot download its "
                              f"{CONFIG_FILE} and {WEIGHTS_FILE} artifacts: {error}") from error
        weights_count = _weights_parameter_count(weights_path)
        if weights_count != record.trainable_params:
            raise ExportError(f"trial {record.trial_id}: {WEIGHTS_FILE} holds {weights_count:,} parameters, "
                              f"the trial trained {record.trainable_params:,}")
        config = yaml.safe_load(config_path.read_text())
        config["output_dir"] = f"runs/{directory.name}"  # not the study's trial directory
        RunConfig.from_dict(config)  # what we write must load: fail here, not at `qstudy train`
        directory.mkdir(parents=True, exist_ok=True)
        header = (f"# Exported from study {record.study}, trial {record.trial_id} (MLflow run {record.run_id}): "
                  f"{record.label}\n# {reason}.\n# Retrain with `qstudy train {CONFIG_FILE}`; caption with "
                  f"`qstudy caption --adapter {directory.name} VIDEO.mp4`.\n")
        (directory / CONFIG_FILE).write_text(header + yaml.safe_dump(config, sort_keys=False))
        weights_path.replace(directory / WEIGHTS_FILE)
    metrics = {
        "study": record.study,
        "trial_id": record.trial_id,
        "run_id": record.run_id,
        "method": record.method,
        "hyperparameters": record.params,
        "cider": record.cider,
        "trainable_params": record.trainable_params,
        "total_params": record.total_params,
        "epoch_val_cider": list(record.epoch_cider),
        "final_metrics": final_metrics(client, record.run_id),
    }
    (directory / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")


def export_trials(selection: StudySelection, choice: Selection, out_dir: Path) -> Path:
    """Write the chosen trials under ``out_dir`` and an index of them; return the index's path."""
    out_dir = out_dir.resolve()  # `--out .` has no name to stage beside
    _check_out_dir(out_dir)
    chosen = select_trials(selection, choice)
    client = client_for(selection.tracking_uri)
    # Written beside --out and renamed into place at the end: a failed export leaves no directory
    # without its index, and the index never lists what is not there.
    staging = out_dir.with_name(f".{out_dir.name}.export-{os.getpid()}")
    try:
        shutil.rmtree(staging, ignore_errors=True)  # left by a killed export of the same pid
        staging.mkdir(parents=True)
    except OSError as error:
        raise ExportError(f"--out {out_dir}: cannot create it ({error.strerror})") from None
    try:
        index_path = _write_export(client, selection, choice, chosen, staging)
        try:
            os.rename(staging, out_dir)  # replaces an empty --out; refuses one another export filled meanwhile
        except OSError as error:
            raise ExportError(f"--out {out_dir}: {error.strerror}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir / index_path.name


def _write_export(client, selection: StudySelection, choice: Selection, chosen: list[tuple[TrialRecord, str]],
                  out_dir: Path) -> Path:
    exported = []
    for position, (record, reason) in enumerate(chosen, start=1):
        directory = out_dir / _directory_name(position, record)
        _export_trial(client, record, reason, directory)
        exported.append({
            "directory": directory.name, "study": record.study, "trial_id": record.trial_id,
            "run_id": record.run_id, "method": record.method, "label": record.label, "cider": record.cider,
            "trainable_params": record.trainable_params, "total_params": record.total_params, "why": reason,
        })
    index = {
        "selection": str(choice),
        "studies": [study.name for study in selection.studies],
        "tracking_uri": selection.tracking_uri,
        "parent_runs": {study.name: study.parent_run_id for study in selection.studies},
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "trials": exported,
    }
    index_path = out_dir / INDEX_FILE
    comment = ("# What `qstudy export` wrote and why: one directory per trial with config.yaml "
               "(loads with `qstudy train`), adapter.safetensors and metrics.json.\n")
    index_path.write_text(comment + yaml.safe_dump(index, sort_keys=False))
    return index_path


def load_adapter(directory: str | Path) -> tuple["Captioner", RunConfig]:
    """The exported trial's model, in eval mode, exactly as it was after training."""
    directory = Path(directory)
    config = RunConfig.from_yaml(directory / CONFIG_FILE)
    return load_trained(config, directory / WEIGHTS_FILE), config


def caption_videos(captioner: "Captioner", config: RunConfig, videos: list[Path]) -> Iterator[tuple[Path, str | None]]:
    """``(video, caption)`` as each caption is made, frames sampled as in training; ``None``: it does not decode."""
    import torch

    from qstudy.data.frames import sample_or_skip
    from qstudy.train.device import autocast

    size = config.data.image_size or captioner.image_size
    for video in videos:
        frames, error = sample_or_skip(video, config.data.num_frames, size, config.data.resize)
        if error is not None:
            yield video, None
            continue
        frames = torch.from_numpy(frames)[None]
        if config.data.blind:  # trained on blank frames: caption as it was evaluated
            frames = torch.zeros_like(frames)
        with autocast(captioner.device, config.train.precision):
            (caption,) = captioner.generate(frames, config.eval.max_new_tokens, config.eval.num_beams)
        yield video, caption
