"""Search-space files: schema, validation against the model's shapes, and sampling through Optuna.

A search space names a study family, a base run config, fixed overrides, and one *arm* per
adapter method with the hyperparameters to search (dotted keys into the run config). It is
validated completely before Ray starts anything: every choice and range bound is applied to
the base config and checked by the adapter against the model's shapes, so a bad rank or
layer fails here with the field named. Trainable parameters are counted in closed form for
every sampled config; over an optional budget the config is marked infeasible for Optuna
(``trial.set_constraint``) and never trained. This module imports no torch.
"""

from __future__ import annotations

import copy
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from qstudy.core.errors import ConfigError, NothingToTrain, Problems
from qstudy.config import ModelConfig, RunConfig
from qstudy.core.paths import check_path_component, expand_path
from qstudy.core.validate import from_mapping, load_yaml
from qstudy.core.dims import ModelDims

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"
# Optuna objectives, in this order: CIDEr is maximised, trainable parameters minimised.
OBJECTIVES = ("cider", "trainable_params")
OBJECTIVE_MODES = ("max", "min")
BUDGET_CONSTRAINT = "parameter_budget"


def encode(value: Any) -> Any:
    """Optuna categoricals hold scalars only; lists (e.g. insertion layers) travel as JSON text."""
    return json.dumps(value) if isinstance(value, (list, dict)) else value


@dataclass(frozen=True)
class Param:
    """One searched hyperparameter: a categorical (``choices``) or a numeric range (``low``/``high``)."""

    key: str  # dotted run-config key, e.g. "adapter.rank"
    choices: tuple[Any, ...] = ()
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None

    @classmethod
    def from_spec(cls, key: str, spec: Any, where: str) -> "Param":
        if not isinstance(spec, dict):  # a bare value pins the key for this arm
            return cls(key, choices=(spec,))
        unknown = sorted(set(spec) - {"choices", "low", "high", "log", "step"})
        if unknown:
            raise ConfigError(f"unknown key {where}.{unknown[0]} (allowed: choices, low, high, log, step)")
        if "choices" in spec:
            if set(spec) != {"choices"}:
                raise ConfigError(f"{where}: 'choices' cannot be combined with low/high/log/step")
            if not isinstance(spec["choices"], list) or not spec["choices"]:
                raise ConfigError(f"{where}.choices: expected a non-empty list, got {spec['choices']!r}")
            return cls(key, choices=tuple(spec["choices"]))
        if "low" not in spec or "high" not in spec:
            raise ConfigError(f"{where}: expected 'choices' or both 'low' and 'high'")
        low, high = spec["low"], spec["high"]
        for bound, value in (("low", low), ("high", high)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{where}.{bound}: expected a number, got {value!r}")
        if not low < high:
            raise ConfigError(f"{where}: low {low} must be below high {high}")
        log = spec.get("log", False)
        if not isinstance(log, bool):
            raise ConfigError(f"{where}.log: expected true or false, got {log!r}")
        if log and low <= 0:
            raise ConfigError(f"{where}.low: a log range needs low > 0, got {low}")
        return cls(key, low=low, high=high, log=log, step=spec.get("step"))

    @property
    def is_integer(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int)

    def extremes(self) -> list[Any]:
        """The values validation must try: every choice, or both ends of a range."""
        return list(self.choices) if self.choices else [self.low, self.high]

    def every_value(self) -> list[Any]:
        """Every value the sampler can pick: the choices, or each step of an integer range (no data key is a float)."""
        return list(self.choices) if self.choices else list(range(self.low, self.high + 1, self.step or 1))

    def suggest(self, trial, name: str) -> Any:
        """Sample from an Optuna trial; returns the run-config value (lists decoded)."""
        if self.choices:
            if len(self.choices) == 1:
                return copy.deepcopy(self.choices[0])
            encoded = [encode(choice) for choice in self.choices]
            return copy.deepcopy(self.choices[encoded.index(trial.suggest_categorical(name, encoded))])
        if self.is_integer:
            return trial.suggest_int(name, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(name, float(self.low), float(self.high), step=self.step, log=self.log)


@dataclass(frozen=True)
class Arm:
    """One adapter method and the hyperparameters searched for it."""

    method: str
    params: tuple[Param, ...]


def set_dotted(mapping: dict, key: str, value: Any) -> None:
    """``set_dotted(cfg, "train.learning_rate", 1e-3)``; intermediate sections must exist."""
    *sections, leaf = key.split(".")
    node = mapping
    for section in sections:
        node = node.setdefault(section, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {section} is not a section")
    node[leaf] = value


@dataclass(frozen=True)
class SpaceFile:
    """The top-level keys of a search-space YAML (``base`` and ``arms`` are parsed further)."""

    study: str  # study family: the MLflow experiment and the default study name
    base: Any  # a run config mapping, a preset name (tiny_qadapter) or a YAML path
    arms: dict[str, Any]  # adapter method -> {dotted run-config key: choices, range or pinned value}
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted keys applied to the base for every arm
    sampler: Literal["tpe", "nsga2", "random", "budget"] = "tpe"
    seed: int = 0
    trials: int = 8
    concurrency: int = 2
    workers_per_trial: int = 1
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    parameter_budget: int | str | None = None  # a count (250000, "250k") or a share of all parameters ("2%")
    max_failures: int = 1  # restarts of a trial whose worker died (from its last checkpoint)
    # Where Tune's state, checkpoints and trial records go (study/storage.py): a directory every node
    # reaches or an object store's URI (s3://bucket/prefix); None: the study directory.
    storage: str | None = None
    # Early stopping: "moasha" compares trials at rungs of grace_epochs * reduction_factor**k
    # epochs and stops those outside the top 1/reduction_factor (study/scheduler.py).
    scheduler: Literal["none", "moasha"] = "none"
    grace_epochs: int = 1
    reduction_factor: int = 3

    def problems(self) -> list[str]:
        """What is wrong with the settings; parse_space reports it with the arms' problems."""
        problems = Problems()
        with problems.check():
            check_path_component(self.study, "study")  # it names the study's directory under $QSTUDY_HOME/studies
        for name in ("trials", "concurrency", "workers_per_trial", "grace_epochs"):
            if getattr(self, name) < 1:
                problems.add(f"{name}: {getattr(self, name)} must be >= 1")
        if self.reduction_factor < 2:
            problems.add(f"reduction_factor: {self.reduction_factor} must be >= 2 (it keeps 1/reduction_factor)")
        if self.cpus_per_worker <= 0:
            problems.add(f"cpus_per_worker: {self.cpus_per_worker} must be > 0")
        if not self.arms:
            problems.add("arms: at least one arm (an adapter method) is needed")
        return problems.items


@dataclass
class SearchSpace:
    """A validated search space: the file's settings, the resolved base config, the arms, the model's shapes."""

    path: str
    settings: SpaceFile
    base: dict  # the run config every trial starts from (overrides applied, paths absolute)
    arms: list[Arm]
    dims: ModelDims
    parameter_budget: int | None = None

    @property
    def study(self) -> str:
        return self.settings.study

    def run_config(self, method: str, values: dict[str, Any]) -> RunConfig:
        """The base config with the arm's method and the sampled ``{dotted key: value}`` applied."""
        data = copy.deepcopy(self.base)
        data["adapter"] = {"method": method}
        for key, value in values.items():
            set_dotted(data, key, value)
        return RunConfig.from_dict(data)

    def arm(self, method: str) -> Arm:
        return next(arm for arm in self.arms if arm.method == method)

    def data_variants(self) -> list[tuple[str, RunConfig]]:
        """``(arm, run config)`` for each distinct ``data`` section trials can get: what the frame cache must hold.

        Only ``data.*`` keys vary here; the rest of each config is the arm's defaults.
        """
        variants = {}
        for arm in self.arms:
            params = [param for param in arm.params if param.key.startswith("data.")]
            for combination in itertools.product(*(param.every_value() for param in params)):
                config = self.run_config(arm.method, {p.key: v for p, v in zip(params, combination)})
                variants.setdefault(json.dumps(config.to_dict()["data"], sort_keys=True), (arm.method, config))
        return list(variants.values())


def read_dims(base: dict, path: str) -> ModelDims:
    """The base model's shapes, from its config.json and safetensors headers (local or hub cache)."""
    model, data = base["model"], base["data"]
    try:
        return ModelDims.from_pretrained(
            model["vision_encoder"], model["language_model"], data["num_frames"],
            frame_grid=model.get("frame_grid", ModelConfig.frame_grid),
            temporal_merger_rank=model.get("temporal_merger_rank", ModelConfig.temporal_merger_rank))
    except (FileNotFoundError, OSError) as error:
        raise ConfigError(f"{path}: base.model: cannot read the model's shapes ({error}); "
                          "for the tiny preset run `qstudy demo` or prepare $QSTUDY_HOME first") from None


def load_base(base: Any, space_dir: Path) -> dict:
    """``base`` is an embedded run config, a preset name (``tiny_qadapter``) or a YAML path."""
    if isinstance(base, dict):
        return copy.deepcopy(base)
    if not isinstance(base, str):
        raise ConfigError(f"base: expected a run config mapping, a preset name or a path, got {base!r}")
    preset = PRESETS_DIR / f"{base}.yaml"
    path = preset if preset.exists() else space_dir / expand_path(base)
    return load_yaml(path)


def _resolve_budget(budget: int | str | None, total_params: int) -> int | None:
    if budget is None or isinstance(budget, int):
        if isinstance(budget, int) and budget < 1:
            raise ConfigError(f"parameter_budget: {budget} must be >= 1")
        return budget
    from qstudy.analysis.pareto import parse_budget

    try:
        return parse_budget(budget, total_params)
    except ValueError as error:
        raise ConfigError(f"parameter_budget: {error}") from None


def _arm_problems(space: SearchSpace, arm: Arm) -> list[str]:
    """Every bad choice or range end of the arm, each named by its key and value.

    Each value is checked beside values of the other keys that passed, so one bad key does not
    hide another; a problem that names no searched key (a method default that does not fit
    the model) is the arm's own, named once.
    """
    where = f"arms.{arm.method}"
    arm_problems, by_param = Problems(), {param.key: {} for param in arm.params}

    def check(values: dict[str, Any], param: Param, value: Any) -> bool:
        try:
            space.run_config(arm.method, values).adapter.validate(space.dims)
            return True
        except ConfigError as error:
            own = [problem for problem in error.problems if param.key in problem]
            if own:
                by_param[param.key].setdefault(encode(value), (value, own[0]))
            arm_problems.add(*(f"{where}: {problem}" for problem in error.problems if param.key not in problem))
            return not own

    anchor: dict[str, Any] = {}
    for param in arm.params:
        passing = [value for value in param.extremes() if check({**anchor, param.key: value}, param, value)]
        if passing:
            anchor[param.key] = passing[0]
    for param in arm.params:  # values that passed before later keys were fixed may clash with them
        for value in param.extremes():
            check({**anchor, param.key: value}, param, value)

    problems = Problems()
    for param in arm.params:
        failures = list(by_param[param.key].values())
        if len(failures) == len(param.extremes()) and len({problem for _, problem in failures}) == 1:
            problems.add(f"{where}.{param.key}: {failures[0][1]}")  # whatever the value
        else:
            problems.add(*(f"{where}.{param.key}: value {value!r}: {problem}" for value, problem in failures))
    problems.add(*arm_problems.items)
    return problems.items


def smallest_trainable(space: SearchSpace, arm: Arm) -> int:
    """The fewest trainable parameters any config of ``arm`` has, in closed form.

    Only ``adapter.*`` keys change a count: every combination of their values is tried (a
    float range by its ends).
    """
    params = [param for param in arm.params if param.key.startswith("adapter.")]
    values = [param.every_value() if not param.choices and param.is_integer else param.extremes() for param in params]
    return min(space.run_config(arm.method, {p.key: v for p, v in zip(params, combination)})
               .adapter.count_trainable(space.dims) for combination in itertools.product(*values))


def check_feasible(space: SearchSpace) -> None:
    """Raise :class:`NothingToTrain` when every config of the space is over its parameter budget."""
    budget = space.parameter_budget
    if budget is None:
        return
    smallest = min(smallest_trainable(space, arm) for arm in space.arms)
    if smallest > budget:
        total = space.dims.total_params
        setting = space.settings.parameter_budget
        shown = setting.strip() if isinstance(setting, str) and setting.strip().endswith("%") else f"{budget:,}"
        raise NothingToTrain(f"every sampled config is over parameter_budget {shown} "
                             f"(smallest in this space: {100 * smallest / total:.1f}%, {smallest:,} of {total:,} "
                             "parameters); raise the budget or add smaller choices")


def _parse_arms(arms: dict, problems: Problems) -> list[Arm]:
    """The arms that parse; the problems of the others go to ``problems``."""
    from qstudy.methods import ADAPTERS

    parsed = []
    for method, params in arms.items():
        if method not in ADAPTERS:
            problems.add(f"arms.{method}: unknown method (one of: {', '.join(sorted(ADAPTERS))})")
            continue
        if not isinstance(params, dict | None):
            problems.add(f"arms.{method}: expected a mapping of dotted keys to choices or ranges")
            continue
        specs = []
        for key, value in (params or {}).items():
            with problems.check():
                specs.append(Param.from_spec(key, value, f"arms.{method}.{key}"))
        if len(specs) == len(params or {}):
            parsed.append(Arm(method, tuple(specs)))
    return parsed


def parse_space(data: dict, path: str = "<space>", base_dir: Path | None = None,
                dims: ModelDims | None = None,
                more_checks: Callable[[SearchSpace], list[str]] | None = None) -> SearchSpace:
    """Validate a search-space mapping completely; every error names the field, and all are reported at once.

    ``dims`` defaults to the shapes of the base config's models; pass them to validate
    without the model files (a hub model offline, or a test). ``more_checks`` (the study
    driver's data check) gets the space even when its arms have problems, and what it finds
    is reported with theirs.
    """
    base_dir = base_dir or Path.cwd()
    settings = from_mapping(SpaceFile, data)
    base = load_base(settings.base, base_dir)
    base.pop("adapter", None)  # each arm supplies its method
    problems = Problems()
    problems.add(*settings.problems())
    for key, value in settings.overrides.items():
        with problems.check("overrides: "):
            set_dotted(base, key, value)
    try:
        resolved = RunConfig.from_dict({**base, "adapter": {"method": "frozen"}}, base_dir=base_dir).to_dict()
    except ConfigError as error:
        problems.add(*error.prefixed("base: ").problems)
        _parse_arms(settings.arms, problems)  # an arm's own problems are found without a base
        problems.raise_any()
    resolved.pop("adapter")
    epochs = resolved["train"]["epochs"]
    if settings.scheduler == "moasha" and settings.grace_epochs * settings.reduction_factor > epochs:
        problems.add(f"grace_epochs: {settings.grace_epochs} x reduction_factor {settings.reduction_factor} "
                     f"exceeds train.epochs {epochs}: no rung to compare trials at (study/scheduler.py)")
    arms = _parse_arms(settings.arms, problems)
    if dims is None:
        with problems.check():
            dims = read_dims(resolved, path)
        if dims is None:  # nothing more can be checked without the model's shapes
            problems.raise_any()
    space = SearchSpace(path=path, settings=settings, base=resolved, arms=arms, dims=dims)
    for arm in arms:
        problems.add(*_arm_problems(space, arm))
    with problems.check():
        space.parameter_budget = _resolve_budget(settings.parameter_budget, space.dims.total_params)
    if more_checks is not None:
        problems.add(*more_checks(space))
    problems.raise_any()
    return space


def load_space(path: str | Path, dims: ModelDims | None = None) -> SearchSpace:
    """Read and validate a search-space YAML; errors start with the file name."""
    path = Path(path)
    try:
        return parse_space(load_yaml(path), str(path), base_dir=path.resolve().parent, dims=dims)
    except ConfigError as error:
        raise error.prefixed(f"{path}: ") from None


SAMPLED = "sampled"  # the key of the trial's SampledConfig in the config dict Tune hands the trial


@dataclass(frozen=True)
class SampledConfig:
    """What the sampler chose for one trial and the run config built from it, validated once.

    Tune carries it to the trial, and the trial to its workers, as the dataclass itself (Ray
    pickles it): nothing downstream rebuilds or re-validates the config.
    """

    method: str
    values: dict[str, Any]  # dotted run-config key -> value
    run_config: RunConfig
    trainable_params: int
    over_budget: bool

    @classmethod
    def from_tune_config(cls, config: dict) -> "SampledConfig":
        return config[SAMPLED]


@dataclass
class SpaceSampler:
    """Optuna define-by-run space: picks an arm and its values, counts parameters, flags the budget.

    A picklable object rather than a closure: Tune pickles the searcher into its experiment
    state, and ``qstudy study --resume`` restores it from there.
    """

    space: SearchSpace

    def __call__(self, trial) -> dict[str, Any]:
        """Tune's config for the trial: ``method`` (the live table's column) and the :class:`SampledConfig`."""
        methods = [arm.method for arm in self.space.arms]
        method = trial.suggest_categorical("method", methods) if len(methods) > 1 else methods[0]
        # Names carry the arm: two arms may search the same key over different choices. A key the
        # other values may leave unused (Q-Adapter's rank beside a rank-free placement) is sampled
        # after them and only where used: Optuna sees a conditional parameter, not noise.
        from qstudy.methods import ADAPTERS, adapter_config_from_mapping

        conditional = {f"adapter.{name}" for name in ADAPTERS[method].conditional_fields}
        params = self.space.arm(method).params
        values = {p.key: p.suggest(trial, f"{method}.{p.key}") for p in params if p.key not in conditional}
        adapter = adapter_config_from_mapping({"method": method, **{
            key.removeprefix("adapter."): value for key, value in values.items() if key.startswith("adapter.")}})
        values |= {p.key: p.suggest(trial, f"{method}.{p.key}") for p in params
                   if p.key in conditional and adapter.uses(p.key.removeprefix("adapter."))}
        config = self.space.run_config(method, values)
        trainable = config.adapter.count_trainable(self.space.dims)
        trial.set_user_attr("method", method)
        trial.set_user_attr("trainable_params", trainable)
        budget = self.space.parameter_budget
        if budget is not None:
            trial.set_constraint(BUDGET_CONSTRAINT, trainable - budget)  # > 0: infeasible
        sampled = SampledConfig(method, values, config, trainable, over_budget=budget is not None and trainable > budget)
        return {"method": method, SAMPLED: sampled}
