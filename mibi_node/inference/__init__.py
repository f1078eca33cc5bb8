"""Ensemble members, fusion, model bundles and the inference engine."""

__all__: list[str] = []
