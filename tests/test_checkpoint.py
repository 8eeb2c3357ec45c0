import json
import os

import pytest
import torch

from megagpt.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_model_for_inference,
    resolve_checkpoint_dir,
    save_checkpoint,
)
from megagpt.config import apply_overrides
from megagpt.model import build_model
from megagpt.training.optimizer import build_optimizer


def save(tiny_config, root, step, keep_last=0):
    model = build_model(tiny_config.model, seed=step)
    optimizer = build_optimizer(model, tiny_config.optim)
    path = save_checkpoint(
        root,
        step,
        model.state_dict(),
        optimizer.state_dict(),
        tiny_config,
        {"loss": 1.5},
        keep_last=keep_last,
    )
    return path, model


def test_round_trip_with_metadata_and_tokenizer(tiny_config, tmp_path):
    path, model = save(tiny_config, tmp_path / "ckpt", 7)
    loaded = load_checkpoint(tmp_path / "ckpt", with_optimizer=True)
    assert loaded.path == path
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.model_state[name], tensor), name
    assert loaded.metadata["step"] == 7 and loaded.metadata["loss"] == 1.5
    assert {"time", "megagpt_version", "torch_version"} <= loaded.metadata.keys()
    assert loaded.config.model == tiny_config.model
    assert loaded.config.data.tokenizer == str(path / "tokenizer.model")  # travels along
    assert loaded.optimizer_state["param_groups"][0]["weight_decay"] == 0.1
    inference_model, _, _ = load_model_for_inference(path)
    assert inference_model.lm_head.weight is inference_model.embed_tokens.weight
    assert not inference_model.training


def test_latest_pointer_retention_and_no_partial_dirs(tiny_config, tmp_path):
    root = tmp_path / "ckpt"
    for step in (1, 2, 3, 4):
        save(tiny_config, root, step, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000003", "step_00000004"]
    assert resolve_checkpoint_dir(root) == root / "step_00000004"
    assert resolve_checkpoint_dir(tmp_path / "ckpt" / "step_00000003").name == "step_00000003"


def test_run_directory_resolves_through_checkpoints(tiny_config, tmp_path):
    save(tiny_config, tmp_path / "run" / "checkpoints", 5)
    assert resolve_checkpoint_dir(tmp_path / "run").name == "step_00000005"
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        resolve_checkpoint_dir(tmp_path / "nothing")


def test_newer_format_is_refused(tiny_config, tmp_path):
    path, _ = save(tiny_config, tmp_path / "ckpt", 1)
    meta = json.loads((path / "metadata.json").read_text())
    meta["format_version"] = 99
    (path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format 99.*upgrade megagpt"):
        load_checkpoint(path)


def test_shape_mismatch_lists_the_tensors(tiny_config, tmp_path):
    path, _ = save(tiny_config, tmp_path / "ckpt", 1)
    bigger = apply_overrides(tiny_config, ["model.hidden_size=96"], "test")
    (path / "config.yaml").write_text(
        (path / "config.yaml").read_text().replace("hidden_size: 64", "hidden_size: 96")
    )
    assert bigger.model.hidden_size == 96
    with pytest.raises(
        CheckpointError,
        match=r"embed_tokens.weight: checkpoint \(512, 64\) "
        r"vs model \(512, 96\)",
    ):
        load_model_for_inference(path)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_loading_never_unpickles_code(tiny_config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path, _ = save(tiny_config, tmp_path / "ckpt", 1)
    torch.save({"weights": _Exploit()}, path / "model.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()
