"""anonpipe: a resident DICOM service that de-identifies reviewed studies for research.

See README.md for the commands and ``../shared/design/ARCHITECTURE.md`` for the contracts.
"""

#: The one place the version is written (pyproject.toml reads it from here): a constant, not
#: ``importlib.metadata.version``, which cost every command ~20 ms of start-up.
__version__ = "0.1.0"

__all__ = ["__version__"]
