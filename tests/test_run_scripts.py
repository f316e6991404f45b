"""``thruput run`` on unmodified scripts: a plain loop, HF Trainer, Lightning, torchrun, crashes.

Each script plants a bottleneck (a sleeping dataset or optimizer step) and records, with its
own optimizer post-hook, when each optimizer step ended: the report's step times are checked
against that clock (within 20 ms, a fraction of the planted stall), its phases must not overlap (the named phases never exceed
the step; ``other`` is the rest, to 1e-9), and the verdict must name the planted bottleneck.
HF, Lightning and torchrun run once each in a subprocess (their imports are slow and their
global state should not leak into the test process).
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from thruput.cli import main

HEADER = """
import json, sys, time
import torch

torch.set_num_threads(1)  # tiny models: no thread-pool spinning on a shared machine
ENDS = []


def record_ends(optimizer):
    optimizer.register_step_post_hook(lambda *args: ENDS.append(time.perf_counter()))
    return optimizer


def save(path):
    Path = __import__("pathlib").Path
    Path(path).write_text(json.dumps({"ends": ENDS, "name": __name__, "argv": sys.argv}))
"""

PLAIN = HEADER + """
from torch.utils.data import DataLoader, Dataset


class SlowData(Dataset):
    def __len__(self):
        return 20

    def __getitem__(self, i):
        time.sleep(0.02)  # planted: 4 x 20 ms of data loading per step
        return torch.full((33,), i % 100)


model = torch.nn.Sequential(torch.nn.Embedding(100, 16), torch.nn.Linear(16, 100))
opt = record_ends(torch.optim.AdamW(model.parameters(), lr=1e-3))
for batch in DataLoader(SlowData(), batch_size=4):
    logits = model(batch[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
    loss.backward()
    opt.step()
    opt.zero_grad()
save(sys.argv[1])
"""

TRAINER = HEADER + """
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments


class SlowAdamW(torch.optim.AdamW):
    def step(self, closure=None):
        time.sleep(0.2)  # planted: a slow optimizer
        return super().step(closure)


class Data(torch.utils.data.Dataset):
    def __len__(self):
        return 32

    def __getitem__(self, i):
        ids = torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


torch.manual_seed(0)
config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=2, bos_token_id=0,
                    eos_token_id=0)
model = GPT2LMHeadModel(config)
opt = record_ends(SlowAdamW(model.parameters(), lr=1e-3))
args = TrainingArguments(output_dir=sys.argv[2], per_device_train_batch_size=4, gradient_accumulation_steps=2,
                         max_steps=4, report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
                         logging_steps=100)
Trainer(model=model, args=args, train_dataset=Data(), optimizers=(opt, None)).train()
save(sys.argv[1])
"""

LIGHTNING = HEADER + """
import lightning as L


class SlowAdamW(torch.optim.AdamW):
    def step(self, closure=None):
        loss = super().step(closure)  # Lightning's closure runs forward and backward in here
        time.sleep(0.2)  # planted: a slow optimizer
        return loss


class Data(torch.utils.data.Dataset):
    def __len__(self):
        return 20

    def __getitem__(self, i):
        return torch.randint(0, 64, (17,), generator=torch.Generator().manual_seed(i))


class TinyLM(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Embedding(64, 32), torch.nn.Linear(32, 64))

    def training_step(self, batch, index):
        logits = self.net(batch[:, :-1])
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())

    def configure_optimizers(self):
        return record_ends(SlowAdamW(self.parameters(), lr=1e-3))


trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
trainer.fit(TinyLM(), torch.utils.data.DataLoader(Data(), batch_size=4))
save(sys.argv[1])
sys.exit(3)  # the exit code must pass through thruput run's process
"""

CRASH = HEADER + """
model = torch.nn.Linear(4, 4)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for step in range(5):
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    if step == 2:
        if sys.argv[1] == "raise":
            raise RuntimeError("boom at step 2")
        if sys.argv[1] == "exit":
            sys.exit(7)
        if sys.argv[1] == "interrupt":
            raise KeyboardInterrupt
"""

DDP = """
import time
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
model = torch.nn.Linear(16, 16)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for step in range(5):
    model(torch.randint(0, 2, (8, 16)).float()).square().mean().backward()
    for p in model.parameters():
        dist.all_reduce(p.grad)  # rank 0 waits here for rank 1's sleep
    if dist.get_rank() == 1:
        time.sleep(0.1)  # planted: rank 1 is slow outside every phase
    opt.step()
    opt.zero_grad()
dist.destroy_process_group()
"""


def _write(directory: Path, name: str, source: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(source))
    return path


def _thruput_run(*cmd: str, out: Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "thruput.cli", "run", "--no-status", "--out", str(out), "--",
                           *cmd], capture_output=True, text=True, timeout=900, cwd=cwd)


def _check_steps(document: dict, ends: list[float], phase: str, planted_s: float, first: int = 0) -> None:
    """Steps match the script's optimizer steps, phases do not overlap, the planted phase shows."""
    steps = document["steps"]
    assert len(steps) == len(ends)
    for k, step in enumerate(steps):
        named = sum(v for p, v in step["phases"].items() if p != "other")
        assert named <= step["time_s"] * (1 + 1e-9)
        assert sum(step["phases"].values()) == pytest.approx(step["time_s"], rel=1e-9)
        if k >= first:
            assert step["phases"][phase] >= planted_s
        if k:
            assert step["time_s"] == pytest.approx(ends[k] - ends[k - 1], abs=0.02)


def test_plain_loop_is_data_bound(tmp_path) -> None:
    script = _write(tmp_path, "plain.py", PLAIN)
    result = tmp_path / "result.json"
    assert main(["run", "--no-status", "--out", str(tmp_path / "runs"), "--html", "--trace", "--",
                 str(script), str(result)]) == 0
    recorded = json.loads(result.read_text())
    assert recorded["name"] == "__main__" and recorded["argv"] == [str(script), str(result)]
    document = json.loads((tmp_path / "runs" / "plain.json").read_text())
    # The first batch is fetched before the first forward, where step 0 starts.
    _check_steps(document, recorded["ends"], "data_wait", 4 * 0.02, first=1)
    assert [s["tokens"] for s in document["steps"]] == [4 * 33] * 5
    assert document["verdict"]["bottleneck"] == "data-bound"
    assert document["meta"]["exit"] == {"code": 0, "error": None}
    assert (tmp_path / "runs" / "plain.html").exists() and (tmp_path / "runs" / "plain.trace.json").exists()


def test_hf_trainer_with_gradient_accumulation_is_optimizer_bound(tmp_path) -> None:
    script = _write(tmp_path, "trainer.py", TRAINER)
    result = tmp_path / "result.json"
    run = _thruput_run(str(script), str(result), str(tmp_path / "hf-out"), out=tmp_path / "runs")
    assert run.returncode == 0, run.stderr
    document = json.loads((tmp_path / "runs" / "trainer.json").read_text())
    _check_steps(document, json.loads(result.read_text())["ends"], "optimizer", 0.2)
    # One step per optimizer update: two micro-batches of 4 x 16 tokens each.
    assert [(s["samples"], s["tokens"]) for s in document["steps"]] == [(8, 128)] * 4
    assert document["verdict"]["bottleneck"] == "optimizer-bound"
    assert "verdict: optimizer-bound" in run.stderr


def test_lightning_closure_is_split_from_the_optimizer(tmp_path) -> None:
    script = _write(tmp_path, "lit.py", LIGHTNING)
    result = tmp_path / "result.json"
    run = _thruput_run(str(script), str(result), out=tmp_path / "runs")
    assert run.returncode == 3, run.stderr
    assert "the script ended with SystemExit: 3 (exit code 3)" in run.stderr
    document = json.loads((tmp_path / "runs" / "lit.json").read_text())
    _check_steps(document, json.loads(result.read_text())["ends"], "optimizer", 0.2)
    for step in document["steps"]:  # the closure's forward and backward are not optimizer time
        assert step["phases"]["forward"] > 0 and step["phases"]["backward"] > 0
        assert step["tokens"] == 4 * 17
    assert document["verdict"]["bottleneck"] == "optimizer-bound"


@pytest.mark.parametrize("how, code, error", [
    ("raise", 1, "RuntimeError: boom at step 2"),
    ("exit", 7, "SystemExit: 7"),
    ("interrupt", 130, "KeyboardInterrupt"),
])
def test_crashing_script_reports_the_steps_before_and_passes_the_code_on(tmp_path, capsys, how, code, error) -> None:
    script = _write(tmp_path, "crash.py", CRASH)
    assert main(["run", "--no-status", "--out", str(tmp_path), "--", str(script), how]) == code
    document = json.loads((tmp_path / "crash.json").read_text())
    assert len(document["steps"]) == 3
    assert document["meta"]["exit"] == {"code": code, "error": error}
    err = capsys.readouterr().err
    assert f"the script ended with {error} (exit code {code})" in err
    if how == "raise":  # python's traceback, without thruput's frames
        assert "Traceback" in err and 'crash.py", line' in err and "runpy" not in err


def test_module_form_runs_as_main_from_the_working_directory(tmp_path, monkeypatch) -> None:
    _write(tmp_path, "tinytrain.py", PLAIN.replace("return 20", "return 8"))
    monkeypatch.chdir(tmp_path)
    argv_before, path_before = sys.argv[:], sys.path[:]
    assert main(["run", "--no-status", "--", "-m", "tinytrain", "result.json"]) == 0
    assert (sys.argv, sys.path) == (argv_before, path_before)
    recorded = json.loads((tmp_path / "result.json").read_text())
    assert recorded["name"] == "__main__" and recorded["argv"] == [str(tmp_path / "tinytrain.py"), "result.json"]
    assert len(json.loads((tmp_path / "runs" / "tinytrain.json").read_text())["steps"]) == 2


def test_script_without_optimizer_steps_says_why_it_has_no_steps(tmp_path, capsys) -> None:
    script = _write(tmp_path, "infer.py", "import torch\nwith torch.no_grad():\n    torch.nn.Linear(2, 2)(torch.ones(1, 2))\n")
    assert main(["run", "--no-status", "--out", str(tmp_path), "--", str(script)]) == 0
    assert json.loads((tmp_path / "infer.json").read_text())["steps"] == []
    assert "a step ends at optimizer.step(), and this run called none" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_ranks_each_write_a_report(tmp_path) -> None:
    script = _write(tmp_path, "ddp.py", DDP)
    run = _thruput_run(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                       str(script), out=tmp_path / "runs", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    rank0, rank1 = (json.loads((tmp_path / "runs" / f"ddp-rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["meta"]["rank"] == 0 and rank1["meta"]["rank"] == 1 and rank0["meta"]["world_size"] == 2
    assert len(rank0["steps"]) == len(rank1["steps"]) == 5
    assert rank0["verdict"]["bottleneck"] == "communication-bound"
    # Rank 0 waits in all_reduce for most of rank 1's 0.1 s sleep (less its own lag behind rank 1).
    assert sorted(s["phases"]["comm"] for s in rank0["steps"][1:])[2] >= 0.05
    assert all(s["phases"]["other"] >= 0.1 for s in rank1["steps"])
    assert [s["tokens"] for s in rank1["steps"]] == [0] * 5  # float inputs: no tokens to count
    assert "thruput profile: ddp-rank0" in run.stderr and "thruput profile: ddp-rank1" in run.stderr
