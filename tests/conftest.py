"""Shared fixtures: a tiny random Qwen3-MoE built from config, and the trained micro model from shared/."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "examples" / "assets"
SHARED = Path(os.environ.get("MOE_FX_SHARED", REPO.parent / "shared"))


def _first_existing(*paths: Path) -> Path:
    for p in paths:
        if p.exists():
            return p
    pytest.skip(f"none of {paths} exists")


@pytest.fixture(scope="session")
def micro_path() -> Path:
    """The trained 2-layer, 8-expert Qwen3-MoE (shared/models/qwen3moe-micro, or the copy shipped in examples/)."""
    return _first_existing(SHARED / "models" / "qwen3moe-micro", ASSETS / "qwen3moe-micro")


@pytest.fixture(scope="session")
def calib_path() -> Path:
    return _first_existing(ASSETS / "calib.jsonl.gz", SHARED / "data" / "corpus" / "train.jsonl.gz")


@pytest.fixture(scope="session")
def valid_path() -> Path:
    return _first_existing(ASSETS / "valid.jsonl.gz", SHARED / "data" / "corpus" / "valid.jsonl.gz")


def tiny_qwen3(num_experts: int = 8, top_k: int = 2, norm: bool = True, seed: int = 0):
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    cfg = Qwen3MoeConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=num_experts,
        num_experts_per_tok=top_k, norm_topk_prob=norm, max_position_embeddings=128, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture
def tiny_model():
    return tiny_qwen3()


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(2, 128, (4, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def once(tmp_path_factory) -> Callable:
    """``once(key, build)``: ``build(directory)`` the first time ``key`` is asked for in the session (a fresh
    directory each key), its result every time. For expensive setups (ONNX exports: seconds each) that several
    tests check from different angles; what it returns is shared, so tests read it and never modify it."""
    done: dict[str, object] = {}

    def get(key: str, build: Callable[[Path], object]) -> object:
        if key not in done:
            done[key] = build(tmp_path_factory.mktemp(re.sub(r"\W+", "_", key)))
        return done[key]

    return get


SCHEDULED_TOGETHER = ("test_onnx",)
"""Under ``--dist loadfile`` (scripts/test.sh) the test files whose names start with one of these run in one worker,
as one unit: they share :func:`once`'s exports (onnx_cases.py), which each worker would otherwise build again."""

SCHEDULED_FIRST = ("test_onnx", "test_graph_backend.py", "test_examples.py", "test_presets.py", "test_recipes.py",
                   "test_quantized_kernels_interpreted.py", "test_distributed.py", "test_sibling_linears.py", "test_cli.py")
"""The slowest units (minutes each on 2 CPU cores), longest first, handed out before the rest (otherwise ordered by
their number of tests): a unit of one long test started last would leave the other worker idle at the end."""


@pytest.hookimpl(optionalhook=True)  # an xdist hook: the suite also runs without xdist
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile`` by file, but :data:`SCHEDULED_TOGETHER`'s files as one unit and :data:`SCHEDULED_FIRST`
    first; any other distribution is xdist's own."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class Scheduling(LoadFileScheduling):
        ordered = False

        def _split_scope(self, nodeid: str) -> str:
            path = super()._split_scope(nodeid)
            name = Path(path).name
            return next((str(Path(path).parent / prefix) for prefix in SCHEDULED_TOGETHER if name.startswith(prefix)), path)

        def _assign_work_unit(self, node) -> None:
            queue = getattr(self, "workqueue", None)  # xdist internals: without them, its own order
            if not self.ordered and hasattr(queue, "move_to_end"):  # the first call, once the queue holds every unit
                self.ordered = True
                for first in reversed(SCHEDULED_FIRST):
                    for scope in [s for s in queue if Path(s).name == first]:
                        queue.move_to_end(scope, last=False)
            super()._assign_work_unit(node)

    try:
        return Scheduling(config, log)
    except TypeError:  # another xdist's constructor: its own scheduling
        return None


INTERPRETER_TRITON = (3, 9)
"""Oldest Triton whose interpreter runs the kernels here: older ones turn a scalar argument into a one-element
array that numpy 2 refuses as a loop bound (``only 0-dimensional arrays can be converted``; Triton 3.6, on the GPU
machine's torch 2.11)."""


NO_INTERPRETER = "no Triton 3.9+ for its interpreter (scripts/test.sh installs one beside the venv)"
"""The skip reason of tests that need :func:`interpreter_env`."""


def interpreter_env() -> dict[str, str] | None:
    """The environment of a subprocess that runs the Triton kernels in Triton's interpreter (``TRITON_INTERPRET=1``,
    which must be set before Triton is imported), or ``None`` where no usable Triton is found: the one
    ``scripts/test.sh`` installs beside the venv (``MOE_FX_TRITON_PATH``), else the one installed here (CUDA builds
    of torch ship it) if it is at least :data:`INTERPRETER_TRITON`, so that the CPU suite itself keeps running
    without Triton."""
    import importlib.metadata
    import importlib.util

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    extra = os.environ.get("MOE_FX_TRITON_PATH", "")
    if extra and (Path(extra) / "triton" / "__init__.py").is_file():
        return {**env, "PYTHONPATH": os.pathsep.join(filter(None, [extra, os.environ.get("PYTHONPATH", "")]))}
    if importlib.util.find_spec("triton") is not None:
        version = tuple(int(p) for p in re.findall(r"\d+", importlib.metadata.version("triton"))[:2])
        return env if version >= INTERPRETER_TRITON else None
    return None
