"""The reference training loop: wires data, memory, kernels and the profiler together.

Read top to bottom, one step is: wait for a batch (``data_wait``), move it to the device
(``h2d``), forward + loss (``forward``), backward (``backward``), gradient sync (``comm``,
data-parallel only), clip + optimizer + LR schedule (``optimizer``), weights back to the device
(``h2d``, offloaded optimizers). The loop knows neither the model's kind (``thruput.models.kinds``)
nor the optimizer's (``thruput.optimizer``); printing is the caller's (``on_step``).
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from thruput.checkpoint import Checkpointer, CheckpointError, TorchRNG, check_same_run, load_newest, restore
from thruput.config import ConfigError, RunConfig, to_dict
from thruput.data_config import build_sources, build_tokenizer, check_data
from thruput.models.kinds import build_model, bundled_tokenizer, transformer_shape
from thruput.optimizer import build_optimizer
from thruput.labels import IGNORE_INDEX
from thruput.profile import ClockSampler, StepProfiler, lookup_peak, measure_cpu_peak, run_document
from thruput.profile.collectives import collective


@dataclass
class TrainResult:
    """What a run produced: the loss per step and the profiler's run document."""

    losses: list[float] = field(default_factory=list)
    document: dict[str, Any] | None = None
    start_step: int = 0
    checkpoints: list[Path] = field(default_factory=list)
    model: torch.nn.Module | None = None
    useful_tokens: int = 0  # labelled (non-padding) positions trained on, all ranks
    skipped_checkpoints: list[Path] = field(default_factory=list)  # newer ones that did not load
    rank: int = 0


@dataclass(frozen=True)
class StepInfo:
    """What ``train(on_step=...)`` is told after each step: the step number (1-based), the
    run's last step, this rank's loss and positions, the learning rate the step used and the
    step's host wall time in seconds."""

    step: int
    steps: int
    loss: float
    lr: float
    tokens: int
    seconds: float
    rank: int


def build_scheduler(cfg: RunConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to 10% of the peak LR at the last step."""
    warmup, total = cfg.optimizer.warmup_steps, cfg.steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[dict]) -> float:
    """Mean cross-entropy per labelled token over ``batches`` for a ``thruput.models.GPT``
    (document-masked when the batches carry ``segment_ids`` or ``position_ids``), in eval mode;
    the model's mode is restored afterwards."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            logits = model(batch["input_ids"], batch.get("position_ids"), batch.get("segment_ids"))
            labels = batch["shift_labels"].flatten()
            total += float(F.cross_entropy(logits.flatten(0, 1).float(), labels, ignore_index=IGNORE_INDEX,
                                           reduction="sum"))
            count += int((labels != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    return total / max(count, 1)


def build_loader(cfg: RunConfig, rank: int, world: int, cost: Any = None) -> Any:
    """The data plane for this rank: packed rows of ``seq_len``, ``batch_size`` rows per rank.

    Ranks are balanced by ``cost`` (a ``thruput.data.CostModel``), by default the FLOPs of the
    model ``cfg.model`` describes (``CostModel.for_transformer`` of its kind's transformer shape).
    """
    from thruput.data import CostModel, Loader, Plan, resolve_backend

    d = cfg.data
    if cost is None:
        cost = CostModel.for_transformer(**transformer_shape(cfg.model))
    plan = Plan(build_sources(cfg), seq_len=d.seq_len, tokens_per_batch=d.seq_len * d.batch_size * world,
                packing=d.pack, cost=cost, world_size=world, seed=cfg.seed, tokenizer=build_tokenizer(cfg),
                eos=d.eos)
    backend = resolve_backend(d.backend, world, address=d.ray_address, cpu_budget=d.workers)
    if backend == "ray":
        # Every rank of one launch joins the same actors: torchrun gives all ranks one run id.
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", cfg.name)
        options: dict[str, Any] = {"address": d.ray_address, "run_id": run_id}
    elif backend == "process":
        options = {"cpu_budget": max(1, d.workers), "max_workers": max(1, d.workers)}
    else:
        options = {}
    return Loader(plan, rank=rank, world_size=world, backend=backend, device=cfg.device, workers=options)


class ForeignLoader:
    """A ``loader_factory``'s iterable of batches (a torch ``DataLoader``, say) as the loop uses a
    loader: ``stats()`` names its type; it has no state, so checkpointing it is refused."""

    def __init__(self, batches: Iterable[dict]) -> None:
        self.batches = batches

    def __iter__(self) -> Any:
        return iter(self.batches)

    def stats(self) -> dict[str, Any]:
        return {"backend": type(self.batches).__name__}

    def state_dict(self) -> dict[str, Any]:
        raise CheckpointError(f"a {type(self.batches).__name__} from loader_factory has no resumable state: "
                              "checkpoint runs on thruput's own loader")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state_dict()

    def close(self) -> None:
        close = getattr(self.batches, "close", None)
        if close is not None:
            close()


def with_model_tokenizer(cfg: RunConfig) -> RunConfig:
    """``cfg`` whose ``data.tokenizer`` is the model's own when the config sets none."""
    bundled = None if cfg.data.tokenizer is not None else bundled_tokenizer(cfg.model)
    if bundled is None:
        return cfg
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=bundled))


def _peak_flops(cfg: RunConfig, device: torch.device) -> float | None:
    if cfg.profile.peak_flops is not None:
        return cfg.profile.peak_flops
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    if device.type == "cuda":
        return lookup_peak(torch.cuda.get_device_name(device), dtype)
    return measure_cpu_peak(dtype)


def _distributed(device: str) -> tuple[int, int]:
    """(rank, world size); initialises torch.distributed when launched by torchrun: NCCL when
    training on CUDA, where a device without an index becomes this rank's ``LOCAL_RANK`` GPU
    (otherwise every rank would train on GPU 0), else gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    target = torch.device(device)
    if world > 1 and target.type == "cuda" and target.index is None:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def train(
    cfg: RunConfig,
    *,
    resume: bool = False,
    stop_after: int | None = None,
    loader_factory: Callable[[RunConfig, int, int], Iterable[dict]] | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
) -> TrainResult:
    """Run ``cfg.steps`` training steps (or stop after ``stop_after`` steps, for tests of
    interrupted runs) and return losses and the profiler's run document, which records the
    loss and learning rate of every step. ``on_step`` is called after each step (on every rank)
    with a :class:`StepInfo`; ``thruput train`` prints from it. ``loader_factory(cfg, rank,
    world)`` replaces thruput's loader with any iterable of batches (no checkpoints then).

    With ``resume=True`` the newest checkpoint in ``cfg.checkpoint.dir`` that loads is loaded (a
    newer one that does not gets a ``CheckpointWarning`` and is kept as ``NAME.unloadable``) and
    the run continues exactly where it stopped: same batches, same optimizer and LR state.
    Raises FileNotFoundError if there is no checkpoint, ``CheckpointError`` if none loads or the
    newest that loads does not fit this run (naming the key).
    """
    cfg = with_model_tokenizer(cfg)
    check_data(cfg)  # a wrong path, field or vocabulary fails here, before workers or the model
    rank, world = _distributed(cfg.device)
    state, skipped = None, []
    if resume:  # first, so that a missing or foreign checkpoint is reported before any set-up
        if not cfg.checkpoint.dir:
            raise ConfigError("checkpoint.dir: --resume needs the folder of the checkpoints")
        # Warns for each newer file that does not load; rank 0 renames those aside (other ranks
        # reading meanwhile skip them all the same).
        path, state, skipped = load_newest(cfg.checkpoint.dir, set_aside=rank == 0)
        check_same_run(path, state, to_dict(cfg))
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    model = build_model(cfg, device)
    optimizer = build_optimizer(cfg, model.module.parameters())
    scheduler = build_scheduler(cfg, optimizer.optimizer)
    # dtype "bfloat16": mixed precision (weights keep model's dtype, matmuls run in bf16).
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")
    comm = None
    if world > 1 and not optimizer.reduces_gradients:
        from thruput.comm import GradientBuckets

        comm = GradientBuckets([p for p in model.module.parameters() if p.requires_grad], op="all_reduce")
    loader = build_loader(cfg, rank, world) if loader_factory is None else ForeignLoader(
        loader_factory(cfg, rank, world))
    prof = StepProfiler(device, peak_flops=_peak_flops(cfg, device) if cfg.profile.enabled else None,
                        clocks=ClockSampler(hz=cfg.profile.clock_hz) if cfg.profile.enabled else None,
                        enabled=cfg.profile.enabled)
    prof.meta.update({"config": to_dict(cfg), "rank": rank, "world_size": world, "params": model.num_params(),
                      "optimizer": type(optimizer.optimizer).__name__, "data_backend": loader.stats().get("backend"),
                      "levers": _levers_on(cfg, comm is not None, loader_factory is None)})
    checkpoints = Checkpointer(
        cfg.checkpoint.dir, cfg.checkpoint.every, cfg.checkpoint.keep,
        {"model": model.module, "optimizer": optimizer.optimizer, "scheduler": scheduler, "loader": loader,
         "profiler": prof, "rng": TorchRNG()}, writes=rank == 0, collective=optimizer.collective_state,
        export=model.save if cfg.checkpoint.save_model else None)

    result = TrainResult(model=model.module, skipped_checkpoints=skipped, rank=rank)
    step = 0
    try:  # from here on the loader is closed however the run ends
        if state is not None:
            restore(path, state, checkpoints.parts, entries=("step", "losses", "useful_tokens"), optional=("rng",))
            step = result.start_step = int(state["step"])
            result.losses = list(state["losses"])
            result.useful_tokens = int(state["useful_tokens"])
            prof.meta["resumed_from"] = {"checkpoint": str(path), "step": step, "skipped": list(map(str, skipped))}
        batches = prof.wrap_loader(loader)
        end = cfg.steps if stop_after is None else min(cfg.steps, step + stop_after)
        while step < end:
            t0, lr = time.perf_counter(), optimizer.optimizer.param_groups[0]["lr"]  # the rate this step uses
            with prof.step(tokens=0, samples=0) as record:
                batch = next(batches)
                with prof.phase("h2d"):
                    batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                             for k, v in batch.items()}
                useful = int((batch["shift_labels"] != IGNORE_INDEX).sum())
                if cfg.profile.enabled:
                    record.tokens = batch["input_ids"].numel()
                    record.samples = batch["input_ids"].shape[0]
                    record.useful_tokens = useful
                    record.flops = model.flops(batch)
                with prof.phase("forward"), autocast:
                    loss = model.loss(batch)
                with prof.phase("backward"):
                    step_useful = backward_global_mean(loss, useful, world, device)  # all ranks
                if comm is not None:
                    prof.add_time("comm", comm.finish())
                with prof.phase("optimizer"):
                    optimizer.clip(cfg.optimizer.grad_clip)
                    optimizer.step()
                    scheduler.step()
                with prof.phase("h2d"):
                    optimizer.copy_back()
                for key, value in model.counters().items():
                    prof.counter(key, value)
            step += 1
            result.losses.append(loss.item())
            result.useful_tokens += step_useful
            prof.record_scalar("loss", result.losses[-1])
            prof.record_scalar("lr", lr)
            if on_step is not None:
                on_step(StepInfo(step, cfg.steps, result.losses[-1], lr, batch["input_ids"].numel(),
                                 time.perf_counter() - t0, rank))
            if checkpoints.due(step):
                result.checkpoints += _save(checkpoints, optimizer, step, cfg, result)
        optimizer.flush()  # a delayed update lands: the returned model holds the newest weights
        if cfg.checkpoint.dir and step > result.start_step and not checkpoints.due(step):
            # The end of the run (or of this slice of it, with stop_after) is always resumable.
            result.checkpoints += _save(checkpoints, optimizer, step, cfg, result)
    finally:
        loader.close()
    kernel_fallbacks = {**_kernel_fallbacks(cfg), **model.fallbacks()}
    result.document = run_document(prof, name=cfg.name, meta={"kernel_fallbacks": kernel_fallbacks})
    if cfg.profile.report_dir:  # every rank writes its own: `thruput report DIR/` merges them
        from thruput.profile import save_html, save_json

        stem = cfg.name if world == 1 else f"{cfg.name}-rank{rank}"
        save_json(result.document, Path(cfg.profile.report_dir) / f"{stem}.json")
        save_html(result.document, Path(cfg.profile.report_dir) / f"{stem}.html")
    return result


def backward_global_mean(loss: torch.Tensor, labelled: int, world: int, device: torch.device) -> int:
    """Backward of this rank's per-token mean ``loss`` over ``labelled`` tokens, weighted so that
    gradients averaged over ranks are those of the mean over every labelled token of the global
    batch (a plain mean of per-rank means is that only when the ranks hold equal counts).
    Returns the labelled tokens of all ranks: one scalar all-reduce when ``world > 1``."""
    if world == 1:
        loss.backward()
        return labelled
    total = torch.tensor([labelled], dtype=torch.int64, device=device if dist.get_backend() == "nccl" else "cpu")
    with collective():  # rank-level wait for the slowest forward (thruput.profile.collectives)
        dist.all_reduce(total)
    (loss * (world * labelled / max(1, int(total)))).backward()
    return int(total)


def _save(checkpoints: Checkpointer, optimizer: Any, step: int, cfg: RunConfig, result: TrainResult) -> list[Path]:
    """Checkpoint ``step`` (every rank calls this; rank 0 writes)."""
    optimizer.flush()  # a delayed update lands before the weights are saved
    saved = checkpoints.save(step, {"losses": list(result.losses), "useful_tokens": result.useful_tokens,
                                    "config": to_dict(cfg)})
    return [saved] if saved else []


def _kernel_fallbacks(cfg: RunConfig) -> dict[str, str]:
    """The fused loss's slower paths of this run, and why (for the run document)."""
    if not cfg.kernels.fused_cross_entropy:
        return {}
    from thruput.kernels import fallbacks

    return fallbacks()  # only the fused loss records there


def _levers_on(cfg: RunConfig, comm_overlap: bool, own_loader: bool) -> list[str]:
    """The verdict's lever names this run has on (``thruput.profile.verdict.LEVERS``); packing
    only when the rows come from thruput's own loader (a ``loader_factory`` may not pack)."""
    offload = cfg.optimizer.kind == "offload_adamw"
    on = {"packing": own_loader and cfg.data.pack, "fused_cross_entropy": cfg.kernels.fused_cross_entropy,
          "compile": cfg.kernels.compile, "offload": offload, "comm_overlap": comm_overlap,
          "low_precision_states": offload and cfg.optimizer.state_dtype != "fp32",
          "delayed_update": offload and cfg.optimizer.delayed_update_after is not None}
    return sorted(name for name, value in on.items() if value)
