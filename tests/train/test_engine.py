"""The engine's learning-rate schedule: warm-up, decay over the run, and its state across a checkpoint."""

from __future__ import annotations

import pytest
import torch
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
