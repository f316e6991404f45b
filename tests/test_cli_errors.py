"""Errors at the command line: one line on stderr naming the file/key, an exit code, no traceback
(``--debug`` shows it); bugs keep their traceback; Ctrl-C exits 130; log_every prints lines."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from thruput.cli import EXIT_BAD_INPUT, EXIT_INTERRUPTED, main

CONFIG = """
name = "cli"
steps = {steps}
log_every = {log_every}
[model]
d_model = 16
n_layers = 1
n_heads = 2
[data]
seq_len = 16
batch_size = 2
[[data.sources]]
name = "web"
kind = "jsonl"
path = "{data}"
[optimizer]
warmup_steps = 1
[checkpoint]
dir = "{ckpt}"
every = 1
[profile]
peak_flops = 1e11
"""
LOG_LINE = re.compile(r"^step (\d+)/(\d+)  loss (\d+\.\d{4})  lr (\d\.\d{3}e[+-]\d\d)  tokens/s ([\d,]+)$", re.M)


def _thruput(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "thruput.cli", *args], capture_output=True, text=True, timeout=300)


def _config(tmp_path: Path, lines: list[str], steps: int = 2, log_every: int = 1) -> Path:
    data = tmp_path / "web.jsonl"
    data.write_text("".join(line + "\n" for line in lines))
    path = tmp_path / "run.toml"
    path.write_text(CONFIG.format(steps=steps, log_every=log_every, data=data, ckpt=tmp_path / "ckpt"))
    return path


def _one_line(proc: subprocess.CompletedProcess, code: int) -> str:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    return proc.stderr.rstrip("\n")


GOOD = [json.dumps({"text": f"document {i}: " + "words and more words " * (1 + i % 5)}) for i in range(40)]


def test_missing_config_and_bad_toml_are_one_line_and_debug_shows_the_traceback(tmp_path) -> None:
    missing = tmp_path / "absent.toml"
    assert _one_line(_thruput("train", str(missing)), 2) == f"thruput train: config file not found: {missing}"
    bad = tmp_path / "bad.toml"
    bad.write_text("steps = = 3\n")
    assert _one_line(_thruput("train", str(bad)), 2).startswith(f"thruput train: {bad}: invalid TOML: ")
    for argv in (["--debug", "train", str(missing)], ["train", str(missing), "--debug"]):
        debug = _thruput(*argv)
        assert debug.returncode == 1 and "Traceback" in debug.stderr
        assert debug.stderr.rstrip().endswith(f"thruput.config.ConfigError: config file not found: {missing}")


def test_malformed_record_names_source_file_and_line(tmp_path) -> None:
    # Among the first records: the data check before training finds it and names the source's key.
    config = _config(tmp_path, [*GOOD[:2], '{"text": "cut off', *GOOD[2:]])
    line = _one_line(_thruput("train", str(config)), EXIT_BAD_INPUT)
    assert re.fullmatch(rf"thruput train: data.sources\[0\].path: source 'web': file '{tmp_path / 'web.jsonl'}' "
                        r"line 3: malformed JSON \(.+\)", line), line
    # Past the records the check reads: the loader's DataError during training, also one line.
    config = _config(tmp_path, [*GOOD[:20], '{"text": "cut off', *GOOD[20:]], steps=8)
    line = _one_line(_thruput("train", str(config)), EXIT_BAD_INPUT)
    assert re.fullmatch(rf"thruput train: source 'web': file '{tmp_path / 'web.jsonl'}' line 21: malformed JSON "
                        r"\(.+\)", line), line


def test_resume_without_or_with_only_unloadable_checkpoints_is_one_line(tmp_path) -> None:
    config = _config(tmp_path, GOOD)
    ckpt = tmp_path / "ckpt"
    assert _one_line(_thruput("train", str(config), "--resume"), 2) == f"thruput train: no checkpoint in {ckpt}"
    ckpt.mkdir()
    (ckpt / "step_00000002.pt").write_bytes(b"")
    (ckpt / "step_00000001.pt").write_bytes(b"PK\x03\x04" + bytes(100))
    assert _one_line(_thruput("train", str(config), "--resume"), 2) == (
        f"thruput train: no checkpoint in {ckpt} loads (step_00000002.pt: empty file (0 bytes); step_00000001.pt: "
        f"truncated: a zip archive (torch.save's format) of 104 bytes whose end is missing)")


def test_log_every_lines_a_corrupt_newest_checkpoint_and_another_models_checkpoint(tmp_path) -> None:
    config = _config(tmp_path, GOOD, steps=3, log_every=2)
    first = _thruput("train", str(config))
    assert first.returncode == 0, first.stderr
    lines = LOG_LINE.findall(first.stdout)
    assert [(int(s), int(n)) for s, n, *_ in lines] == [(2, 3), (3, 3)]  # every 2 steps, and the last
    assert float(lines[0][3]) == pytest.approx(1e-3, rel=1e-3)  # warm-up of 1 step: the peak at step 2
    assert all(int(rate.replace(",", "")) > 0 for *_, rate in lines)
    ckpt = tmp_path / "ckpt"
    (ckpt / "step_00000003.pt").write_bytes(b"\x00" * 64)
    config.write_text(config.read_text().replace("steps = 3", "steps = 4"))
    resumed = _thruput("train", str(config), "--resume")
    assert _one_line(resumed, 0) == (
        f"thruput train: warning: {ckpt / 'step_00000003.pt'} does not load (corrupt or not a checkpoint: 64 bytes "
        f"that are not a zip archive (torch.save's format)); resuming from step_00000002.pt, the newest that does "
        f"(the file is kept as step_00000003.pt.unloadable)")
    assert [(int(s), int(n)) for s, n, *_ in LOG_LINE.findall(resumed.stdout)] == [(4, 4)]
    config.write_text(config.read_text().replace("steps = 4", "steps = 5").replace("d_model = 16", "d_model = 32"))
    assert _one_line(_thruput("train", str(config), "--resume"), 2) == (
        f"thruput train: {ckpt / 'step_00000004.pt'} does not fit this run: model.d_model is 16 in the checkpoint, "
        f"32 in this run")


def test_interrupt_exits_130_and_a_bug_keeps_its_traceback(monkeypatch, capsys, tmp_path) -> None:
    import thruput.profile

    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(thruput.profile, "load_json", interrupted)
    assert main(["report", "x.json"]) == EXIT_INTERRUPTED
    assert capsys.readouterr().err == "thruput report: interrupted\n"

    def buggy(path):
        raise RuntimeError("an internal bug")

    monkeypatch.setattr(thruput.profile, "load_json", buggy)
    with pytest.raises(RuntimeError, match="an internal bug"):  # not reduced to a line: the traceback shows
        main(["report", "x.json"])
    before = warnings.showwarning
    monkeypatch.setattr(thruput.profile, "load_json", lambda path: warnings.warn("careful\nnow") or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main(["report", "x.json"])
    assert capsys.readouterr().err == "thruput report: warning: careful / now\n"
    assert warnings.showwarning is before  # the one-line printer is gone after the command
