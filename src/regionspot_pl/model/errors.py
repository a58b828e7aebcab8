"""The errors of head files (``.pt``) and head folders: a leaf module, so that the folder format
(:mod:`.pretrained`) and the file format (:mod:`.checkpoint`) raise the same ones without
importing each other."""

from __future__ import annotations

from ..errors import RegionSpotError


class CheckpointError(RegionSpotError, ValueError):
    """A file or folder is not the head checkpoint it was expected to be."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint file or head folder does not exist (nor a Hugging Face Hub repository of that id)."""
