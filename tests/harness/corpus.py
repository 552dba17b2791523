"""Public DICOM sample files that nobody on this project wrote, by collection.

The collections are the test data shipped with installed packages (and a Debian package), so the
engine meets files from many vendors, transfer syntaxes and eras, plus the deliberately broken
ones (truncated, no meta, bad VR, not DICOM at all) that it must quarantine:

- ``pydicom``: every file under ``pydicom/data/test_files`` of the installed pydicom, recursively;
- ``pydicom-data``: ``data_store/data`` of the installed ``pydicom-data`` distribution;
- ``deid-data``: ``deid_data/data`` of the installed ``deid-data`` distribution, recursively;
- ``dicom3tools``: ``/usr/share/doc/dicom3tools/examples/*.dcm`` (Debian ``dicom3tools``);
- ``nibabel``: the DICOM files (``*.dcm``, ``*.dcm.gz``, unpacked on copy) of
  ``nibabel/nicom/tests/data`` in the installed nibabel: Siemens objects with CSA private
  headers, a Philips enhanced MR, and files with odd values that broke nibabel once.

Everything is kept except Python files, ``__pycache__``, README/markdown and LICENSE files: a
``.json``, ``.dump``, ``.gz`` or ``.zip`` beside the images is input the engine must refuse. A
collection whose package is not installed is absent from the result.
"""

from __future__ import annotations

import gzip
import importlib.util
import shutil
from pathlib import Path

import pydicom

__all__ = ["DICOM3TOOLS_EXAMPLES", "collections", "copy_corpus"]

DICOM3TOOLS_EXAMPLES = Path("/usr/share/doc/dicom3tools/examples")

_SKIPPED_SUFFIXES = frozenset({".py", ".pyc", ".pyo", ".md"})


def _kept(path: Path) -> bool:
    name = path.name.casefold()
    if "__pycache__" in path.parts or path.suffix.casefold() in _SKIPPED_SUFFIXES:
        return False
    return not name.startswith(("readme", "license", "licence"))


def _files(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.rglob("*") if p.is_file() and _kept(p.relative_to(root)))


def _package_dir(package: str) -> Path | None:
    """The folder of an importable package, without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _roots() -> dict[str, Path]:
    roots = {"pydicom": Path(pydicom.__file__).parent / "data" / "test_files"}
    for name, package in (("pydicom-data", "data_store"), ("deid-data", "deid_data")):
        folder = _package_dir(package)
        if folder is not None:
            roots[name] = folder / "data"
    nibabel = _package_dir("nibabel")
    if nibabel is not None:
        roots["nibabel"] = nibabel / "nicom" / "tests" / "data"
    return roots


def _dicom_only(files: list[Path]) -> list[Path]:
    return [p for p in files if p.name.casefold().endswith((".dcm", ".dcm.gz"))]


def collections() -> dict[str, list[Path]]:
    """The sample files of every available collection, by collection name, in a stable order."""
    found = {name: _files(root) for name, root in _roots().items()}
    if "nibabel" in found:  # beside CSA and text fixtures that are not DICOM files
        found["nibabel"] = _dicom_only(found["nibabel"])
    if DICOM3TOOLS_EXAMPLES.is_dir():
        found["dicom3tools"] = sorted(p for p in DICOM3TOOLS_EXAMPLES.glob("*.dcm") if p.is_file())
    return {name: files for name, files in found.items() if files}


def copy_corpus(dest: Path) -> dict[str, list[Path]]:
    """Copy every collection to ``dest/<collection>/<path inside the collection>``.

    Returns the copies by collection, in the order of :func:`collections`.
    """
    roots = _roots()
    roots["dicom3tools"] = DICOM3TOOLS_EXAMPLES
    copied: dict[str, list[Path]] = {}
    for name, files in collections().items():
        copied[name] = []
        for source in files:
            target = dest / name / source.relative_to(roots[name])
            target.parent.mkdir(parents=True, exist_ok=True)
            if name == "nibabel" and source.suffix == ".gz":
                target = target.with_suffix("")  # x.dcm.gz -> x.dcm, unpacked
                target.write_bytes(gzip.decompress(source.read_bytes()))
            else:
                shutil.copyfile(source, target)
            copied[name].append(target)
    return copied
