# ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env jobs/runtime_env_cpu.yaml -- python jobs/study.py search_spaces/qadapter_tiny.yaml --mlflow-uri http://127.0.0.1:5000
"""The study job's entrypoint: start a study, or resume it when a study of that name already exists.

Resubmitting the same command after the job's driver died (node loss, `ray job stop`)
continues the study where it stopped instead of failing on the existing name, so a job can
simply be submitted again. Every argument is `qstudy study`'s; the cluster comes from
RAY_ADDRESS, which `ray job submit` sets.
"""

import sys

from qstudy.cli import build_parser, main
from qstudy.core.validate import load_yaml
from qstudy.core.paths import qstudy_home
from qstudy.study.tuner import STATE_FILE, study_dir

if __name__ == "__main__":
    args = build_parser().parse_args(["study", *sys.argv[1:]])
    name = args.name or (load_yaml(args.space)["study"] if args.space else None)
    if name and (study_dir(qstudy_home(), name) / STATE_FILE).exists():
        print(f"study {name!r} exists: resuming it")
        given = [("--address", args.address), ("--mlflow-uri", args.tracking_uri), ("--storage", args.storage)]
        sys.exit(main(["study", "--resume", name, *(item for option in given if option[1] for item in option)]))
    sys.exit(main(["study", *sys.argv[1:]]))
