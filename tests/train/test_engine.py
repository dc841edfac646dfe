"""The engine's learning-rate schedule, its checkpoints (what trains, nothing frozen) and resuming from them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from qstudy.config import TrainConfig
from qstudy.train.engine import make_engine

TOTAL_STEPS = 20


def engine_and_model(deepspeed: bool, schedule: str):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    config = TrainConfig(batch_size=2, learning_rate=0.1, lr_schedule=schedule, warmup_ratio=0.2,
                         deepspeed=deepspeed)
    return make_engine(model, list(model.parameters()), config, TOTAL_STEPS), model


def train(engine, model, steps: int) -> list[float]:
    """The learning rate each step ran at."""
    rates = []
    for _ in range(steps):
        rates.append(engine.optimizer.param_groups[0]["lr"])
        engine.step(engine.model(torch.ones(2, 4)).pow(2).mean())
    return rates


@pytest.mark.parametrize("deepspeed", [False, True])
def test_cosine_warms_up_then_decays_to_zero_and_resumes_from_a_checkpoint(deepspeed, tmp_path):
    engine, model = engine_and_model(deepspeed, "cosine")
    rates = train(engine, model, TOTAL_STEPS // 2)
    assert rates[0] == 0.0 and rates[4] == pytest.approx(0.1)  # 4 warm-up steps
    assert rates[5] > rates[-1]
    engine.save(tmp_path / "checkpoint", {"epoch": 0})
    rates += train(engine, model, TOTAL_STEPS // 2)
    assert engine.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)

    resumed, resumed_model = engine_and_model(deepspeed, "cosine")
    resumed.load(tmp_path / "checkpoint")
    assert train(resumed, resumed_model, TOTAL_STEPS // 2) == pytest.approx(rates[TOTAL_STEPS // 2:])


def test_constant_keeps_the_rate_after_warm_up():
    engine, model = engine_and_model(False, "constant")
    rates = train(engine, model, TOTAL_STEPS)
    assert rates[4:] == pytest.approx([0.1] * (TOTAL_STEPS - 4))


@pytest.mark.parametrize("deepspeed", [False, True])
def test_accumulating_two_micro_batches_is_one_step_on_both(deepspeed):
    inputs, targets = torch.randn(8, 4, generator=torch.Generator().manual_seed(1)), torch.linspace(-1, 1, 8)[:, None]

    def weights_after(batch_size: int, accumulation: int) -> list[torch.Tensor]:
        """The model's weights after each optimiser step over the 8 samples, in order."""
        torch.manual_seed(0)
        model = nn.Linear(4, 1)
        config = TrainConfig(batch_size=batch_size, learning_rate=0.1, lr_schedule="constant", warmup_ratio=0.0,
                             gradient_accumulation_steps=accumulation, deepspeed=deepspeed)
        engine = make_engine(model, list(model.parameters()), config, total_steps=8 // (batch_size * accumulation))
        snapshots = [model.weight.detach().clone()]
        for start in range(0, 8, batch_size):
            batch = slice(start, start + batch_size)
            engine.step(nn.functional.mse_loss(engine.model(inputs[batch]), targets[batch]))
            snapshots.append(model.weight.detach().clone())
        return snapshots

    whole = weights_after(batch_size=4, accumulation=1)
    accumulated = weights_after(batch_size=2, accumulation=2)
    torch.testing.assert_close(accumulated[1], accumulated[0], rtol=0, atol=0)  # half a step: nothing moves yet
    torch.testing.assert_close(accumulated[2::2], whole[1:])
    assert not torch.allclose(whole[1], whole[0]) and not torch.allclose(whole[2], whole[1])


class FrozenBaseTrainableHead(nn.Module):
    """A 256x256 frozen base, used twice through a tied alias as GPT-2 ties its LM head, and a small head that trains."""

    def __init__(self, head_seed: int):
        super().__init__()
        torch.manual_seed(0)  # the same base whatever the seed, as a rebuilt base is
        self.base = nn.Linear(256, 256).requires_grad_(False)
        self.tied = nn.Linear(256, 256, bias=False).requires_grad_(False)
        self.tied.weight = self.base.weight
        torch.manual_seed(head_seed)
        self.head = nn.Linear(256, 4)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.tied(self.base(inputs)))


def keys_and_bytes(checkpoint: Path) -> tuple[set[str], int]:
    """The name of every tensor at any depth of the checkpoint's files, and the bytes of all its files.

    Names only, without a tensor (DeepSpeed's ``shared_params`` maps a tied alias to the weight it
    shares), hold no weight and are left out.
    """
    keys: set[str] = set()

    def walk(value) -> None:
        if isinstance(value, dict):
            keys.update(key for key, item in value.items() if isinstance(key, str) and isinstance(item, torch.Tensor))
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    files = [path for path in checkpoint.rglob("*") if path.is_file()]
    for path in files:
        if path.suffix == ".safetensors":
            with safe_open(path, "pt") as weights:
                keys.update(weights.keys())
        elif path.suffix == ".pt":
            walk(torch.load(path, map_location="cpu", weights_only=False))  # DeepSpeed pickles its own objects
    return keys, sum(path.stat().st_size for path in files)


@pytest.mark.parametrize(("deepspeed", "zero_stage"), [(False, 0), (True, 2), (True, 3)],
                         ids=["plain", "zero2", "zero3"])
def test_a_checkpoint_holds_only_what_trains_and_resumes_it_exactly(deepspeed, zero_stage, tmp_path):
    config = TrainConfig(batch_size=8, learning_rate=0.01, deepspeed=deepspeed, zero_stage=zero_stage)
    inputs = torch.randn(4, 8, 256, generator=torch.Generator().manual_seed(1))

    def train(engine, batches) -> None:
        for batch in batches:
            engine.step(engine.model(batch).pow(2).mean())

    model = FrozenBaseTrainableHead(head_seed=0)
    engine = make_engine(model, [p for p in model.parameters() if p.requires_grad], config, total_steps=4)
    train(engine, inputs[:2])
    engine.save(tmp_path / "checkpoint", {"epoch": 0})
    train(engine, inputs[2:])

    keys, size = keys_and_bytes(tmp_path / "checkpoint")
    frozen = {"base.weight", "base.bias", "tied.weight"}
    assert not keys & frozen, sorted(keys & frozen)
    frozen_bytes = 257 * 256 * 4
    assert size < frozen_bytes, f"{size} bytes in the checkpoint, {frozen_bytes} in the frozen base"

    # Resumed on a rebuilt model: the same base, a head initialised afresh, which the checkpoint overwrites.
    resumed_model = FrozenBaseTrainableHead(head_seed=1)
    resumed = make_engine(resumed_model, [p for p in resumed_model.parameters() if p.requires_grad], config,
                          total_steps=4)
    assert resumed.load(tmp_path / "checkpoint")["epoch"] == 0
    train(resumed, inputs[2:])
    expected, got = engine.trainable_state(), resumed.trainable_state()
    assert set(got) == {"head.weight", "head.bias"}
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)


# What an earlier DeepSpeed engine of this process set for its world of one (its port is taken).
PROCESS_GROUP_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def test_a_deepspeed_engine_compiles_nothing(tmp_path):
    """In a fresh process, as a trial starts: DeepSpeed's process group comes up without building a C++ op."""
    extensions = tmp_path / "torch_extensions"
    script = ("from torch import nn; from qstudy.config import TrainConfig; from qstudy.train.engine import make_engine; "
              "model = nn.Linear(4, 1); engine = make_engine(model, list(model.parameters()), "
              "TrainConfig(batch_size=2, deepspeed=True), 4); print('ready', engine.optimizer.param_groups[0]['lr'])")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**{key: value for key, value in os.environ.items() if key not in PROCESS_GROUP_ENV},
                               "TORCH_EXTENSIONS_DIR": str(extensions)})
    assert done.returncode == 0 and "ready" in done.stdout, done.stderr[-3000:]
    assert not extensions.exists() or not any(extensions.iterdir()), sorted(extensions.rglob("*"))
