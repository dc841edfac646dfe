"""A search space rehearsed at real shapes: one short trial per arm through the study path, and the full study's cost.

Before GPUs are booked: every arm of the space trains for a few optimiser steps on random
weights built from the real models' ``config.json`` (only that file is read: from a local
directory, the Hugging Face cache, the hub, or ``--model-configs DIR``; no weights are
fetched), on the space's own data, through the path a study takes: the frame cache, Ray
Tune and Ray Train workers, DeepSpeed, MLflow. Each arm runs its *heaviest* config: the most
trainable parameters its budget allows, and the largest value of every other numeric key
it searches.

Each trial trains ``REHEARSAL_EPOCHS`` short epochs of ``steps`` optimiser steps; the first
pays for warm-up (allocator, DeepSpeed's set-up, first calls) and the second is timed, train
steps and validation apart. Per arm: step time, peak memory (the GPU's allocated peak on a
GPU, rank 0's peak resident memory on CPU), trainable parameters, the bytes of the last
checkpoint the engine wrote, and the device-hours of one full trial:

    trial_hours = workers x epochs x (steps_per_epoch x step_s + val_clips x eval_s_per_clip) / 3600

with ``steps_per_epoch`` counted as the recipe counts it over the full train split (or
``--train-clips`` clips like them) on the space's own workers, and the study's estimate is
``trials`` x the mean over arms (the sampler's share of each arm is not known in advance), an
upper bound where early stopping or the budget ends trials sooner. Frozen-prefix reuse is off
(``rehearsal_snapshot`` says why): an arm that leaves the encoder's first layers frozen runs
them in every step, so its step time is an upper bound too.

On a cluster without GPUs a space that asks for them is rehearsed on CPU:
``use_gpu`` off and its workers shrunk to the CPUs there are. Its study runs under a
temporary ``QSTUDY_HOME`` removed at the end (only the frame cache it filled is the real
home's), and is tracked in an experiment of its own (the space's study family +
``-rehearsal``), so the family's own experiment, `qstudy report` and `--resume` never see it.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qstudy.config import RunConfig
from qstudy.core.dims import ModelNotFound, hub_unreachable, read_config
from qstudy.core.errors import ConfigError
from qstudy.core.validate import from_mapping, load_yaml
from qstudy.methods import adapter_config_from_mapping
from qstudy.records import TrialRecord
from qstudy.study.space import Arm, Param, SearchSpace, SpaceFile, load_base, parse_space, set_dotted
from qstudy.study.storage import EPOCH_METRICS
from qstudy.tracking import schema, writer

REHEARSAL_EPOCHS = 2  # the first warms up, the second is measured
DEFAULT_STEPS = 3  # optimiser steps per rehearsal epoch
CPU_VAL_CLIPS = 2  # val clips a CPU rehearsal decodes per epoch: enough to time one, cheap at 224 px
# Keys the rehearsal sets itself: an arm that searches one of them is rehearsed at the rehearsal's value.
REHEARSAL_KEYS = ("train.epochs", "train.max_steps_per_epoch", "data.max_val_clips", "data.reuse_frozen_prefix")


@dataclass(frozen=True)
class RehearsalOptions:
    """What ``qstudy rehearse`` was asked."""

    space_path: Path
    home: Path  # the real QSTUDY_HOME: its frame cache and default MLflow store
    steps: int = DEFAULT_STEPS
    model_configs: Path | None = None  # DIR/<model name>/config.json, read before the hub
    train_clips: int | None = None  # the full study's train clips, for the estimate (default: the space's split)
    val_clips: int | None = None  # its val split's clips (default: the space's split), max_val_clips applied
    address: str | None = None
    tracking_uri: str | None = None
    verbose: int = 1


@dataclass
class ArmResult:
    """One rehearsed arm: its config and what it measured."""

    method: str
    values: dict[str, Any]
    status: str
    trainable_params: int
    step_seconds: float | None = None
    eval_seconds_per_clip: float | None = None
    peak_memory_mb: float | None = None
    checkpoint_bytes: int | None = None
    steps_per_epoch: int | None = None  # of the full study, on its workers
    trial_device_hours: float | None = None
    error: str | None = None


@dataclass
class Rehearsal:
    """The rehearsal of a space: its arms' measurements, how they were made, and the full study's estimate."""

    space: str
    date: str
    device: str  # "GPU" or "CPU"
    memory: str  # what peak_memory_mb is on that device
    settings: dict[str, Any]  # the space settings the rehearsal changed, old -> new ("use_gpu": "True -> False")
    tokenizer: str
    steps: int
    study_trials: int
    study_epochs: int
    study_workers: int
    study_concurrency: int
    train_clips: int
    val_clips: int
    arms: list[ArmResult] = field(default_factory=list)
    device_hours: float | None = None
    wall_hours: float | None = None
    wall_seconds: float = 0.0
    tracking_uri: str = ""
    experiment: str = ""
    parent_run_id: str = ""
    exit_code: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def tower_config(name: str, model_configs: Path | None, field_name: str) -> dict:
    """A tower's ``config.json`` alone: from ``model_configs/<name>/``, else a local directory, the cache or the hub."""
    if model_configs is not None and (model_configs / name / "config.json").is_file():
        return json.loads((model_configs / name / "config.json").read_text())
    try:
        return read_config(name)
    except ModelNotFound as error:
        raise ConfigError(f"{field_name}: {error}; offline, give --model-configs DIR with DIR/{name}/config.json") \
            from None


def random_tower(config: dict, field_name: str, causal_lm: bool):
    """The model ``config`` describes (its ``architectures`` class), with freshly initialised weights."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if config.get("model_type") not in CONFIG_MAPPING:
        raise ConfigError(f"{field_name}: transformers knows no model_type {config.get('model_type')!r}")
    model_config = CONFIG_MAPPING[config["model_type"]].from_dict(config)
    architecture = getattr(transformers, (config.get("architectures") or [""])[0], None)
    if architecture is not None:
        return architecture(model_config)
    auto = transformers.AutoModelForCausalLM if causal_lm else transformers.AutoModel
    return auto.from_config(model_config)


def rehearsal_tokenizer(config: RunConfig) -> tuple[Any, str]:
    """The LM's own tokenizer where it can be had without weights, else a word-level one over the train captions.

    The stand-in only changes how many tokens a caption takes (words, not BPE pieces), which
    ``model.max_caption_tokens`` caps either way; the returned text says which was used.
    """
    from transformers import AutoTokenizer

    from qstudy.data.annotations import data_clips
    from qstudy.model.tiny import build_tokenizer

    name = config.model.tokenizer or config.model.language_model
    if Path(name).is_dir() or hub_unreachable() is None:
        try:
            return AutoTokenizer.from_pretrained(name), f"{name}'s own"
        except (OSError, ValueError):
            pass
    words = sorted({word for clip in data_clips(config.data, config.data.train_split) for caption in clip.captions
                    for word in caption.split()})
    return build_tokenizer(words), (f"word-level over the train captions ({len(words)} words; {name}'s own "
                                    "could not be read offline)")


def build_random_base(config: RunConfig, model_configs: Path | None, directory: Path) -> tuple[dict, str]:
    """Random-weight towers from the real configs, saved where the trials load them; the ``model`` section naming
    them, and which tokenizer it uses."""
    import torch

    torch.manual_seed(0)
    towers = {}
    for key, causal_lm in (("vision_encoder", False), ("language_model", True)):
        field_name = f"base.model.{key}"
        model = random_tower(tower_config(getattr(config.model, key), model_configs, field_name), field_name,
                             causal_lm)
        model.save_pretrained(directory / key)
        towers[key] = str(directory / key)
        del model
    tokenizer, note = rehearsal_tokenizer(config)
    tokenizer.save_pretrained(directory / "language_model")
    # A pretrained projector belongs to the base it was trained with; the rehearsal's towers are random.
    model = {**config.to_dict()["model"], **towers, "tokenizer": towers["language_model"], "projector": None}
    return model, note


def base_config(raw: dict, space_path: Path) -> RunConfig:
    """The run config every trial of the space starts from (its overrides applied), for a frozen stand-in arm."""
    settings = from_mapping(SpaceFile, raw)
    space_dir = space_path.resolve().parent
    base = load_base(settings.base, space_dir)
    for key, value in settings.overrides.items():
        set_dotted(base, key, value)
    base["adapter"] = {"method": "frozen"}
    return RunConfig.from_dict(base, base_dir=space_dir)


def largest(param: Param) -> Any:
    """A searched key's heaviest value: the largest of numeric choices or a range's top, else the first choice."""
    if not param.choices:
        return param.high
    numbers = [value for value in param.choices if isinstance(value, (int, float)) and not isinstance(value, bool)]
    return max(numbers) if len(numbers) == len(param.choices) else param.choices[0]


def heaviest(space: SearchSpace, arm: Arm) -> tuple[dict[str, Any], int] | None:
    """The arm's config with the most trainable parameters within the budget, every other key at :func:`largest`;
    None where every config is over the budget. Counts are the closed forms the sampler uses."""
    others = {param.key: largest(param) for param in arm.params
              if not param.key.startswith("adapter.") and param.key not in REHEARSAL_KEYS}
    searched = [param for param in arm.params if param.key.startswith("adapter.")]
    grids = [param.every_value() if not param.choices and param.is_integer else param.extremes() for param in searched]
    best = None
    for combination in itertools.product(*grids):
        section = {"adapter": {"method": arm.method}}
        for param, value in zip(searched, combination):
            set_dotted(section, param.key, value)
        try:  # the adapter's own section is all a count depends on: no whole run config per combination
            adapter = adapter_config_from_mapping(section["adapter"])
            adapter.validate(space.dims)
        except ConfigError:
            continue  # values that are valid one by one, not together
        count = adapter.count_trainable(space.dims)
        if (space.parameter_budget is None or count <= space.parameter_budget) and (best is None or count > best[1]):
            best = {**others, **{param.key: value for param, value in zip(searched, combination)}}, count
    return best


def cpu_settings(settings: SpaceFile, cpus: float) -> dict[str, Any]:
    """The space settings a rehearsal on a cluster without GPUs changes: no GPU, the workers the CPUs hold."""
    workers = max(1, min(settings.workers_per_trial, int(cpus)))
    # A TorchTrainer's driver asks 0.01 CPU beside its workers (study/trial.py).
    per_worker = cpus if workers == 1 else math.floor(100 * (cpus - 0.01) / workers) / 100
    return {"use_gpu": False, "workers_per_trial": workers,
            "cpus_per_worker": min(settings.cpus_per_worker, per_worker)}


def _checkpoint_bytes(study_dir: Path, trial_id: str) -> int | None:
    """The bytes of the newest checkpoint a trial persisted (in Tune's or Ray Train's storage, whichever ran it)."""
    checkpoints = [path.parent for path in study_dir.rglob(EPOCH_METRICS) if trial_id in str(path)]
    if not checkpoints:
        return None
    newest = max(checkpoints, key=lambda path: json.loads((path / EPOCH_METRICS).read_text())["epoch"])
    return sum(path.stat().st_size for path in newest.rglob("*") if path.is_file())


def full_epoch(config: RunConfig, workers: int, train_clips: int | None = None,
               val_clips: int | None = None) -> tuple[int, int, int]:
    """(train clips, optimiser steps per epoch, val clips) of the full study's trial of ``config`` on ``workers``;
    ``train_clips`` / ``val_clips`` replace the sizes of the splits its data section names."""
    from qstudy.data.annotations import data_clips
    from qstudy.train.recipe import SplitData, steps_per_epoch

    clips = data_clips(config.data, config.data.train_split)
    if train_clips is not None:  # clips like the split's own, as many as the full study's split has
        clips = list(itertools.islice(itertools.cycle(clips), train_clips))
    val = val_clips or len(data_clips(config.data, config.data.val_split))
    if config.data.max_val_clips is not None:
        val = min(val, config.data.max_val_clips)
    return len(clips), steps_per_epoch(SplitData(clips, None, []), config.data, config.train, workers), val


def rehearsal_snapshot(raw: dict, base: RunConfig, model: dict, steps: int, val_clips: int,
                       changed: dict[str, Any]) -> dict:
    """The space file a rehearsal runs (before its arms are pinned): the space's, with the random towers as its
    model, short epochs, its own study family, one trial at a time and no restarts."""
    data = base.to_dict()
    data.pop("adapter")
    data["model"] = {key: value for key, value in model.items() if value is not None}
    return {**copy.deepcopy(raw), "study": raw["study"] + schema.REHEARSAL_EXPERIMENT_SUFFIX, "base": data,
            "overrides": {"train.epochs": REHEARSAL_EPOCHS, "train.max_steps_per_epoch": steps,
                          "data.max_val_clips": val_clips,
                          # The prefix states of the whole train split, under random weights no study will
                          # load, would cost a pass over it and their size on disk (~16 GB for MSR-VTT).
                          "data.reuse_frozen_prefix": False},
            "sampler": "random", "scheduler": "none", "concurrency": 1, "max_failures": 0, **changed}


def _arm_pins(values: dict[str, Any]) -> dict[str, Any]:
    """An arm's rehearsed values as one-choice keys (a bare mapping would read as a search spec)."""
    return {key: {"choices": [value]} for key, value in values.items()}


def _timed_epoch(study_dir: Path, trial_id: str, on_gpu: bool) -> dict[str, Any] | None:
    """A rehearsal trial's timed (last) epoch from its metrics.json; None where the trial wrote none."""
    path = study_dir / "trials" / trial_id / "metrics.json"
    if not path.is_file():
        return None
    timed = json.loads(path.read_text())["epochs"][-1]
    return {"step_seconds": timed["train_seconds"] / timed["train_steps"],
            "eval_seconds": timed["seconds"] - timed["train_seconds"],
            "peak_memory_mb": timed["peak_memory_mb"] if on_gpu else timed["peak_rss_mb"]}


def _full_config(base: RunConfig, method: str, values: dict[str, Any]) -> RunConfig:
    """An arm's config as the full study would train it: the space's base with the arm's rehearsed values."""
    data = base.to_dict()
    data["adapter"] = {"method": method}
    for key, value in values.items():
        set_dotted(data, key, value)
    return RunConfig.from_dict(data)


def _estimate(rehearsal: Rehearsal, arm: ArmResult, config: RunConfig, timed: dict, rehearsed_val_clips: int,
              options: RehearsalOptions) -> None:
    """Fill in the arm's full-trial steps per epoch and device-hours (the module docstring's formula)."""
    clips, steps, val = full_epoch(config, rehearsal.study_workers, options.train_clips, options.val_clips)
    rehearsal.train_clips, rehearsal.val_clips = clips, val
    arm.steps_per_epoch = steps
    arm.eval_seconds_per_clip = timed["eval_seconds"] / rehearsed_val_clips
    trial_seconds = config.train.epochs * (steps * arm.step_seconds + val * arm.eval_seconds_per_clip)
    arm.trial_device_hours = rehearsal.study_workers * trial_seconds / 3600


def rehearse(options: RehearsalOptions) -> Rehearsal:
    """Rehearse every arm of the space at ``options.space_path``; the measurements and the full study's estimate."""
    from qstudy.data.annotations import data_clips
    from qstudy.study.tuner import StudyOptions, connect_ray, run_study, study_dir

    started = time.perf_counter()
    path = options.space_path
    raw = load_yaml(path)
    try:
        settings = from_mapping(SpaceFile, raw)
        base = base_config(raw, path)
    except ConfigError as error:
        raise error.prefixed(f"{path}: ") from None
    uri = writer.resolve_tracking_uri(options.tracking_uri, options.home)
    writer.check_reachable(uri)
    # A temporary home for the rehearsal's study, beside the real one (the towers are as large as the models).
    scratch = Path(tempfile.mkdtemp(prefix="rehearsal-", dir=options.home))
    try:
        model, tokenizer_note = build_random_base(base, options.model_configs, scratch / "models")  # before Ray
        connect_ray(options.address, options.verbose)
        import ray

        resources = ray.cluster_resources()
        without_gpus = settings.use_gpu and resources.get("GPU", 0) < 1
        fitted = cpu_settings(settings, resources.get("CPU", 1.0)) if without_gpus else {}
        changed = {key: value for key, value in fitted.items() if getattr(settings, key) != value}
        on_gpu = settings.use_gpu and not fitted
        val_clips = min(base.data.max_val_clips or base.eval.batch_size, base.eval.batch_size) if on_gpu \
            else CPU_VAL_CLIPS
        snapshot = rehearsal_snapshot(raw, base, model, options.steps, val_clips, changed)
        space = parse_space(snapshot, str(path), base_dir=path.resolve().parent)
        pins = {arm.method: heaviest(space, arm) for arm in space.arms}
        rehearsed = {method: pinned for method, pinned in pins.items() if pinned is not None}
        snapshot.update(arms={method: _arm_pins(values) for method, (values, _) in rehearsed.items()},
                        trials=len(rehearsed))
        snapshot_path = scratch / "space.yaml"
        snapshot_path.write_text(yaml.safe_dump(snapshot, sort_keys=False))

        rehearsal = Rehearsal(
            space=str(path), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), device="GPU" if on_gpu else "CPU",
            memory=("peak GPU memory allocated (torch.cuda.max_memory_allocated), rank 0" if on_gpu
                    else "peak resident memory (VmHWM) of rank 0's process"),
            settings={key: f"{getattr(settings, key)} -> {value}" for key, value in changed.items()},
            tokenizer=tokenizer_note, steps=options.steps, study_trials=settings.trials, study_epochs=base.train.epochs,
            study_workers=settings.workers_per_trial, study_concurrency=settings.concurrency, train_clips=0,
            val_clips=0, tracking_uri=uri, experiment=snapshot["study"])
        rehearsal.arms = [ArmResult(method, {}, schema.INFEASIBLE, 0,
                                    error="every config is over parameter_budget: not rehearsed")
                          for method, pinned in pins.items() if pinned is None]
        if not rehearsed:
            return rehearsal
        # Created here with the real home's artifact root: the study's own home is removed at the end.
        writer.ensure_experiment(uri, snapshot["study"], options.home / "mlflow" / "artifacts")
        name = time.strftime("rehearsal-%Y%m%d-%H%M%S")
        home = scratch / "home"
        summary = run_study(StudyOptions(space_path=snapshot_path, home=home, name=name, address=options.address,
                                         tracking_uri=uri, verbose=options.verbose))
        rehearsal.parent_run_id, rehearsal.exit_code = summary.parent_run_id, summary.exit_code
        directory = study_dir(home, name)
        rehearsed_val = min(val_clips, len(data_clips(base.data, base.data.val_split)))
        for record in summary.records:
            values, count = rehearsed[record.method]
            arm = ArmResult(record.method, values, record.status, record.trainable_params or count, error=record.error)
            timed = _timed_epoch(directory, record.trial_id, on_gpu)
            if timed is not None:
                arm.step_seconds, arm.peak_memory_mb = timed["step_seconds"], timed["peak_memory_mb"]
                arm.checkpoint_bytes = _checkpoint_bytes(directory, record.trial_id)
                _estimate(rehearsal, arm, _full_config(base, record.method, values), timed, rehearsed_val, options)
            rehearsal.arms.append(arm)
        measured = [arm.trial_device_hours for arm in rehearsal.arms if arm.trial_device_hours is not None]
        if measured:
            mean = sum(measured) / len(measured)
            rehearsal.device_hours = settings.trials * mean
            rehearsal.wall_hours = math.ceil(settings.trials / settings.concurrency) * mean / settings.workers_per_trial
        rehearsal.wall_seconds = time.perf_counter() - started
        _log(rehearsal)
        return rehearsal
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _log(rehearsal: Rehearsal) -> None:
    """The measurements and the estimate on the rehearsal's parent run, the whole table as its artifact."""
    metrics = {schema.rehearsal_metric(arm.method, name): getattr(arm, name) for arm in rehearsal.arms
               for name in schema.REHEARSAL_ARM_METRICS if getattr(arm, name) is not None}
    if rehearsal.device_hours is not None:
        metrics[schema.REHEARSAL_DEVICE_HOURS] = rehearsal.device_hours
    writer.log_rehearsal(rehearsal.tracking_uri, rehearsal.parent_run_id, metrics,
                         {schema.REHEARSAL_TAG: str(Path(rehearsal.space).resolve())}, rehearsal.to_dict())


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_rehearsal(rehearsal: Rehearsal) -> str:
    """The per-arm table, how it was measured, and the full study's estimate, as the CLI prints them."""
    changed = ", ".join(f"{key} {value}" for key, value in rehearsal.settings.items())
    lines = [f"rehearsal of {rehearsal.space} on {rehearsal.device}, {rehearsal.date}: {REHEARSAL_EPOCHS} epochs of "
             f"{rehearsal.steps} optimiser steps per arm, the second timed; random weights from the models' configs",
             *( [f"  on CPU: {changed}"] if changed else []),
             f"  tokenizer: {rehearsal.tokenizer}",
             f"  memory: {rehearsal.memory}",
             "",
             "| arm | config | status | trainable | step s | eval s/clip | peak memory MiB | checkpoint MB "
             "| steps/epoch | device-h/trial |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for arm in rehearsal.arms:
        config = TrialRecord("", "", arm.method, arm.values, None, None, None, arm.status).config
        checkpoint = None if arm.checkpoint_bytes is None else arm.checkpoint_bytes / 1e6
        lines.append(f"| {arm.method} | {config} | {arm.status} | {arm.trainable_params:,} | "
                     f"{_number(arm.step_seconds, '.3f')} | {_number(arm.eval_seconds_per_clip, '.3f')} | "
                     f"{_number(arm.peak_memory_mb, ',.0f')} | {_number(checkpoint, ',.1f')} | "
                     f"{_number(arm.steps_per_epoch, ',')} | {_number(arm.trial_device_hours, '.2f')} |")
    lines.append("")
    if rehearsal.device_hours is not None:
        lines += [f"full study: {rehearsal.study_trials} trials x {rehearsal.study_epochs} epochs on "
                  f"{rehearsal.study_workers} worker(s) each, {rehearsal.train_clips:,} train clips and "
                  f"{rehearsal.val_clips:,} val clips: ~{rehearsal.device_hours:,.1f} {rehearsal.device}-hours, "
                  f"~{rehearsal.wall_hours:,.1f} h of wall clock at concurrency {rehearsal.study_concurrency}",
                  "  device-h/trial = workers x epochs x (steps/epoch x step s + val clips x eval s/clip) / 3600; "
                  "the study: trials x the arms' mean (an upper bound where early stopping or the budget ends "
                  "trials sooner)"]
    failed = [arm for arm in rehearsal.arms if arm.error]
    lines += [f"{arm.method}: {arm.error.splitlines()[-1] if arm.error.strip() else arm.error}" for arm in failed]
    if rehearsal.parent_run_id:
        lines.append(f"rehearsal took {rehearsal.wall_seconds:.0f} s; MLflow: {rehearsal.tracking_uri}  experiment "
                     f"{rehearsal.experiment!r}, run {rehearsal.parent_run_id} ({schema.REHEARSAL_ARTIFACT})")
    return "\n".join(lines)
