"""Fixtures of the web tests."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A folder with a short path for Unix sockets (tmp_path may exceed 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="ap-", dir="/tmp"))
    yield path
    for child in path.iterdir():
        child.unlink(missing_ok=True)
    path.rmdir()
