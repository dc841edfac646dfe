"""The ``qstudy`` command line: one subcommand per stage of the pipeline."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from qstudy.config import ConfigError, qstudy_home

DEMO_CONFIG = Path(__file__).parent / "presets" / "tiny_qadapter.yaml"


def _quiet_libraries() -> None:
    """Progress bars of weight loading drown the run's own log."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def cmd_data(args) -> None:
    from qstudy.data.synthetic import SyntheticSpec, generate

    spec = SyntheticSpec(domain=args.domain, num_clips=args.clips, seed=args.seed)
    print(generate(args.out, spec))


def cmd_base(args) -> None:
    from qstudy.model.base import BaseSpec, pretrain_base

    _quiet_libraries()
    model = pretrain_base(args.out, BaseSpec(steps=args.steps, seed=args.seed))
    print(json.dumps(model.__dict__, indent=2))


def prepare_tiny_workspace(home: Path) -> None:
    """The embedded default's inputs: target-domain clips and the pretrained tiny base."""
    from qstudy.data.synthetic import SyntheticSpec, generate
    from qstudy.model.base import pretrain_base

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
    from qstudy.config import RunConfig
    from qstudy.train.recipe import run

    config = RunConfig.from_yaml(args.config)  # fails on bad keys before any model is built
    if args.output_dir:
        config.output_dir = args.output_dir
    _quiet_libraries()
    print_result(run(config))


def cmd_demo(args) -> None:
    from qstudy.config import RunConfig
    from qstudy.train.recipe import run

    home = qstudy_home()
    print(f"preparing the tiny workspace in {home} (synthetic mp4 clips, pretrained tiny base)")
    _quiet_libraries()
    prepare_tiny_workspace(home)
    config = RunConfig.from_yaml(DEMO_CONFIG)
    config.output_dir = str(home / "runs" / "demo")
    print_result(run(config))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qstudy", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log training progress")
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    synthetic = data.add_parser("synthetic", help="write a synthetic video-caption dataset as mp4 files")
    synthetic.add_argument("--out", required=True, type=Path)
    synthetic.add_argument("--domain", default="target", choices=["source", "target"])
    synthetic.add_argument("--clips", type=int, default=480)
    synthetic.add_argument("--seed", type=int, default=0)
    synthetic.set_defaults(handler=cmd_data)

    base = commands.add_parser("base", help="pretrain the tiny base captioner on the source domain")
    base.add_argument("--out", type=Path, default=None, help="default: $QSTUDY_HOME/base/tiny")
    base.add_argument("--steps", type=int, default=1000)
    base.add_argument("--seed", type=int, default=0)
    base.set_defaults(handler=cmd_base)

    train = commands.add_parser("train", help="train and evaluate one run from a YAML config")
    train.add_argument("config", type=Path)
    train.add_argument("--output-dir", default=None)
    train.set_defaults(handler=cmd_train)

    demo = commands.add_parser("demo", help="the embedded default: synthetic data, tiny base, one Q-Adapter run")
    demo.set_defaults(handler=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s")
    if getattr(args, "out", "") is None:
        args.out = qstudy_home() / "base" / "tiny"
    try:
        args.handler(args)
    except ConfigError as error:
        print(f"qstudy: config error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
