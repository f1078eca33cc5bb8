"""Study assembly: when a study is complete, and (later) whether it is a MIBI study."""

from mibi_node.assembly.stability import mark_stable_studies

__all__ = ["mark_stable_studies"]
