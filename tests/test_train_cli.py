"""``thruput train`` as a user runs it: killed with SIGKILL and resumed, and under torchrun."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from thruput.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from thruput.profile.job import load_job

CONFIG = """
name = "{name}"
steps = {steps}
seed = 5
[model]
d_model = 32
n_layers = 2
n_heads = 2
[data]
seq_len = 32
batch_size = 2
workers = {workers}
{data_extra}
[[data.sources]]
name = "code"
kind = "stdlib_code"
options = {{ max_files = 30 }}
[[data.sources]]
name = "docs"
kind = "stdlib_docstrings"
options = {{ max_files = 30 }}
weight = 0.5
[optimizer]
warmup_steps = 2
{optimizer_extra}
[checkpoint]
dir = "{ckpt}"
every = {every}
keep = 50
[profile]
peak_flops = 1e11
report_dir = "{report}"
"""


def _write(tmp: Path, name: str, steps: int, every: int, workers: int = 0, data_extra: str = "",
           optimizer_extra: str = "") -> Path:
    path = tmp / f"{name}.toml"
    path.write_text(CONFIG.format(name=name, steps=steps, every=every, workers=workers, data_extra=data_extra,
                                  optimizer_extra=optimizer_extra, ckpt=tmp / name / "ckpt",
                                  report=tmp / name))
    return path


def _thruput(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "thruput.cli", *args], capture_output=True, text=True,
                          timeout=300, **kwargs)


def _final(ckpt: Path) -> dict:
    return load_checkpoint(latest_checkpoint(ckpt))


def test_sigkilled_run_resumes_with_the_same_loss_curve(tmp_path) -> None:
    steps = 40
    full = _write(tmp_path, "full", steps, every=4, workers=1)
    assert _thruput("train", str(full)).returncode == 0
    killed = _write(tmp_path, "killed", steps, every=4, workers=1)
    ckpt = tmp_path / "killed" / "ckpt"
    proc = subprocess.Popen([sys.executable, "-m", "thruput.cli", "train", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while not list_checkpoints(ckpt) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its loader workers, mid-run
    proc.wait()
    interrupted_at = int(_final(ckpt)["step"])
    assert 0 < interrupted_at < steps, "the kill should land mid-run"
    resumed = _thruput("train", str(killed), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = _final(tmp_path / "full" / "ckpt"), _final(ckpt)
    assert a["step"] == b["step"] == steps
    assert a["losses"] == b["losses"]  # bitwise: the same floats
    assert a["useful_tokens"] == b["useful_tokens"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    # The profiler state travelled with the checkpoint: the report covers every step.
    assert len(b["profiler"]["records"]) == steps


def test_bad_config_names_the_key(tmp_path) -> None:
    path = _write(tmp_path, "bad", 4, every=0)
    path.write_text(path.read_text().replace("d_model = 32", 'd_model = "wide"'))
    result = _thruput("train", str(path))
    assert result.returncode == 2
    assert "model.d_model" in result.stderr


@pytest.mark.skipif(shutil.which("torchrun") is None and not torch.distributed.is_available(),
                    reason="torch.distributed is unavailable")
def test_two_rank_torchrun_completes_and_resumes(tmp_path, ray_address) -> None:
    """Two gloo ranks on the shared Ray data plane with ZeRO-2 offload: an interrupted run resumes
    to the same state."""
    extra = f'ray_address = "{ray_address}"'
    zero2 = 'kind = "offload_adamw"\nzero2 = true'
    steps = 4
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "-m", "thruput.cli", "train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = _write(tmp_path, "full", steps, every=2, data_extra=extra, optimizer_extra=zero2)
    done = subprocess.run([*launch, str(full)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    # Interrupted after step 2: only that checkpoint exists, in a fresh folder; --resume finishes it.
    part = _write(tmp_path, "part", steps, every=2, data_extra=extra, optimizer_extra=zero2)
    (tmp_path / "part" / "ckpt").mkdir(parents=True)
    first = list_checkpoints(tmp_path / "full" / "ckpt")[0]
    shutil.copy(first, tmp_path / "part" / "ckpt" / first.name)
    resumed = subprocess.run([*launch, str(part), "--resume"], capture_output=True, text=True, timeout=300, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _final(tmp_path / "full" / "ckpt"), _final(tmp_path / "part" / "ckpt")
    assert a["step"] == b["step"] == steps
    assert a["losses"] == b["losses"]
    assert a["useful_tokens"] == b["useful_tokens"] > 0
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["profiler"]["records"] and len(b["profiler"]["records"]) == steps
    meta = json.loads((tmp_path / "part" / "part-rank0.json").read_text())["meta"]
    assert meta["world_size"] == 2 and meta["optimizer"] == "Zero2OffloadAdamW" and meta["data_backend"] == "ray"
    # Each rank wrote its document; merged, ZeRO-2's collectives gave every step a per-rank record.
    job = load_job(tmp_path / "part")
    assert job["ranks"] == [0, 1] and not job["missing_ranks"]
    assert all(s["comm_wait"] is not None for d in job["documents"].values() for s in d["steps"])
