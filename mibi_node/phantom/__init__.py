"""Synthetic dual-phase parathyroid MIBI studies written as valid NM DICOM."""

__all__: list[str] = []
