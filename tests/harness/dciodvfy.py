"""David Clunie's ``dciodvfy`` (Debian ``dicom3tools``) as an independent validator of DICOM files.

``dciodvfy -new`` checks a file against the IODs of the standard it was built with and prints
one line per finding in the new message format (``Error - </path(gggg,eeee)> - message ...``),
which carries no file name, so the findings of an input and its de-identified output compare
line by line. Only errors count here; warnings are advice.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

__all__ = ["TIMEOUT", "DciodvfyError", "available", "errors"]

TOOL = "dciodvfy"
TIMEOUT = 60.0


class DciodvfyError(RuntimeError):
    """dciodvfy could not be run or did not finish in time."""


def available() -> bool:
    """Whether ``dciodvfy`` is on the PATH."""
    return shutil.which(TOOL) is not None


def errors(path: Path, timeout: float = TIMEOUT) -> list[str]:
    """The ``Error`` lines ``dciodvfy -new`` prints for `path`, in order, each stripped.

    Lines that do not start with ``Error`` (warnings, the IOD name) are dropped. A prefix
    naming the file (``-filename`` is not passed, but a message may start with the path) is
    removed so that lines of different files compare.

    Raises
    ------
    DciodvfyError
        When the tool is missing or times out.
    """
    executable = shutil.which(TOOL)
    if executable is None:
        raise DciodvfyError(f"{TOOL} not found on PATH")
    try:
        result = subprocess.run(
            [executable, "-new", str(path)],
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise DciodvfyError(f"{TOOL} timed out after {timeout} s on {path}") from exc
    text = (result.stdout + result.stderr).decode("utf-8", "replace")
    found: list[str] = []
    for line in text.splitlines():
        line = line.strip().removeprefix(f"{path}:").removeprefix(str(path)).strip()
        if line.startswith("Error"):
            found.append(line)
    return found
