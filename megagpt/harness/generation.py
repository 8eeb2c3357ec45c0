"""Generating for a batch of prompts of different lengths, with a KV cache, on any layout.

Prompts are padded on the left so that every row's next token lands in the same cache
slot; each row's positions count its own tokens only, and no query sees a padding key,
so a row generates what it would generate alone (up to float rounding). A padding query
sees itself, so that its (unused) attention is never over an empty set of keys, which
would give NaNs that the cache would keep. When every prompt has the same length none
of this is needed and the model runs its plain causal path.

A row stops at a stop id (EOD), at one of the stop strings (looked for in the decoded
new text, since a string may span tokens or end inside one), or after max_new_tokens;
the batch stops when every row has.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import torch

from megagpt.generate import Sampling, sample_next
from megagpt.parallel.inference import InferenceRunner

GREEDY = Sampling(temperature=0.0)


@dataclass(frozen=True)
class Stops:
    """When a row is finished.

    Attributes:
        ids: Token ids that end a row (EOD); they are not part of its output.
        texts: Strings that end a row once the decoded new text contains one.
        decode: Token ids to text, needed with `texts`.
    """

    ids: Collection[int] = ()
    texts: Sequence[str] = ()
    decode: Callable[[list[int]], str] | None = None

    def reached(self, new_ids: list[int]) -> bool:
        if new_ids and new_ids[-1] in self.ids:
            return True
        if not self.texts:
            return False
        text = self.decode(new_ids)
        return any(stop and stop in text for stop in self.texts)


def _left_padded(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple:
    """Tokens (B, T) padded on the left, and which of them are real (B, T)."""
    length = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    real = torch.zeros((len(prompts), length), dtype=torch.bool)
    for i, prompt in enumerate(prompts):
        tokens[i, length - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        real[i, length - len(prompt) :] = True
    return tokens.to(device), real.to(device)


@torch.no_grad()
def generate_batch(
    runner: InferenceRunner,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stops: Stops = Stops(),
    sampling: Sampling = GREEDY,
    pad_id: int = 0,
) -> list[list[int]]:
    """The new ids of each prompt (stop ids left out), generated together.

    Args:
        runner: The model on any layout; every rank of a replica passes the same prompts.
        prompts: Token ids, at least one per prompt; each prompt + max_new_tokens must
            fit in model.max_seq_len.
        max_new_tokens: Most ids generated per prompt.
        stops: When a row ends (see Stops).
        sampling: Greedy by default (temperature 0).
        pad_id: The id written into the left padding (never seen by a real token).
    """
    limit = runner.config.max_seq_len
    longest = max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0 or longest + max_new_tokens > limit:
        raise ValueError(
            f"prompts of {min(len(p) for p in prompts)}-{longest} tokens + {max_new_tokens} new "
            f"do not fit: each prompt needs a token, and the model takes {limit} positions"
        )
    batch, device = len(prompts), runner.device
    tokens, real = _left_padded(prompts, pad_id, device)
    padded = not bool(real.all())
    total = longest + max_new_tokens
    cache = runner.new_cache(batch, total)
    generator = sampling.generator(device)
    vocab = runner.config.vocab_size
    keys = torch.ones((batch, total), dtype=torch.bool, device=device)  # which keys are real
    keys[:, :longest] = real
    positions = (real.long().cumsum(1) - 1).clamp(min=0)  # each row counts its own tokens
    prompt_lengths = real.sum(1)  # (B,)

    def step_inputs(step_tokens: torch.Tensor, start: int) -> dict:
        """The forward's arguments for `step_tokens` (B, T), after `start` cached slots
        (counted here: a pipeline stage's cache holds only its own layers)."""
        T = step_tokens.shape[1]
        kwargs = {"kv_cache": cache, "start_pos": start}
        if padded:
            if start == 0:
                causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
                own = torch.eye(T, dtype=torch.bool, device=device)
                mask = (causal & keys[:, None, :T]) | own
                kwargs.update(positions=positions, attention_mask=mask[:, None])
            else:
                mask = keys[:, None, None, : start + T]  # (B, 1, 1, K)
                position = prompt_lengths + (start - longest)  # each row counts its own
                kwargs.update(positions=position[:, None], attention_mask=mask)
        return kwargs

    def choose(logits: torch.Tensor) -> torch.Tensor:  # (B, V) -> (B,)
        last = logits[:, :vocab]  # padded ids are never sampled
        return sample_next(last, sampling.temperature, sampling.top_k, sampling.top_p, generator)

    select = torch.zeros(tokens.shape, dtype=torch.bool, device=device)
    select[:, -1] = True
    outputs: list[list[int]] = [[] for _ in range(batch)]
    finished = [False] * batch
    step_tokens, filled = tokens, 0
    for _ in range(max_new_tokens):
        kwargs = step_inputs(step_tokens, filled)
        filled += step_tokens.shape[1]
        chosen = runner.forward(step_tokens, select, choose, (batch,), torch.long, **kwargs)
        for i, token in enumerate(chosen.tolist()):
            if finished[i]:
                continue
            outputs[i].append(token)
            finished[i] = stops.reached(outputs[i])
        if all(finished):
            break
        step_tokens = chosen[:, None]
        select = torch.ones((batch, 1), dtype=torch.bool, device=device)
    return [out[:-1] if out and out[-1] in stops.ids else out for out in outputs]
