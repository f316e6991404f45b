"""Shared fixtures. One Ray instance serves the whole test session; only tests that ask for it start it."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_address():
    """Address of a 127.0.0.1-only Ray instance (2 CPUs, no dashboard), shut down at session end."""
    ray = pytest.importorskip("ray")
    from thruput.data.backends.ray.backend import start_local_ray

    address = start_local_ray(num_cpus=2, object_store_memory=200 * 2**20)
    yield address
    ray.shutdown()


def _train_bpe(folder, texts, special=("[UNK]", "<|endoftext|>"), vocab_size=120):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=list(special),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return tok


@pytest.fixture(scope="session")
def bpe():
    """Trains a byte-level BPE: ``bpe(folder, texts, special=..., vocab_size=...)`` saves
    ``folder/tokenizer.json`` and returns the ``tokenizers.Tokenizer``."""
    return _train_bpe
