"""Conversion between OffloadAdamW's host buckets and torch.optim.AdamW's state-dict format.

The format is torch.optim.AdamW's: per trainable parameter ``step`` and fp32 ``exp_avg`` /
``exp_avg_sq`` in the parameter's shape, plus the fp32 ``master`` when the training dtype is not
fp32 (torch AdamW ignores the extra key). So a checkpoint of an offloaded run loads into a run
with torch AdamW and back. Under ZeRO-2 a rank holds only pieces of each parameter; ``combine``
sums (or maxes) the zero-filled per-rank tensors into the full ones.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from thruput.memory.adam import AdamState
from thruput.memory.offload_buckets import HostSegment

_MOMENTS = ("exp_avg", "exp_avg_sq")


def export_state(param_groups: list[dict[str, Any]], segments: list[HostSegment],
                 pieces: dict[int, list[tuple[HostSegment, int]]],
                 combine: Callable[[Tensor, str], Tensor]) -> tuple[dict[int, dict[str, Tensor]], list[dict]]:
    """(state, param_groups) of a torch.optim.AdamW state dict for these host buckets.

    ``pieces`` maps ``id(param)`` to the (segment, piece index) pairs this process holds;
    ``combine(t, "sum" | "max")`` joins per-rank tensors (identity in one process). Parameters
    never stepped get no state entry, like torch.
    """
    index: dict[int, int] = {}
    groups = []
    defaults = torch.optim.AdamW([torch.zeros(1)]).param_groups[0]
    for group in param_groups:
        ids = [index.setdefault(id(p), len(index)) for p in group["params"]]
        saved = {k: v for k, v in defaults.items() if k != "params"}
        saved.update({k: v for k, v in group.items() if k != "params"})
        groups.append({**saved, "params": ids})
    moments = {id(seg): seg.state.to_fp32() for seg in segments}
    state: dict[int, dict[str, Tensor]] = {}
    for group in param_groups:
        for p in group["params"]:
            if not p.requires_grad:
                continue
            full = {k: torch.zeros(p.numel(), dtype=torch.float32) for k in (*_MOMENTS, "master")}
            step = 0
            for seg, i in pieces.get(id(p), []):  # ZeRO-2: only this rank's pieces
                _, ps, pe, ss = seg.pieces[i]
                m, v = moments[id(seg)]
                full["exp_avg"][ps:pe] = m[ss:ss + pe - ps]
                full["exp_avg_sq"][ps:pe] = v[ss:ss + pe - ps]
                full["master"][ps:pe] = seg.master[ss:ss + pe - ps]
                step = max(step, seg.steps[i])
            step = int(combine(torch.tensor([step], dtype=torch.float64), "max").item())
            if step == 0:
                continue
            entry = {"step": torch.tensor(float(step))}
            for k in _MOMENTS + (("master",) if p.dtype != torch.float32 else ()):
                entry[k] = combine(full[k], "sum").view(p.shape)
            state[index[id(p)]] = entry
    return state, groups


def import_state(param_groups: list[dict[str, Any]], segments: list[HostSegment], state_dtype: str,
                 state_dict: dict[str, Any]) -> None:
    """Load a torch.optim.AdamW-format ``state_dict`` into the groups' hyperparameters and the
    segments' masters, moments and per-piece step counts.

    The master comes from the saved ``master`` when present, else from the current parameters.
    Raises ``ValueError`` when the number of groups, of parameters per group, or a state's size
    differs, or when the saved groups use ``amsgrad`` / ``maximize``.
    """
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(param_groups):
        raise ValueError(f"loaded state dict has {len(saved_groups)} parameter groups, "
                         f"this optimizer has {len(param_groups)}")
    by_id: dict[int, dict[str, Tensor]] = {}
    for gi, (group, saved) in enumerate(zip(param_groups, saved_groups)):
        if len(group["params"]) != len(saved["params"]):
            raise ValueError(f"param group {gi}: loaded state dict has {len(saved['params'])} "
                             f"parameters, this optimizer has {len(group['params'])}")
        for key in ("amsgrad", "maximize"):
            if saved.get(key):
                raise ValueError(f"param group {gi}: {key}=True is not supported by OffloadAdamW")
        for p, idx in zip(group["params"], saved["params"]):
            entry = state_dict["state"].get(idx, state_dict["state"].get(str(idx)))
            if entry is not None:
                for key in (*_MOMENTS, "master"):
                    if key in entry and entry[key].numel() != p.numel():
                        raise ValueError(f"param group {gi}: state {key!r} of parameter {idx} has "
                                         f"{entry[key].numel()} elements, the parameter {p.numel()}")
                by_id[id(p)] = entry
        group.update({k: (tuple(v) if k == "betas" else v) for k, v in saved.items() if k != "params"})
    for seg in segments:
        m = torch.zeros(seg.numel, dtype=torch.float32)
        v = torch.zeros(seg.numel, dtype=torch.float32)
        for i, (p, ps, pe, ss) in enumerate(seg.pieces):
            entry = by_id.get(id(p))
            n = pe - ps
            master = entry.get("master") if entry is not None else None
            source = p.detach() if master is None else master
            seg.master[ss:ss + n].copy_(source.reshape(-1)[ps:pe])
            if seg.param_out is not None:  # what a skipped piece copies back
                seg.param_out[ss:ss + n].copy_(seg.master[ss:ss + n])
            seg.steps[i] = 0 if entry is None else int(float(entry["step"]))
            if entry is None:
                continue
            m[ss:ss + n] = entry["exp_avg"].detach().reshape(-1)[ps:pe].float().cpu()
            v[ss:ss + n] = entry["exp_avg_sq"].detach().reshape(-1)[ps:pe].float().cpu()
        fresh = AdamState.from_fp32(m, v, state_dtype, index_offset=seg.index_offset)
        for name in ("exp_avg", "exp_avg_sq", "exp_avg_scale", "exp_avg_sq_scale"):
            dst = getattr(seg.state, name)
            if dst is not None:
                dst.copy_(getattr(fresh, name))
