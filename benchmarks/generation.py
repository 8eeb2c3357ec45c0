"""Generation throughput: megagpt's batched KV-cache generation against transformers'
`generate` on the same model, prompts and greedy decoding.

Both sides run the same weights (megagpt's initialization, written as a transformers
directory with `save_hf` and loaded as GPT2LMHeadModel, sdpa attention), fp32, in one
process with the same threads, under torch.no_grad, every row generating exactly
--new-tokens tokens (no stop token). Cases, each at two shapes (--shapes):

- equal: a batch of --batch prompts of --prompt-len tokens each;
- mixed: a batch of prompts of different lengths (--prompt-len, 3/4, 1/2 and 1/4 of it,
  cycled), padded on the left as lm-eval's `generate_until` sends them: transformers
  gets the attention mask and position ids of the padding, megagpt's
  `megagpt.harness.generation.generate_batch` its per-row positions and mask.

megagpt's side is what `megagpt eval --tasks` runs for a generation task: the
InferenceRunner (one process here) and generate_batch. Tokens/s = batch x new tokens /
time of the whole call (prefill included). Rounds alternate megagpt and transformers;
the ratio megagpt / transformers of each round is reported, then the median.

    python benchmarks/generation.py                       # tiny and gpt2-124m shapes
    python benchmarks/generation.py --shapes tiny --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from megagpt.checkpoint.convert import save_hf
from megagpt.config import apply_overrides, load_config
from megagpt.harness.generation import Stops, generate_batch
from megagpt.model import build_model
from megagpt.parallel.inference import InferenceRunner

SHAPES = {
    # The tests' tiny GPT (tests/conftest.py), with room for 64 + 64 tokens.
    "tiny": ["model.n_layers=2", "model.hidden_size=64", "model.n_heads=4", "model.vocab_size=512"],
    # GPT-2 124M: 12 layers, 768 wide, 12 heads, the 50,257-token vocabulary.
    "gpt2-124m": [],
}


def models(shape: str, directory: Path):
    import transformers

    config = apply_overrides(load_config("gpt2-124m"), [*SHAPES[shape], "data.seq_len=128"], shape)
    ours = build_model(config.model, "cpu", seed=0).eval()
    state = {k: v.detach() for k, v in ours.state_dict().items()}
    save_hf(state, config.model, directory)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    theirs.generation_config.eos_token_id = None  # every row runs to max_new_tokens
    theirs.generation_config.pad_token_id = 0
    return ours, theirs, config.model.vocab_size


def prompt_lengths(case: str, batch: int, length: int) -> list[int]:
    if case == "equal":
        return [length] * batch
    return [max(1, length * (4 - i % 4) // 4) for i in range(batch)]


def run_ours(runner, prompts, new_tokens) -> float:
    start = time.perf_counter()
    outputs = generate_batch(runner, prompts, new_tokens, Stops())
    elapsed = time.perf_counter() - start
    assert all(len(o) == new_tokens for o in outputs)
    return elapsed


def run_theirs(model, prompts, new_tokens) -> float:
    longest = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros(len(prompts), longest, dtype=torch.long)
    for i, prompt in enumerate(prompts):  # left padding, as lm-eval's HFLM pads
        ids[i, longest - len(prompt) :] = torch.tensor(prompt)
        mask[i, longest - len(prompt) :] = 1
    start = time.perf_counter()
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False
    )
    elapsed = time.perf_counter() - start
    assert out.shape[1] == longest + new_tokens
    return elapsed


def check_same_tokens(runner, model, prompts, new_tokens: int) -> bool:
    """Whether both sides generate the same ids (a sanity check of the comparison)."""
    ours = generate_batch(runner, prompts, new_tokens, Stops())
    longest = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, prompt in enumerate(prompts):
        ids[i, longest - len(prompt) :] = torch.tensor(prompt)
        mask[i, longest - len(prompt) :] = 1
    theirs = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False
    )
    return ours == theirs[:, longest:].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="tiny,gpt2-124m")
    parser.add_argument("--cases", default="equal,mixed")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{args.threads} threads; batch {args.batch}, prompts up to {args.prompt_len} "
        f"tokens, {args.new_tokens} new tokens, greedy"
    )
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes.split(","):
            ours, theirs, vocab = models(shape, Path(tmp) / shape)
            runner = InferenceRunner.from_model(ours)
            g = torch.Generator().manual_seed(0)
            for case in args.cases.split(","):
                lengths = prompt_lengths(case, args.batch, args.prompt_len)
                prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
                same = check_same_tokens(runner, theirs, prompts, 8)
                run_ours(runner, prompts, 4), run_theirs(theirs, prompts, 4)  # warm up
                ratios, rates = [], []
                tokens = args.batch * args.new_tokens
                for _ in range(args.rounds):
                    a = run_ours(runner, prompts, args.new_tokens)
                    b = run_theirs(theirs, prompts, args.new_tokens)
                    ratios.append(b / a)
                    rates.append((tokens / a, tokens / b))
                print(
                    f"{shape:10s} {case:6s} prompts {lengths}: megagpt / transformers "
                    f"{' '.join(f'{r:.2f}' for r in ratios)} -> median "
                    f"{statistics.median(ratios):.2f}x "
                    f"({statistics.median(r[0] for r in rates):.0f} vs "
                    f"{statistics.median(r[1] for r in rates):.0f} tokens/s; "
                    f"same first 8 tokens: {same})"
                )


if __name__ == "__main__":
    main()
