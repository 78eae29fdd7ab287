"""The exporter's error for a checkpoint it cannot export (TensorFlow-free, imported by every loader)."""
from __future__ import annotations


class CheckpointError(Exception):
    """The checkpoint cannot be exported; the message says what was found and what is needed."""


class CasingError(CheckpointError):
    """The checkpoint's evidence about lower-casing contradicts itself; the message names the flag to pass."""
