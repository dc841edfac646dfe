"""The study driver: a validated space in, a Ray Tune ``Tuner`` with two-objective ``OptunaSearch``, a summary out.

Order matters: the space is validated (every problem at once, the data's annotations
included), its budget checked against the smallest config it allows, and the tracking
server checked before Ray starts anything; the MLflow experiment and parent run are created here, once, before any trial
(trials racing to create them collide). The node's frame cache is warmed here too, so trials
map decoded frames instead of each decoding the dataset. The Optuna study lives in an RDB
(sqlite) file in the study directory and Tune's experiment state in the study's storage
(study/storage.py: the study directory, a shared mount or an object store), so ``--resume
NAME`` continues the same study, the same parent run and the same trials, on this cluster or,
given the new ``--mlflow-uri`` and ``--storage``, on another. A Ctrl-C closes
every open run as INTERRUPTED and says how to resume. The summary is ``qstudy report``'s own
reading of the study from MLflow, so the two always agree; its :attr:`StudySummary.exit_code`
says whether the study trained as planned. Imports no torch.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from qstudy.analysis.pareto import front_table
from qstudy.analysis.report import read_studies
from qstudy.core.errors import (EXIT_INTERRUPTED, EXIT_NOTHING_TRAINED, EXIT_OK, EXIT_TRIALS_FAILED, ConfigError,
                                 REASON_LIMIT, Problems, one_line)
from qstudy.core.validate import load_yaml
from qstudy.records import TrialRecord, format_counts, trial_counts
from qstudy.study.preflight import check_nodes, cluster_capacity, shape_problem, study_checks
from qstudy.study.space import (OBJECTIVE_MODES, OBJECTIVES, SearchSpace, SpaceSampler, check_feasible,
                                parse_space)
from qstudy.study.storage import OUT_OF_MEMORY_MARKER, StudyStorage
from qstudy.study.trial import StudyContext, run_name, run_trial
from qstudy.tracking import schema, writer
from qstudy.tracking.writer import TrialTarget

log = logging.getLogger(__name__)

STATE_FILE = "study.json"
SPACE_SNAPSHOT = "space.yaml"
_RAY_SINGLE_MACHINE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
SCHEDULER_STATE = "scheduler.json"
OUTBOX_DIR = "outbox"  # in the study directory, on each node's disk: the MLflow outboxes of the trials it ran
# How long the driver keeps retrying a remote server for outboxes it could not deliver: a restarting
# tracking server is back within a minute or two; longer, and the outboxes wait for `--resume`.
OUTBOX_WAIT_S = 120


@dataclass(frozen=True)
class StudyOptions:
    """What ``qstudy study`` was asked; ``None`` keeps the search-space file's own setting."""

    space_path: Path
    home: Path
    name: str | None = None
    address: str | None = None
    tracking_uri: str | None = None
    storage: str | None = None  # the study's storage (study/storage.py); None: the space's, else the study directory
    trials: int | None = None
    concurrency: int | None = None
    workers_per_trial: int | None = None
    sampler: str | None = None
    force_trainer: bool = False
    verbose: int = 1
    replay_table: Path | None = None  # replay recorded curves instead of training (study/replay.py)


@dataclass
class StudyState:
    """The study directory's ``study.json``: enough to resume without the original command line."""

    name: str
    space_origin: str  # the space file the snapshot came from: its relative paths resolve beside it
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    optuna_storage: str
    force_trainer: bool
    replay_table: str | None = None
    storage: str | None = None  # the storage URI the study's directory is in (study/storage.py); None: the home's


@dataclass
class StudySummary:
    """What a finished study produced and where to look at it."""

    name: str
    study_dir: Path
    storage: StudyStorage
    tracking_uri: str
    experiment: str
    parent_run_id: str
    wall_seconds: float
    records: list[TrialRecord] = field(default_factory=list)
    front: list[TrialRecord] = field(default_factory=list)
    knee: TrialRecord | None = None  # the front's knee, as `qstudy report` picks it
    best: TrialRecord | None = None
    interrupted: bool = False  # Ctrl-C: `qstudy study --resume NAME` continues
    commands_need_uri: bool = False  # the tracking URI is not the home's default: commands must name it

    def count(self, status: str) -> int:
        return sum(record.status == status for record in self.records)

    @property
    def exit_code(self) -> int:
        """The command's exit status: 0 only when a trial finished and none failed (``cli`` lists the codes).

        A trial that ran out of memory is no failure: beside finished trials it leaves the exit 0
        (the summary counts it); a study where every trial that ran ran out trained nothing (4).
        """
        if self.interrupted:
            return EXIT_INTERRUPTED
        if self.count(schema.FAILED):
            return EXIT_TRIALS_FAILED
        if not self.count(schema.FINISHED):
            return EXIT_NOTHING_TRAINED
        return EXIT_OK


def study_dir(home: Path, name: str) -> Path:
    return home / "studies" / name


def _snapshot_space(options: StudyOptions) -> dict:
    """The space file with the command line's overrides applied: ``space.yaml`` in the study dir."""
    raw = load_yaml(options.space_path)
    for key, value in (("trials", options.trials), ("concurrency", options.concurrency),
                       ("workers_per_trial", options.workers_per_trial), ("sampler", options.sampler),
                       ("storage", options.storage)):
        if value is not None:
            raw[key] = value
    return raw


def _parse_snapshot(snapshot: dict, origin: Path, reads_data: bool = True) -> SearchSpace:
    """Validate the snapshot as if it sat beside the original file (its relative paths stay valid).

    ``reads_data``: the trials train on the space's data (not replayed curves), so its
    annotations are checked too.
    """
    try:
        return parse_space(snapshot, str(origin), base_dir=origin.resolve().parent,
                           more_checks=data_problems if reads_data else None)
    except ConfigError as error:
        raise error.prefixed(f"{origin}: ") from None


def data_problems(space: SearchSpace) -> list[str]:
    """The problems of the data every data variant of the space reads (data/check.py): its files, not its videos.

    Runs before Ray starts and before any MLflow run exists, so a bad split name or file fails
    the study in seconds instead of failing each trial in turn.
    """
    from qstudy.data.check import check_data

    problems = Problems()
    for _, config in space.data_variants():
        with problems.check():
            check_data(config.data)
    return problems.items


def _check_address(address: str) -> None:
    """Fail in seconds, naming it, when nothing listens at a Ray address: ``ray.init`` would retry forever."""
    host, _, port = address.rpartition("://")[2].rpartition(":")
    if not port.isdigit():
        return  # "auto" and other forms Ray resolves itself
    try:
        socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=5).close()
    except OSError as error:
        raise ConfigError(f"--address {address}: no Ray cluster answers there ({error}); start one "
                          "(`ray start --head`) or leave out --address for a local instance") from None


def connect_ray(address: str | None, verbose: int) -> None:
    """Join the cluster at ``address`` (or RAY_ADDRESS), else start a local instance bound to loopback only.

    Trials' own output (tokenizer JVMs, library warnings, Ray's per-checkpoint lines) reaches
    the terminal only when ``verbose`` > 1; Ray keeps it in its session logs either way.
    """
    address = address or os.environ.get("RAY_ADDRESS")
    if address is not None:
        _check_address(address)
    else:
        # Ray turns a loopback node address into the machine's own unless it runs single-machine
        # (its macOS/Windows mode), so this keeps every port it opens on 127.0.0.1. Its child
        # processes read the variable; this process reads the constant, set when Ray was imported.
        os.environ[_RAY_SINGLE_MACHINE] = "0"
    import ray
    from ray._private import ray_constants

    if ray.is_initialized():
        return
    if verbose <= 1:  # after `import ray`, which sets its logger to INFO
        # Ray's INFO lines: a local instance started, Tune's experiment state written.
        logging.getLogger("ray").setLevel(logging.WARNING)
        if address is None:
            # Ray turns token authentication on for a local instance and warns that it did at every
            # start (and saves a token to ~/.ray on a machine's first): the plan, not news.
            logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
    if address is None:
        ray_constants.ENABLE_RAY_CLUSTER = False
        # The dashboard would only cost memory and seconds (and listen on more ports).
        ray.init(include_dashboard=False, configure_logging=False, _node_ip_address="127.0.0.1",
                 log_to_driver=verbose > 1)
    else:  # `ray job submit` sets RAY_ADDRESS to the cluster the job runs on
        ray.init(address=address, configure_logging=False, log_to_driver=verbose > 1)


def _warm_frame_cache(space: SearchSpace) -> None:
    """Decode every split the trials will read into this node's frame cache, once, before any trial.

    Its annotations were read by :func:`data_problems` when the space was validated.
    """
    from qstudy.data.cache import prebuild

    for _, config in space.data_variants():
        # A bar redrawn with carriage returns is noise in a piped log (CI, `ray job logs`).
        prebuild(config, progress=sys.stderr.isatty())


def _check_resources(context: StudyContext) -> None:
    """Refuse a trial shape the cluster can never place, even scaled up: Ray Train V2 would wait for it forever.

    A shape that fits only once the autoscaler has added nodes is fine: its trials wait for them.
    """
    settings = context.space.settings
    driver = 0 if context.in_actor else context.driver_resources()["CPU"]
    problem = shape_problem(cluster_capacity(), context.worker_resources(), settings.workers_per_trial, driver)
    if problem:
        raise ConfigError(problem)


def _tuner_run_config(context: StudyContext, directory: Path):
    from ray import tune

    from qstudy.study.progress import StudyProgress

    progress = StudyProgress(context.tracking.study, str(directory), context.storage, context.space.settings.trials)
    # Tune restarts a trial whose actor died from its last checkpoint; with a TorchTrainer the
    # trainer's own FailureConfig restarts its workers, so Tune need not restart the driver too.
    restarts = context.space.settings.max_failures if context.in_actor else 0
    # verbose=0: Tune's status tables and per-trial lines give way to StudyProgress, whatever -v says.
    return tune.RunConfig(name="tune", **context.storage.ray_storage(), verbose=0,
                          failure_config=tune.FailureConfig(max_failures=restarts), callbacks=[progress])


def _trial_dirname(trial) -> str:
    """The trial id alone: Tune's default name spells out every config key and outgrows paths."""
    return f"trial_{trial.trial_id}"


def _trainable(context: StudyContext):
    from ray import tune

    return tune.with_resources(tune.with_parameters(run_trial, context=context), context.driver_resources())


def _no_ray_resume_hint(record: logging.LogRecord) -> bool:
    """Ray's ``Tuner.restore(...)`` hint after a Ctrl-C: the study's summary says how to resume it instead."""
    return "Tuner.restore" not in record.getMessage()


def _prepare_output(verbose: int) -> None:
    """The live table (or event lines) and the summary; Optuna's and MLflow's INFO lines (study created, tables
    migrated; Ray's: :func:`_connect_ray`) and Tune's tracebacks only with -v."""
    # Tune's new output engine would print its own tables beside study/progress.py's.
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    # Save Tune's experiment state often: a killed driver loses at most this many seconds of it.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    logging.getLogger("ray.tune.tune").addFilter(_no_ray_resume_hint)
    # Tune logs each failed trial's whole traceback; study/progress.py prints one line instead.
    os.environ["TUNE_PRINT_ALL_TRIAL_ERRORS"] = "1" if verbose > 1 else "0"
    if verbose <= 1:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        writer.quiet_logs()


def run_study(options: StudyOptions) -> StudySummary:
    """Validate, set up tracking and storage, run every trial, summarise."""
    started = time.perf_counter()
    if options.replay_table is not None and not options.replay_table.is_file():
        raise ConfigError(f"--replay {options.replay_table}: file not found")
    snapshot = _snapshot_space(options)
    # Before Ray starts anything and before any MLflow run exists: every config and data problem, then the budget.
    space = _parse_snapshot(snapshot, options.space_path, reads_data=options.replay_table is None)
    check_feasible(space)
    name = options.name or space.study
    directory = study_dir(options.home, name)
    if (directory / STATE_FILE).exists():
        raise ConfigError(f"study {name!r} already exists in {directory}: resume it with "
                          f"`qstudy study --resume {name}` or pick another --name")
    uri = writer.resolve_tracking_uri(options.tracking_uri, options.home)
    writer.check_reachable(uri)

    _prepare_output(options.verbose)
    connect_ray(options.address, options.verbose)
    state = StudyState(name=name, space_origin=str(options.space_path.resolve()), tracking_uri=uri,
                       experiment_id="", parent_run_id="", optuna_storage=f"sqlite:///{directory / 'optuna.db'}",
                       force_trainer=options.force_trainer, storage=space.settings.storage or str(directory.parent),
                       replay_table=str(options.replay_table.resolve()) if options.replay_table else None)
    context = _context(state, directory, space)
    check_nodes(study_checks(uri, space, context.storage, reads_data=state.replay_table is None))
    _check_resources(context)
    if state.replay_table is None:
        _warm_frame_cache(space)

    settings = space.settings
    state.experiment_id = writer.ensure_experiment(uri, space.study, options.home / "mlflow" / "artifacts")
    state.parent_run_id = writer.start_study_run(uri, state.experiment_id, name, {
        schema.SPACE_PARAM: str(options.space_path), schema.SAMPLER_PARAM: settings.sampler,
        schema.TRIALS_PARAM: settings.trials, schema.CONCURRENCY_PARAM: settings.concurrency,
        schema.WORKERS_PER_TRIAL_PARAM: settings.workers_per_trial,
        schema.PARAMETER_BUDGET_PARAM: space.parameter_budget,
        schema.ARMS_PARAM: ",".join(arm.method for arm in space.arms),
        schema.BASE_TOTAL_PARAM: space.dims.total_params})
    directory.mkdir(parents=True, exist_ok=True)
    (directory / SPACE_SNAPSHOT).write_text(yaml.safe_dump(snapshot, sort_keys=False))
    _save_state(state, directory)
    context = _context(state, directory, space)

    from optuna.storages import RDBStorage
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    searcher = make_searcher(space, name, RDBStorage(state.optuna_storage), context.tracking)
    # reuse_actors: a trial inherits the finished trial's process with torch, transformers and
    # MLflow already imported; a fresh actor per trial costs seconds of imports on a busy node.
    tuner = tune.Tuner(
        _trainable(context),
        tune_config=tune.TuneConfig(search_alg=ConcurrencyLimiter(searcher, max_concurrent=settings.concurrency),
                                    scheduler=make_scheduler(space, directory / SCHEDULER_STATE),
                                    num_samples=settings.trials, reuse_actors=True,
                                    trial_dirname_creator=_trial_dirname),
        run_config=_tuner_run_config(context, directory))
    tuner.fit()
    return _finish(state, directory, space, started)


def load_state(home: Path, name: str) -> StudyState:
    """The ``study.json`` of study ``name`` under ``home``; an unknown name fails listing the known ones."""
    path = study_dir(home, name) / STATE_FILE
    if not path.exists():
        raise ConfigError(f"no study {name!r} in {home / 'studies'} (studies there: {', '.join(_known(home)) or 'none'})")
    return StudyState(**json.loads(path.read_text()))


def _known(home: Path) -> list[str]:
    """The studies under ``home``, oldest first."""
    states = [path for path in (home / "studies").glob(f"*/{STATE_FILE}")]
    return [path.parent.name for path in sorted(states, key=lambda path: (path.stat().st_mtime, path.parent.name))]


def resolve_study(home: Path, name: str) -> tuple[str, str | None]:
    """``(study name, note)``: a study's own name, or its space's ``study`` (the MLflow experiment), meaning the
    latest study run from that space; the note says which one that is. An unknown name fails listing the studies."""
    if (study_dir(home, name) / STATE_FILE).exists():
        return name, None
    family = [known for known in _known(home) if _space_study(study_dir(home, known)) == name]
    if not family:
        load_state(home, name)  # raises, listing the studies there
    note = f"{name!r} is the study family of {len(family)} studies here; using the latest, {family[-1]}"
    return family[-1], note


def _space_study(directory: Path) -> str | None:
    """The ``study`` of the space a study directory was started from; None where its snapshot is gone."""
    snapshot = directory / SPACE_SNAPSHOT
    return load_yaml(snapshot).get("study") if snapshot.is_file() else None


def make_searcher(space: SearchSpace, name: str, storage, target: TrialTarget | None, sampler=None):
    """The study's two-objective Optuna searcher (``storage``: an Optuna storage; ``target``: MLflow or None).

    ``sampler``: an Optuna sampler in place of the space's (a benchmark's anchor).
    """
    from qstudy.study.search import StudySearch, make_sampler

    # The first trials try each arm once (Optuna enqueues them; the sampler fills in the arm's
    # values): a short study over many arms would otherwise leave some off the Pareto plane. The
    # budget sampler does so itself, skipping an arm with no config within the budget.
    several = len(space.arms) > 1 and space.settings.sampler != "budget"
    first_arms = [{"method": arm.method} for arm in space.arms] if several else None
    return StudySearch(space=SpaceSampler(space), metric=list(OBJECTIVES), mode=list(OBJECTIVE_MODES),
                       sampler=sampler or make_sampler(space), study_name=name,
                       storage=storage, points_to_evaluate=first_arms, epochs=space.base["train"]["epochs"],
                       target=target)


def make_scheduler(space: SearchSpace, state_path: Path | None):
    """The space's Tune scheduler: ``None`` (every trial runs to its last epoch) or MOASHA."""
    from qstudy.study.scheduler import MultiObjectiveASHA

    settings = space.settings
    if settings.scheduler == "none":
        return None
    return MultiObjectiveASHA(settings.grace_epochs, settings.reduction_factor, space.base["train"]["epochs"],
                              state_path=str(state_path) if state_path else None)


def resume_study(name: str, home: Path, address: str | None = None, verbose: int = 1,
                 tracking_uri: str | None = None, storage: str | None = None) -> StudySummary:
    """Continue a study whose driver died: unfinished trials resume, finished ones are kept.

    A study moved to another cluster names where its runs and its storage are now
    (``tracking_uri``, ``storage``); the study directory keeps them for the next resume.
    """
    started = time.perf_counter()
    directory = study_dir(home, name)
    state = load_state(home, name)
    space = _parse_snapshot(load_yaml(directory / SPACE_SNAPSHOT), Path(state.space_origin),
                            reads_data=state.replay_table is None)
    state.tracking_uri = tracking_uri or state.tracking_uri
    state.storage = storage or state.storage
    writer.check_reachable(state.tracking_uri)

    _prepare_output(verbose)
    connect_ray(address, verbose)
    context = _context(state, directory, space)
    check_nodes(study_checks(state.tracking_uri, space, context.storage, reads_data=state.replay_table is None))
    _check_resources(context)
    if state.replay_table is None:
        _warm_frame_cache(space)
    _save_state(state, directory)
    from ray import tune

    # Trials that raised stay failed; trials the dead driver left running continue from their checkpoints.
    tuner = tune.Tuner.restore(context.storage.path("tune"), trainable=_trainable(context),
                               resume_unfinished=True, resume_errored=False, restart_errored=False,
                               **context.storage.ray_filesystem())
    writer.reopen_study_run(state.tracking_uri, state.parent_run_id)
    tuner.fit()
    return _finish(state, directory, space, started)


def _save_state(state: StudyState, directory: Path) -> None:
    (directory / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))


def _storage(state: StudyState, directory: Path) -> StudyStorage:
    return StudyStorage(state.storage or str(directory.parent), state.name)


def _context(state: StudyState, directory: Path, space: SearchSpace) -> StudyContext:
    return StudyContext(study_dir=str(directory), space=space, tracking=_target(state, directory),
                        storage=_storage(state, directory), force_trainer=state.force_trainer,
                        replay_table=state.replay_table)


def _target(state: StudyState, directory: Path) -> TrialTarget:
    return TrialTarget(tracking_uri=state.tracking_uri, experiment_id=state.experiment_id,
                                parent_run_id=state.parent_run_id, study=state.name,
                                outbox_root=str(directory / OUTBOX_DIR))


def _close_optuna_orphans(state: StudyState) -> None:
    """Trials Optuna handed out before a driver died, which no Tune trial ran, are not running forever."""
    import optuna
    from optuna.trial import TrialState

    study = optuna.load_study(study_name=state.name, storage=state.optuna_storage)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(trial.number, state=TrialState.FAIL)


def _close_trial_runs(target: TrialTarget, trials) -> None:
    """Leave no child run open, and no trial Tune ran without one, as MLflow has them.

    A trial that errored before its function ran (its reused actor died) opened no run: it
    gets a FAILED one. Unfinished trials (Ctrl-C) close as INTERRUPTED, trials Tune's
    experiment state never recorded (a killed driver) as LOST.
    """
    from ray.tune.experiment import Trial

    runs = writer.trial_runs(target)
    for trial in trials:
        if trial.status == Trial.ERROR and runs.get(trial.trial_id, ("", True))[1]:
            writer.close_trial(target, trial.trial_id, run_name(trial.config["method"], trial.trial_id),
                               schema.FAILED, {schema.METHOD_TAG: trial.config["method"]})
    unfinished = {trial.trial_id for trial in trials if trial.status not in (Trial.TERMINATED, Trial.ERROR)}
    writer.close_open_trials(target, schema.INTERRUPTED, only=unfinished)
    writer.close_open_trials(target, schema.LOST, keep={trial.trial_id for trial in trials})


def read_summary(state: StudyState, directory: Path, storage: StudyStorage, experiment: str, wall_seconds: float,
                 interrupted: bool) -> StudySummary:
    """The study as ``qstudy report`` reads it from MLflow: the same records, counted the same way."""
    analysis = read_studies([state.parent_run_id], state.tracking_uri).analysis
    home = directory.parent.parent
    return StudySummary(name=state.name, study_dir=directory, storage=storage, tracking_uri=state.tracking_uri,
                        experiment=experiment,
                        parent_run_id=state.parent_run_id, wall_seconds=wall_seconds, records=list(analysis.records),
                        front=list(analysis.front), knee=analysis.knee, best=analysis.best, interrupted=interrupted,
                        commands_need_uri=state.tracking_uri != writer.default_tracking_uri(home))


def deliver_everywhere(target: TrialTarget, wait_s: float) -> int:
    """Deliver the outboxes on every live node (each trial's is on the disk of the node it ran on), with a task on
    each node; returns how many stay undelivered there, counting a node that could not be asked as one."""
    import ray
    from ray.exceptions import RayError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    deliver = ray.remote(num_cpus=0, max_retries=0)(writer.deliver_all)
    pending = {node["NodeManagerAddress"]: deliver.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        node["NodeID"], soft=False)).remote(target, wait_s) for node in ray.nodes() if node["Alive"]}
    undelivered = 0
    for address, reference in pending.items():
        try:
            undelivered += ray.get(reference)
        except RayError as error:
            log.warning("could not deliver the MLflow outboxes on node %s: %s", address, error)
            undelivered += 1
    return undelivered


def _finish(state: StudyState, directory: Path, space: SearchSpace, started: float) -> StudySummary:
    """Deliver what trials could not log, close every run, and summarise the study as ``qstudy report`` reads it."""
    from ray.tune import ExperimentAnalysis
    from ray.tune.experiment import Trial

    storage = _storage(state, directory)
    trials = ExperimentAnalysis(storage.path("tune"), **storage.ray_filesystem()).trials
    interrupted = len(trials) < space.settings.trials or any(
        trial.status not in (Trial.TERMINATED, Trial.ERROR) for trial in trials)
    target = _target(state, directory)
    undelivered = deliver_everywhere(target, wait_s=OUTBOX_WAIT_S if writer.is_remote(state.tracking_uri) else 0)
    try:
        _close_trial_runs(target, trials)
    except Exception as error:  # noqa: BLE001 - MLflow is down: the runs stay open until the study is resumed
        log.warning("could not close the trials' MLflow runs: %s", error)
    if not interrupted:  # an interrupted study's running Optuna trials are the ones its resume finishes
        _close_optuna_orphans(state)
    summary = read_summary(state, directory, storage, space.study, time.perf_counter() - started, interrupted)
    # Metrics at step 0 once: an interrupted study logs them when it is resumed to its end.
    metrics = {} if interrupted else {
        **{schema.trials_metric(status): count for status, count in trial_counts(summary.records).items()},
        schema.BEST_CIDER: summary.best.cider if summary.best else float("nan"),
        schema.UNDELIVERED_TRIALS: undelivered, schema.STUDY_WALL_SECONDS: summary.wall_seconds}
    try:
        writer.finish_study_run(state.tracking_uri, state.parent_run_id, metrics,
                                {"trials": [asdict(r) for r in summary.records],
                                 "front": [asdict(r) for r in summary.front]},
                                schema.INTERRUPTED if interrupted else schema.FINISHED)
    except Exception as error:  # noqa: BLE001 - the study's results are in MLflow and on disk either way
        log.warning("could not close the MLflow parent run %s: %s", state.parent_run_id, error)
    return summary


def trial_log(summary: StudySummary, trial_id: str) -> str:
    """Where Tune wrote a failed trial's full error (its traceback, each time it failed)."""
    return summary.storage.where("tune", f"trial_{trial_id}", "error.txt")


def _first_of(records: list[TrialRecord], total: int, what: str) -> str:
    first = records[0]
    return (f"{len(records)} of {total} trials {what}; the first, trial {first.trial_id} ({first.method}): "
            f"{one_line(first.error or 'no error was recorded', REASON_LIMIT)}")


def _outcome_lines(summary: StudySummary) -> list[str]:
    """What did not train as planned: trials out of memory (the first one's allocation and its traceback), the
    failures (the first one's reason and log), or why nothing trained."""
    lines = []
    total = len(summary.records)
    out_of_memory = [record for record in summary.records if record.status == schema.OUT_OF_MEMORY]
    if out_of_memory:
        lines += [_first_of(out_of_memory, total, "ran out of memory (told to the sampler as infeasible, not failed)"),
                  f"  traceback: {summary.storage.where('trials', out_of_memory[0].trial_id, OUT_OF_MEMORY_MARKER)}"]
    failed = [record for record in summary.records if record.status == schema.FAILED]
    if failed:
        return lines + [_first_of(failed, total, "failed"), f"  full log: {trial_log(summary, failed[0].trial_id)}"]
    if not summary.interrupted and not summary.count(schema.FINISHED):
        why = [reason for status, reason in (
            (schema.INFEASIBLE, "an infeasible trial is over the space's parameter_budget and is never trained"),
            (schema.OUT_OF_MEMORY, "a smaller config or a larger machine is what helps one out of memory"))
            if summary.count(status)]
        lines.append("nothing trained: no trial finished" + (f" ({'; '.join(why)})" if why else ""))
    return lines


def next_commands(summary: StudySummary) -> list[str]:
    """The commands that look at this study next, as a user types them."""
    uri = f" --mlflow-uri {summary.tracking_uri}" if summary.commands_need_uri else ""
    exports = summary.study_dir.parent.parent / "exports" / summary.name
    lines = [f"qstudy report {summary.name}{uri}",
             f"qstudy export {summary.name} --select front --out {exports}{uri}",
             f"qstudy dashboard {summary.name}"]
    if writer.is_remote(summary.tracking_uri):
        lines.append(f"MLflow UI: {summary.tracking_uri}")
    else:
        lines.append(f"mlflow ui --backend-store-uri {summary.tracking_uri} --port 5000   (then http://127.0.0.1:5000)")
    return lines


def format_summary(summary: StudySummary) -> str:
    """The final summary the CLI prints: counts, the Pareto front, the best trial, what went wrong, where
    everything is, and the commands to run next."""
    best = summary.best
    lines = [f"study {summary.name}: {format_counts(summary.records)} in {summary.wall_seconds:.0f} s",
             "Pareto front (CIDEr max, trainable parameters min):",
             front_table(summary.front, summary.knee),
             f"best CIDEr: {best.cider:.4f} (trial {best.trial_id})" if best else "best CIDEr: none",
             *_outcome_lines(summary),
             f"study directory: {summary.study_dir}",
             *([f"storage: {summary.storage.where()}"] if not summary.storage.local else []),
             f"MLflow: {summary.tracking_uri}  experiment {summary.experiment!r}, parent run {summary.parent_run_id}"]
    if summary.interrupted:
        lines.append(f"interrupted: continue with `qstudy study --resume {summary.name}`")
    else:
        lines += ["next:", *(f"  {command}" for command in next_commands(summary))]
    return "\n".join(lines)
