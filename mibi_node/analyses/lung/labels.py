"""The lung analysis' lesion classes and their label values.

Label value 0 is background; the values here are the voxel values of the phantom's truth
masks and the class indices of the detector (torchvision's Mask R-CNN counts background as
class 0, so a class' index is its label value).
"""

from __future__ import annotations

from typing import Final

__all__ = ["CLASSES", "CLASS_NAMES", "LABEL_OF"]

#: The lesion classes, in label order (label value = index + 1).
CLASSES: Final[tuple[str, ...]] = ("ground_glass_opacity", "bronchiectasis")

#: Class key -> its label value.
LABEL_OF: Final[dict[str, int]] = {name: index + 1 for index, name in enumerate(CLASSES)}

#: What a radiologist reads.
CLASS_NAMES: Final[dict[str, str]] = {
    "ground_glass_opacity": "Ground-glass opacity",
    "bronchiectasis": "Bronchiectasis",
}
