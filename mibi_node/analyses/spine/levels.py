"""The eleven lumbar levels and their classes, as the Spinal Disease 2020 task names them.

Seed 002: the representative point of every vertebra and intervertebral disc from the
T12-L1 disc down to the L5-S1 disc is annotated on the middle frame of the T2 sagittal
series. Vertebrae are normal (``v1``) or degenerated (``v2``); discs are normal (``v1``),
bulge (``v2``), protrusion (``v3``), extrusion (``v4``) or Schmorl's node (``v5``).
"""

from __future__ import annotations

from typing import Literal

__all__ = [
    "CHALLENGE_CODES",
    "CLASSES",
    "DISC_CLASSES",
    "LEVELS",
    "LEVEL_KIND",
    "VERTEBRA_CLASSES",
    "Kind",
    "class_from_code",
    "code_from_class",
]

Kind = Literal["disc", "vertebra"]

#: The eleven levels, head to foot (the model's heatmap channels, the SR's group order).
LEVELS: tuple[str, ...] = (
    "T12-L1",
    "L1",
    "L1-L2",
    "L2",
    "L2-L3",
    "L3",
    "L3-L4",
    "L4",
    "L4-L5",
    "L5",
    "L5-S1",
)

#: Level -> "disc" or "vertebra".
LEVEL_KIND: dict[str, Kind] = {level: ("disc" if "-" in level else "vertebra") for level in LEVELS}

#: Class keys per kind, in the order of the challenge's codes v1, v2, ...
VERTEBRA_CLASSES: tuple[str, ...] = ("normal", "degenerated")
DISC_CLASSES: tuple[str, ...] = ("normal", "bulge", "protrusion", "extrusion", "schmorl_node")

#: Kind -> its classes.
CLASSES: dict[str, tuple[str, ...]] = {"vertebra": VERTEBRA_CLASSES, "disc": DISC_CLASSES}

#: Kind -> the challenge's code of each class ("v1" ... "v5").
CHALLENGE_CODES: dict[str, dict[str, str]] = {
    kind: {name: f"v{index + 1}" for index, name in enumerate(names)}
    for kind, names in CLASSES.items()
}


def class_from_code(kind: str, code: str) -> str:
    """The class key of a challenge code (``"v3"`` on a disc -> ``"protrusion"``).

    A disc annotated with two codes (``"v2,v5"``, the data set has a few) takes the first.
    """
    if kind not in CLASSES:
        raise ValueError(f'Argument "kind" should be "disc" or "vertebra", not {kind!r}.')
    first = code.split(",")[0].strip().lower()
    for name, value in CHALLENGE_CODES[kind].items():
        if value == first:
            return name
    raise ValueError(
        f"unknown {kind} code {code!r}: the challenge uses "
        + ", ".join(CHALLENGE_CODES[kind].values())
    )


def code_from_class(kind: str, name: str) -> str:
    """The challenge code of a class key (``"protrusion"`` on a disc -> ``"v3"``)."""
    try:
        return CHALLENGE_CODES[kind][name]
    except KeyError:
        raise ValueError(f"unknown {kind} class {name!r}") from None
