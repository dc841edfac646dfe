"""Run configs: typed dataclasses from YAML, errors that name the key, before any model is built."""

import sys

import pytest
import yaml

from qstudy.methods.qadapter.config import QAdapterConfig
from qstudy.core.errors import ConfigError
from qstudy.config import RunConfig

VALID = {
    "data": {"annotations": "a.json", "video_dir": "videos"},
    "model": {"vision_encoder": "openai/clip-vit-base-patch16", "language_model": "gpt2"},
    "adapter": {"method": "qadapter", "num_query_tokens": 4, "insertion_layers": [1, 2]},
    "train": {"epochs": 2, "learning_rate": 0.001},
}


def write(tmp_path, data):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_valid_config_becomes_typed_objects(tmp_path):
    config = RunConfig.from_yaml(write(tmp_path, VALID))
    assert isinstance(config.adapter, QAdapterConfig)
    assert config.adapter.num_query_tokens == 4 and config.adapter.insertion_layers == [1, 2]
    assert config.train.epochs == 2 and config.train.batch_size == 16  # default kept
    # Hub names stay names; local relative paths resolve against the YAML's folder.
    assert config.model.language_model == "gpt2"
    assert config.data.video_dir == str(tmp_path / "videos")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["train"].update(learnign_rate=1), "unknown key train.learnign_rate"),
        (lambda d: d["adapter"].update(nq=3), "unknown key adapter.nq"),
        (lambda d: d["adapter"].update(method="nope"), "adapter.method: unknown method 'nope'"),
        (lambda d: d["adapter"].update(gating="relu"), "adapter.gating: 'relu' is not one of"),
        (lambda d: d["train"].update(epochs="three"), "train.epochs: expected an integer"),
        (lambda d: d["train"].update(learning_rate=-1.0), "train.learning_rate must be > 0"),
        (lambda d: d["train"].update(lr_schedule="linear"), "train.lr_schedule: 'linear' is not one of"),
        (lambda d: d["train"].update(warmup_ratio=1.0), "train.warmup_ratio must be in"),
        (lambda d: d["model"].update(temporal_merger_rank=-2), "model.temporal_merger_rank must be >= 0"),
        (lambda d: d["data"].update(resize="crop"), "data.resize: 'crop' is not one of"),
        (lambda d: d["train"].update(gradient_accumulation_steps=0), "train.gradient_accumulation_steps must be >= 1"),
        (lambda d: d["model"].update(gradient_checkpointing="yes"), "model.gradient_checkpointing: expected bool"),
        (lambda d: d["data"].pop("video_dir"), "missing key data.video_dir"),
        (lambda d: d["data"].update(decode_workers=0), "data.decode_workers must be >= 1"),
        (lambda d: d["data"].update(cache_dir=""), "data.cache_dir: empty path"),
        (lambda d: d.update(extra=1), "unknown key extra"),
    ],
)
def test_bad_configs_name_the_field(tmp_path, mutate, message):
    data = yaml.safe_load(yaml.safe_dump(VALID))
    mutate(data)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        RunConfig.from_yaml(write(tmp_path, data))


def test_invalid_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: invalid YAML"):
        RunConfig.from_yaml(path)


def test_config_errors_come_before_torch_is_imported(tmp_path):
    """A bad key fails in milliseconds: the config layer never imports torch."""
    import subprocess

    data = yaml.safe_load(yaml.safe_dump(VALID))
    data["train"]["bogus"] = 1
    path = write(tmp_path, data)
    code = ("import sys\nfrom qstudy.config import RunConfig, ConfigError\n"
            f"try:\n    RunConfig.from_yaml({str(path)!r})\nexcept ConfigError as e:\n    print(e)\n"
            "print('torch' in sys.modules)")
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "unknown key train.bogus" in output
    assert output.strip().endswith("False")


def test_frame_cache_defaults_to_qstudy_home_and_is_absolute(tmp_path, monkeypatch):
    """Trials run with other working directories: the path every trial maps must be fixed when read."""
    monkeypatch.setenv("QSTUDY_HOME", str(tmp_path / "home"))
    assert RunConfig.from_yaml(write(tmp_path, VALID)).data.cache_dir == str(tmp_path / "home" / "cache")
    relative = yaml.safe_load(yaml.safe_dump(VALID))
    relative["data"]["cache_dir"] = "frames"
    assert RunConfig.from_yaml(write(tmp_path, relative)).data.cache_dir == str(tmp_path / "frames")


def test_round_trip_through_dict(tmp_path):
    config = RunConfig.from_yaml(write(tmp_path, VALID))
    again = RunConfig.from_dict(config.to_dict())
    assert again == config


def test_every_problem_of_a_config_is_reported_at_once(tmp_path):
    data = yaml.safe_load(yaml.safe_dump(VALID))
    data["train"].update(learnign_rate=1, epochs=0, warmup_ratio=2.0)
    data["data"].update(num_frames=0, val_split="../val")
    data["model"].pop("language_model")
    with pytest.raises(ConfigError) as error:
        RunConfig.from_yaml(write(tmp_path, data))
    problems = [problem.removeprefix(f"{tmp_path / 'run.yaml'}: ") for problem in error.value.problems]
    assert [problem.split(" ")[0] if problem.startswith(("unknown", "missing")) is False else problem.split(" (")[0]
            for problem in problems] == [
        "data.num_frames", "data.val_split:", "missing key model.language_model", "unknown key train.learnign_rate"]
