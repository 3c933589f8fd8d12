"""The project's error types. Each message names the file, key or value at fault, on one line."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or inconsistent; the message names file and key."""


class LoraError(CheckpointError):
    """A LoRA file does not fit the model (unknown module, wrong shape or rank)."""
