"""The knee analysis' structures: the four cartilage plates and their label values.

Label value 0 is background; the values here are the voxel values of the phantom's truth
masks, of the models' outputs and the Segment Numbers of the DICOM SEG (one segment per
structure, in this order).
"""

from __future__ import annotations

from typing import Final

__all__ = ["LABEL_OF", "STRUCTURES", "STRUCTURE_NAMES", "TIBIAL"]

#: The structures, in label order (label value = index + 1).
STRUCTURES: Final[tuple[str, ...]] = (
    "femoral_cartilage",
    "medial_tibial_cartilage",
    "lateral_tibial_cartilage",
    "patellar_cartilage",
)

#: Structure key -> its voxel value in a label volume.
LABEL_OF: Final[dict[str, int]] = {name: index + 1 for index, name in enumerate(STRUCTURES)}

#: What a radiologist reads on the status page and in the SR's segment labels.
STRUCTURE_NAMES: Final[dict[str, str]] = {
    "femoral_cartilage": "Femoral cartilage",
    "medial_tibial_cartilage": "Medial tibial cartilage",
    "lateral_tibial_cartilage": "Lateral tibial cartilage",
    "patellar_cartilage": "Patellar cartilage",
}

#: The two tibial plates (the goal's "tibial" Dice is over both together).
TIBIAL: Final[tuple[str, ...]] = ("medial_tibial_cartilage", "lateral_tibial_cartilage")
