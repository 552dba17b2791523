"""anonpipe: a resident DICOM service that de-identifies reviewed studies for research.

See README.md for the commands and ``../shared/design/ARCHITECTURE.md`` for the contracts.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("anonpipe")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
