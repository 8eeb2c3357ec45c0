"""Sampling text from a trained GPT.

With the KV cache the prompt is run once ("prefill") and each new token costs one
position's worth of work; without it every step reruns the whole sequence. Both
paths produce the same tokens, which a test checks.
"""

from __future__ import annotations

import logging

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
) -> torch.Tensor:
    """Continue `prompt` (B, T) by up to `max_new_tokens` tokens; returns (B, T + n).

    Generation stops early once every row has produced `eod_id`. The total length
    must fit in model.config.max_seq_len.
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
    for _ in range(max_new_tokens):
        if cache is None:
            logits = model(tokens)
        else:
            position = tokens.shape[1] - (prompt_len if cache.length(0) == 0 else 1)
            logits = model(tokens[:, position:], start_pos=position, kv_cache=cache)
        last = logits[:, -1, : cfg.vocab_size].float()  # padded ids are never sampled
        next_token = sample_next(last, temperature, top_k, top_p, generator)
        if eod_id is not None:
            next_token = torch.where(finished, torch.full_like(next_token, eod_id), next_token)
            finished |= next_token == eod_id
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        if eod_id is not None and bool(finished.all()):
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
