"""Reading NM/SC studies into named float arrays, denoising and preprocessing them.

Import from the modules themselves (``mibi_node.imaging.nm``, ``mibi_node.imaging.denoise``,
``mibi_node.imaging.tta``); this package knows nothing of the database or the network.
"""

__all__: list[str] = []
