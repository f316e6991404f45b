"""The command line: sub-commands, report rendering, bench dispatch, the demo."""
import json
import subprocess
import sys

import pytest

from thruput.cli import main


def test_help_lists_subcommands(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("demo", "train", "report", "bench", "estimate"):
        assert command in out


def test_unknown_benchmark_lists_known(capsys) -> None:
    assert main(["bench", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown benchmark 'nope'" in err and "profiler" in err


def test_bench_profiler_quick_writes_json(tmp_path) -> None:
    out = tmp_path / "p.json"
    assert main(["bench", "profiler", "--quick", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["overhead_ratio"] > 0


def test_demo_tiny_runs_both_sides_and_reports(tmp_path, capsys) -> None:
    assert main(["demo", "--tiny", "--out", str(tmp_path)]) == 0
    page = (tmp_path / "demo.html").read_text()
    assert page.startswith("<!doctype html>") and "baseline" in page and "thruput" in page
    figures = json.loads((tmp_path / "demo.json").read_text())
    base, fast = figures["runs"]["baseline"], figures["runs"]["thruput"]
    assert fast["levers"] == ["data_plane", "offload", "fused_ce", "compile"] and base["levers"] == []
    # Same labelled tokens (the packed run rounds up to whole rows) and packing leaves no padding.
    row = figures["setup"]["seq_len"]
    assert base["useful_tokens"] <= fast["useful_tokens"] < base["useful_tokens"] + figures["setup"]["packed_rows"] * row
    assert fast["padding_ratio"] < 0.02
    assert figures["speedup"] > 0 and figures["loss_rel_diff"] >= 0
    out = capsys.readouterr().out
    assert "useful tokens/s" in out and "held-out loss" in out
    html = tmp_path / "again.html"
    trace = tmp_path / "trace.json"
    assert main(["report", str(tmp_path / "thruput.json"), "--html", str(html), "--trace", str(trace)]) == 0
    assert "verdict" in capsys.readouterr().out
    assert html.exists() and json.loads(trace.read_text())["traceEvents"]


def test_report_of_missing_file_is_clear(tmp_path, capsys) -> None:
    assert main(["report", str(tmp_path / "none.json")]) == 2
    assert "run file not found" in capsys.readouterr().err


def test_train_with_bad_config_names_key(tmp_path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[optimizer]\nlr = 'high'\n")
    proc = subprocess.run([sys.executable, "-m", "thruput.cli", "train", str(cfg)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "optimizer.lr: expected float" in proc.stderr


def test_bench_help_lists_every_benchmark_with_its_description(capsys) -> None:
    from thruput import benchmarks

    with pytest.raises(SystemExit) as info:
        main(["bench", "--help"])
    assert info.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    listed = lines[lines.index("benchmarks:") + 1:]
    assert len(listed) == len(benchmarks.names()) >= 8
    for line, (name, description) in zip(listed, benchmarks.descriptions().items()):
        assert line.split() == [name, *description.split()]
    assert benchmarks.descriptions()["profiler"] == benchmarks.available()["profiler"].DESCRIPTION


def test_a_failure_of_the_machine_exits_1_on_one_line(monkeypatch, capsys) -> None:
    import thruput.profile

    def full(path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(thruput.profile, "load_json", full)
    assert main(["report", "x.json"]) == 1
    assert capsys.readouterr().err == "thruput report: [Errno 28] No space left on device\n"
