"""Log-likelihoods of continuations, batched by length, one forward per shared context.

A request is a context and a continuation (token ids); its answer is the summed
log-probability of the continuation's tokens given what precedes them, and whether
greedy decoding would have produced every one of them (lm-evaluation-harness's
`loglikelihood`). Multiple-choice tasks ask the same context with several
continuations; here they share one row of one forward:

    row:        c0 c1 c2 c3 | a1 a2 | b1
    positions:   0  1  2  3 |  4  5 |  4      (each continuation restarts after c3)
    branch:      0  0  0  0 |  1  1 |  2      (a token sees the context and its own branch)

The logits at c3 predict every continuation's first token; a continuation of m tokens
adds m - 1 tokens to the row (a one-token answer adds none). Positions and the attention
mask make each continuation's logits exactly those of the sequence context +
continuation alone, so the answers do not depend on which requests share a row or a
batch (up to float rounding). Rows are sorted by length and padded on the right.

A request longer than the model's window is scored alone, its context cut from the left
as lm-eval does: the input is (context + continuation)[-(max_len + 1):][:-1].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from megagpt.parallel.inference import InferenceRunner

PAD_BRANCH = -1


@dataclass
class Row:
    """One sequence of a batch: a context, then its continuations' tokens after it."""

    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    branches: list[int] = field(default_factory=list)
    scored: list[tuple[int, list[int], list[int]]] = field(default_factory=list)
    """(request index, row indices whose logits predict its tokens, those tokens)."""

    def add_context(self, context: Sequence[int]) -> None:
        self.tokens += context
        self.positions += range(len(context))
        self.branches += [0] * len(context)

    def add_continuation(self, request: int, context_len: int, continuation: list[int]) -> None:
        """Append `continuation`'s inputs (all but its last token) as a new branch."""
        branch = max(self.branches) + 1
        start = len(self.tokens)
        self.tokens += continuation[:-1]
        self.positions += range(context_len, context_len + len(continuation) - 1)
        self.branches += [branch] * (len(continuation) - 1)
        predicting = [context_len - 1, *range(start, start + len(continuation) - 1)]
        self.scored.append((request, predicting, continuation))


def pack_requests(
    requests: Sequence[tuple[Sequence[int], Sequence[int]]], max_len: int
) -> list[Row]:
    """Rows holding every (context, continuation) request; continuations of one context
    share its row while the row stays within `max_len` tokens."""
    rows: list[Row] = []
    open_rows: dict[tuple[int, ...], Row] = {}
    for index, (context, continuation) in enumerate(requests):
        context, continuation = list(context), list(continuation)
        if not context or not 0 < len(continuation) <= max_len:
            raise ValueError(
                f"request {index}: {len(context)} context and {len(continuation)} continuation "
                f"tokens; each needs at least one, and the continuation at most {max_len}"
            )
        if len(context) + len(continuation) - 1 > max_len:  # alone, cut from the left
            row = Row()
            row.add_context((context + continuation)[-(max_len + 1) : -len(continuation)])
            row.add_continuation(index, len(row.tokens), continuation)
            rows.append(row)
            continue
        key = tuple(context)
        row = open_rows.get(key)
        if row is None or len(row.tokens) + len(continuation) - 1 > max_len:
            row = Row()
            row.add_context(context)
            open_rows[key] = row
            rows.append(row)
        row.add_continuation(index, len(context), continuation)
    return rows


def batch_tensors(rows: Sequence[Row], pad_id: int, device: torch.device) -> dict:
    """The model inputs of `rows` padded on the right: tokens, positions, the attention
    mask (a token sees earlier tokens of the context and of its own branch; padding
    sees the context and itself) and the selection of the scored positions.

    When every row is one sequence (a context and at most one continuation: cloze
    tasks, rolling windows), plain causal attention over the padded rows is the same
    for every real token (padding comes after it), so neither mask nor positions are
    passed: attention takes its causal kernel (cloze requests/s on CPU against lm-eval's
    hf backend: 1.30x with the mask, 1.41x without; benchmarks/RESULTS.md)."""
    length = max(len(r.tokens) for r in rows)
    if all(len(r.scored) <= 1 for r in rows):
        tokens = torch.full((len(rows), length), pad_id, dtype=torch.long)
        select = torch.zeros((len(rows), length), dtype=torch.bool)
        for i, row in enumerate(rows):
            tokens[i, : len(row.tokens)] = torch.tensor(row.tokens)
            for _, predicting, _ in row.scored:
                select[i, predicting] = True
        return {"tokens": tokens.to(device), "select": select.to(device)}
    tokens = torch.full((len(rows), length), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), length), dtype=torch.long)
    branches = torch.full((len(rows), length), PAD_BRANCH, dtype=torch.long)
    select = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, row in enumerate(rows):
        n = len(row.tokens)
        tokens[i, :n] = torch.tensor(row.tokens)
        positions[i, :n] = torch.tensor(row.positions)
        branches[i, :n] = torch.tensor(row.branches)
        for _, predicting, _ in row.scored:
            select[i, predicting] = True
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    same = branches[:, :, None] == branches[:, None, :]  # (B, T, T)
    mask = causal & (same | (branches[:, None, :] == 0))
    return {
        "tokens": tokens.to(device),
        "positions": positions.to(device),
        "attention_mask": mask[:, None].to(device),  # (B, 1, T, T)
        "select": select.to(device),
    }


def score_batch(runner: InferenceRunner, rows: Sequence[Row], pad_id: int) -> dict:
    """{request index: (log-likelihood, greedy)} for the requests of `rows`."""
    inputs = batch_tensors(rows, pad_id, runner.device)
    select = inputs.pop("select")
    # The selected logits come in row-major order: map each row index to its place.
    place = torch.cumsum(select.flatten().long(), 0).view(select.shape) - 1
    where, targets, owners = [], [], []
    for i, row in enumerate(rows):
        for request, predicting, continuation in row.scored:
            where += place[i, predicting].tolist()
            targets += continuation
            owners.append((request, len(continuation)))
    where_t = torch.tensor(where, device=runner.device)
    targets_t = torch.tensor(targets, device=runner.device)

    def reduce(logits: torch.Tensor) -> torch.Tensor:  # (N, V) -> (P, 2)
        picked = logits[where_t]
        logprobs = picked.log_softmax(-1).gather(-1, targets_t[:, None]).squeeze(-1)
        greedy = picked.argmax(-1) == targets_t
        return torch.stack([logprobs.double(), greedy.double()], dim=-1)

    stats = runner.forward(
        inputs.pop("tokens"), select, reduce, (len(targets), 2), torch.float64, **inputs
    )
    answers, offset = {}, 0
    for request, count in owners:
        part = stats[offset : offset + count]
        answers[request] = (float(part[:, 0].sum()), bool(part[:, 1].all()))
        offset += count
    return answers


def loglikelihoods(
    runner: InferenceRunner,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int,
    pad_id: int = 0,
) -> list[tuple[float, bool]]:
    """(log-likelihood, greedy) of every (context, continuation) request, in order.

    Args:
        runner: The model, on any layout; every rank of a replica passes the same requests.
        requests: Token ids of each context (at least one) and continuation (at least one).
        batch_size: Rows per forward (a row is a context with its continuations).
        pad_id: The id written into padding (never seen by a scored position).
    """
    rows = pack_requests(requests, runner.config.max_seq_len)
    # Longest first, as lm-eval orders them: a batch's padding is least, and a too
    # large batch fails at once rather than at the end.
    rows.sort(key=lambda r: (-len(r.tokens), r.tokens))
    answers: dict[int, tuple[float, bool]] = {}
    for batch in token_budget_batches(rows, batch_size):
        answers.update(score_batch(runner, batch, pad_id))
    return [answers[i] for i in range(len(requests))]


def token_budget_batches(rows: Sequence[Row], batch_size: int) -> list[Sequence[Row]]:
    """Consecutive slices of `rows` (longest first) holding at most as many tokens,
    padding included, as the first batch: `batch_size` rows of the longest length.

    Shorter rows thus share a forward in larger numbers: fewer, fuller forwards at no
    more memory than the first batch takes (cloze requests/s on CPU against lm-eval's
    hf backend: 1.41x with `batch_size` rows per forward; benchmarks/RESULTS.md)."""
    if not rows:
        return []
    budget = batch_size * len(rows[0].tokens)
    batches, start = [], 0
    while start < len(rows):
        longest = len(rows[start].tokens)
        count = max(1, budget // longest)
        batches.append(rows[start : start + count])
        start += count
    return batches


def multiple_choice_metrics(
    choice_loglikelihoods: Sequence[float], choices: Sequence[str], answer: int
) -> dict[str, float]:
    """acc and acc_norm of one multiple-choice question, as lm-eval 0.4.13 defines them.

    Args:
        choice_loglikelihoods: log P(choice | context) of each choice, the
            continuation being the choice text as the task appends it (for lm-eval,
            target_delimiter + choice).
        choices: The choices' texts (without the delimiter): acc_norm divides each
            log-likelihood by its number of characters, `len(choice)` (lm-eval's
            `acc_norm`; its `acc_bytes` would use the UTF-8 byte length).
        answer: Index of the right choice.

    Returns:
        {"acc": 1.0 if the most likely choice is the answer, "acc_norm": the same after
        length normalization}; ties go to the first choice (numpy's argmax).
    """
    best = max(range(len(choices)), key=lambda i: (choice_loglikelihoods[i], -i))
    normalized = [ll / max(1, len(text)) for ll, text in zip(choice_loglikelihoods, choices)]
    best_norm = max(range(len(choices)), key=lambda i: (normalized[i], -i))
    return {"acc": float(best == answer), "acc_norm": float(best_norm == answer)}
