"""Start-up shim of ``thruput run -- LAUNCHER ...``, first on PYTHONPATH of that launcher only.

Profiles the ranks the launcher starts (``thruput.run.launcher.activate_from_env``), then runs
the ``sitecustomize`` this file shadows, if there is one, as Python would have.
"""
import importlib
import os
import sys


def _profile_rank() -> None:
    if "THRUPUT_RUN_OPTIONS" not in os.environ or "RANK" not in os.environ:
        return
    try:
        from thruput.run.launcher import activate_from_env

        activate_from_env()
    except Exception as exc:  # a broken profiler must not stop the training it observes
        print(f"thruput run: not profiling rank {os.environ['RANK']} ({type(exc).__name__}: {exc})",
              file=sys.stderr)


def _run_shadowed_sitecustomize() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    sys.modules.pop("sitecustomize", None)
    try:
        importlib.import_module("sitecustomize")
    except ImportError as exc:
        if exc.name != "sitecustomize":
            raise
    finally:
        sys.path[:] = saved


_profile_rank()
_run_shadowed_sitecustomize()
