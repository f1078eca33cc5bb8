"""Offline modules: sub-model training, fusion fitting and the test module."""

__all__: list[str] = []
