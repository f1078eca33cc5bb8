"""mibi-node: a DICOM node that classifies parathyroid MIBI scintigraphy.

The package is split by pipeline stage (see ``docs/architecture.md``): ``reception``,
``storage``, ``assembly``, ``jobs``, ``imaging``, ``inference``, ``report``, ``dispatch``,
``web`` and ``phantom``. ``cli`` and ``daemon`` are the only modules that know them all.
"""

import logging

from mibi_node.errors import MibiNodeError

__version__ = "0.1.0"

#: Implementation Class UID of mibi-node (a UUID-derived UID, PS3.5 B.2), announced in every
#: association and written into the File Meta of every file the node makes.
IMPLEMENTATION_CLASS_UID = "2.25.88449298483801219055411050429656492791"
#: Implementation Version Name (at most 16 characters).
IMPLEMENTATION_VERSION_NAME = f"MIBI_NODE_{__version__}"

__all__ = [
    "IMPLEMENTATION_CLASS_UID",
    "IMPLEMENTATION_VERSION_NAME",
    "MibiNodeError",
    "__version__",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
