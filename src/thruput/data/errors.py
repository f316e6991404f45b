"""The one exception type of the data plane."""
from __future__ import annotations


class DataError(ValueError):
    """Bad data or a bad plan: the message names the source, the file and the line where known."""
