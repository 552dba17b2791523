"""The limited vocabulary (white lists) for descriptors under the Clean Descriptors option.

File format, as the original pipeline's ``dicom_limited_vocabulary.json``:
``{"gggg,eeee": ["allowed value", ...]}``. A value is kept verbatim when it equals an allowed
value after :func:`normalise`; anything else gets the attribute's removing action.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from anonpipe.anon.values import values_of

_DROPPED = re.compile(r"[-_,.]")
_SPACES = re.compile(r"\s+")
_TAG = re.compile(r"^([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})$")


def normalise(value: str) -> str:
    """Lower case, strip, drop ``- _ , .`` and collapse spaces (the original's rule)."""
    return _SPACES.sub(" ", _DROPPED.sub("", value.lower())).strip()


@dataclass(frozen=True)
class Vocabulary:
    """Allowed values per tag, normalised."""

    allowed: Mapping[int, frozenset[str]] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Sequence[str]]) -> Vocabulary:
        """Build from the JSON shape; ValueError names what is malformed (never a value)."""
        if not isinstance(data, Mapping):
            raise ValueError("top level is not an object")
        allowed: dict[int, frozenset[str]] = {}
        for key, values in data.items():
            found = _TAG.match(key.strip())
            if found is None:
                raise ValueError(f"key {key!r} is not a tag")
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                raise ValueError(f"entry {key!r} is not an array of strings")
            tag = int(found.group(1) + found.group(2), 16)
            allowed[tag] = frozenset(normalise(str(v)) for v in values)
        return cls(allowed)

    @classmethod
    def load(cls, path: Path | None) -> Vocabulary:
        """Read a vocabulary file; None gives the empty vocabulary (nothing is kept)."""
        if path is None:
            return cls()
        return cls.from_mapping(json.loads(path.read_text(encoding="utf-8")))

    def allows(self, tag: int, value: object) -> bool:
        """Whether every value of a (possibly multi-valued) element is on the white list."""
        words = self.allowed.get(tag)
        if not words:
            return False
        values = values_of(value)
        return bool(values) and all(normalise(str(v)) in words for v in values)
