"""The ``qstudy`` command line: one subcommand per stage of the pipeline."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from qstudy.core.errors import (EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_NOTHING_TRAINED, EXIT_OK,
                                 EXIT_TRIALS_FAILED, ConfigError, NothingToTrain, QstudyError, one_line)
from qstudy.config import RunConfig
from qstudy.core.paths import check_path_component, qstudy_home
from qstudy.core.validate import load_yaml
from qstudy.model.quiet import quiet_weight_loading

DEMO_CONFIG = Path(__file__).parent / "presets" / "tiny_qadapter.yaml"
# A checkout's search space (editable install); `qstudy demo` run from a checkout finds it in cwd too.
DEMO_SPACE = Path(__file__).resolve().parents[2] / "search_spaces" / "qadapter_tiny.yaml"
EXIT_CODES = f"""exit codes:
  {EXIT_OK:<4} done; for study, demo and study --resume: at least one trial finished and none failed;
       the others were stopped early by the scheduler, infeasible by the budget, or ran out of
       memory (never a failure: the summary counts them and names the first one's allocation)
  {EXIT_FAILED:<4} an unexpected error (a traceback; please report it); caption: a video could not be decoded
  {EXIT_BAD_INPUT:<4} bad input, before anything ran: a config, data or annotation problem (all of them,
       one line each, naming the field or file), an unknown study name (the known ones are listed)
  {EXIT_TRIALS_FAILED:<4} the study ran but trials failed: the summary names how many, the first one's
       reason and the file with its full log; evaluate: some chosen trials could not be scored (the
       others' scores are logged)
  {EXIT_NOTHING_TRAINED:<4} the study trained nothing: every config of the space is over parameter_budget
       (said before Ray starts), or no trial finished (e.g. every one ran out of memory)
  {EXIT_INTERRUPTED:<4} interrupted (Ctrl-C); a study says how to resume it"""


def cmd_data(args) -> None:
    from qstudy.data.synthetic import SyntheticSpec, generate

    spec = SyntheticSpec(domain=args.domain, num_clips=args.clips, seed=args.seed)
    print(generate(args.out, spec, layout=args.layout))


def run_configs_of(path: Path) -> list[tuple[str, RunConfig]]:
    """``(label, run config)`` for a run config YAML, or one per distinct data section of a search-space YAML."""
    from qstudy.study.space import load_space

    if "arms" in load_yaml(path):
        return load_space(path).data_variants()
    config = RunConfig.from_yaml(path)
    return [(config.adapter.method, config)]


def cmd_data_cache(args) -> None:
    from qstudy.data.cache import prebuild

    for label, config in run_configs_of(args.config):
        if args.workers is not None:
            config.data.decode_workers = args.workers
        for entry in prebuild(config):
            state = f"decoded {entry.decoded} videos" if entry.decoded else "already cached"
            print(f"{label}: {len(entry.clips)} clips x {entry.frames.shape[1:]} frames, {len(entry.skipped)} "
                  f"skipped, {state}: {entry.path}")


def cmd_base(args) -> None:
    from qstudy.train.pretrain import BaseSpec, pretrain_base

    quiet_weight_loading()
    spec = BaseSpec(seed=args.seed) if args.steps is None else BaseSpec(steps=args.steps, seed=args.seed)
    model = pretrain_base(args.out, spec)
    print(json.dumps(model.__dict__, indent=2))


def tiny_base_dir(seed: int = 0) -> Path:
    """Where the tiny base of a seed is cached; seed 0's is the one the presets name."""
    return qstudy_home() / "base" / ("tiny" if seed == 0 else f"tiny-seed{seed}")


def prepare_tiny_workspace(home: Path) -> None:
    """The embedded default's inputs: target-domain clips and the pretrained tiny base."""
    from qstudy.data.synthetic import SyntheticSpec, generate
    from qstudy.train.pretrain import pretrain_base

    if not (home / "data" / "target" / "annotations.json").exists():
        generate(home / "data" / "target", SyntheticSpec(domain="target"))
    pretrain_base(home / "base" / "tiny")


def print_result(result) -> None:
    print(f"\n{result.method}: {result.trainable_params:,} trainable of {result.total_params:,} parameters "
          f"({100 * result.trainable_params / result.total_params:.2f}%), {result.wall_seconds:.0f} s, "
          f"{len(result.skipped_videos)} videos skipped")
    for epoch in result.epochs:
        scores = "  ".join(f"{name} {value:.3f}" for name, value in epoch.val.items())
        print(f"  epoch {epoch.epoch}: loss {epoch.train_loss:.3f}  {scores}")
    print(f"metrics: {Path(result.output_dir) / 'metrics.json'}")


def cmd_train(args) -> None:
    from qstudy.data.check import check_data

    config = RunConfig.from_yaml(args.config)  # fails on bad keys before torch is even imported
    if args.output_dir:
        config.output_dir = args.output_dir
    check_data(config.data)  # and on bad annotations, splits or video_dir, before a model is built
    from qstudy.train.recipe import run

    quiet_weight_loading()
    print_result(run(config))


def _study_options(args, space_path: Path, name: str | None):
    from qstudy.study.tuner import StudyOptions

    return StudyOptions(space_path=space_path, home=qstudy_home(), name=name, address=args.address,
                        tracking_uri=args.tracking_uri, storage=args.storage, trials=args.trials,
                        concurrency=args.concurrency,
                        workers_per_trial=args.workers_per_trial, sampler=args.sampler,
                        verbose=_study_verbosity(args), replay_table=getattr(args, "replay", None))


def _study_verbosity(args) -> int:
    """Tune's verbosity: the live table and the summary; with -v also every trial's own output."""
    return 2 if args.verbose else 1


def _print_summary(summary) -> None:
    """The study's summary, then exit with what it means (see EXIT_CODES)."""
    from qstudy.study.tuner import format_summary

    print(format_summary(summary), flush=True)
    code = summary.exit_code
    if code == EXIT_TRIALS_FAILED:
        print(f"qstudy: study {summary.name}: trials failed (exit {code})", file=sys.stderr)
    elif code == EXIT_NOTHING_TRAINED:
        print(f"qstudy: study {summary.name}: nothing trained, no trial finished (exit {code})", file=sys.stderr)
    if code != EXIT_OK:
        sys.exit(code)


def _local_study(name: str) -> str:
    """A study under $QSTUDY_HOME by its name or its space's study family (the latest of it), saying which."""
    from qstudy.study.tuner import resolve_study

    resolved, note = resolve_study(qstudy_home(), name)
    if note:
        print(f"qstudy: {note}", file=sys.stderr)
    return resolved


def cmd_study(args) -> None:
    from qstudy.study.tuner import resume_study, run_study

    if (args.space is None) == (args.resume is None):
        raise ConfigError("give a search-space file or --resume NAME (not both)")
    if args.resume:
        _print_summary(resume_study(_local_study(args.resume), qstudy_home(), args.address, _study_verbosity(args),
                                    tracking_uri=args.tracking_uri, storage=args.storage))
    else:
        _print_summary(run_study(_study_options(args, args.space, args.name)))


def cmd_rehearse(args) -> None:
    from qstudy.study.rehearsal import RehearsalOptions, format_rehearsal, rehearse

    quiet_weight_loading()
    rehearsal = rehearse(RehearsalOptions(
        space_path=args.space, home=qstudy_home(), steps=args.steps, model_configs=args.model_configs,
        train_clips=args.train_clips, val_clips=args.val_clips, address=args.address, tracking_uri=args.tracking_uri,
        verbose=_study_verbosity(args)))
    print(format_rehearsal(rehearsal), flush=True)
    if rehearsal.exit_code != EXIT_OK:
        sys.exit(rehearsal.exit_code)


def cmd_dashboard(args) -> None:
    """optuna-dashboard on a study's Optuna storage, on this machine only (a live view while it runs)."""
    from optuna_dashboard import run_server

    from qstudy.study.tuner import load_state

    name = _local_study(args.study)
    state = load_state(qstudy_home(), name)
    print(f"optuna-dashboard for study {name} ({state.optuna_storage}): http://127.0.0.1:{args.port} "
          "(Ctrl-C stops it)", flush=True)
    run_server(state.optuna_storage, host="127.0.0.1", port=args.port)


def cmd_demo(args) -> None:
    """A small Q-Adapter study on a local Ray instance, tracked in the embedded sqlite MLflow store."""
    import time

    from qstudy.study.tuner import run_study

    home = qstudy_home()
    print(f"preparing the tiny workspace in {home} (synthetic mp4 clips, pretrained tiny base)")
    quiet_weight_loading()
    prepare_tiny_workspace(home)
    space = DEMO_SPACE if DEMO_SPACE.exists() else Path.cwd() / "search_spaces" / DEMO_SPACE.name
    name = time.strftime("demo-%Y%m%d-%H%M%S")
    print(f"running study {name} from {space} on a local Ray instance")
    _print_summary(run_study(_study_options(args, space, name)))


def cmd_report(args) -> None:
    from qstudy.analysis.paper import markdown_table, write_paper_tables
    from qstudy.analysis.report import format_published, format_report, publish_dashboards, read_studies
    from qstudy.analysis.views import default_views_dir, load_views

    views = load_views(args.views or default_views_dir())  # a bad view file fails before MLflow is read
    selection = _announced(read_studies(args.studies, args.tracking_uri, args.budget, args.reference))
    print(format_report(selection))
    out_dir = args.report_dir or qstudy_home() / "reports" / selection.name
    print("\n" + format_published(selection, out_dir, publish_dashboards(selection, views, out_dir, not args.no_png)))
    tables = write_paper_tables(selection, out_dir)
    if tables:
        print(f"\npaper table: the trials scored by `qstudy evaluate`\n{markdown_table(selection)}")
        print("  written to " + ", ".join(str(path) for path in tables))


def cmd_export(args) -> None:
    from qstudy.analysis.report import read_studies
    from qstudy.analysis.selection import Selection
    from qstudy.export import export_trials

    choice = Selection.parse(args.select)
    index = export_trials(_announced(read_studies(args.studies, args.tracking_uri)), choice, args.export_dir)
    print(index.read_text())
    print(f"index: {index}")


def cmd_evaluate(args) -> None:
    from qstudy.analysis.report import read_studies
    from qstudy.analysis.selection import Selection
    from qstudy.study.evaluation import evaluate_selection

    choice = Selection.parse(args.select)
    selection = _announced(read_studies(args.studies, args.tracking_uri))

    def printed(result) -> None:
        scores = "  ".join(f"{name} {100 * result.scores[name]:.1f}" for name in result.scores)
        print(f"trial {result.record.trial_id} ({result.record.label}): {result.split!r}, {result.beams} beam(s), "
              f"{result.clips} clips: {scores}", flush=True)

    results = evaluate_selection(selection, choice, args.split, args.beams, args.address, _study_verbosity(args),
                                 on_result=printed)
    uri = "" if args.tracking_uri is None else f" --mlflow-uri {args.tracking_uri}"
    print(f"{len(results)} trials scored (x100), logged as test_* metrics on their MLflow runs "
          f"({selection.tracking_uri}); the paper table: qstudy report {' '.join(args.studies)}{uri}")


def _announced(selection):
    """The selection, after saying how a name that was not a study's own was read."""
    for note in selection.notes:
        print(f"qstudy: {note}", file=sys.stderr)
    return selection


def cmd_caption(args) -> None:
    from qstudy.export import caption_videos, load_adapter

    quiet_weight_loading()
    captioner, config = load_adapter(args.adapter)
    undecoded = 0
    # Each caption is printed as it is made: a later failure loses none of them.
    for video, caption in caption_videos(captioner, config, args.videos):
        print(f"{video}\t{caption if caption is not None else '(could not decode this video)'}", flush=True)
        undecoded += caption is None
    if undecoded:
        sys.exit(EXIT_FAILED)


def _study_name(text: str) -> str:
    """A study name names a directory under $QSTUDY_HOME/studies: it must stay there."""
    try:
        return check_path_component(text, "study name")
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def _add_tracking_uri(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mlflow-uri", dest="tracking_uri",
                        help="MLflow tracking URI (default: sqlite under $QSTUDY_HOME/mlflow)")


def _add_study_arguments(parser: argparse.ArgumentParser, trials: int | None = None) -> None:
    """Options of `study` and `demo`; unset ones keep the search-space file's settings."""
    parser.add_argument("--address", help="Ray cluster (default: RAY_ADDRESS under `ray job submit`, else local)")
    _add_tracking_uri(parser)
    parser.add_argument("--storage", help="where Tune's state, checkpoints and trial records go: a directory "
                                          "every node reaches, or s3://bucket/prefix, gs://... (default: the study "
                                          "directory)")
    parser.add_argument("--trials", type=int, default=trials)
    parser.add_argument("--concurrency", type=int)
    parser.add_argument("--workers-per-trial", type=int)
    parser.add_argument("--sampler", choices=["tpe", "nsga2", "random"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qstudy", description=__doc__, epilog=EXIT_CODES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log training progress")
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    synthetic = data.add_parser("synthetic", help="write a synthetic video-caption dataset as mp4 files")
    synthetic.add_argument("--out", required=True, type=Path)
    synthetic.add_argument("--domain", default="target", choices=["source", "target"])
    synthetic.add_argument("--clips", type=int, default=480)
    synthetic.add_argument("--seed", type=int, default=0)
    synthetic.add_argument("--layout", default="merged", choices=["merged", "msrvtt", "msvd"],
                           help="merged: one annotations.json with every split; msrvtt: train_val_videodatainfo.json "
                                "+ test_videodatainfo.json; msvd: video_corpus.csv + <split>_list.txt")
    synthetic.set_defaults(handler=cmd_data)
    cache = data.add_parser("cache", help="decode a run's or a search space's splits into the node's frame cache")
    cache.add_argument("config", type=Path, help="a run config YAML or a search-space YAML")
    cache.add_argument("--workers", type=int, help="decoding processes (default: data.decode_workers, else every core)")
    cache.set_defaults(handler=cmd_data_cache)

    base = commands.add_parser("base", help="pretrain the tiny base captioner on the source domain")
    base.add_argument("--out", type=Path, default=None, help="default: $QSTUDY_HOME/base/tiny")
    base.add_argument("--steps", type=int, default=None, help="default: BaseSpec.steps")
    base.add_argument("--seed", type=int, default=0)
    base.set_defaults(handler=cmd_base)

    train = commands.add_parser("train", help="train and evaluate one run from a YAML config")
    train.add_argument("config", type=Path)
    train.add_argument("--output-dir", default=None)
    train.set_defaults(handler=cmd_train)

    study = commands.add_parser("study", help="run a hyperparameter study (Ray Tune + Optuna, tracked in MLflow)")
    study.add_argument("space", type=Path, nargs="?", help="search-space YAML (see search_spaces/)")
    study.add_argument("--resume", metavar="NAME", type=_study_name,
                       help="continue a study whose driver stopped (a study name, or its space's study: the latest)")
    study.add_argument("--name", type=_study_name, help="study name (default: the space's study family)")
    study.add_argument("--replay", metavar="TABLE", type=Path,
                       help="replay recorded curves (bench/record_curves.py) instead of training each trial")
    _add_study_arguments(study)
    study.set_defaults(handler=cmd_study)

    rehearse = commands.add_parser(
        "rehearse", help="run every arm of a space for a few steps at real shapes: step time, memory, the study's cost",
        description="Before GPUs are booked: every arm of the space (its heaviest config) trains a few optimiser steps "
                    "on random weights built from the models' config.json (no weights are downloaded), on the "
                    "space's data, through Ray Train, DeepSpeed, the frame cache and MLflow. Prints per arm the step "
                    "time, peak memory, trainable parameters and checkpoint size, and the full study's device-hours. "
                    "Without GPUs, a space that asks for them runs on CPU. Tracked in the experiment STUDY-rehearsal; "
                    "no study is left behind.")
    rehearse.add_argument("space", type=Path, help="search-space YAML (see search_spaces/)")
    rehearse.add_argument("--steps", type=_positive, default=3,
                          help="optimiser steps per epoch; two epochs, the second timed (default: 3)")
    rehearse.add_argument("--model-configs", type=Path, metavar="DIR",
                          help="read each model's config.json from DIR/<model name>/config.json first (offline)")
    rehearse.add_argument("--train-clips", type=_positive, metavar="N",
                          help="train clips of the full study, for the estimate (default: the space's train split)")
    rehearse.add_argument("--val-clips", type=_positive, metavar="N",
                          help="val clips of the full study, for the estimate (default: the space's val split)")
    rehearse.add_argument("--address", help="Ray cluster (default: RAY_ADDRESS under `ray job submit`, else local)")
    _add_tracking_uri(rehearse)
    rehearse.set_defaults(handler=cmd_rehearse)

    dashboard = commands.add_parser("dashboard", help="optuna-dashboard on a study's Optuna storage (127.0.0.1)")
    dashboard.add_argument("study", metavar="STUDY", type=_study_name,
                           help="study name (a directory under $QSTUDY_HOME/studies), or its space's study: the latest")
    dashboard.add_argument("--port", type=int, default=8080)
    dashboard.set_defaults(handler=cmd_dashboard)

    demo = commands.add_parser("demo", help="the embedded default: synthetic data, tiny base, a small local study")
    _add_study_arguments(demo, trials=6)
    demo.set_defaults(handler=cmd_demo)

    report = commands.add_parser("report", help="Pareto front, hypervolume, knee and dashboards of studies in MLflow")
    report.add_argument("studies", nargs="+", metavar="STUDY",
                        help="study name, parent run id, or MLflow experiment (its latest study); several combine")
    _add_tracking_uri(report)
    report.add_argument("--budget", help="parameter budget: a share of the base model (1.5%%) or a count (250k)")
    report.add_argument("--reference", help="hypervolume reference point CIDER,PARAMS (default: 0,1.1x largest trial)")
    report.add_argument("--views", type=Path, help="directory of dashboard view files (default: dashboards/)")
    report.add_argument("--out", dest="report_dir", type=Path, help="default: $QSTUDY_HOME/reports/STUDY")
    report.add_argument("--no-png", action="store_true", help="HTML dashboards only (PNGs need Chromium)")
    report.set_defaults(handler=cmd_report)

    export = commands.add_parser("export", help="write selected trials' configs, adapter weights and metrics")
    export.add_argument("studies", nargs="+", metavar="STUDY",
                        help="study name, parent run id, or MLflow experiment (its latest study); several combine")
    export.add_argument("--select", default="front", help="front | knee | best | budget=1.5%% (default: front)")
    export.add_argument("--out", dest="export_dir", type=Path, required=True)
    _add_tracking_uri(export)
    export.set_defaults(handler=cmd_export)

    evaluate = commands.add_parser(
        "evaluate", help="score selected trials' adapters on a held-out split (BLEU@4, METEOR, ROUGE-L, CIDEr)",
        description="Score the selected trials' trained adapters on a held-out split, one Ray task per trial, and "
                    "log the scores as test_* metrics on their MLflow runs; `qstudy report` then prints the paper "
                    "table. Trials are selected on validation CIDEr only: test scores never select or rank them.")
    evaluate.add_argument("studies", nargs="+", metavar="STUDY",
                          help="study name, parent run id, or MLflow experiment (its latest study); several combine")
    evaluate.add_argument("--select", default="front", help="front | knee | best | budget=1.5%% (default: front)")
    evaluate.add_argument("--split", help="the held-out split (default: each trial's data.test_split)")
    evaluate.add_argument("--beams", type=_positive, help="beam width (default: each trial's eval.num_beams)")
    evaluate.add_argument("--address", help="Ray cluster (default: RAY_ADDRESS under `ray job submit`, else local)")
    _add_tracking_uri(evaluate)
    evaluate.set_defaults(handler=cmd_evaluate)

    caption = commands.add_parser("caption", help="caption videos with an exported adapter")
    caption.add_argument("--adapter", type=Path, required=True, help="a directory written by `qstudy export`")
    caption.add_argument("videos", nargs="+", type=Path, metavar="VIDEO")
    caption.set_defaults(handler=cmd_caption)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s")
    if getattr(args, "out", "") is None:
        args.out = qstudy_home() / "base" / "tiny"
    try:
        args.handler(args)
    except QstudyError as error:
        kind = "config error: " if isinstance(error, ConfigError) else "nothing to train: " if isinstance(
            error, NothingToTrain) else ""
        # One line per problem, whatever a library put into each (YAML errors span several).
        for problem in error.problems if isinstance(error, ConfigError) else (str(error),):
            print(f"qstudy: {kind}{one_line(problem)}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:  # before a study's trials started; once they run, the study handles Ctrl-C
        print("qstudy: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
