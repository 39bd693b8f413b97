"""The one base class of every error a user can cause (a bad config value, a missing file, a corrupt
checkpoint, ...). The CLI catches :class:`VitdistillError` once and prints its message as one line;
anything else is a bug and keeps its traceback."""

from __future__ import annotations


class VitdistillError(Exception):
    """A user-facing problem; the message names the bad value and what is valid."""
