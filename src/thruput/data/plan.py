"""The declarative plan: what to read, how to mix, pack and balance it."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import KW_ONLY, InitVar, dataclass, field

import numpy as np

from thruput.data.balance import CostModel
from thruput.data.errors import DataError
from thruput.data.mixture import normalized_weights, quotas, weight_at
from thruput.data.sources import Source
from thruput.data.tokenize import ByteTokenizer, DocumentTokenizer, Tokenizer

BALANCE_STRATEGIES = ("lpt", "none")


@dataclass
class Plan:
    """Everything that decides which tokens each rank sees at each step.

    * ``sources``: each with its ``weight`` (a number or a ``step -> float`` schedule);
      ``weights`` (``step -> {name: weight}``) overrides them all when given.
    * ``seq_len``: tokens per row; ``tokens_per_batch``: tokens per step over all ranks, a multiple
      of ``seq_len * world_size``. Weights split the step's tokens (packing) or rows (no packing).
    * ``packing``: pack documents into full rows (no padding); otherwise one document piece per
      row, padded. Documents longer than ``seq_len`` are split either way.
    * ``balance``: ``"lpt"`` assigns work to ranks minimising the largest ``cost``; ``"none"``
      gives each rank a contiguous share.
    * ``world_size`` and ``seed``.
    * ``tokenizer`` (default ``ByteTokenizer``) and ``eos``: append the tokenizer's EOS token to
      every non-empty document (pre-tokenized ones too), so the model learns to predict where a
      document ends: its label at a document's last token is the EOS, at the EOS itself -100.
      ``None`` (the default): when the tokenizer has one (``eos_id``; ``ByteTokenizer`` has none);
      ``True``: required (``DataError`` without one); ``False``: never. ``document_tokenizer``
      is what the source loaders run.

    Who reads the sources is not part of the plan (it changes no token): ``Loader(plan,
    backend=...)`` chooses; passing ``backend=`` here raises ``TypeError`` saying so.

    The tokens of step ``s`` are a pure function of (plan, seed, s) and the per-source stream
    cursors; the cursors are the whole resumable state. Raises ``DataError`` naming the field.
    """

    sources: Sequence[Source]
    seq_len: int
    tokens_per_batch: int
    packing: bool = True
    balance: str = "lpt"
    cost: CostModel = field(default_factory=CostModel)
    world_size: int = 1
    seed: int = 0
    tokenizer: Tokenizer = field(default_factory=ByteTokenizer)
    weights: Callable[[int], Mapping[str, float]] | None = None
    eos: bool | None = None
    document_tokenizer: DocumentTokenizer = field(init=False, repr=False, compare=False)
    _: KW_ONLY
    backend: InitVar[None] = None  # moved to the Loader: caught to say so

    def __post_init__(self, backend: None) -> None:
        if backend is not None:
            raise TypeError(
                f"Plan(backend={backend!r}): the backend is no longer part of the plan (it changes no token); "
                f"pass it to the loader: Loader(plan, backend={backend!r}), or set data.backend in the run config"
            )
        self.sources = list(self.sources)
        if not isinstance(self.seq_len, (int, np.integer)) or self.seq_len <= 0:
            raise DataError(f"plan: seq_len must be a positive integer, got {self.seq_len!r}")
        if not isinstance(self.tokens_per_batch, (int, np.integer)) or self.tokens_per_batch <= 0:
            raise DataError(f"plan: tokens_per_batch must be a positive integer, got {self.tokens_per_batch!r}")
        if self.tokens_per_batch % self.seq_len:
            raise DataError(
                f"plan: tokens_per_batch {self.tokens_per_batch} is not a multiple of seq_len {self.seq_len}"
            )
        self.check_world_size(self.world_size)
        if self.balance not in BALANCE_STRATEGIES:
            raise DataError(f"plan: balance must be one of {BALANCE_STRATEGIES}, got {self.balance!r}")
        if self.eos not in (None, True, False):
            raise DataError(f"plan: eos must be True, False or None, got {self.eos!r}")
        eos_id = getattr(self.tokenizer, "eos_id", None)
        if self.eos and eos_id is None:
            raise DataError(f"plan: eos=True, but the tokenizer ({type(self.tokenizer).__name__}) has no EOS token")
        self.document_tokenizer = DocumentTokenizer(self.tokenizer, None if self.eos is False else eos_id)
        if not self.sources:
            raise DataError("plan: no sources")
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise DataError(f"plan: duplicate source names {dupes}")
        for source in self.sources:
            source.check()
        self.weights_at(0)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    @property
    def eos_id(self) -> int | None:
        """The token appended to every document, or None."""
        return self.document_tokenizer.eos_id

    @property
    def rows_per_step(self) -> int:
        return self.tokens_per_batch // self.seq_len

    def check_world_size(self, world_size: int) -> None:
        if not isinstance(world_size, (int, np.integer)) or world_size <= 0:
            raise DataError(f"plan: world_size must be a positive integer, got {world_size!r}")
        if self.rows_per_step % world_size:
            raise DataError(
                f"plan: {self.rows_per_step} rows per step (tokens_per_batch / seq_len) "
                f"cannot be split equally over world_size {world_size}"
            )

    def weights_at(self, step: int) -> np.ndarray:
        """Normalised source weights at ``step``; ``DataError`` if they are negative or sum to zero."""
        if self.weights is not None:
            table = self.weights(step)
            unknown = sorted(set(table) - set(self.names))
            if unknown:
                raise DataError(f"plan: weights at step {step} name unknown sources {unknown}")
            raw = [float(table.get(n, 0.0)) for n in self.names]
        else:
            raw = [weight_at(s.weight, step) for s in self.sources]
        return normalized_weights(self.names, raw, step)

    def quotas(self, step: int) -> np.ndarray:
        """Per-source share of step ``step``: tokens when packing, rows otherwise."""
        units = self.tokens_per_batch if self.packing else self.rows_per_step
        return quotas(self.weights_at(step), units, self.seed, step)
