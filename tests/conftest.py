"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BACH = REPO.parent / "shared" / "data" / "bach_midi"


@pytest.fixture(scope="session")
def bach_dir() -> Path:
    """The 201-file Bach corpus, which lives in ../shared beside the checkout (never copied in)."""
    if not BACH.is_dir():
        pytest.skip(f"corpus not found at {BACH}: these tests need ../shared beside the checkout")
    return BACH
