import dataclasses
import re
import subprocess
import sys

import pytest

from megagpt.config import (
    Config,
    ConfigError,
    load_config,
    save_config,
)
from megagpt.config.docs import describe_fields, field_docs
from megagpt.config.loader import REPO_CONFIG_DIR
from megagpt.data import check_data_config
from megagpt.model.build import build_meta_model
from megagpt.model.flops import parameter_counts


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_are_valid_and_match_tiny_preset_model():
    defaults = load_config()
    assert defaults == Config()
    tiny = load_config("tiny")
    assert tiny.model == defaults.model


def test_precedence_command_line_over_file_over_defaults(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 2.0e-4\n  min_lr: 1.0e-5\nmodel:\n  n_layers: 3\n")
    config = load_config(path, ["optim.lr=3e-4", "train.seed=7"])
    assert config.optim.lr == 3e-4  # command line beats the file
    assert config.optim.min_lr == 1e-5  # file beats the default
    assert config.model.n_layers == 3
    assert config.train.seed == 7
    assert config.model.hidden_size == Config().model.hidden_size  # default kept


def test_override_values_are_typed():
    config = load_config(
        None,
        [
            "model.bias=false",
            "model.n_kv_heads=2",
            "train.compile=yes",
            "data.path=0.3 a 0.7 b",
            "model.ffn_hidden_size=null",
        ],
    )
    assert config.model.bias is False
    assert config.model.n_kv_heads == 2
    assert config.train.compile is True
    assert config.data.path == ["0.3", "a", "0.7", "b"]
    assert config.model.ffn_hidden_size is None


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("optim.lr=fast", "optim.lr = 'fast' (command line): expected a number"),
        ("model.n_layers=2.5", "model.n_layers = '2.5' (command line): expected an integer"),
        ("model.bias=maybe", "model.bias = 'maybe' (command line): expected true or false"),
        ("model.activation=relu", "expected one of 'gelu', 'swiglu'"),
        ("optim.learnig_rate=1", "unknown key optim.learnig_rate"),
        ("modle.n_layers=2", "unknown key modle"),
        ("lr=1", "write section.key=value"),
    ],
)
def test_bad_overrides_name_key_value_and_what_is_allowed(override, fragment):
    with pytest.raises(ConfigError, match=None) as error:
        load_config(None, [override])
    assert fragment in str(error.value)


def test_unknown_key_suggests_the_close_one(tmp_path):
    path = write(tmp_path, "optim:\n  min_learning_rate: 0.1\ntrain:\n  max_step: 5\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert "train.max_step" in message or "optim.min_learning_rate" in message
    with pytest.raises(ConfigError, match="did you mean train.max_steps"):
        load_config(write(tmp_path, "train:\n  max_step: 5\n", "b.yaml"))


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (
            ["model.hidden_size=256", "model.n_heads=7"],
            "model.n_heads = 7: must divide model.hidden_size (256)",
        ),
        (["model.n_heads=6", "model.n_kv_heads=4"], "model.n_kv_heads = 4: must divide"),
        (["data.seq_len=512"], "data.seq_len = 512: must not exceed model.max_seq_len (256)"),
        (
            ["train.global_batch_size=10", "train.micro_batch_size=4"],
            "must be a multiple of train.micro_batch_size (4)",
        ),
        (["optim.min_lr=1.0", "optim.lr=0.1"], "optim.min_lr = 1.0: must be in [0, optim.lr"),
        (["data.split=1,2"], None),
        (["data.split=abc"], "data.split = 'abc'"),
        (["data.path=0.3 a b"], "weight/prefix pairs"),
        (["data.path=-1 a"], "must be positive"),
        (["model.dropout=1.5"], "model.dropout = 1.5: must be in [0, 1)"),
        (
            ["model.position_embedding=rope", "model.hidden_size=30", "model.n_heads=10"],
            "needs an even head size",
        ),
    ],
)
def test_inconsistent_values(overrides, fragment):
    def resolve():  # what every command does: load, then check the data settings
        check_data_config(load_config(None, overrides).data)

    if fragment is None:  # "1,2" is valid: train and validation, no test split
        resolve()
        return
    with pytest.raises(ConfigError) as error:
        resolve()
    assert fragment in str(error.value)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist.*gpt2-124m"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(write(tmp_path, "- a\n- b\n", "list.yaml"))
    with pytest.raises(ConfigError, match="model .*expected a mapping"):
        load_config(write(tmp_path, "model: 3\n", "scalar.yaml"))


def test_yaml_is_loaded_safely(tmp_path):
    path = write(tmp_path, "train:\n  output_dir: !!python/object/apply:os.getcwd []\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_resolved_config_round_trips(tmp_path):
    config = load_config("gpt2-124m", ["optim.lr=1e-4", "data.path=0.5 a 0.5 b"])
    save_config(config, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == config


def test_every_field_has_a_docstring():
    rows = describe_fields()
    assert len(rows) > 40
    undocumented = [key for key, _, _, doc in rows if not doc]
    assert undocumented == []
    for section in dataclasses.fields(Config):
        assert section.name in field_docs(Config)


@pytest.mark.parametrize("preset", sorted(p.stem for p in REPO_CONFIG_DIR.glob("*.yaml")))
def test_presets_are_the_size_their_name_says(preset):
    if preset in ("sft", "classify"):  # fine-tuning: the model comes from finetune.init
        config = load_config(preset, ["finetune.init=runs/pretrain"])  # loads and validates
        assert config.train.epochs and config.checkpoint.resume == "auto"
        return
    config = load_config(preset)  # loads and validates
    counted = parameter_counts(config.model)["total"]
    # the model as built holds exactly the parameters the FLOP counter counts
    assert sum(p.numel() for p in build_meta_model(config.model).parameters()) == counted
    size = re.search(r"-(\d+(?:\.\d+)?)([mb])$", preset)
    if size is None:
        # the demo's models, named for what they are; Mixtral's size: test_export_moe.py
        assert preset in ("tiny", "tiny-moe", "mixtral-8x7b")
        return
    named = float(size.group(1)) * {"m": 1e6, "b": 1e9}[size.group(2)]
    assert counted == pytest.approx(named, rel=0.05), f"{preset}: {counted:,} parameters"


def test_config_cli_prints_fields_and_resolved_values():
    fields = subprocess.run(
        [sys.executable, "-m", "megagpt", "config", "fields"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "optim.lr  (float, default 0.001)" in fields
    assert "Peak learning rate" in fields
    shown = subprocess.run(
        [
            sys.executable,
            "-m",
            "megagpt",
            "config",
            "show",
            "--config",
            "gpt2-124m",
            "optim.lr=1e-4",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "lr: 0.0001" in shown and "hidden_size: 768" in shown
    bad = subprocess.run(
        [sys.executable, "-m", "megagpt", "train", "model.n_heads=5"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert "model.n_heads = 5: must divide model.hidden_size (192)" in bad.stderr
    split = subprocess.run(
        [sys.executable, "-m", "megagpt", "config", "show", "data.split=abc"],
        capture_output=True,
        text=True,
    )
    assert split.returncode == 2 and "data.split = 'abc'" in split.stderr
