"""Each framework integration is an optional extra: importing thruput never imports the
frameworks, and an integration whose framework is missing says which pip command installs it."""
from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

FRAMEWORKS = ("transformers", "lightning", "pytorch_lightning", "accelerate")


def test_importing_thruput_and_its_subsystems_imports_no_framework():
    code = ("import sys, thruput, thruput.data, thruput.memory, thruput.profile, thruput.kernels; "
            f"print(sorted(m for m in {FRAMEWORKS!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(("module", "framework", "extra"), [
    ("thruput.hf", "transformers", "hf"),
    ("thruput.lightning", "lightning", "lightning"),
    ("thruput.accelerate", "accelerate", "accelerate"),
])
def test_a_missing_framework_is_an_import_error_naming_the_extra(monkeypatch, module, framework, extra):
    for name in list(sys.modules):  # hide the framework, forget thruput's module (both restored after)
        if name == framework or name.startswith(framework + "."):
            monkeypatch.setitem(sys.modules, name, None)
        if name == module or name.startswith(module + "."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, framework, None)
    with pytest.raises(ImportError, match=rf"pip install 'thruput\[{extra}\]'"):
        importlib.import_module(module)
