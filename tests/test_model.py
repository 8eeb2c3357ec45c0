import ast
import math
from pathlib import Path

import pytest
import torch

from megagpt.config import load_config
from megagpt.config.schema import ModelConfig
from megagpt.model import build_model
from megagpt.model.build import build_meta_model
from megagpt.model.flops import flops_per_token, matmul_parameters, parameter_counts
from tests.conftest import LLAMA_SHAPE

VARIANTS = {
    "gpt2": {},
    "llama": dict(**LLAMA_SHAPE, bias=False, tie_embeddings=False, n_kv_heads=2),
    "gqa-separate-qkv": dict(n_kv_heads=3, fused_qkv=False),
    "mqa-rope": dict(n_kv_heads=1, position_embedding="rope"),
    "padded-vocab": dict(vocab_size=1000, pad_vocab_size_to_multiple_of=128),
    "dropout": dict(dropout=0.1, attention_dropout=0.1),
}


def small(**overrides) -> ModelConfig:
    base = dict(vocab_size=320, max_seq_len=32, n_layers=2, hidden_size=48, n_heads=6)
    return ModelConfig(**{**base, **overrides})


@pytest.mark.parametrize("name", VARIANTS)
def test_shapes_and_parameter_count_formula(name):
    cfg = small(**VARIANTS[name])
    model = build_model(cfg, seed=0)
    tokens = torch.randint(0, cfg.vocab_size, (3, 17))
    logits = model(tokens)
    vocab = math.ceil(cfg.vocab_size / cfg.pad_vocab_size_to_multiple_of) * (
        cfg.pad_vocab_size_to_multiple_of
    )
    assert logits.shape == (3, 17, vocab)
    assert sum(p.numel() for p in model.parameters()) == parameter_counts(cfg)["total"]


@pytest.mark.parametrize("name", VARIANTS)
def test_causal_masking(name):
    """A position's output must not change when any later token changes."""
    cfg = small(**VARIANTS[name])
    model = build_model(cfg, seed=0).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 20))
    changed = tokens.clone()
    changed[:, 12:] = torch.randint(0, cfg.vocab_size, (2, 8))
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-5)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_gpt2_124m_has_the_published_parameter_count():
    cfg = load_config("gpt2-124m").model
    assert (cfg.vocab_size, cfg.max_seq_len, cfg.bias, cfg.tie_embeddings) == (
        50257,
        1024,
        True,
        True,
    )
    model = build_meta_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == 124_439_808
    assert parameter_counts(cfg)["total"] == 124_439_808


# Brown et al. 2020 ("Language Models are Few-Shot Learners"), table 2.1: parameters,
# layers, d_model, heads, d_head, batch size in tokens, learning rate; context 2048.
GPT3_TABLE = {
    "gpt3-1.3b": (1.3e9, 24, 2048, 24, 128, 1e6, 2.0e-4),
    "gpt3-2.7b": (2.7e9, 32, 2560, 32, 80, 1e6, 1.6e-4),
    "gpt3-6.7b": (6.7e9, 32, 4096, 32, 128, 2e6, 1.2e-4),
    "gpt3-13b": (13.0e9, 40, 5140, 40, 128, 2e6, 1.0e-4),
    "gpt3-175b": (175.0e9, 96, 12288, 96, 128, 3.2e6, 0.6e-4),
}
# Where the table contradicts itself, the presets keep d_head and derive the rest
# (as Megatron's and EleutherAI's GPT-3 configs do); each preset's header says so.
GPT3_TABLE_TYPOS = {
    "gpt3-1.3b": {"n_heads": 16},  # 24 heads of 128 would be 3072 wide, not 2048
    "gpt3-13b": {"hidden_size": 5120},  # 40 heads of 128 are 5120, not 5140
}


@pytest.mark.parametrize("preset", GPT3_TABLE)
def test_gpt3_presets_follow_table_2_1_of_the_paper(preset):
    params, layers, d_model, heads, d_head, batch_tokens, lr = GPT3_TABLE[preset]
    config = load_config(preset)
    cfg = config.model
    expected = {"n_layers": layers, "hidden_size": d_model, "n_heads": heads}
    expected.update(GPT3_TABLE_TYPOS.get(preset, {}))
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert cfg.head_dim == d_head
    assert cfg.max_seq_len == config.data.seq_len == 2048
    assert config.optim.lr == pytest.approx(lr)
    # The paper rounds batch sizes to one or two digits (1M for 512 x 2048 = 1,048,576).
    tokens = config.train.global_batch_size * config.data.seq_len
    assert tokens == pytest.approx(batch_tokens, rel=0.05)
    # The closed form for a GPT with tied embeddings and learned positions (Narayanan
    # et al. 2021): 12 L d^2 + 13 L d + (V + s) d + 2 d, V the padded vocabulary.
    L, d, V, s = cfg.n_layers, cfg.hidden_size, cfg.padded_vocab_size, cfg.max_seq_len
    assert parameter_counts(cfg)["total"] == 12 * L * d * d + 13 * L * d + (V + s) * d + 2 * d
    # The paper prints two significant digits (2.7B for the 2.65B its own shape has),
    # so its counts are matched to within their rounding, 2%.
    assert parameter_counts(cfg)["total"] == pytest.approx(params, rel=0.02)


@pytest.mark.parametrize(
    "preset, hf_name",
    [("gpt2-124m", None), ("gpt2-350m", "medium"), ("gpt2-774m", "large"), ("gpt2-1.5b", "xl")],
)
def test_gpt2_presets_match_transformers_parameter_counts(preset, hf_name):
    transformers = pytest.importorskip("transformers")
    cfg = load_config(preset).model
    hf_config = transformers.GPT2Config(
        n_embd=cfg.hidden_size,
        n_layer=cfg.n_layers,
        n_head=cfg.n_heads,
        n_positions=cfg.max_seq_len,
        vocab_size=cfg.vocab_size,
    )
    with torch.device("meta"):
        hf = transformers.GPT2LMHeadModel(hf_config)
    assert sum(p.numel() for p in build_meta_model(cfg).parameters()) == hf.num_parameters()


def test_meta_build_allocates_nothing_and_materializes_deterministically():
    cfg = small()
    meta = build_meta_model(cfg)
    assert all(p.is_meta for p in meta.parameters())
    a, b = build_model(cfg, seed=5), build_model(cfg, seed=5)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(
        a.layers["0"].mlp.up_proj.weight, build_model(cfg, seed=6).layers["0"].mlp.up_proj.weight
    )


def test_tied_embeddings_survive_materialization():
    model = build_model(small(), seed=0)
    assert model.lm_head.weight is model.embed_tokens.weight
    untied = build_model(small(tie_embeddings=False), seed=0)
    assert untied.lm_head.weight is not untied.embed_tokens.weight


def test_scaled_initialization():
    cfg = small(n_layers=8, hidden_size=256, n_heads=4)
    model = build_model(cfg, seed=0)
    block = model.layers["3"]
    assert block.attn.qkv_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    residual = 0.02 / math.sqrt(2 * cfg.n_layers)
    assert block.attn.out_proj.weight.std().item() == pytest.approx(residual, rel=0.05)
    assert block.mlp.down_proj.weight.std().item() == pytest.approx(residual, rel=0.05)
    assert torch.count_nonzero(block.attn.qkv_proj.bias) == 0
    assert torch.equal(block.attn_norm.weight, torch.ones(cfg.hidden_size))


def test_flops_per_token_follows_palm_accounting():
    cfg = load_config("gpt2-124m").model
    n = matmul_parameters(cfg)
    # the blocks' 85M plus the output layer (38.6M); the embeddings are lookups
    assert n == 85_054_464 + 50257 * 768
    assert flops_per_token(cfg, 1024) == 6 * n + 12 * 12 * 768 * 1024


def test_forward_with_targets_returns_the_mean_next_token_loss():
    model = build_model(small(), seed=0)
    tokens = torch.randint(0, 320, (2, 9))
    logits = model(tokens[:, :-1])
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    torch.testing.assert_close(model(tokens[:, :-1], tokens[:, 1:]), expected)


def test_model_package_does_not_import_torch_distributed():
    source = Path(__file__).parents[1] / "megagpt" / "model"
    for path in source.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n.startswith("torch.distributed") for n in names), path


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    cfg = small(vocab_size=128, n_layers=2, hidden_size=64, n_heads=4, max_seq_len=32)
    model = build_model(cfg, seed=0)
    batch = torch.randint(0, cfg.vocab_size, (4, 33))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(200):
        loss = model(batch[:, :-1], batch[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1
