"""``thruput run``: profile an unmodified training script (plain loop, HF Trainer, Lightning).

``thruput run [--out DIR] [--html] [--trace] [--no-status] -- python train.py ARGS`` installs
global torch hooks (``hooks``), turns what they see into profiler steps (``recorder``: a step
ends at optimizer.step), shows a live status line (``status``) and writes the same run
document and reports as ``StepProfiler`` (``session``). ``command`` reads the command,
``launcher`` runs it.
"""
from thruput.run.hooks import TorchHooks
from thruput.run.command import Command, CommandError, parse_command
from thruput.run.launcher import run_command
from thruput.run.recorder import Recorder, batch_counts
from thruput.run.session import ExitInfo, RunOptions, Session

__all__ = ["Command", "CommandError", "ExitInfo", "Recorder", "RunOptions", "Session", "TorchHooks",
           "batch_counts", "parse_command", "run_command"]
