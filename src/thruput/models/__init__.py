"""Models used by the demo, the tests and the benchmarks."""
from thruput.models.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
