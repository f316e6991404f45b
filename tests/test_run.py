"""thruput run's parts: batch counting, the recorder's step and phase rules, the hooks, the
command line shapes and the status line. The scripts under ``thruput run`` are in
test_run_scripts.py."""
from __future__ import annotations

import io
import os
import sys
import time

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data import dataloader as torch_dataloader

import torch.nn.modules.module as nn_module
import torch.optim.optimizer as optim_module
import thruput.profile.steps as steps_module
from thruput.profile import StepProfiler
from thruput.run import Command, CommandError, Recorder, TorchHooks, batch_counts, parse_command
from thruput.run.status import StatusLine, format_status


def _recorder() -> Recorder:
    return Recorder(lambda device: StepProfiler(device, warmup_steps=0))


def test_batch_counts_rules() -> None:
    ids = torch.ones(2, 5, dtype=torch.long)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert batch_counts({"input_ids": ids, "attention_mask": mask}) == (10, 2, 8)
    assert batch_counts({"input_ids": ids, "padding_ratio": 0.25}) == (10, 2, 8)  # thruput Loader
    assert batch_counts((torch.randn(3, 7), torch.zeros(3, dtype=torch.int64))) == (3, 3, 3)
    assert batch_counts([{"x": torch.randn(2)}, [torch.zeros(4, 6, dtype=torch.int32)]]) == (24, 4, 24)
    assert batch_counts({"pixels": torch.randn(2, 3)}) is None
    assert batch_counts("text") is None


class _Clock:
    """A stand-in for ``time`` in the profiler: time moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_phases_are_exclusive_and_step_ends_at_optimizer(monkeypatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(steps_module, "time", clock)
    rec = _recorder()
    model, opt = torch.nn.Linear(2, 2), torch.optim.SGD([torch.zeros(1)], lr=0.1)
    for _ in range(2):
        rec.forward_begins(model, ())
        clock.sleep(0.010)
        rec.enter("comm")        # a collective inside the forward
        clock.sleep(0.020)
        rec.exit()
        clock.sleep(0.001)
        rec.exit()               # forward ends
        clock.sleep(0.003)       # Python between phases: other
        rec.optimizer_begins(opt)
        rec.forward_begins(model, ())  # Lightning: the closure's forward inside optimizer.step
        clock.sleep(0.010)
        rec.exit()
        clock.sleep(0.005)
        rec.optimizer_ends(opt)
    prof = rec.close()
    assert len(prof.records) == 2
    for r in prof.records:
        assert r.time_s == pytest.approx(0.049, abs=1e-12)
        assert r.phases["comm"] == pytest.approx(0.020, abs=1e-12)
        assert r.phases["forward"] == pytest.approx(0.021, abs=1e-12)   # both forwards, not the comm
        assert r.phases["optimizer"] == pytest.approx(0.005, abs=1e-12)  # not the closure's forward
        assert r.phases["other"] == pytest.approx(0.003, abs=1e-12)
    # Steps are contiguous: the second starts where the first ended.
    assert prof.records[1].start == prof.records[0].host_end


def test_nested_optimizer_steps_end_one_step_and_the_clock_is_the_first_optimizer() -> None:
    rec = _recorder()
    model = torch.nn.Linear(2, 2)
    first, second = (torch.optim.SGD([torch.zeros(1)], lr=0.1) for _ in range(2))
    for _ in range(3):
        rec.forward_begins(model, ())
        rec.exit()
        rec.optimizer_begins(first)
        rec.optimizer_begins(first)   # a subclass's step() calling super().step()
        rec.optimizer_ends(first)
        rec.optimizer_ends(first)
        rec.optimizer_begins(second)  # a second optimizer (GAN) does not end a step
        rec.optimizer_ends(second)
    assert len(rec.close().records) == 3


def test_tokens_follow_the_model_forward_not_the_fetch() -> None:
    rec = _recorder()
    model, loss_fn = torch.nn.Linear(2, 2), torch.nn.MSELoss()
    opt = torch.optim.SGD([torch.zeros(1)], lr=0.1)
    batch = {"input_ids": torch.ones(2, 4, dtype=torch.long)}
    rec.batch(batch)
    rec.batch(batch)  # fetched ahead (prefetch, gradient accumulation)
    for _ in range(2):
        rec.forward_begins(model, ())
        rec.exit()
        rec.forward_begins(loss_fn, (torch.randn(1),))  # a loss module is not the model
        rec.exit()
        rec.optimizer_begins(opt)
        rec.optimizer_ends(opt)
    rec.batch(batch)
    with torch.no_grad():  # an evaluation forward takes its batch without counting it
        rec.forward_begins(model, ())
        rec.exit()
    rec.optimizer_begins(opt)
    rec.optimizer_ends(opt)
    records = rec.close().records
    assert [(r.tokens, r.samples) for r in records] == [(8, 2), (8, 2), (0, 0)]


def test_without_a_loader_tokens_come_from_integer_forward_arguments() -> None:
    rec = _recorder()
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD([torch.zeros(1)], lr=0.1)
    for _ in range(2):  # gradient accumulation over two micro-batches
        rec.forward_begins(model, (torch.zeros(3, 5, dtype=torch.long),))
        rec.exit()
        rec.forward_begins(model, (torch.randn(3, 5),))  # float input: not tokens
        rec.exit()
        rec.forward_begins(model, (torch.zeros(3, 5, dtype=torch.long),))
        rec.exit()
        rec.optimizer_begins(opt)
        rec.optimizer_ends(opt)
    assert [r.tokens for r in rec.close().records] == [30, 30]


def test_hooks_time_the_outermost_forward_once_and_remove_everything() -> None:
    calls: list[str] = []

    class Spy(Recorder):
        def forward_begins(self, module, args):
            calls.append(type(module).__name__)
            super().forward_begins(module, args)

    originals = (torch_dataloader._BaseDataLoaderIter.__next__, torch.autograd.backward,
                 torch.distributed.all_reduce, torch.Tensor.to)
    rec = Spy(lambda device: StepProfiler(device, warmup_steps=0))
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(8, 1)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(TensorDataset(torch.randn(6, 4), torch.zeros(6, dtype=torch.long)), batch_size=3)
    with TorchHooks(rec):
        for x, _ in loader:
            model(x).sum().backward()
            opt.step()
    assert calls == ["Sequential", "Sequential"]
    records = rec.close().records
    assert len(records) == 2 and [r.samples for r in records] == [3, 3]
    assert all(r.phases["backward"] > 0 and r.phases["optimizer"] > 0 for r in records)
    assert records[1].phases["data_wait"] > 0  # the first fetch precedes step 0; the second is in step 1
    assert not nn_module._global_forward_pre_hooks and not nn_module._global_forward_hooks
    assert not optim_module._global_optimizer_pre_hooks and not optim_module._global_optimizer_post_hooks
    assert (torch_dataloader._BaseDataLoaderIter.__next__, torch.autograd.backward,
            torch.distributed.all_reduce, torch.Tensor.to) == originals


def test_inner_modules_meet_no_hook_and_a_raising_forward_keeps_the_hooks() -> None:
    seen: list[int] = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(len(nn_module._global_forward_pre_hooks))  # inner: torch's fast path
            if x.sum() < 0:
                raise ValueError("negative")
            return x

    rec = _recorder()
    model = torch.nn.Sequential(torch.nn.Identity(), Probe())
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    with TorchHooks(rec):
        with pytest.raises(ValueError, match="negative"):  # the script's own error, unchanged
            model(-torch.ones(1))
        for _ in range(2):
            model(torch.ones(1))
            opt.step()
        assert len(nn_module._global_forward_pre_hooks) == 1
    assert seen == [0, 0, 0]
    records = rec.close().records
    assert len(records) == 2 and all(r.phases["forward"] > 0 for r in records)


def test_thruput_loader_batches_are_data_wait_with_their_padding() -> None:
    from thruput.data import Loader, MemorySource, Plan

    docs = [f"document {i}: " + "words " * (1 + i % 37) for i in range(300)]
    plan = Plan([MemorySource("docs", docs)], seq_len=64, tokens_per_batch=4 * 64, packing=False,
                world_size=1, seed=0)
    rec = _recorder()
    model = torch.nn.Embedding(256, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ratios = []
    with TorchHooks(rec), Loader(plan, backend="inline", steps=3) as loader:
        for batch in loader:
            ratios.append(batch["padding_ratio"])
            model(batch["input_ids"]).sum().backward()
            opt.step()
    records = rec.close().records
    assert [(r.tokens, r.samples) for r in records] == [(256, 4)] * 3
    assert [r.useful_tokens for r in records] == [round(256 * (1 - x)) for x in ratios]
    assert records[1].phases["data_wait"] > 0


def test_hooks_refuse_a_second_install() -> None:
    hooks = TorchHooks(_recorder())
    with hooks, pytest.raises(RuntimeError, match="already installed"):
        hooks.install()


@pytest.mark.parametrize("argv, expected", [
    (["--", "python", "train.py", "--lr", "1"], Command("script", "train.py", ("--lr", "1"))),
    (["train.py", "a"], Command("script", "train.py", ("a",))),
    (["--", "-m", "pkg.train", "x"], Command("module", "pkg.train", ("x",))),
    (["torchrun", "--nproc_per_node", "2", "t.py"], Command("launcher", "torchrun", ("--nproc_per_node", "2", "t.py"))),
])
def test_parse_command_shapes(argv, expected, monkeypatch) -> None:
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    assert parse_command(argv) == expected


def test_parse_command_refuses_another_environments_python(tmp_path, monkeypatch) -> None:
    other = tmp_path / "python"
    other.write_text("#!/bin/sh\necho /elsewhere\n")
    other.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(CommandError, match=f"{other}, another environment"):
        parse_command(["python", "train.py"])


def test_parse_command_names_and_errors() -> None:
    assert parse_command([sys.executable, "-m", "torch.distributed.run", "t.py"]).kind == "launcher"
    assert parse_command(["torchrun", "--standalone", "dir/t.py"]).default_name() == "t"
    assert parse_command(["-m", "pkg.train"]).default_name() == "train"
    for argv, message in ([[], "no command"], [["--"], "no command"], [["-m"], "without a module"],
                          [[sys.executable, "-u", "t.py"], "python option '-u'"]):
        with pytest.raises(CommandError, match=message):
            parse_command(argv)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_status_line_is_rate_limited_and_only_on_a_terminal() -> None:
    prof = StepProfiler(warmup_steps=0)
    for _ in range(3):
        with prof.step(tokens=1000, samples=4):
            with prof.phase("data_wait"):
                time.sleep(0.002)
    line = format_status(prof.records)
    assert line.startswith("thruput run: step 3 |") and "tokens/s" in line and "data " in line
    tty = _Tty()
    status = StatusLine(stream=tty, interval=3600)
    status.update(prof)
    status.update(prof)   # within the interval: not written
    status.clear()
    assert tty.getvalue().count("thruput run: step 3") == 1 and tty.getvalue().endswith("\r\x1b[2K")
    piped = io.StringIO()
    StatusLine(stream=piped).update(prof)
    assert piped.getvalue() == ""


def test_targets_cuda_reads_every_form_of_to() -> None:
    from thruput.run.hooks import _targets_cuda

    assert _targets_cuda(("cuda",), {}) and _targets_cuda((0,), {}) and _targets_cuda((), {"device": "cuda:1"})
    assert _targets_cuda((torch.device("cuda", 0), torch.float16), {})
    assert not _targets_cuda((torch.float16,), {}) and not _targets_cuda(("cpu",), {})
    assert not _targets_cuda((True,), {}) and not _targets_cuda((), {"dtype": torch.float16})


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_steps_time_copies_and_device_phases_with_events() -> None:
    rec = _recorder()
    model = torch.nn.Linear(64, 64).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with TorchHooks(rec):
        for _ in range(3):
            x = torch.randn(256, 64).to("cuda")      # h2d
            y = torch.randn(256, 64).cuda()          # h2d
            model(x + y).square().mean().backward()
            opt.step()
            x.to(torch.float16)                      # a cast on the device: not h2d
    prof = rec.close()
    assert prof.device.type == "cuda" and prof._cuda
    prof.finish()
    assert len(prof.records) == 3
    for r in prof.records[1:]:
        assert r.phases["h2d"] > 0 and r.phases["forward"] > 0 and r.phases["backward"] > 0
        assert sum(v for k, v in r.phases.items() if k != "other") <= r.time_s * (1 + 1e-6)


def test_a_run_without_token_ids_has_no_padding_rather_than_all_padding() -> None:
    prof = StepProfiler(warmup_steps=0)
    for _ in range(2):
        with prof.step(tokens=0, samples=8):  # float inputs: thruput run counts no tokens
            pass
    assert prof.summary()["padding_ratio"] == 0.0


def test_rss_read_every_step_is_the_readers_own_after_a_fork() -> None:
    from thruput.profile.memory import rss_bytes

    rss_bytes()  # keeps /proc/self/statm open for the next steps
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child (a DataLoader worker, say) grows by 256 MiB and reads its own RSS
        start = rss_bytes()
        grown = bytearray(256 * 2**20)
        grown[::4096] = b"1" * len(grown[::4096])
        os.write(write, str(rss_bytes() - start).encode())
        os._exit(0)
    os.close(write)
    growth = int(os.read(read, 64))
    os.waitpid(pid, 0)
    assert growth > 200 * 2**20
