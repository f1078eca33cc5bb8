"""mibi-node: a DICOM node that classifies parathyroid MIBI scintigraphy.

The package is split by pipeline stage (see ``docs/architecture.md``): ``reception``,
``storage``, ``assembly``, ``jobs``, ``imaging``, ``inference``, ``report``, ``dispatch``,
``web`` and ``phantom``. ``cli`` and ``daemon`` are the only modules that know them all.
"""

import logging

from mibi_node.errors import MibiNodeError

__version__ = "0.1.0"
__all__ = ["MibiNodeError", "__version__"]

logging.getLogger(__name__).addHandler(logging.NullHandler())
