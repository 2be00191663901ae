"""The one exception type the library raises for bad checkpoints and bad inputs."""

from __future__ import annotations


class SanaCheckpointError(Exception):
    """A checkpoint (or input) cannot be used.

    The message always names what is at fault: the file, the key, the expected and
    found shape, or the value. Nothing is half-loaded when this is raised.
    """
