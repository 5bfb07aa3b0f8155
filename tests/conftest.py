"""Shared fixtures: tiny random Llama / Mistral / Qwen2 checkpoints with a tiny tokenizer, on CPU."""

from __future__ import annotations

import os
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

from tests.helpers import make_source  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_cache(request, tmp_path_factory, monkeypatch):
    """Fast tests never touch the user's asset cache; slow tests share it (the real model is fetched once)."""
    if request.node.get_closest_marker("slow") is None:
        monkeypatch.setenv("ECOMLA_CACHE", str(tmp_path_factory.getbasetemp() / "ecomla-cache"))


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps one state (and mixed precision) per process; tests that train with several precisions in
    one pytest process each leave it clean, as accelerate's own test suite does."""
    yield
    if "accelerate.state" in sys.modules:
        sys.modules["accelerate.state"].AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    return make_source("llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory):
    return make_source("qwen2", tmp_path_factory.mktemp("qwen2"))


@pytest.fixture(scope="session")
def mistral_dir(tmp_path_factory):
    return make_source("mistral", tmp_path_factory.mktemp("mistral"))
