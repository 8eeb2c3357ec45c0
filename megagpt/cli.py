"""The `megagpt` command: train, finetune, generate, eval, demo, config, launch, sweep-report."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from megagpt.errors import report_user_errors
from megagpt.launch.cli import add_launch_commands, run_launch, run_sweep_report

OVERRIDES_HELP = "settings as section.key=value (e.g. optim.lr=3e-4 model.n_layers=4)"
FIELDS_HINT = "Every setting, its type, default and meaning: megagpt config fields"


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train", help="train a GPT (run under torchrun for several ranks)", epilog=FIELDS_HINT
    )
    p.add_argument("--config", help="YAML file, or a preset name from configs/ (gpt2-124m)")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)


def _add_finetune(sub) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune pretrained weights (finetune.init) on a labeled set",
        description="megagpt train, starting from finetune.init: a megagpt checkpoint (any "
        "layout) or a Hugging Face GPT-2/Llama directory, whose model shape and tokenizer "
        "it takes; weights only, the optimizer and schedule start at step 0.",
        epilog=FIELDS_HINT,
    )
    p.add_argument("--config", help="YAML file, or a preset name from configs/ (sft-tiny)")
    p.add_argument("overrides", nargs="*", help=f"{OVERRIDES_HELP}; finetune.init=DIR needed")


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="sample text from a checkpoint")
    p.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint directory, checkpoints/ root, or a run's output_dir",
    )
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy decoding")
    p.add_argument("--top-k", type=int, default=50, help="0 disables")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling; 1 disables")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-cache", action="store_true", help="recompute every position (slow)")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="loss and perplexity of a checkpoint on a data split")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--split", choices=("train", "valid", "test"), default="valid")
    p.add_argument(
        "--iters",
        type=int,
        default=None,
        help="global batches to average (default: the run's train.eval_iters)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("overrides", nargs="*", help=f"{OVERRIDES_HELP}; e.g. data.path=other")


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="build data from Python's docs, train a tiny GPT, generate")
    p.add_argument("--nproc", type=int, default=1, help="data-parallel processes")
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)


def _add_config(sub) -> None:
    p = sub.add_parser("config", help="show a resolved config, or document every field")
    actions = p.add_subparsers(dest="action", required=True)
    show = actions.add_parser("show", help="print the resolved config as YAML")
    show.add_argument("--config", help="YAML file or preset name")
    show.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    actions.add_parser("fields", help="every setting with its type, default and meaning")


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write a checkpoint as a Hugging Face model or one file")
    formats = p.add_subparsers(dest="format", required=True)
    hf = formats.add_parser(
        "hf", help="a transformers model directory (GPT-2 or Llama), with the tokenizer"
    )
    torch_file = formats.add_parser("torch", help="one consolidated state dict (torch.save)")
    for parser in (hf, torch_file):
        parser.add_argument(
            "--checkpoint",
            required=True,
            help="checkpoint directory, checkpoints/ root, or run output_dir",
        )
        parser.add_argument("--out", required=True, help="directory (hf) or file (torch)")


def _add_import(sub) -> None:
    p = sub.add_parser("import", help="a Hugging Face model as a megagpt checkpoint")
    formats = p.add_subparsers(dest="format", required=True)
    hf = formats.add_parser("hf", help="a local transformers GPT-2 or Llama directory")
    hf.add_argument("--model", required=True, help="the transformers model directory")
    hf.add_argument(
        "--out", required=True, help="run directory; the checkpoint goes to <out>/checkpoints"
    )
    hf.add_argument("overrides", nargs="*", help=f"{OVERRIDES_HELP}, stored in its config")


def _add_checkpoint(sub) -> None:
    p = sub.add_parser("checkpoint", help="inspect checkpoints without loading a model")
    actions = p.add_subparsers(dest="action", required=True)
    verify = actions.add_parser(
        "verify", help="check every file of a checkpoint against its recorded XXH3-64 and size"
    )
    verify.add_argument(
        "directory", help="a step_N/ checkpoint, or a checkpoints/ root or run directory (all)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megagpt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        _add_train,
        _add_finetune,
        _add_generate,
        _add_eval,
        _add_demo,
        _add_config,
        _add_export,
        _add_import,
        _add_checkpoint,
    ):
        add(sub)
    add_launch_commands(sub)
    return parser


def _export(args) -> None:
    from megagpt.checkpoint.convert import export_hf, export_torch

    written = (export_hf if args.format == "hf" else export_torch)(args.checkpoint, args.out)
    print(f"wrote {written}")


def _import(args) -> None:
    from megagpt.checkpoint.convert import import_hf

    written = import_hf(args.model, args.out, args.overrides)
    print(f"wrote {written}; continue training with checkpoint.resume={written}")


def _train(args) -> int:
    from megagpt.config import load_config
    from megagpt.training.trainer import exit_code, train

    return exit_code(train(load_config(args.config, args.overrides)))


def _finetune(args) -> int:
    from megagpt.config import ConfigError, load_config
    from megagpt.training.trainer import exit_code, train

    config = load_config(args.config, args.overrides)
    if not config.finetune.init:
        raise ConfigError(
            "finetune.init is not set: name the pretrained weights, a megagpt checkpoint "
            "or a Hugging Face model directory (finetune.init=runs/pretrain)"
        )
    return exit_code(train(config))


def _check_sampling(args) -> None:
    """Sampling flags out of their range are errors, never silently "off"."""
    from megagpt.config import ConfigError

    for flag, ok, requirement in (
        ("--temperature", args.temperature >= 0, "must be >= 0 (0 is greedy decoding)"),
        ("--top-k", args.top_k >= 0, "must be >= 0 (0 keeps every token)"),
        ("--top-p", 0 < args.top_p <= 1, "must be in (0, 1] (1 keeps every token)"),
        ("--max-new-tokens", args.max_new_tokens >= 0, "must be >= 0"),
        ("--num-samples", args.num_samples >= 1, "must be at least 1"),
    ):
        if not ok:
            value = getattr(args, flag[2:].replace("-", "_"))
            raise ConfigError(f"{flag} {value}: {requirement}")


def _generate(args) -> None:
    from megagpt.checkpoint import CheckpointError, load_model_for_inference
    from megagpt.generate import generate_text
    from megagpt.tokenizer import Tokenizer

    _check_sampling(args)
    model, config, _ = load_model_for_inference(args.checkpoint, args.device)
    if not config.data.tokenizer:
        raise CheckpointError(
            f"{args.checkpoint} names no tokenizer (data.tokenizer) and holds no copy of one "
            "(tokenizer.model or tokenizer.json): generation needs the tokenizer the model "
            "was trained with"
        )
    texts = generate_text(
        model,
        Tokenizer(config.data.tokenizer),
        args.prompt,
        args.max_new_tokens,
        args.temperature,
        args.top_k or None,
        args.top_p,
        args.seed,
        args.num_samples,
        use_cache=not args.no_cache,
    )
    for text in texts:
        print(text)
        if args.num_samples > 1:
            print("-" * 40)


def _checkpoint(args) -> int:
    from megagpt.checkpoint import CheckpointError, verify_checkpoints

    results = verify_checkpoints(args.directory)
    for directory, problems in results:
        if problems is None:
            print(f"{directory}: written without checksums; not verified")
        elif problems:
            print(f"{directory}: DAMAGED")
            for problem in problems:
                print(f"    {problem}")
        else:
            print(f"{directory}: ok")
    damaged = [str(d) for d, problems in results if problems]
    if damaged:
        raise CheckpointError(f"{len(damaged)} damaged checkpoint(s): {', '.join(damaged)}")
    return 0


def _eval(args) -> None:
    from megagpt.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(
        args.checkpoint, args.split, args.iters, args.overrides, args.device
    )
    print(json.dumps(result))


def _demo(args) -> None:
    from megagpt.demo import run_demo

    run_demo(args.output_dir, args.nproc, args.overrides)


def _config(args) -> None:
    from megagpt.config import config_to_yaml, load_config
    from megagpt.config.docs import format_fields
    from megagpt.data import check_data_config

    if args.action == "fields":
        print(format_fields())
        return
    config = load_config(args.config, args.overrides)
    check_data_config(config.data)
    print(config_to_yaml(config), end="")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {
        "train": _train,
        "finetune": _finetune,
        "generate": _generate,
        "eval": _eval,
        "demo": _demo,
        "config": _config,
        "export": _export,
        "import": _import,
        "checkpoint": _checkpoint,
        "launch": run_launch,
        "sweep-report": run_sweep_report,
    }
    # Ctrl-C in training saves a checkpoint first; a second one, or one elsewhere, ends here.
    return report_user_errors(f"megagpt {args.command}", lambda: handlers[args.command](args))


if __name__ == "__main__":
    sys.exit(main())
