"""The GPT model, its construction, and its parameter and FLOP counts."""

from megagpt.model.build import build_model
from megagpt.model.gpt import GPT
from megagpt.model.kv_cache import KVCache

__all__ = ["GPT", "KVCache", "build_model"]
