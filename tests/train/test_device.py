"""The device a process computes on, and the inputs that follow the model there.

A captioner on ``meta`` fails on any CPU tensor that reaches it.

No GPU is needed: ``meta`` is a second device every CPU build has, and mixing it with a CPU
tensor raises as mixing CPU and CUDA does. Every registered method is checked, and each of
Q-Adapter's placements and new gates on all four backbone pairs, because an
adapter that makes a tensor without a device breaks only there.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from qstudy.methods import ADAPTERS, adapter_config_from_mapping
from qstudy.methods.inject import apply_adapter
from qstudy.config import DataConfig, TrainConfig
from qstudy.data.annotations import Clip
from qstudy.data.synthetic import caption_vocabulary
from qstudy.model.captioner import Captioner
from qstudy.model.tiny import build_tiny
from qstudy.train.device import peak_rss_mb, reset_peak_rss, worker_device
from qstudy.train.engine import Engine
from qstudy.train.recipe import SplitData, train_epoch

NUM_FRAMES = 2
CAPTIONS = ["a red circle moves left", "a blue square moves up"]


# (vision family, LM family): the random tiny towers of tests/conftest.py's ``tiny_random_base``, then the others.
PAIRS = [("clip", "gpt2"), ("clip", "qwen2"), ("siglip", "gpt2"), ("siglip", "qwen2")]
# Each of Q-Adapter's placements and of the gates added with them (their modules make tensors of their own);
# the token gate is one module whatever the placement.
QADAPTER_READINGS = {
    "side-token-queries_to_lm": {"method": "qadapter", "gating": "token", "queries_to_lm": True},
    "gated_attention-per_head": {"method": "qadapter", "placement": "gated_attention", "gating": "per_head"},
    "sequence-vpt": {"method": "qadapter", "placement": "sequence"},
    "sequence-vqt": {"method": "qadapter", "placement": "sequence", "sequence_mode": "vqt", "queries_to_lm": True},
}
# Every method's defaults on the first pair; every Q-Adapter reading on every pair.
CASES = {**{f"clip-gpt2-{method}": (PAIRS[0], {"method": method}) for method in sorted(ADAPTERS)},
         **{f"{'-'.join(pair)}-qadapter-{name}": (pair, adapter)
            for pair in PAIRS for name, adapter in QADAPTER_READINGS.items()}}


@pytest.fixture(scope="module")
def random_base(tiny_random_base, tmp_path_factory):
    """The random tiny towers of a (vision, LM) pair, built the first time a case asks for them."""
    built = {PAIRS[0]: tiny_random_base}

    def of(pair: tuple[str, str]):
        if pair not in built:
            towers = build_tiny(tmp_path_factory.mktemp("-".join(pair)), caption_vocabulary(), vision=pair[0], lm=pair[1])
            built[pair] = replace(towers, temporal_merger_rank=tiny_random_base.temporal_merger_rank)
        return built[pair]

    return of


def meta_captioner(base, adapter: dict) -> tuple[Captioner, list[torch.nn.Parameter]]:
    torch.manual_seed(0)
    captioner = Captioner.from_pretrained(base, NUM_FRAMES)
    apply_adapter(captioner, adapter_config_from_mapping(adapter))
    captioner.to("meta")  # new Parameter objects: a CPU tensor cannot take meta data in place
    return captioner, [p for p in captioner.parameters() if p.requires_grad]


def cpu_frames(captioner: Captioner, batch: int) -> torch.Tensor:
    size = captioner.image_size
    return torch.randint(0, 256, (batch, NUM_FRAMES, size, size, 3), dtype=torch.uint8)


@pytest.mark.parametrize(("pair", "adapter"), list(CASES.values()), ids=list(CASES))
def test_forward_backward_and_generate_run_on_the_models_device(random_base, pair, adapter, monkeypatch):
    captioner, trainable = meta_captioner(random_base(pair), adapter)
    loss = captioner(cpu_frames(captioner, 2), *captioner.tokenize(CAPTIONS))
    assert loss.device.type == "meta"
    loss.backward()
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in trainable)

    # Decoding itself needs values (it stops at EOS); what matters is what reaches the LM.
    seen = {}

    def fake_generate(**inputs):
        seen.update(inputs)
        return torch.zeros(inputs["inputs_embeds"].shape[0], 3, dtype=torch.long)

    monkeypatch.setattr(captioner.lm, "generate", fake_generate)
    assert len(captioner.generate(cpu_frames(captioner, 3), max_new_tokens=3)) == 3
    assert {seen[key].device.type for key in ("inputs_embeds", "attention_mask")} == {"meta"}


def test_the_recipes_batches_reach_the_models_device(tiny_random_base, monkeypatch):
    captioner, trainable = meta_captioner(tiny_random_base, {"method": "qadapter"})
    config = TrainConfig(batch_size=2, epochs=1)
    engine = Engine(captioner, trainable, config, total_steps=3)
    clips = [Clip(f"clip{i}", Path(f"clip{i}.mp4"), tuple(CAPTIONS)) for i in range(3)]
    split = SplitData(clips, cpu_frames(captioner, len(clips)), [])
    item = torch.Tensor.item
    # The recipe logs loss values; a meta tensor has none, so it reads as zero here.
    monkeypatch.setattr(torch.Tensor, "item", lambda t: 0.0 if t.device.type == "meta" else item(t))
    run_config = SimpleNamespace(data=DataConfig(annotations="-", video_dir="-"), train=config)  # what train_epoch reads

    assert train_epoch(engine, captioner, split, run_config, epoch=0) == 0.0
    assert all(p.device.type == "meta" for p in trainable)


@pytest.mark.parametrize(("cuda", "expected"), [(False, "cpu"), (True, "cuda:1")])
def test_a_process_outside_ray_computes_on_its_local_rank_gpu_or_the_cpu(cuda, expected, monkeypatch):
    """torchrun's second rank on a GPU box: where DeepSpeed puts that rank's model too."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert worker_device() == torch.device(expected)


def test_a_ray_task_holding_a_gpu_computes_on_it():
    """What an in-actor trial with ``use_gpu`` gets: Ray's GPU, not the CPU (Ray pretends to have two here)."""
    script = textwrap.dedent("""
        import ray
        from qstudy.train.device import peak_rss_mb, reset_peak_rss, worker_device

        ray.init(num_cpus=1, num_gpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
        device = ray.remote(worker_device)
        print(ray.get(device.options(num_cpus=0.5, num_gpus=1).remote()), ray.get(device.options(num_cpus=0.5).remote()))
    """)
    with tempfile.TemporaryDirectory(prefix="qsdev", dir="/tmp") as ray_tmp:  # Ray's socket paths must stay short
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_AUTH_MODE": "token",
                                   "RAY_AUTH_TOKEN": secrets.token_hex(16)})  # Ray listens beyond loopback
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-2:] == ["cuda:0", "cpu"]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="the peak is reset through Linux's procfs")
def test_the_peak_resident_memory_starts_over_when_reset():
    """A reused Ray actor ran other trials before: a run's peak must be its own (train/recipe.py resets it)."""
    reset_peak_rss()
    before = peak_rss_mb()
    block = b"\x01" * (256 * 2**20)  # written, so resident
    assert peak_rss_mb() >= before + 200
    del block
    assert peak_rss_mb() >= before + 200  # a peak, not the present size
    reset_peak_rss()
    assert peak_rss_mb() < before + 100
