"""The `megagpt` command: train, finetune, generate, chat, eval, demo, config, launch,
sweep-report, compare, plan."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from megagpt.classify_cli import add_classify_command, run_classify
from megagpt.errors import report_user_errors
from megagpt.launch.cli import add_launch_commands, run_launch, run_sweep_report
from megagpt.launch.search_cli import run_compare
from megagpt.plan_cli import add_plan_command, run_plan
from megagpt.training.preemption import hold_stop_signals

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


def _add_sampling(p, max_new_tokens: int) -> None:
    """The flags of generate and chat: the checkpoint, how tokens are drawn, where."""
    p.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint directory, checkpoints/ root, or a run's output_dir",
    )
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy decoding")
    p.add_argument("--top-k", type=int, default=50, help="0 disables")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling; 1 disables")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="cpu")


def _add_template(p) -> None:
    p.add_argument(
        "--template",
        "--chat-template",
        dest="template",
        metavar="NAME|FILE",
        help="chat template instead of the checkpoint's (plain, megagpt-chat, or a .json)",
    )


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="sample text from a checkpoint")
    _add_sampling(p, max_new_tokens=100)
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--no-cache", action="store_true", help="recompute every position (slow)")
    p.add_argument(
        "--chat",
        action="store_true",
        help="the prompt is one user turn of a chat (the checkpoint's template); "
        "print only the reply",
    )
    _add_template(p)


def _add_chat(sub) -> None:
    p = sub.add_parser(
        "chat",
        help="talk to a chat fine-tuned checkpoint in the terminal",
        description="One user turn per line of stdin (a terminal or a pipe), each reply "
        "printed as it is generated. Ctrl-C stops a reply; Ctrl-C or Ctrl-D at the "
        "prompt (or the end of piped input) ends the chat.",
    )
    _add_sampling(p, max_new_tokens=256)
    p.add_argument("--system", default=None, help="a system prompt that starts the chat")
    _add_template(p)


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
    _add_eval_tasks(p)


def _add_eval_tasks(p) -> None:
    """The flags of `megagpt eval --tasks` (lm-evaluation-harness, see megagpt.harness)."""
    p.description = (
        "Without --tasks: loss and perplexity on a data split. With --tasks: lm-evaluation-"
        "harness tasks through megagpt's own model (pip install megagpt[eval]), on the layout "
        "the overrides give (parallel.tensor_parallel_size=2 ...; run under torchrun for "
        "several processes); results go to <checkpoint>/eval/<time>/."
    )
    p.add_argument(
        "--tasks",
        help="lm-eval task names and/or task YAML paths, comma-separated "
        "(hellaswag,lambada_openai,path/to/task.yaml)",
    )
    p.add_argument("--num-fewshot", type=int, help="examples before each question")
    p.add_argument("--limit", type=float, help="documents per task (a fraction if below 1)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward")
    p.add_argument("--output", help="directory for the results (default: beside the checkpoint)")


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
        "hf", help="a transformers model directory (GPT-2, Llama or Mixtral), with the tokenizer"
    )
    torch_file = formats.add_parser("torch", help="one consolidated state dict (torch.save)")
    for parser in (hf, torch_file):
        parser.add_argument(
            "--checkpoint",
            required=True,
            help="checkpoint directory, checkpoints/ root, or run output_dir",
        )
        parser.add_argument("--out", required=True, help="directory (hf) or file (torch)")
    hf.add_argument(
        "--merge-lora",
        action="store_true",
        help="a LoRA checkpoint: write its base weights with the adapters folded in",
    )


def _add_import(sub) -> None:
    p = sub.add_parser("import", help="a Hugging Face model as a megagpt checkpoint")
    formats = p.add_subparsers(dest="format", required=True)
    hf = formats.add_parser("hf", help="a local transformers GPT-2, Llama or Mixtral directory")
    hf.add_argument("--model", required=True, help="the transformers model directory")
    hf.add_argument(
        "--out", required=True, help="run directory; the checkpoint goes to <out>/checkpoints"
    )
    hf.add_argument("overrides", nargs="*", help=f"{OVERRIDES_HELP}, stored in its config")
    ds = formats.add_parser(
        "deepspeed",
        help="a DeepSpeed checkpoint (engine.save_checkpoint) with its optimizer state",
    )
    ds.add_argument("--checkpoint", required=True, help="the save_checkpoint directory")
    ds.add_argument("--config", help="YAML of the model it holds (megagpt's config format)")
    ds.add_argument(
        "--out", required=True, help="run directory; the checkpoint goes to <out>/checkpoints"
    )
    ds.add_argument(
        "--trust-pickles",
        action="store_true",
        help="DeepSpeed's files are pickles, which can run code when loaded: say that "
        "this checkpoint comes from you or someone you trust",
    )
    ds.add_argument("overrides", nargs="*", help=f"{OVERRIDES_HELP} (the model's shape)")


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
        _add_chat,
        add_classify_command,
        _add_eval,
        _add_demo,
        _add_config,
        _add_export,
        _add_import,
        _add_checkpoint,
        add_plan_command,
        _add_setup,
    ):
        add(sub)
    add_launch_commands(sub)
    return parser


def _add_setup(sub) -> None:
    p = sub.add_parser("setup", help="one-time set-up of optional parts of this environment")
    parts = p.add_subparsers(dest="part", required=True)
    parts.add_parser(
        "deepspeed",
        help="build DeepSpeed's CPU Adam and async_io (NVMe offload) extensions once; "
        "runs never compile them themselves",
    )


def _setup(args) -> None:
    from megagpt.parallel.deepspeed_ops import build_ops
    from megagpt.utils.logging import setup_logging

    setup_logging(0, "INFO")
    for name, outcome in build_ops().items():
        print(f"DeepSpeed {name}: {outcome}")


def _export(args) -> None:
    from megagpt.checkpoint.convert import export_hf, export_torch

    if args.format == "hf":
        written = export_hf(args.checkpoint, args.out, merge_lora=args.merge_lora)
    else:
        written = export_torch(args.checkpoint, args.out)
    print(f"wrote {written}")


def _import(args) -> None:
    from megagpt.checkpoint.convert import import_hf

    if args.format == "deepspeed":
        from megagpt.checkpoint.deepspeed_import import import_deepspeed
        from megagpt.config import apply_overrides, load_config

        config = load_config(args.config, args.overrides)
        config = apply_overrides(config, [f"train.output_dir={args.out}"], "import")
        written = import_deepspeed(args.checkpoint, args.out, config, args.trust_pickles)
    else:
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
        ("--num-samples", getattr(args, "num_samples", 1) >= 1, "must be at least 1"),
    ):
        if not ok:
            value = getattr(args, flag[2:].replace("-", "_"))
            raise ConfigError(f"{flag} {value}: {requirement}")


def _generate(args) -> None:
    from megagpt.checkpoint import CheckpointError, load_model_for_inference
    from megagpt.config import ConfigError
    from megagpt.generate import generate_text
    from megagpt.tokenizer import Tokenizer

    _check_sampling(args)
    if args.chat:
        return _generate_chat(args)
    if args.template:
        raise ConfigError(
            f"--template {args.template} is for a chat: add --chat to apply it to the prompt"
        )
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


def _chat_session(args, **options):
    from megagpt.chat import load_chat_session
    from megagpt.generate import Sampling

    sampling = Sampling(args.temperature, args.top_k or None, args.top_p, args.seed)
    return load_chat_session(
        args.checkpoint,
        args.device,
        args.template,
        sampling=sampling,
        max_new_tokens=args.max_new_tokens,
        **options,
    )


def _notice(line: str) -> None:
    print(f"[{line}]", file=sys.stderr, flush=True)


def _generate_chat(args) -> None:
    from megagpt.config import ConfigError

    if args.no_cache:
        raise ConfigError("--no-cache: --chat always keeps the KV cache; leave one of them out")
    session = _chat_session(args, notify=_notice)
    for _ in range(args.num_samples):
        session.reset()  # each sample answers the prompt afresh; the seed runs on
        print(session.reply(args.prompt))
        if args.num_samples > 1:
            print("-" * 40)
        if session.interrupted:  # Ctrl-C stops the reply, and so the command
            raise KeyboardInterrupt


def _chat(args) -> None:
    from megagpt.chat import ChatError

    _check_sampling(args)
    session = _chat_session(args, system=args.system, notify=_notice)
    # A prompt and a reply label only for a person; piped input gets bare replies.
    interactive = sys.stdin.isatty()
    printed: list[str] = []  # the reply so far, to end its line

    def show(text: str) -> None:
        printed.append(text)
        print(text, end="", flush=True)

    while True:
        try:
            line = input("you> " if interactive else "")
        except (EOFError, KeyboardInterrupt):  # Ctrl-D, end of piped input, Ctrl-C
            if interactive:
                print()
            return
        if not line.strip():
            continue
        if interactive:
            print("model> ", end="", flush=True)
        printed.clear()
        try:
            session.reply(line, on_text=show)
        except ChatError as error:
            print(f"megagpt chat: {error}", file=sys.stderr, flush=True)
            continue
        if not "".join(printed).endswith("\n"):
            print(flush=True)
        if session.interrupted:
            _notice("reply stopped")


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

    if args.tasks:
        return _eval_tasks(args)

    result = evaluate_checkpoint(
        args.checkpoint, args.split, args.iters, args.overrides, args.device
    )
    print(json.dumps(result))


def _eval_tasks(args) -> None:
    from megagpt.harness.run import evaluate_tasks, format_results

    results = evaluate_tasks(
        args.checkpoint,
        args.tasks,
        args.num_fewshot,
        int(args.limit) if args.limit and args.limit >= 1 else args.limit,
        args.batch_size,
        args.overrides,
        args.device,
        args.output,
    )
    if results is not None:  # the first rank reports
        print(format_results(results))


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
    if args.command in ("train", "finetune"):
        hold_stop_signals()  # again: the `megagpt` script does not start in __main__.py
    handlers = {
        "train": _train,
        "finetune": _finetune,
        "generate": _generate,
        "chat": _chat,
        "classify": run_classify,
        "eval": _eval,
        "demo": _demo,
        "config": _config,
        "export": _export,
        "import": _import,
        "checkpoint": _checkpoint,
        "launch": run_launch,
        "sweep-report": run_sweep_report,
        "compare": run_compare,
        "plan": run_plan,
        "setup": _setup,
    }
    # Ctrl-C in training saves a checkpoint first; a second one, or one elsewhere, ends here.
    return report_user_errors(f"megagpt {args.command}", lambda: handlers[args.command](args))


if __name__ == "__main__":
    sys.exit(main())
