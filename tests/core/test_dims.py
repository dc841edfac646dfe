"""Model shapes come from the safetensors headers over HTTP range requests (or config.json for .bin weights).

A fake Hugging Face hub on loopback serves real checkpoints whose weight files are ~50 MB and
counts the bytes it sends: the shapes must match the local files' while the weights stay on
the server. Each read runs in a fresh interpreter, so huggingface_hub reads the endpoint, the
cache and offline mode from the environment as it would for a user.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNREACHABLE_HUB = "http://127.0.0.1:9"  # the discard port: refused at once, whatever network the machine has
COMMIT = "0" * 40
HEADER_BUDGET = 1_000_000  # bytes of weight files a read may fetch; each weight file here is ~50 MB
WEIGHT_SUFFIXES = (".safetensors", ".bin")


class FakeHub:
    """``/{org}/{name}/resolve/{revision}/{file}`` for the repos under ``root`` (HEAD, GET, Range)."""

    def __init__(self, root: Path):
        self.root = root
        self.sent: Counter[str] = Counter()  # body bytes per "org/name/file"
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self):
                hub.answer(self, body=False)

            def do_GET(self):
                hub.answer(self, body=True)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, request: BaseHTTPRequestHandler, body: bool) -> None:
        parts = request.path.split("?")[0].strip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":  # e.g. huggingface_hub's agent-harness registry (telemetry)
            return self.error(request, 404, "")
        repo, filename = "/".join(parts[:2]), "/".join(parts[4:])
        if not (self.root / repo).is_dir():
            return self.error(request, 404, "RepoNotFound")
        path = self.root / repo / filename
        if not path.is_file():
            return self.error(request, 404, "EntryNotFound")
        size = path.stat().st_size
        start, end, status = 0, size - 1, 200
        if (ranged := request.headers.get("Range")) is not None:
            first, _, last = ranged.removeprefix("bytes=").partition("-")
            start, end, status = int(first), min(int(last or size - 1), size - 1), 206
        request.send_response(status)
        request.send_header("X-Repo-Commit", COMMIT)
        request.send_header("ETag", f'"{hashlib.sha1(f"{repo}/{filename}/{size}".encode()).hexdigest()}"')
        request.send_header("Content-Length", str(end - start + 1))
        request.send_header("Accept-Ranges", "bytes")
        if status == 206:
            request.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        request.end_headers()
        if body:
            with path.open("rb") as handle:
                handle.seek(start)
                request.wfile.write(handle.read(end - start + 1))
            self.sent[f"{repo}/{filename}"] += end - start + 1

    @staticmethod
    def error(request: BaseHTTPRequestHandler, status: int, code: str) -> None:
        request.send_response(status)
        if code:
            request.send_header("X-Error-Code", code)
        request.send_header("Content-Length", "0")
        request.end_headers()

    def weight_bytes_sent(self, repo: str) -> int:
        return sum(count for name, count in self.sent.items()
                   if name.startswith(f"{repo}/") and name.endswith(WEIGHT_SUFFIXES))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    """``org/{single,sharded,bin,vision,config-only,unknown-type}``: a GPT-2 whose 100k-word embedding makes ~50 MB of
    weights, saved as one safetensors file, as 20 MB shards and as pytorch_model.bin; a tiny CLIP vision tower; a
    config alone; .bin weights of a model_type transformers does not know."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from qstudy.model.tiny import VISION_TOWERS

    root = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=100_000, n_positions=64, n_embd=128, n_layer=2, n_head=4))
    lm.save_pretrained(root / "org" / "single")
    lm.save_pretrained(root / "org" / "sharded", max_shard_size="20MB")
    lm.config.save_pretrained(root / "org" / "bin")
    torch.save(lm.state_dict(), root / "org" / "bin" / "pytorch_model.bin")
    lm.config.save_pretrained(root / "org" / "config-only")
    (root / "org" / "unknown-type").mkdir()
    (root / "org" / "unknown-type" / "config.json").write_text('{"model_type": "no-such-type"}')
    (root / "org" / "unknown-type" / "pytorch_model.bin").write_bytes(b"weights of a model transformers cannot build")
    VISION_TOWERS["clip"](32).save_pretrained(root / "org" / "vision")
    return root


@pytest.fixture
def hub(checkpoints):
    server = FakeHub(checkpoints)
    yield server
    server.close()


def read_in_fresh_process(call: str, tmp_path: Path, **env: str) -> dict:
    """Run ``call`` (an expression over qstudy.core.dims) in a new interpreter; its result, error and torch use."""
    script = f"""
import json, sys
from qstudy.core import dims
from qstudy.core.errors import ConfigError
try:
    result, error = {call}, None
except Exception as exc:
    result = None
    error = {{"type": type(exc).__name__, "message": str(exc), "config_error": isinstance(exc, ConfigError)}}
if isinstance(result, dims.ModelDims):
    result = {{**result.__dict__, "total_params": result.total_params}}
print(json.dumps({{"result": result, "error": error, "torch": "torch" in sys.modules}}))
"""
    environment = {**os.environ, "PYTHONPATH": str(REPO / "platform"), "HF_HOME": str(tmp_path / "hf-home"),
                   "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "OMP_NUM_THREADS": "1", **env}
    for inherited in ("HF_TOKEN", "HF_HUB_CACHE"):
        environment.pop(inherited, None)
    done = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True,
                          timeout=300, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def as_shapes(result: dict) -> dict[str, tuple[int, ...]]:
    return {key: tuple(shape) for key, shape in result.items()}


HUB_CHECKPOINTS = ["org/single", "org/sharded", "org/bin"]


@pytest.mark.parametrize("repo", HUB_CHECKPOINTS)
def test_hub_shapes_come_without_the_weights(hub, checkpoints, tmp_path, repo):
    from qstudy.core.dims import read_weight_shapes

    weights = [path for path in (checkpoints / repo).iterdir() if path.name.endswith(WEIGHT_SUFFIXES)]
    assert sum(path.stat().st_size for path in weights) > 50 * HEADER_BUDGET
    read = read_in_fresh_process(f"dims.read_weight_shapes({repo!r})", tmp_path, HF_ENDPOINT=hub.endpoint)
    assert read["error"] is None, read["error"]
    assert as_shapes(read["result"]) == read_weight_shapes(str(checkpoints / "org" / "single"))
    assert hub.weight_bytes_sent(repo) < HEADER_BUDGET, hub.sent
    assert not read["torch"]  # even the .bin checkpoint's model is built in a child interpreter


def test_model_dims_from_the_hub_are_those_from_local_directories(hub, checkpoints, tmp_path):
    from qstudy.core.dims import ModelDims

    read = read_in_fresh_process('dims.ModelDims.from_pretrained("org/vision", "org/sharded", 4, 2, 16)', tmp_path,
                                 HF_ENDPOINT=hub.endpoint)
    local = ModelDims.from_pretrained(str(checkpoints / "org" / "vision"), str(checkpoints / "org" / "single"), 4,
                                      frame_grid=2, temporal_merger_rank=16)
    assert read["error"] is None, read["error"]
    shapes = {field: as_shapes(read["result"].pop(field)) for field in ("vision_shapes", "lm_shapes")}
    assert (shapes["vision_shapes"], shapes["lm_shapes"]) == (local.vision_shapes, local.lm_shapes)
    assert read["result"] == {**{k: v for k, v in local.__dict__.items() if not k.endswith("_shapes")},
                              "total_params": local.total_params}
    assert not read["torch"]


@pytest.mark.parametrize("repo", ["org/single", "org/sharded"])
def test_a_cached_model_is_read_offline(hub, checkpoints, tmp_path, repo):
    """Every file of the repo in huggingface_hub's cache (as a snapshot leaves it, with no record of what the repo
    lacks), the hub out of reach: the shapes come from the cache."""
    from qstudy.core.dims import read_weight_shapes

    files = sorted(path.name for path in (checkpoints / repo).iterdir())
    fetch = f"[__import__('huggingface_hub').hf_hub_download({repo!r}, name) for name in {files!r}]"
    assert read_in_fresh_process(fetch, tmp_path, HF_ENDPOINT=hub.endpoint)["error"] is None
    read = read_in_fresh_process(f"dims.read_weight_shapes({repo!r})", tmp_path, HF_HUB_OFFLINE="1",
                                 HF_ENDPOINT=UNREACHABLE_HUB)
    assert read["error"] is None, read["error"]
    assert as_shapes(read["result"]) == read_weight_shapes(str(checkpoints / "org" / "single"))


# (vision encoder, language model, environment, what the one-line error must say)
BAD_MODELS = {
    "unknown repo": ("org/vision", "org/no-such-model", {},
                     ["model.language_model", "org/no-such-model", "no such model on the hub"]),
    "no weights": ("org/config-only", "org/single", {}, ["model.vision_encoder", "org/config-only", "no weights"]),
    "unknown model type": ("org/vision", "org/unknown-type", {},
                           ["model.language_model", "org/unknown-type", "no model_type 'no-such-type'"]),
    "unreachable hub": ("org/vision", "org/single", {"HF_ENDPOINT": UNREACHABLE_HUB},
                        ["model.vision_encoder", "org/vision", "cannot be reached"]),
    "offline, not cached": ("org/vision", "org/single", {"HF_HUB_OFFLINE": "1"},
                            ["model.vision_encoder", "org/vision", "HF_HUB_OFFLINE is set"]),
}


@pytest.mark.parametrize("case", BAD_MODELS)
def test_a_model_that_cannot_be_read_is_a_config_error_naming_the_field(hub, tmp_path, case):
    vision, lm, env, expected = BAD_MODELS[case]
    read = read_in_fresh_process(f"dims.ModelDims.from_pretrained({vision!r}, {lm!r}, 4)", tmp_path,
                                 **{"HF_ENDPOINT": hub.endpoint, **env})
    error = read["error"]
    assert error is not None and error["config_error"] and "\n" not in error["message"], error
    assert all(part in error["message"] for part in expected), error["message"]
    assert error["message"].startswith(expected[0])
    assert hub.weight_bytes_sent(lm) == 0
