"""Knee MR cartilage (seed 003): two-stage segmentation returned as DICOM SEG and SR."""
