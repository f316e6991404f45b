"""Set-up of ``thruput bench hf``: instruction data, a trained BPE tokenizer, the shared training set.

Everything comes from the running interpreter's standard library (nothing is downloaded):

* two sources of instruction-like documents, JSONL files ``{"text": ...}``: ``explain`` (the
  instruction names a function or class, the response is its docstring: tens to hundreds of
  tokens) and ``implement`` (the instruction names it and quotes its summary line, the response
  is its source: up to a row). Lengths are long-tailed, most far shorter than a row. Every
  eighth module is held out: its documents are the held-out set.
* a byte-level BPE tokenizer trained on the training modules with ``tokenizers``, with ``<pad>``
  and ``<eos>``. Files are cached under ``default_corpus_dir() / "hf-bench"`` keyed by a hash
  of their inputs' content (the source files, the sizes, the library versions), never by a
  name, since several environments share one cache.
* the training set: the thruput arm's ``Loader`` decides which document tokens ``steps`` steps
  hold (a pure function of the plan); the HF arms get exactly those tokens as whole documents,
  so every arm trains on the same labelled tokens (checked: the counts must agree).
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from thruput.atomic import write_atomic
from thruput.data.corpus import default_corpus_dir, stdlib_files

SPECIAL = ("<pad>", "<eos>")
HELD_OUT_EVERY = 8  # module i is held out when i % 8 == 7
MAX_SOURCE_BYTES = 4096


@dataclass(frozen=True)
class Workload:
    """Sizes of the benchmark; :meth:`quick` is the seconds-long one the tests run."""

    vocab_size: int = 16384
    model: dict[str, Any] = field(default_factory=lambda: dict(
        hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4))
    seq_len: int = 1024  # thruput's row; documents longer than a row are left out of the data
    rows: int = 1  # thruput rows per step
    # Documents per HF step; None: as many as make the HF arms take thruput's number of steps
    # (``hf_batch_for``), so every arm makes about the same number of optimizer updates.
    hf_batch: int | None = None
    steps: int = 40  # thruput steps; the HF arms train on the same tokens (one epoch of them)
    lr: float = 1e-3
    eval_documents: int = 64
    max_files: int | None = None  # stdlib modules read (None: all)
    weights: dict[str, float] = field(default_factory=lambda: {"explain": 0.5, "implement": 0.5})
    seed: int = 0

    @classmethod
    def quick(cls) -> Workload:
        return cls(vocab_size=1024, model=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                               num_attention_heads=2, num_key_value_heads=2),
                   seq_len=256, rows=1, steps=6, eval_documents=8, max_files=48)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _records(path: Path) -> tuple[list[str], list[str]]:
    """(explain, implement) documents of one module, in source order."""
    code = path.read_text(encoding="utf-8", errors="replace")
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):  # a few stdlib files are templates
        return [], []
    lines = code.splitlines(keepends=True)
    module = path.stem
    explain, implement = [], []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        doc = ast.get_docstring(node)
        if not doc:
            continue
        kind = "class" if isinstance(node, ast.ClassDef) else "function"
        explain.append(f"### Instruction\nExplain what the {kind} `{node.name}` of `{module}` does.\n\n"
                       f"### Response\n{doc}\n")
        source = "".join(lines[node.lineno - 1:node.end_lineno])
        if len(source.encode("utf-8", errors="replace")) <= MAX_SOURCE_BYTES:
            summary = doc.strip().splitlines()[0]
            implement.append(f"### Instruction\nWrite the {kind} `{node.name}` for `{module}`: {summary}\n\n"
                             f"### Response\n```python\n{source}```\n")
    return explain, implement


def _content_key(files: list[Path], *parts: Any) -> str:
    import tokenizers

    digest = hashlib.sha256(json.dumps([tokenizers.__version__, *parts], default=str).encode())
    for f in files:
        digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


def train_tokenizer(files: list[Path], vocab_size: int, cache: Path) -> Path:
    """A byte-level BPE ``tokenizer.json`` trained on ``files`` (cached by content hash)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = cache / f"tokenizer-{_content_key(files, vocab_size, SPECIAL)}.json"
    if path.exists():
        return path
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(f) for f in files], trainer)
    cache.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda out: out.write(tok.to_str().encode()))
    return path


@dataclass(frozen=True)
class Data:
    """The files of one workload: tokenizer, training sources (name -> JSONL), held-out JSONL."""

    tokenizer: Path
    sources: dict[str, Path]
    held_out: Path


def build_data(work: Workload, cache: Path | None = None) -> Data:
    """Write (or find in the cache) the tokenizer and the instruction JSONL files of ``work``.

    Records whose tokens and EOS do not fit one row are left out: every arm then sees whole
    documents, and a model sees no document a row would cut.
    """
    from tokenizers import Tokenizer

    cache = (cache or default_corpus_dir()) / "hf-bench"
    files = stdlib_files(work.max_files)
    train_files = [f for i, f in enumerate(files) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    held_files = [f for i, f in enumerate(files) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    tokenizer = train_tokenizer(train_files, work.vocab_size, cache)
    folder = cache / f"data-{_content_key(files, tokenizer.name, work.seq_len, HELD_OUT_EVERY, MAX_SOURCE_BYTES)}"
    names = ("explain", "implement", "held_out")
    paths = {n: folder / f"{n}.jsonl" for n in names}
    if not all(p.exists() for p in paths.values()):
        tok = Tokenizer.from_file(str(tokenizer))
        docs: dict[str, list[str]] = {n: [] for n in names}
        for f in files:
            explain, implement = _records(f)
            if f in held_files:
                docs["held_out"] += [d for pair in zip(explain, implement) for d in pair]
            else:
                docs["explain"] += explain
                docs["implement"] += implement
        folder.mkdir(parents=True, exist_ok=True)
        for n in names:
            lengths = [len(e.ids) for e in tok.encode_batch(docs[n], add_special_tokens=False)]
            kept = [d for d, k in zip(docs[n], lengths) if 0 < k < work.seq_len]  # + EOS <= seq_len
            text = "".join(json.dumps({"text": d}) + "\n" for d in kept)
            write_atomic(paths[n], lambda out, text=text: out.write(text.encode()))
    return Data(tokenizer, {n: paths[n] for n in ("explain", "implement")}, paths["held_out"])


def thruput_plan(work: Workload, data: Data) -> Any:
    """The thruput arm's ``Plan``: both sources mixed by ``work.weights``, packed rows of ``seq_len``."""
    from thruput.data import JsonlSource, Plan
    from thruput.data.tokenize import HFTokenizer

    sources = [JsonlSource(n, p, weight=work.weights[n]) for n, p in data.sources.items()]
    return Plan(sources, seq_len=work.seq_len, tokens_per_batch=work.rows * work.seq_len, seed=work.seed,
                tokenizer=HFTokenizer(data.tokenizer, eos_token="<eos>"), eos=True)


def hf_batch_for(work: Workload, documents: list[np.ndarray]) -> int:
    """Documents per HF step: ``work.hf_batch``, else the training set's documents per thruput step."""
    return work.hf_batch or max(1, round(len(documents) / work.steps))


def labelled(batch: dict[str, Any]) -> int:
    """Labelled targets in a Loader batch."""
    return int((batch["shift_labels"] != -100).sum())


def training_set(work: Workload, data: Data) -> tuple[list[np.ndarray], int]:
    """(documents, labelled targets) of the thruput arm's ``work.steps`` steps.

    Each document is the tokens the steps hold of it, plus the target of the last one where it
    has one: trained alone with the label shift (``n`` tokens, ``n - 1`` targets) it has exactly
    the targets the Loader gave it. ``ValueError`` if the two counts disagree.
    """
    from thruput.data import Loader

    pieces: dict[tuple[str, int, int], list[tuple[int, np.ndarray, int]]] = {}
    total = 0
    with Loader(thruput_plan(work, data), backend="inline", steps=work.steps) as loader:
        for batch in loader:
            total += labelled(batch)
            flat_ids = batch["input_ids"].numpy().reshape(-1)
            flat_targets = batch["shift_labels"].numpy().reshape(-1)
            cu = batch["cu_seqlens"].numpy()
            for i, (source, epoch, record, offset, _) in enumerate(batch["documents"]):
                lo, hi = int(cu[i]), int(cu[i + 1])  # pieces are in row order, as cu_seqlens
                piece = (offset, flat_ids[lo:hi], int(flat_targets[hi - 1]))
                pieces.setdefault((source, epoch, record), []).append(piece)
    documents = []
    for parts in pieces.values():
        parts.sort(key=lambda p: p[0])
        tokens = np.concatenate([p[1] for p in parts])
        last_target = parts[-1][2]
        documents.append(np.append(tokens, last_target) if last_target != -100 else tokens)
    count = sum(len(d) - 1 for d in documents)
    if count != total:
        raise ValueError(f"training set: {count} targets in whole documents, {total} in the Loader's batches")
    return documents, total


def held_out_documents(work: Workload, data: Data) -> list[np.ndarray]:
    """The first ``work.eval_documents`` held-out documents, tokenized with the EOS at the end."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(data.tokenizer))
    eos = tok.token_to_id("<eos>")
    texts = [json.loads(line)["text"] for line in data.held_out.read_text(encoding="utf-8").splitlines()]
    return [np.array(e.ids + [eos], dtype=np.int64)
            for e in tok.encode_batch(texts[:work.eval_documents], add_special_tokens=False)]


def save_documents(path: Path, documents: list[np.ndarray]) -> None:
    """Documents as one ``.npz`` (tokens and offsets), for the arms' processes."""
    offsets = np.cumsum([0] + [len(d) for d in documents])
    tokens = np.concatenate(documents).astype(np.int64) if documents else np.zeros(0, np.int64)
    with open(path, "wb") as out:
        np.savez(out, tokens=tokens, offsets=offsets)
    os.chmod(path, 0o644)


def load_documents(path: Path) -> list[np.ndarray]:
    with np.load(path) as z:
        tokens, offsets = z["tokens"], z["offsets"]
    return [tokens[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
