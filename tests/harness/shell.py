"""Commands run as an operator types them: in bash with ``pipefail``, the venv's scripts first
on ``PATH`` (so ``anonpipectl status | head -1`` fails if anonpipectl does)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

__all__ = ["BIN", "shell"]

#: The folder of this interpreter's scripts (``anonpipe``, ``anonpipectl``).
BIN = Path(sys.executable).parent


def shell(command: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run *command* in ``bash -o pipefail`` in *cwd*; its output captured as text."""
    env = dict(os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '')}")
    return subprocess.run(
        ["bash", "-o", "pipefail", "-c", command],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
        check=False,
    )
