"""`thruput bench hf`: every arm trains on the same labelled tokens, and the quick run's figures hold together.

Speed is not asserted: the numbers depend on the machine and its load.
"""
import json
import math

import numpy as np
import pytest

from thruput.benchmarks._hf_setup import Workload, build_data, labelled, thruput_plan, training_set
from thruput.cli import main
from thruput.data import Loader


def test_training_set_holds_exactly_the_loaders_targets(tmp_path):
    work = Workload.quick()
    data = build_data(work, cache=tmp_path)
    documents, total = training_set(work, data)
    loader_targets = []
    with Loader(thruput_plan(work, data), backend="inline", steps=work.steps) as loader:
        batches = list(loader)
    for batch in batches:
        t = batch["shift_labels"].numpy().reshape(-1)
        loader_targets.append(t[t != -100])
    assert total == sum(labelled(b) for b in batches) > 0
    # Trained alone with the label shift, the documents' targets are the Loader's, token for token.
    hf_targets = np.concatenate([d[1:] for d in documents])
    assert np.array_equal(np.sort(hf_targets), np.sort(np.concatenate(loader_targets)))
    assert max(len(d) for d in documents) <= work.seq_len
    # Two sources, long-tailed: most documents far shorter than a row.
    sources = {s for b in batches for s, *_ in b["documents"]}
    assert sources == {"explain", "implement"}
    assert np.median([len(d) for d in documents]) < work.seq_len / 2


@pytest.mark.slow
def test_quick_run_writes_consistent_figures(tmp_path, capsys):
    out = tmp_path / "hf.json"
    assert main(["bench", "hf", "--quick", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    arms = result["arms"]
    assert set(arms) == {"hf_default", "hf_best", "thruput"}
    assert all("error" not in a for a in arms.values()), arms
    rate = {name: a["useful_tokens_per_s"] for name, a in arms.items()}
    assert result["speedup_vs_hf_default"] == pytest.approx(rate["thruput"] / rate["hf_default"], rel=1e-12)
    assert result["speedup_vs_hf_best"] == pytest.approx(rate["thruput"] / rate["hf_best"], rel=1e-12)
    losses = {name: a["held_out_loss"] for name, a in arms.items()}
    assert all(math.isfinite(v) and 0 < v < math.log(result["workload"]["vocab_size"]) + 1 for v in losses.values())
    assert result["loss_rel_diff_vs_hf_default"] == pytest.approx(
        abs(losses["thruput"] - losses["hf_default"]) / losses["hf_default"], rel=1e-12)
    # The same labelled tokens in every arm; padding only where the padding collator puts it.
    assert {a["labelled_tokens"] for a in arms.values()} == {result["workload"]["labelled_tokens"]}
    assert arms["hf_default"]["padding_ratio"] > 0
    assert arms["hf_best"]["padding_ratio"] == 0 and arms["thruput"]["padding_ratio"] == 0
    assert all(a["peak_delta_bytes"] > 0 and a["median_step_s"] > 0 for a in arms.values())
    assert result["not_run"]["liger"].startswith("needs CUDA")
    for name in arms:
        assert name in printed
