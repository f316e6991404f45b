"""The reference training loop: wires data, memory, kernels and the profiler together.

Read top to bottom, one step is: wait for a batch (``data_wait``), move it to the device
(``h2d``), forward + loss (``forward``), backward (``backward``), gradient sync (``comm``,
data-parallel only), clip + optimizer + LR schedule (``optimizer``).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from thruput.checkpoint import check_same_run, load_newest, restore, save_checkpoint
from thruput.config import ConfigError, RunConfig, to_dict
from thruput.data_config import build_sources, build_tokenizer, check_data
from thruput.models import GPT, GPTConfig
from thruput.profile import ClockSampler, StepProfiler, lookup_peak, measure_cpu_peak, run_document
from thruput.profile.collectives import collective

from thruput.labels import IGNORE_INDEX


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


def build_model(cfg: RunConfig) -> GPT:
    m = cfg.model
    return GPT(GPTConfig(vocab_size=m.vocab_size, d_model=m.d_model, n_layers=m.n_layers,
                         n_heads=m.n_heads, mlp_ratio=m.mlp_ratio, max_seq_len=cfg.data.seq_len, attention=m.attention))


def build_optimizer(cfg: RunConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """torch AdamW, or thruput's OffloadAdamW; weight decay only on matrices."""
    o = cfg.optimizer
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if o.kind == "offload_adamw":
        from thruput.memory import OffloadAdamW, Zero2OffloadAdamW

        sharded = o.zero2 and dist.is_initialized() and dist.get_world_size() > 1
        return (Zero2OffloadAdamW if sharded else OffloadAdamW)(
            groups, lr=o.lr, betas=o.betas, eps=o.eps, state_dtype=o.state_dtype,
            delayed_update_after=o.delayed_update_after)
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps)


def build_scheduler(cfg: RunConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to 10% of the peak LR at the last step."""
    warmup, total = cfg.optimizer.warmup_steps, cfg.steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _kernel_fallbacks(cfg: RunConfig, compiled: Any) -> dict[str, str]:
    """The kernels of this run that took a slower path than asked, and why (for the run document)."""
    found = {}
    if cfg.kernels.fused_cross_entropy:
        from thruput.kernels import fallbacks

        found.update(fallbacks())  # only the fused loss records there
    if compiled is not None and compiled.stats()["fallback"]:
        found["compile"] = compiled.stats()["fallback"]
    return found


def build_loss(cfg: RunConfig, model: GPT, compiled: Callable[..., torch.Tensor] | None = None,
               ) -> Callable[[dict], torch.Tensor]:
    """Mean cross-entropy over labelled tokens: naive (full logits) or fused chunked.

    ``compiled`` is the compiled model (naive loss) or the compiled ``model.hidden`` (fused loss:
    the chunked LM head stays outside the graph, so the logits never exist in full)."""
    if cfg.kernels.fused_cross_entropy:
        from thruput.kernels import linear_cross_entropy

        hidden_fn = compiled or model.hidden

        def fused(batch: dict) -> torch.Tensor:
            hidden = hidden_fn(batch["input_ids"], batch.get("position_ids"), batch.get("segment_ids"))
            weight = model.lm_head.weight.to(hidden.dtype)  # bf16 under autocast; a no-op in fp32
            return linear_cross_entropy(hidden.flatten(0, 1), weight, batch["shift_labels"].flatten(),
                                        ignore_index=IGNORE_INDEX)

        return fused

    forward_fn = compiled or model

    def naive(batch: dict) -> torch.Tensor:
        logits = forward_fn(batch["input_ids"], batch.get("position_ids"), batch.get("segment_ids"))
        return F.cross_entropy(logits.flatten(0, 1).float(), batch["shift_labels"].flatten(), ignore_index=IGNORE_INDEX)

    return naive


@torch.no_grad()
def evaluate(model: GPT, batches: list[dict]) -> float:
    """Mean cross-entropy per labelled token over ``batches`` (document-masked when the batches
    carry ``segment_ids`` or ``position_ids``), in eval mode; the model's mode is restored afterwards."""
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


def batch_flops(model: GPT, batch: dict) -> float:
    """Training FLOPs of one batch: 6N per token plus attention over each document's length."""
    lengths = batch["cu_seqlens"].diff().to(torch.float64)
    tokens = batch["input_ids"].numel()
    return model.flops_per_token(float((lengths**2).sum()) / tokens) * tokens


def build_loader(cfg: RunConfig, rank: int, world: int, cost: Any = None) -> Any:
    """The data plane for this rank: packed rows of ``seq_len``, ``batch_size`` rows per rank.

    Ranks are balanced by ``cost`` (a ``thruput.data.CostModel``), by default the FLOPs of the
    model ``cfg.model`` describes (``CostModel.for_transformer``).
    """
    from thruput.data import CostModel, Loader, Plan, resolve_backend

    d, m = cfg.data, cfg.model
    if cost is None:
        cost = CostModel.for_transformer(m.d_model, m.n_layers, m.vocab_size, m.mlp_ratio)
    plan = Plan(build_sources(cfg), seq_len=d.seq_len, tokens_per_batch=d.seq_len * d.batch_size * world,
                packing=d.pack, cost=cost, world_size=world, seed=cfg.seed, tokenizer=build_tokenizer(cfg), eos=d.eos)
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
    show_progress: bool = False,
    print_report: bool = False,
    stop_after: int | None = None,
    loader_factory: Callable[[RunConfig, int, int], Any] | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
) -> TrainResult:
    """Run ``cfg.steps`` training steps (or stop after ``stop_after`` steps, for tests of
    interrupted runs) and return losses and the profiler's run document, which records the
    loss and learning rate of every step. ``on_step`` is called after each step (on every rank)
    with a :class:`StepInfo`; ``thruput train`` prints one every ``log_every`` steps.

    With ``resume=True`` the newest checkpoint in ``cfg.checkpoint.dir`` that loads is loaded (a
    newer one that does not gets a ``CheckpointWarning`` and is kept as ``NAME.unloadable``) and
    the run continues exactly where it stopped: same batches, same optimizer and LR state.
    Raises FileNotFoundError if there is no checkpoint, ``CheckpointError`` if none loads or the
    newest that loads does not fit this run (naming the key).
    """
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
    model = build_model(cfg).to(device)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer)
    offload = cfg.optimizer.kind == "offload_adamw"
    compiled = None
    if cfg.kernels.compile:
        from thruput.kernels import compile as compile_model

        # The data plane's rows are always seq_len long; shorter buckets serve padded loaders.
        buckets = sorted({max(1, cfg.data.seq_len // 4), max(1, cfg.data.seq_len // 2), cfg.data.seq_len})
        compiled = compile_model(model.hidden if cfg.kernels.fused_cross_entropy else model, buckets)
    loss_fn = build_loss(cfg, model, compiled)
    # dtype "bfloat16": mixed precision (weights stay fp32, matmuls run in bf16).
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")
    comm = None
    sharded = False
    if offload:
        from thruput.memory import Zero2OffloadAdamW

        sharded = isinstance(optimizer, Zero2OffloadAdamW)
    if world > 1 and not sharded:  # ZeRO-2 reduce-scatters its own gradients
        from thruput.comm import GradientBuckets

        comm = GradientBuckets(model.parameters(), op="all_reduce")
    loader = (loader_factory or build_loader)(cfg, rank, world)
    prof = StepProfiler(device, peak_flops=_peak_flops(cfg, device) if cfg.profile.enabled else None,
                        clocks=ClockSampler(hz=cfg.profile.clock_hz) if cfg.profile.enabled else None,
                        enabled=cfg.profile.enabled)
    prof.meta.update({"config": to_dict(cfg), "rank": rank, "world_size": world,
                      "params": model.num_params(non_embedding=False), "optimizer": type(optimizer).__name__,
                      "data_backend": getattr(loader, "stats", dict)().get("backend", type(loader).__name__),
                      "levers": _levers_on(cfg, comm is not None, loader_factory is None)})

    result = TrainResult(model=model, skipped_checkpoints=skipped)
    step = 0
    progress = None
    try:  # from here on the loader is closed however the run ends
        if state is not None:
            restore(path, state, {"model": model, "optimizer": optimizer, "scheduler": scheduler, "loader": loader,
                                  "profiler": prof}, entries=("step", "losses", "useful_tokens"))
            step = result.start_step = int(state["step"])
            result.losses = list(state["losses"])
            result.useful_tokens = int(state["useful_tokens"])
            prof.meta["resumed_from"] = {"checkpoint": str(path), "step": step, "skipped": list(map(str, skipped))}
        progress = _progress(cfg, step) if show_progress and rank == 0 else None
        batches = prof.wrap_loader(loader)
        end = cfg.steps if stop_after is None else min(cfg.steps, step + stop_after)
        while step < end:
            t0, lr = time.perf_counter(), optimizer.param_groups[0]["lr"]  # the rate this step uses
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
                    record.flops = batch_flops(model, batch)
                with prof.phase("forward"), autocast:
                    loss = loss_fn(batch)
                with prof.phase("backward"):
                    step_useful = backward_global_mean(loss, useful, world, device)  # all ranks
                if comm is not None:
                    prof.add_time("comm", comm.finish())
                with prof.phase("optimizer"):
                    if cfg.optimizer.grad_clip is not None:
                        clip = getattr(optimizer, "clip_grad_norm_", None)
                        if clip is not None:  # OffloadAdamW: the gradients live in host buckets
                            clip(cfg.optimizer.grad_clip)
                        else:
                            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.grad_clip)
                    # OffloadAdamW: the parameter copies back to the device are their own phase.
                    optimizer.step(copy_back=False) if offload else optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    scheduler.step()
                if offload:
                    with prof.phase("h2d"):
                        optimizer.copy_back()
                if compiled is not None:
                    for key, value in compiled.stats().items():
                        if isinstance(value, (int, float)):
                            prof.counter(key, value)
            step += 1
            result.losses.append(loss.item())
            result.useful_tokens += step_useful
            prof.record_scalar("loss", result.losses[-1])
            prof.record_scalar("lr", lr)
            if on_step is not None:
                on_step(StepInfo(step, cfg.steps, result.losses[-1], lr, batch["input_ids"].numel(),
                                 time.perf_counter() - t0, rank))
            if progress is not None:
                progress.advance(loss=result.losses[-1])
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
                saved = _save(cfg, step, rank, sharded, model, optimizer, scheduler, loader, prof, result)
                result.checkpoints += [saved] if saved else []
        if offload:
            optimizer.flush()  # a delayed update lands: the returned model holds the newest weights
        if cfg.checkpoint.dir and step > result.start_step and not (
                cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
            # The end of the run (or of this slice of it, with stop_after) is always resumable.
            saved = _save(cfg, step, rank, sharded, model, optimizer, scheduler, loader, prof, result)
            result.checkpoints += [saved] if saved else []
    finally:
        if progress is not None:
            progress.close()
        close = getattr(loader, "close", None)
        if close is not None:
            close()
    result.document = run_document(prof, name=cfg.name, meta={"kernel_fallbacks": _kernel_fallbacks(cfg, compiled)})
    if print_report and rank == 0:
        from thruput.profile import render_terminal

        render_terminal(result.document)
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


def _save(cfg: RunConfig, step: int, rank: int, sharded: bool, model: torch.nn.Module,
          optimizer: torch.optim.Optimizer, scheduler: Any, loader: Any, prof: StepProfiler,
          result: TrainResult) -> Path | None:
    """Rank 0 writes the checkpoint; every rank calls this, since a sharded optimizer's
    ``state_dict()`` gathers the shards (a collective)."""
    if rank != 0 and not sharded:
        return None
    if hasattr(optimizer, "flush"):
        optimizer.flush()  # OffloadAdamW: a delayed update lands before the weights are saved
    state = {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "loader": loader.state_dict(), "profiler": prof.state_dict(),
             "losses": list(result.losses), "useful_tokens": result.useful_tokens, "config": to_dict(cfg)}
    return save_checkpoint(state, cfg.checkpoint.dir, step, keep=cfg.checkpoint.keep) if rank == 0 else None


def _levers_on(cfg: RunConfig, comm_overlap: bool, own_loader: bool) -> list[str]:
    """The verdict's lever names this run has on (``thruput.profile.verdict.LEVERS``); packing
    only when the rows come from thruput's own loader (a ``loader_factory`` may not pack)."""
    offload = cfg.optimizer.kind == "offload_adamw"
    on = {"packing": own_loader and cfg.data.pack, "fused_cross_entropy": cfg.kernels.fused_cross_entropy,
          "compile": cfg.kernels.compile, "offload": offload, "comm_overlap": comm_overlap,
          "low_precision_states": offload and cfg.optimizer.state_dtype != "fp32",
          "delayed_update": offload and cfg.optimizer.delayed_update_after is not None}
    return sorted(name for name, value in on.items() if value)


class _progress:
    """A rich progress bar showing step and loss."""

    def __init__(self, cfg: RunConfig, start: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn(f"[bold]{cfg.name}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(), transient=False)
        self.task = self.bar.add_task("train", total=cfg.steps, completed=start, loss="-")
        self.bar.start()

    def advance(self, loss: float) -> None:
        self.bar.update(self.task, advance=1, loss=f"{loss:.3f}")

    def close(self) -> None:
        self.bar.stop()
