"""Reading a few header elements of a DICOM file: the SCP (landing), the push, the hooks and the
helper commands all read UIDs or descriptions this one way.

Only the header is read (never pixel data), and only the elements asked for. A file that is not
readable DICOM gives None: each caller decides (refuse, fail, count). pydicom's warnings about
odd values are silenced while reading, because their text may quote the values (patient data).
"""

from __future__ import annotations

import struct
import warnings
from collections.abc import Sequence
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

__all__ = ["UNREADABLE_ERRORS", "read_header", "text_value"]

#: What pydicom raises for a file it cannot read as DICOM (or the operating system for a file it
#: cannot read at all).
UNREADABLE_ERRORS: tuple[type[Exception], ...] = (
    InvalidDicomError,
    OSError,
    EOFError,
    struct.error,
    TypeError,
    KeyError,
    ValueError,
    AttributeError,
    IndexError,
    NotImplementedError,
)


def read_header(path: Path, keywords: Sequence[str]) -> Dataset | None:
    """The header elements `keywords` of the DICOM file `path`, or None if it is unreadable.

    Parameters
    ----------
    path : Path
        A file; read with ``stop_before_pixels`` and ``specific_tags``.
    keywords : sequence of str
        DICOM keywords (``"StudyInstanceUID"``, ``"PatientName"``, ...).

    Returns
    -------
    Dataset or None
        The dataset holding those of `keywords` the file has; None when the file is not DICOM
        (no ``DICM`` preamble), is truncated or malformed in its header, or cannot be opened.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dataset = dcmread(path, stop_before_pixels=True, specific_tags=list(keywords))
            # pydicom parses values lazily: convert them here, where errors are caught.
            for keyword in keywords:
                dataset.get(keyword)
    except UNREADABLE_ERRORS:
        return None
    return dataset


def text_value(dataset: Dataset, keyword: str) -> str | None:
    """The value of element `keyword` as text, or None if the dataset lacks it.

    Multiple values are joined with a backslash (as in DICOM); padding (spaces, NUL) is removed
    from both ends, so an empty or blank value is ``""``.
    """
    if keyword not in dataset:
        return None
    value = dataset.get(keyword)
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        text = "\\".join(str(item) for item in value)
    else:
        text = str(value)
    return text.strip("\0 ")
