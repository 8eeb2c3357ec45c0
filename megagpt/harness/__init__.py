"""Downstream evaluation of megagpt checkpoints through EleutherAI's lm-evaluation-harness.

- `scoring`: log-likelihoods of (context, continuation) requests on any layout, one
  forward per shared context, and multiple-choice metrics as lm-eval defines them;
- `generation`: batched generation for prompts of different lengths (KV cache, stops);
- `model`: a checkpoint's model built for evaluation on this process's layout;
- `adapter`: the lm-eval model `megagpt` (importing it needs lm-eval: the `eval` extra);
- `tasks`: checks of task YAML files, their data and the tokenizer, before a model loads;
- `run`: `megagpt eval --tasks`, results written beside the checkpoint.

Only `adapter` and `run` import lm-eval, so scoring works without it.
"""
