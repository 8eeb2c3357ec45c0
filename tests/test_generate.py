import pytest
import torch

from megagpt.config.schema import ModelConfig
from megagpt.generate import filter_logits, generate
from megagpt.model import build_model
from tests.conftest import LLAMA_SHAPE

SHAPES = {
    "gpt2": {},
    "llama-gqa": dict(**LLAMA_SHAPE, bias=False, n_kv_heads=2, fused_qkv=False),
}


def model_for(name):
    # A large init spreads the logits, so sampling is far from greedy.
    cfg = ModelConfig(
        vocab_size=300,
        max_seq_len=64,
        n_layers=2,
        hidden_size=64,
        n_heads=4,
        init_std=0.3,
        **SHAPES[name],
    )
    return build_model(cfg, seed=0).eval()


@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize(
    "temperature, top_k, top_p", [(0.0, None, None), (1.0, None, None), (0.8, 20, 0.9)]
)
def test_kv_cache_generation_equals_full_recomputation(name, temperature, top_k, top_p):
    model = model_for(name)
    prompt = torch.randint(0, 300, (3, 9), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=40, temperature=temperature, top_k=top_k, top_p=top_p, seed=11)
    cached = generate(model, prompt, use_cache=True, **kwargs)
    full = generate(model, prompt, use_cache=False, **kwargs)
    assert cached.shape == (3, 49)
    assert torch.equal(cached, full)
    assert torch.equal(cached[:, :9], prompt)


def test_cached_logits_match_uncached_logits():
    from megagpt.model.kv_cache import KVCache

    model = model_for("llama-gqa")
    tokens = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    reference = model(tokens)
    cfg = model.config
    cache = KVCache(
        cfg.n_layers, 2, cfg.n_kv_heads, 20, cfg.hidden_size // cfg.n_heads, torch.float32, "cpu"
    )
    parts = [
        model(tokens[:, :7], start_pos=0, kv_cache=cache),
        model(tokens[:, 7:12], start_pos=7, kv_cache=cache),
    ]
    parts += [model(tokens[:, i : i + 1], start_pos=i, kv_cache=cache) for i in range(12, 20)]
    # Different matmul shapes accumulate in different orders: fp32 noise of ~3e-5 on
    # logits of magnitude ~10 (seen over 200 random inputs), hence atol 1e-4.
    torch.testing.assert_close(torch.cat(parts, dim=1), reference, rtol=1e-4, atol=1e-4)


def test_sampling_is_seeded():
    model = model_for("gpt2")
    prompt = torch.randint(0, 300, (1, 4))
    a = generate(model, prompt, 20, temperature=1.0, seed=1)
    assert torch.equal(a, generate(model, prompt, 20, temperature=1.0, seed=1))
    assert not torch.equal(a, generate(model, prompt, 20, temperature=1.0, seed=2))


def test_top_k_and_top_p_filtering():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = filter_logits(logits, top_k=2, top_p=None).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    kept = filter_logits(logits, top_k=None, top_p=0.7).isfinite()
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.7 <= 0.8
    kept = filter_logits(logits, top_k=None, top_p=0.5).isfinite()
    assert kept.tolist() == [[True, False, False, False]]


def test_generation_stops_at_end_of_document_and_respects_context():
    model = model_for("gpt2")
    prompt = torch.randint(0, 300, (1, 5))
    greedy = generate(model, prompt, 30, temperature=0.0)
    eod = int(greedy[0, 8])  # pretend the 4th generated token ends the document
    stopped = generate(model, prompt, 30, temperature=0.0, eod_id=eod)
    assert stopped.shape[1] <= 9 and int(stopped[0, -1]) == eod
    with pytest.raises(ValueError, match="exceeds model.max_seq_len"):
        generate(model, prompt, 60)


def test_padded_vocabulary_ids_are_never_sampled():
    cfg = ModelConfig(
        vocab_size=250,
        pad_vocab_size_to_multiple_of=128,
        max_seq_len=64,
        n_layers=1,
        hidden_size=32,
        n_heads=2,
        init_std=0.5,
    )
    model = build_model(cfg, seed=0).eval()
    out = generate(model, torch.zeros(4, 1, dtype=torch.long), 60, temperature=5.0, seed=0)
    assert int(out.max()) < 250


@pytest.mark.parametrize("prompt_len", [4, 40])
def test_cached_steps_process_one_position_whatever_the_prompt(prompt_len):
    """With the cache, every step after the prefill runs the network on one position."""
    model = model_for("gpt2")
    widths = []
    hook = model.embed_tokens.register_forward_hook(
        lambda m, args, out: widths.append(args[0].shape[1])
    )
    generate(model, torch.zeros(1, prompt_len, dtype=torch.long), 10, temperature=0.0)
    hook.remove()
    assert widths == [prompt_len] + [1] * 9
