"""Shared test fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real cases in ../shared/data; tests that need them skip when absent."""
    if not (SHARED_DATA / "cases.json").is_file():
        pytest.skip(f"real data not found at {SHARED_DATA} (../shared/data beside the repository)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def cases(shared_data: Path) -> list[dict]:
    return json.loads((shared_data / "cases.json").read_text(encoding="utf-8"))


@pytest.fixture(autouse=True)
def _isolated_model_cache(tmp_path_factory, monkeypatch):
    """Never touch the user's checkpoint cache from tests."""
    monkeypatch.setenv("SAM3D_CACHE_DIR", str(tmp_path_factory.mktemp("sam3d-cache")))
