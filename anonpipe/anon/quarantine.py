"""Which files must never leave: the quarantine rules, read from data.

The rules live in ``quarantine_rules.json`` (defaults as the original pipeline's); a site may pass
its own list. Each rule looks at one attribute of the *identified* input and names the reason an
operator reads in ``anonymize_output.txt``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Literal

from pydicom.dataset import Dataset

from anonpipe.anon.values import values_of

Match = Literal["contains", "equals", "not_in", "absent"]
_MATCHES: tuple[Match, ...] = ("contains", "equals", "not_in", "absent")
ALLOWED_MODALITIES = "$allowed_modalities"
#: In ``allowed_modalities``: every modality is allowed (a ``not_in`` rule with it never matches).
ANY = "*"

#: Reason of the rule that finds "Patient Protocol" series (the run's protocol lists use it).
PROTOCOL_REASON = "patient protocol series"


@dataclass(frozen=True, slots=True)
class QuarantineRule:
    """Quarantine when attribute `keyword` `match`es `values` (case-insensitive).

    ``contains``: any value of the attribute contains any of `values`; ``equals``: any value
    equals one of them; ``not_in``: some value is not among them (``*`` among them: never);
    ``absent``: the attribute is missing or empty (list it before a ``not_in`` rule on the same
    attribute, so the reason says what is wrong).
    """

    reason: str
    keyword: str
    match: Match
    values: tuple[str, ...]

    def matches(self, dataset: Dataset) -> bool:
        """Whether `dataset` (the identified input) falls under this rule."""
        texts = _texts(dataset.get(self.keyword))
        wanted = tuple(v.casefold() for v in self.values)
        if self.match == "absent":
            return not texts
        if self.match == "not_in":
            if ANY in wanted:
                return False
            return not texts or any(text not in wanted for text in texts)
        if self.match == "equals":
            return any(text in wanted for text in texts)
        return any(w in text for text in texts for w in wanted)


def _texts(value: Any) -> list[str]:
    return [str(v).strip().casefold() for v in values_of(value) if str(v).strip()]


@cache
def _default_rule_data() -> tuple[dict[str, Any], ...]:
    text = resources.files("anonpipe.anon").joinpath("quarantine_rules.json").read_text()
    return tuple(json.loads(text)["rules"])


def load_rules(
    allowed_modalities: Iterable[str], data: Sequence[dict[str, Any]] | None = None
) -> tuple[QuarantineRule, ...]:
    """Build the rules from `data` (default: the shipped ``quarantine_rules.json``).

    Raises
    ------
    ValueError
        When a rule has an unknown ``match`` or lacks a field.
    """
    rules = []
    for index, entry in enumerate(_default_rule_data() if data is None else data):
        match = entry.get("match")
        if match not in _MATCHES:
            raise ValueError(f"quarantine rule {index}: match must be one of {', '.join(_MATCHES)}")
        values = entry.get("values")
        chosen = tuple(allowed_modalities) if values == ALLOWED_MODALITIES else tuple(values or ())
        rules.append(QuarantineRule(str(entry["reason"]), str(entry["keyword"]), match, chosen))
    return tuple(rules)


def quarantine_reason(dataset: Dataset, rules: Iterable[QuarantineRule]) -> str | None:
    """The reason of the first rule `dataset` matches, or None when it may go on."""
    for rule in rules:
        if rule.matches(dataset):
            return rule.reason
    return None
