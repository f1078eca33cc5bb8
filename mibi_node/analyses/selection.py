"""Which studies an analysis takes: a rule over the header tags of a study's images.

A study matches a rule when it holds an image of an accepted modality (or a Secondary
Capture, where allowed), of an accepted body part where the rule names any, nothing that
rules it out, and at least one of the positive signs: a radiopharmaceutical code, a study or
series description, the calling AE title. The exclusions come first and win: a parathyroid
subtraction study carries a 99mTc-pertechnetate thyroid image beside its sestamibi images,
and the thyroid analysis rules out every study that holds a sestamibi code or a parathyroid
description anywhere, so such a study is a MIBI study and not a thyroid scan.

Rules are pydantic models: the defaults live in each analysis, a site overrides any key in
``[analyses.<name>.selection]`` (the parathyroid analysis still reads the older ``[routing]``
section), and a bad key is named at load.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, field_validator
from pydicom.dataset import Dataset

__all__ = ["HEADER_TAGS", "Match", "SelectionRule", "radiopharmaceutical_codes"]

_SC_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.7"

#: The elements a rule reads (routing reads only these, never the pixels).
HEADER_TAGS = [
    "Modality",
    "SOPClassUID",
    "StudyDescription",
    "SeriesDescription",
    "BodyPartExamined",
    "RadiopharmaceuticalInformationSequence",
]


@dataclass(frozen=True)
class Match:
    """Whether a study matches a rule, and why (a sentence for the status page)."""

    matched: bool
    reason: str


def radiopharmaceutical_codes(header: Dataset) -> set[str]:
    """Code Values of every Radiopharmaceutical Code Sequence item in ``header``."""
    codes = set()
    for item in header.get("RadiopharmaceuticalInformationSequence", []):
        for code in item.get("RadiopharmaceuticalCodeSequence", []):
            value = str(code.get("CodeValue", "")).strip()
            if value:
                codes.add(value)
    return codes


def _check_pattern(value: str) -> str:
    try:
        re.compile(value, re.IGNORECASE)
    except re.error as exc:
        raise ValueError(f"not a valid regular expression: {exc}") from None
    return value


class SelectionRule(BaseModel):
    """A selection rule; every key may be set per site in TOML.

    Attributes
    ----------
    modalities
        Accepted Modality values (upper case).
    secondary_capture
        Also accept Secondary Capture images (screen captures of older consoles).
    body_parts
        Accepted Body Part Examined values; empty accepts any (and a missing one).
    radiopharmaceutical_codes
        Code Values that mark the study (e.g. SCT 424299003 Tc-99m sestamibi).
    description_pattern
        Regular expression searched, case-insensitively, in study and series descriptions;
        empty matches nothing.
    calling_ae_titles
        Calling AE titles whose studies always match (e.g. a dedicated camera).
    exclude_radiopharmaceutical_codes
        Codes that rule a study out wherever they appear in it.
    exclude_description_pattern
        Descriptions that rule a study out; empty rules nothing out.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    modalities: tuple[str, ...] = ("NM",)
    secondary_capture: bool = False
    body_parts: tuple[str, ...] = ()
    radiopharmaceutical_codes: tuple[str, ...] = ()
    description_pattern: str = ""
    calling_ae_titles: tuple[str, ...] = ()
    exclude_radiopharmaceutical_codes: tuple[str, ...] = ()
    exclude_description_pattern: str = ""

    @field_validator("description_pattern", "exclude_description_pattern")
    @classmethod
    def _pattern(cls, value: str) -> str:
        return _check_pattern(value)

    @field_validator("modalities", "body_parts")
    @classmethod
    def _upper(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(m.strip().upper() for m in value if m.strip())

    def match(self, headers: Sequence[Dataset], calling_ae_title: str) -> Match:
        """Apply the rule to one header per series (at least) of a study's images."""
        if not headers:
            return Match(False, "no images in the study (only reports or other objects)")
        modalities = sorted({str(h.get("Modality", "")).upper() or "none" for h in headers})
        accepted = [
            h
            for h in headers
            if str(h.get("Modality", "")).upper() in self.modalities
            or (
                self.secondary_capture
                and str(h.get("SOPClassUID", "")).startswith(_SC_CLASS_PREFIX)
            )
        ]
        if not accepted:
            wanted = " or ".join(self.modalities) or "no modality"
            if self.secondary_capture:
                wanted += " or Secondary Capture"
            return Match(False, f"modality {', '.join(modalities)}, routing wants {wanted}")
        if self.body_parts:
            parts = {str(h.get("BodyPartExamined", "")).strip().upper() for h in accepted}
            if not parts & set(self.body_parts):
                seen = ", ".join(sorted(parts - {""})) or "none"
                return Match(
                    False,
                    f"body part {seen}, routing wants {' or '.join(self.body_parts)}",
                )
        codes: set[str] = set()
        every_code: set[str] = set()
        for header in headers:
            found = radiopharmaceutical_codes(header)
            every_code |= found
            if any(header is h for h in accepted):
                codes |= found
        descriptions = sorted(
            {
                str(h.get(keyword, "")).strip()
                for h in headers
                for keyword in ("StudyDescription", "SeriesDescription")
            }
            - {""}
        )
        excluded = every_code & set(self.exclude_radiopharmaceutical_codes)
        if excluded:
            return Match(False, f"ruled out by radiopharmaceutical code {sorted(excluded)[0]}")
        if self.exclude_description_pattern:
            exclude = re.compile(self.exclude_description_pattern, re.IGNORECASE)
            for description in descriptions:
                if exclude.search(description):
                    return Match(False, f"ruled out by description {description!r}")
        matched = codes & set(self.radiopharmaceutical_codes)
        if matched:
            return Match(True, f"radiopharmaceutical code {sorted(matched)[0]}")
        if self.description_pattern:
            pattern = re.compile(self.description_pattern, re.IGNORECASE)
            accepted_descriptions = sorted(
                {
                    str(h.get(keyword, "")).strip()
                    for h in accepted
                    for keyword in ("StudyDescription", "SeriesDescription")
                }
                - {""}
            )
            for description in accepted_descriptions:
                if pattern.search(description):
                    return Match(True, f"description {description!r}")
        if calling_ae_title and calling_ae_title in self.calling_ae_titles:
            return Match(True, f"calling AE title {calling_ae_title}")
        seen = ", ".join(repr(d) for d in descriptions) or "none"
        return Match(
            False,
            "no routing rule matched (radiopharmaceutical codes "
            f"{', '.join(sorted(codes)) or 'none'}; descriptions {seen}; "
            f"calling AE {calling_ae_title or 'unknown'})",
        )
