"""Fixtures of the reliability tests: one small bundle and one set of phantom studies."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from harness import Study, synth

from bundles import random_bundle


@pytest.fixture(scope="session")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> list[Study]:
    """80 synthetic dual-phase MIBI studies (160 NM instances), the same on every run."""
    return synth(tmp_path_factory.mktemp("phantoms"), 80, seed=8)


@pytest.fixture
def dcmtk(require_tool: Callable[[str], str]) -> None:
    """Skip (with the reason) when the DCMTK peers are not installed."""
    for tool in ("storescu", "storescp", "echoscu"):
        require_tool(tool)
