"""The error type of bad user input, shared by the planner, the reports and the checkpoints (no
imports: every layer may raise it). ``thruput``'s command line prints it as one line."""
from __future__ import annotations


class InputError(ValueError):
    """What the user gave is wrong (a file, a key, a value); the message names it."""
