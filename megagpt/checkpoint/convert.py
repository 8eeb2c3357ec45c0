"""`megagpt export hf|torch` and `megagpt import hf`."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from megagpt.checkpoint import layout
from megagpt.checkpoint.checksums import ChecksummingWriter, checkpoint_sums
from megagpt.checkpoint.convert_classifier import save_hf_classifier
from megagpt.checkpoint.inference import consolidated_state_dict
from megagpt.checkpoint.layout import CheckpointError
from megagpt.checkpoint.lora import check_lora_export
from megagpt.config import Config, DataConfig, ModelConfig, apply_overrides, save_config
from megagpt.model import hf
from megagpt.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def export_hf(checkpoint: str | Path, out: str | Path, merge_lora: bool = False) -> Path:
    """Write the checkpoint as a transformers model directory, with its tokenizer; a
    LoRA checkpoint needs `merge_lora` (its adapters folded into the base weights)."""
    directory = layout.resolve_checkpoint_dir(checkpoint)
    check_lora_export(directory, merge_lora)
    state, config = consolidated_state_dict(directory, merge_adapters=merge_lora)
    if config.model.num_labels:  # a classifier: *ForSequenceClassification
        return _export_classifier(state, config, Path(out), layout.tokenizer_file(directory))
    return save_hf(state, config.model, Path(out), layout.tokenizer_file(directory))


def _export_classifier(state, config, out: Path, tokenizer: Path | None) -> Path:
    tok = Tokenizer(tokenizer) if tokenizer is not None else None
    special = {"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id} if tok else None
    save_hf_classifier(state, config, out, special)
    save_tokenizer(tok, out)
    return out


def save_hf(
    state: dict[str, torch.Tensor], cfg: ModelConfig, out: Path, tokenizer: Path | None = None
) -> Path:
    """Write a transformers model directory (config.json, model.safetensors, and the
    tokenizer: a sentencepiece tokenizer.model or a tokenizer.json, with its config)."""
    import transformers

    special, tok = None, None
    if tokenizer is not None:
        tok = Tokenizer(tokenizer)
        special = {"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id}
    config = hf.hf_config(cfg, special)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    hf_state = hf.to_hf(state, cfg)
    missing, unexpected = model.load_state_dict(hf_state, strict=False, assign=True)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(
            f"export mapping is incomplete: missing {missing}, unexpected {unexpected}"
        )
    if cfg.tie_embeddings:
        model.tie_weights()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    save_tokenizer(tok, out)
    return out


def save_tokenizer(tok: Tokenizer | None, out: Path) -> None:
    """The tokenizer files of a transformers directory, for either kind of tokenizer."""
    if tok is not None and tok.kind == "hf":
        _save_hf_tokenizer(tok, out)
    elif tok is not None:
        _save_sentencepiece_tokenizer(tok.path, out)


def _save_hf_tokenizer(tok: Tokenizer, out: Path) -> None:
    """The tokenizer.json as it is, with a config that makes AutoTokenizer encode as
    megagpt does: no BOS/EOS added, special-token text in a document kept as text
    (split_special_tokens), and decoded text left as it is (no clean-up of spaces). What
    else the tokenizer_config.json read with it said (a chat template) is kept."""
    shutil.copyfile(tok.path, out / "tokenizer.json")
    config = json.loads(tok.config_path.read_text()) if tok.config_path else {}
    config.update(
        tokenizer_class="PreTrainedTokenizerFast",
        add_bos_token=False,
        add_eos_token=False,
        split_special_tokens=True,
        clean_up_tokenization_spaces=False,
        bos_token=tok.id_to_piece(tok.bos_id),
        eos_token=tok.id_to_piece(tok.eos_id),
        pad_token=tok.id_to_piece(tok.pad_id),
        model_max_length=config.get("model_max_length", 1_000_000),
    )
    if tok.unk_id is not None:
        config["unk_token"] = tok.id_to_piece(tok.unk_id)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _save_sentencepiece_tokenizer(tokenizer_model: Path, out: Path) -> None:
    """The sentencepiece model with a config transformers' LlamaTokenizer reads (it
    converts it to a fast tokenizer: the same ids, except for text that starts with
    spaces, where sentencepiece's dummy prefix is handled differently)."""
    shutil.copyfile(tokenizer_model, out / "tokenizer.model")
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "add_bos_token": False,
                "add_eos_token": False,
                "legacy": False,
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "pad_token": "<pad>",
                "model_max_length": 1_000_000,
            },
            indent=2,
        )
        + "\n"
    )


def export_torch(checkpoint: str | Path, out: str | Path) -> Path:
    """One consolidated state dict (torch.save; load it with weights_only=True), and the
    resolved config beside it as <out>.yaml."""
    state, config = consolidated_state_dict(checkpoint)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    save_config(config, out.with_suffix(".yaml"))
    return out


def import_hf(model_dir: str | Path, out: str | Path, overrides: Sequence[str] = ()) -> Path:
    """Turn a local transformers GPT-2, Llama or Mixtral directory into a megagpt checkpoint
    (weights only, step 0) under <out>/checkpoints, ready for `checkpoint.resume`."""
    import transformers

    model_dir = Path(model_dir)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model_config = hf.model_config_from_hf(hf_model.config)
    state = hf.from_hf(hf_model.state_dict(), model_config)
    seq_len = min(DataConfig().seq_len, model_config.max_seq_len)  # fit the model's context
    config = apply_overrides(
        Config(model=model_config, data=DataConfig(seq_len=seq_len)),
        [f"train.output_dir={out}", *overrides],
        "import",
    )
    # A directory with both (Llama 2's) keeps the sentencepiece original.
    tokenizer = next(
        (model_dir / n for n in ("tokenizer.model", "tokenizer.json") if (model_dir / n).is_file()),
        None,
    )
    if tokenizer is not None:
        config.data.tokenizer = str(tokenizer)
    else:
        log.warning(
            "%s has no tokenizer.model or tokenizer.json; set data.tokenizer to the "
            "tokenizer your data was tokenized with",
            model_dir,
        )
    return write_weights_checkpoint(
        state, config, Path(out) / "checkpoints", {"imported_from": str(model_dir.resolve())}
    )


def write_weights_checkpoint(
    state: dict[str, torch.Tensor],
    config: Config,
    root: Path,
    extra: dict,
    optimizer: dict[str, torch.Tensor] | None = None,
    step: int = 0,
) -> Path:
    """A checkpoint holding model weights, and AdamW's state if `optimizer` is given
    (`state.<param>.<key>` entries); without it training starts its optimizer fresh.
    `step` is where the schedule continues (its samples counted as consumed)."""
    partial = layout.start_partial(root, step, config)
    writer = ChecksummingWriter(partial / layout.STATE_DIR)
    dcp.save(
        {"model": state, **({"optimizer": optimizer} if optimizer else {})}, storage_writer=writer
    )
    consumed = step * config.train.global_batch_size
    metadata = {
        **layout.base_metadata(step),
        "consumed_samples": consumed,
        "consumed_tokens": consumed * config.data.seq_len,
        "optimizer_state": bool(optimizer),
        "checksums": checkpoint_sums(partial, [writer.fs.relative_sums(partial)]),
        **extra,
    }
    return layout.publish(partial, root, step, metadata)
