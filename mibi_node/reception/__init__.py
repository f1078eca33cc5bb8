"""DICOM reception: the Storage/Verification SCP, its contexts and its checks."""

from mibi_node.reception.scp import StorageSCP

__all__ = ["StorageSCP"]
