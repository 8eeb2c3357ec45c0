"""Sampling text from a trained GPT.

With the KV cache the prompt is run once ("prefill") and each new token costs one
position's worth of work; without it every step reruns the whole sequence. Both
paths produce the same tokens, which a test checks.

A chat streams: `stream_tokens` yields each id as it is sampled and keeps the caller's
cache, so the next turn feeds only its own tokens, and `TextStream` turns the ids into
text as they come.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass

import torch

from megagpt.config.errors import ConfigError
from megagpt.model.gpt import GPT
from megagpt.model.kv_cache import KVCache
from megagpt.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Keep the top_k most likely tokens and the smallest set whose probability
    reaches top_p; the others get -inf. logits: (B, V)."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p.
        drop = cumulative - sorted_logits.softmax(dim=-1) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """One token id per row of logits (B, V); temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / temperature, top_k, top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: GPT,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eod_id: int | None = None,
    use_cache: bool = True,
    stop_ids: Collection[int] = (),
) -> torch.Tensor:
    """Continue `prompt` (B, T) by up to `max_new_tokens` tokens; returns (B, T + n).

    A row is finished once it produces `eod_id` or one of `stop_ids` (a chat
    template's turn end); after that it is filled with `eod_id`, or without one with
    the id that finished it. Generation stops early once every row is finished. The
    total length must fit in model.config.max_seq_len.
    """
    cfg = model.config
    batch, prompt_len = prompt.shape
    total = prompt_len + max_new_tokens
    if total > cfg.max_seq_len:
        raise ValueError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) "
            f"exceeds model.max_seq_len ({cfg.max_seq_len})"
        )
    generator = None
    if seed is not None:
        generator = torch.Generator(device=prompt.device).manual_seed(seed)
    cache = None
    if use_cache:
        param = next(model.parameters())
        cache = KVCache(
            cfg.n_layers,
            batch,
            cfg.kv_heads,
            total,
            cfg.head_dim,
            param.dtype,
            prompt.device,
        )
    tokens = prompt
    finished = torch.zeros(batch, dtype=torch.bool, device=prompt.device)
    stops = sorted({*stop_ids, *([] if eod_id is None else [eod_id])})
    stop_tensor = torch.tensor(stops, dtype=prompt.dtype, device=prompt.device)
    fill = torch.full((batch,), -1 if eod_id is None else eod_id, device=prompt.device)
    for _ in range(max_new_tokens):
        if cache is None:
            logits = model(tokens)
        else:
            position = tokens.shape[1] - (prompt_len if cache.length(0) == 0 else 1)
            logits = model(tokens[:, position:], start_pos=position, kv_cache=cache)
        last = logits[:, -1, : cfg.vocab_size].float()  # padded ids are never sampled
        next_token = sample_next(last, temperature, top_k, top_p, generator)
        if stops:
            next_token = torch.where(finished, fill, next_token)
            newly = ~finished & torch.isin(next_token, stop_tensor)
            fill = torch.where(newly & (fill < 0), next_token, fill)
            finished |= newly
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        if stops and bool(finished.all()):
            break
    return tokens


def generate_text(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    num_samples: int = 1,
    use_cache: bool = True,
) -> list[str]:
    """`num_samples` continuations of `prompt` as text, each starting a new document.

    The continuation is cut to the positions the model has left after the prompt; EOD
    tokens are dropped from the decoded text.
    """
    prompt_ids = tokenizer.encode_prompt(prompt)
    room = model.config.max_seq_len - len(prompt_ids)
    if room <= 0:
        raise ConfigError(
            f"the prompt is {len(prompt_ids)} tokens; the model takes at most "
            f"{model.config.max_seq_len} (model.max_seq_len): shorten the prompt"
        )
    if max_new_tokens > room:
        log.warning(
            "max_new_tokens = %d cut to %d: the model takes %d positions "
            "(model.max_seq_len) and the prompt uses %d",
            max_new_tokens,
            room,
            model.config.max_seq_len,
            len(prompt_ids),
        )
    device = next(model.parameters()).device
    batch = torch.tensor([prompt_ids] * num_samples, device=device)
    ids = generate(
        model,
        batch,
        min(max_new_tokens, room),
        temperature,
        top_k,
        top_p,
        seed,
        tokenizer.eod_id,
        use_cache=use_cache,
    )
    return [tokenizer.decode([i for i in row if i != tokenizer.eod_id]) for row in ids.tolist()]


@dataclass(frozen=True)
class Sampling:
    """How each next token is chosen (see `sample_next`).

    Attributes:
        temperature: 0 is greedy decoding.
        top_k: Keep only the k most likely tokens; None keeps all.
        top_p: Keep the smallest set reaching this probability; None or 1 keeps all.
        seed: Seeds the sampling generator; None draws from torch's global one.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def generator(self, device: torch.device | str) -> torch.Generator | None:
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)


def new_cache(model: GPT, batch: int = 1) -> KVCache:
    """An empty KV cache for `batch` sequences of up to model.max_seq_len tokens."""
    cfg = model.config
    param = next(model.parameters())
    return KVCache(
        cfg.n_layers, batch, cfg.kv_heads, cfg.max_seq_len, cfg.head_dim, param.dtype, param.device
    )


def cached_length(cache: KVCache) -> int:
    """Positions every layer of `cache` holds. A forward interrupted part way (Ctrl-C)
    leaves the first layers one step ahead; what they hold beyond this is overwritten."""
    return min(cache.length(layer) for layer in range(len(cache.lengths)))


def rewind_cache(cache: KVCache, length: int) -> None:
    """Forget every position of `cache` from `length` on (they are overwritten next)."""
    cache.lengths = [min(n, length) for n in cache.lengths]


@torch.no_grad()
def stream_tokens(
    model: GPT,
    ids: Sequence[int],
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    stop_ids: Collection[int] = (),
    cache: KVCache | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """Continue one sequence `ids`, yielding each new id as soon as it is sampled.

    With a `cache` that already holds a prefix of `ids` (the conversation so far), only
    the ids after that prefix are run; on return the cache holds every id fed: `ids`
    and each yielded id but the last. Without one, every step reruns the sequence.
    Stops after yielding a stop id, after `max_new_tokens` ids, or when the sequence
    fills model.max_seq_len (the caller can make room and call again).

    Args:
        generator: The sampling generator, kept across calls so a seeded chat draws a
            fresh sample each turn; by default `sampling.generator`.

    Raises:
        ValueError: `ids` is empty, or already longer than model.max_seq_len.
    """
    limit = model.config.max_seq_len if cache is None else cache.max_len
    if not ids or len(ids) > limit:
        raise ValueError(f"{len(ids)} ids to continue; the model takes 1 to {limit}")
    device = next(model.parameters()).device
    if generator is None:
        generator = sampling.generator(device)
    tokens = list(ids)
    start = 0
    if cache is not None:
        # At least the last id is rerun: its logits are those of the next token.
        start = min(cached_length(cache), len(tokens) - 1)
        rewind_cache(cache, start)
    vocab = model.config.vocab_size
    for _ in range(min(max_new_tokens, limit - len(tokens))):
        if cache is None:
            logits = model(torch.tensor([tokens], device=device))
        else:
            fresh = torch.tensor([tokens[start:]], device=device)
            logits = model(fresh, start_pos=start, kv_cache=cache)
            start = len(tokens)
        last = logits[:, -1, :vocab].float()  # padded ids are never sampled
        token = int(
            sample_next(last, sampling.temperature, sampling.top_k, sampling.top_p, generator)
        )
        yield token
        if token in stop_ids:
            return
        tokens.append(token)


class TextStream:
    """The text of ids as they come: each `push` returns what one more id adds.

    The whole text so far is decoded each time and only the new suffix returned, so a
    character split over byte tokens, or a sentencepiece word start ("▁", a space
    except at the start) comes out as decoding all the ids at once would write it.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        """What `push` has returned so far, joined."""

    def push(self, token_id: int) -> str:
        """The text `token_id` adds; "" while a character's bytes are incomplete."""
        self.ids.append(token_id)
        # Incomplete UTF-8 decodes to U+FFFD; it is held back until the character is whole.
        return self._advance(self.tokenizer.decode(self.ids).rstrip("\ufffd"))

    def flush(self) -> str:
        """What is still held back (the rest of an incomplete character)."""
        return self._advance(self.tokenizer.decode(self.ids))

    def _advance(self, text: str) -> str:
        if not text.startswith(self.text):
            return ""  # the decoding of earlier ids changed; wait until it extends again
        new, self.text = text[len(self.text) :], text
        return new
