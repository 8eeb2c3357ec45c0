"""Every setting megagpt has, as nested dataclasses.

The string under each field is its documentation: `megagpt config fields` prints it,
and a test checks that no field goes without one. The defaults are the tiny CPU
model that `megagpt demo` trains; the presets in `configs/` override them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class MoEConfig:
    num_experts: int = 0
    """Routed experts in each mixture-of-experts layer; 0 keeps every layer a dense MLP
    (the default: the model, its checkpoints and exports are unchanged)."""

    top_k: int = 2
    """Routed experts each token is sent to (Mixtral: 2 of 8; Switch: 1)."""

    shared_experts: int = 0
    """Experts every token goes through besides its routed ones (DeepSeek's shared
    experts), each as wide as a routed expert; computed as one MLP of their total width."""

    expert_width: int | None = None
    """Hidden width of one expert; None means model.mlp_width (the dense MLP's width).
    Must be a multiple of 8: torch's grouped matmul needs 16-byte aligned bf16 rows."""

    router: Literal["softmax", "sigmoid"] = "softmax"
    """How the router turns its logits into scores: softmax over the experts (Mixtral,
    Switch) or an independent sigmoid per expert (DeepSeek-V3)."""

    normalize_top_k: bool = True
    """Rescale each token's top-k scores to sum to 1 before weighting the experts'
    outputs (Mixtral, DeepSeek-V3). With top_k=1 and a softmax router this leaves the
    router trained only by the auxiliary losses; set false for Switch's raw score."""

    aux_loss_coeff: float = 0.01
    """Weight of the Switch/Mixtral load-balancing loss E x sum_i f_i P_i (f_i: share of
    the token-to-expert assignments, P_i: mean router probability of expert i), taken
    per sequence; 0 disables it."""

    z_loss_coeff: float = 0.0
    """Weight of the router z-loss (ST-MoE): the mean squared log-sum-exp of the router
    logits, which keeps them small; 0 disables it (ST-MoE uses 0.001)."""

    bias_update_rate: float = 0.0
    """DeepSeek-V3's auxiliary-loss-free balancing: each expert has a bias added to its
    score for choosing the top-k only, moved by this much after every optimizer step,
    up for experts that received fewer tokens than average and down for the others;
    0 disables it (DeepSeek-V3 uses 0.001)."""

    every_n_layers: int = 1
    """Layer i (from 0) is a mixture-of-experts layer when (i + 1) is a multiple of
    this; the others keep the dense MLP. 1: every layer; 2: every second layer."""


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    """Number of token ids the tokenizer produces (50257 for the GPT-2 tokenizer)."""

    pad_vocab_size_to_multiple_of: int = 1
    """Round the embedding and output size up to a multiple of this, as Megatron's
    --make-vocab-size-divisible-by (128 makes GPU matmuls faster); 1 keeps it exact."""

    max_seq_len: int = 256
    """Longest sequence the model accepts: the size of the learned position table."""

    n_layers: int = 4
    """Number of transformer blocks."""

    hidden_size: int = 192
    """Width of the residual stream (d_model)."""

    n_heads: int = 6
    """Attention heads; must divide hidden_size (head size = hidden_size / n_heads)."""

    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; must divide n_heads. None means
    n_heads (plain multi-head attention); 1 is multi-query attention."""

    ffn_hidden_size: int | None = None
    """Width of the MLP. None means 4 x hidden_size for GELU, and 8/3 x hidden_size
    rounded up to a multiple of 64 for SwiGLU (about the same parameter count)."""

    activation: Literal["gelu", "swiglu"] = "gelu"
    """MLP activation: GPT-2's tanh-approximated GELU, or Llama's SwiGLU."""

    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    """Normalization before attention, before the MLP, and after the last block."""

    norm_eps: float = 1e-5
    """Epsilon added to the variance inside every norm."""

    position_embedding: Literal["learned", "rope"] = "learned"
    """Absolute learned positions (GPT-2/3) or rotary embeddings on queries and keys."""

    rope_theta: float = 10000.0
    """Base of the rotary frequencies (only used with position_embedding=rope)."""

    bias: bool = True
    """Biases in linear layers and LayerNorms (GPT-2: true; Llama: false)."""

    tie_embeddings: bool = True
    """Share the token embedding matrix with the output layer."""

    fused_qkv: bool = True
    """Compute queries, keys and values with one matmul instead of three."""

    dropout: float = 0.0
    """Dropout on embeddings and on the output of attention and MLP (0 disables)."""

    attention_dropout: float = 0.0
    """Dropout on attention probabilities (0 disables)."""

    init_std: float = 0.02
    """Standard deviation of the normal initialization. Output projections of every
    block use init_std / sqrt(2 x n_layers), as GPT-2 and Megatron do."""

    num_labels: int = 0
    """Classes of a classification head on the final hidden state of each text's last
    token (GPT-1's fine-tuning); 0 for none. Set from the data by fine-tuning."""

    moe: MoEConfig = field(default_factory=MoEConfig)
    """Mixture-of-experts layers in place of the dense MLP (model.moe.num_experts > 0)."""

    # Sizes derived from the fields above, computed here once for every consumer (the
    # model, validation, generation, Hugging Face conversion, the FLOP counter).
    @property
    def head_dim(self) -> int:
        """Width of one attention head: hidden_size / n_heads."""
        return self.hidden_size // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads: n_kv_heads, or n_heads when that is None."""
        return self.n_kv_heads or self.n_heads

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and the output layer: vocab_size rounded up to a
        multiple of pad_vocab_size_to_multiple_of."""
        multiple = self.pad_vocab_size_to_multiple_of
        return -(-self.vocab_size // multiple) * multiple

    @property
    def mlp_width(self) -> int:
        """Hidden width of the MLP: ffn_hidden_size, or the default for the activation."""
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        if self.activation == "swiglu":  # 2/3 of 4C keeps the parameter count of a GELU MLP
            return 64 * -(-8 * self.hidden_size // (3 * 64))
        return 4 * self.hidden_size

    @property
    def expert_width(self) -> int:
        """Hidden width of one routed or shared expert: moe.expert_width, or mlp_width."""
        return self.moe.expert_width or self.mlp_width

    def is_moe_layer(self, index: int) -> bool:
        """Whether block `index` (from 0) has a mixture of experts instead of the MLP."""
        return self.moe.num_experts > 0 and (index + 1) % self.moe.every_n_layers == 0


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    """Ranks that split every layer's matmuls (Megatron's tensor parallelism): attention
    heads, MLP width and vocabulary are divided among them. Keep it within a node."""

    pipeline_parallel_size: int = 1
    """Ranks that each hold a contiguous slice of the layers (pipeline stages)."""

    context_parallel_size: int = 1
    """Ranks that split every sequence (context parallelism): each holds a head and a
    tail chunk of it (balancing the causal work) and attention runs as a ring over
    them. For long sequences; needs data.seq_len divisible by 2 x context_parallel_size,
    no attention dropout, and plain text (fine-tuning and classification: use 1)."""

    expert_parallel_size: int = 1
    """Ranks that split each mixture-of-experts layer's routed experts (expert
    parallelism): each holds num_experts / expert_parallel_size of them and tokens travel
    to their experts' rank and back by all-to-all. They are taken from the ranks that
    shard parameters (data-parallel ranks at zero_stage >= 1, times context ranks), as
    torchtitan does, so it must divide that number; the experts are sharded by ZeRO over
    the rest."""

    data_parallel_size: int | None = None
    """Model replicas that split the global batch; None infers it as
    world size / (tensor_parallel_size x pipeline_parallel_size)."""

    zero_stage: int = 0
    """ZeRO memory sharding across data-parallel ranks (FSDP2): 0 plain data parallel,
    1 shards optimizer state, 2 also gradients, 3 also parameters between uses."""

    sequence_parallel: bool = False
    """With tensor parallelism, also split norms and dropout along the sequence (less
    activation memory; needs data.seq_len divisible by tensor_parallel_size)."""

    pipeline_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b", "zero_bubble"] = "1f1b"
    """Pipeline schedule: gpipe (all forwards, then all backwards), 1f1b, or the
    multi-stage interleaved_1f1b and zero_bubble (need virtual_stages >= 2)."""

    virtual_stages: int = 1
    """Pipeline stages per pipeline rank (interleaving shrinks the pipeline bubble)."""

    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    """Recompute activations in backward to save memory: every block's (full), or only
    those of cheap operations while matmul and attention outputs are kept (selective)."""

    engine: Literal["native", "deepspeed"] = "native"
    """Who runs data parallelism and ZeRO: native (PyTorch's FSDP2, every layout) or
    deepspeed (DeepSpeed's ZeRO 0-3 with CPU or NVMe offload; data parallel only; needs
    the `deepspeed` extra)."""

    offload_optimizer: Literal["none", "cpu", "nvme"] = "none"
    """Keep the optimizer state (and the fp32 master weights it updates) in host memory
    (cpu) or on an NVMe drive (nvme, deepspeed engine only); the optimizer steps there.
    On the native engine cpu is FSDP2's CPU offload, which moves parameters, gradients
    and optimizer state together: the same as offload_params=cpu."""

    offload_params: Literal["none", "cpu", "nvme"] = "none"
    """Keep the parameters themselves in host memory (cpu) or on NVMe (nvme, deepspeed
    engine with zero_stage 3) between uses. On the native engine cpu offloads the
    gradients and optimizer state too (FSDP2's CPU offload, at any zero_stage and
    layout): the same as offload_optimizer=cpu."""

    nvme_path: str | None = None
    """Directory on a local NVMe drive for nvme offload (must exist and be writable)."""


@dataclass
class DataConfig:
    path: list[str] = field(default_factory=list)
    """Dataset prefixes (each names a <prefix>.bin and <prefix>.idx pair), optionally
    weighted as Megatron's --data-path: "0.3 corpusA 0.7 corpusB"."""

    split: str = "969,30,1"
    """Relative sizes of the train, validation and test splits, by documents."""

    tokenizer: str | None = None
    """Path of the tokenizer the data was tokenized with: a sentencepiece .model file or a
    Hugging Face tokenizer.json."""

    seq_len: int = 128
    """Tokens per training sample; at most model.max_seq_len."""

    chat_template: str | None = None
    """The chat template (JSON) the fine-tuning data was rendered with; set from the
    data's manifest, kept with the tokenizer in checkpoints, used by chat and generate."""

    max_epochs: float | None = 4.0
    """Passes over a training dataset beyond which the run warns at start-up (or stops,
    with max_epochs_action=error): repeating data many times overfits. Counted per
    blended dataset from its share of train.max_steps x global_batch_size; null: no check."""

    max_epochs_action: Literal["warn", "error"] = "warn"
    """What a run reading some dataset more than data.max_epochs times does at start-up:
    warn and train, or stop with an error before the model is built."""


@dataclass
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate, reached at the end of warmup."""

    min_lr: float = 1e-4
    """Learning rate at the end of the decay."""

    weight_decay: float = 0.1
    """AdamW weight decay; never applied to biases, norms or embeddings."""

    beta1: float = 0.9
    """AdamW first-moment decay."""

    beta2: float = 0.95
    """AdamW second-moment decay."""

    eps: float = 1e-8
    """AdamW epsilon."""

    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""

    warmup_steps: int = 50
    """Steps of linear warmup from 0 to lr."""

    decay_style: Literal["cosine", "linear", "wsd", "constant"] = "cosine"
    """Schedule after warmup: cosine or linear decay to min_lr, WSD (constant lr,
    then a linear decay over the last wsd_decay_fraction of the steps), or constant."""

    decay_steps: int | None = None
    """Steps from the end of warmup to min_lr; None means until train.max_steps."""

    wsd_decay_fraction: float = 0.2
    """Fraction of the post-warmup steps spent decaying under decay_style=wsd."""


@dataclass
class EarlyStoppingConfig:
    metric: str = "val_loss"
    """The evaluation metric to watch: any metric logged at evaluations (val_loss, val_ppl,
    train_val_gap; val_accuracy, val_macro_f1 for classifiers; eval/<task>/acc etc. for
    eval.tasks). Evaluations that did not measure it are not counted."""

    mode: Literal["auto", "min", "max"] = "auto"
    """Whether lower (min) or higher (max) values are better; auto: max for names with
    acc, accuracy, f1, exact_match, mcc or bleu in their last part, min otherwise
    (losses, perplexity, bits per byte, the gap)."""

    patience: int = 0
    """Stop after this many evaluations in a row without an improvement (with a
    checkpoint, and the reason logged); 0 turns early stopping off."""

    min_delta: float = 0.0
    """How much the metric must beat its best value by for an evaluation to count as an
    improvement (0: any improvement counts)."""


@dataclass
class LossScaleConfig:
    initial_scale: float = 65536.0
    """The loss is multiplied by this before backward (2**16, as DeepSpeed and
    torch.amp start), so small fp16 gradients do not flush to zero."""

    growth_interval: int = 1000
    """Steps in a row without an overflow after which the scale doubles."""

    backoff_factor: float = 0.5
    """The scale is multiplied by this when a step's gradients overflow (inf or NaN)."""

    hysteresis: int = 2
    """Overflowing steps (not necessarily in a row) tolerated before the scale backs
    off; every overflowing step is skipped either way. 1 backs off at every overflow."""

    min_scale: float = 1.0
    """The scale never goes below this."""


@dataclass
class TrainConfig:
    max_steps: int = 600
    """Optimizer steps to train for (computed from epochs when that is set)."""

    epochs: float | None = None
    """Passes over the training split: when set, max_steps is computed from it at
    start-up, ceil(epochs x training samples / global_batch_size)."""

    global_batch_size: int = 16
    """Sequences per optimizer step, summed over all data-parallel ranks."""

    micro_batch_size: int = 8
    """Sequences per forward/backward pass on one rank; gradient accumulation makes
    up the rest: global_batch_size / (micro_batch_size x data-parallel size) passes."""

    seed: int = 1234
    """Seed of weight initialization, data order and dropout."""

    output_dir: str = "runs/default"
    """Directory for everything a run writes: resolved config, metrics, TensorBoard
    events and checkpoints."""

    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Compute precision: bf16 or fp16 autocast (weights and optimizer stay fp32) or
    fp32. fp16, for GPUs without bf16 (V100, T4), scales the loss dynamically (see
    train.loss_scale). auto picks bf16 on GPUs that support it and fp32 on CPU."""

    loss_scale: LossScaleConfig = field(default_factory=LossScaleConfig)
    """Dynamic loss scaling of fp16 training (ignored at other precisions)."""

    fp8: Literal["none", "tensorwise", "rowwise"] = "none"
    """FP8 matmuls in the transformer blocks (attention and MLP projections; the LM
    head, MoE router and norms stay in bf16) through torchao's float8 training, with
    one scale per tensor or per row. Needs bf16 compute, an SM89+ GPU (H100, L40S)
    and the fp8 extra (pip install megagpt[fp8]); fast only with train.compile.
    Checkpoints are the same with or without it. MEGAGPT_FP8_EMULATE=1 emulates it
    where the GPU cannot (CPU tests: numerics only, no speed)."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train; auto uses CUDA when it is available."""

    eval_interval: int = 100
    """Evaluate on the validation split every this many steps, and at the end; 0 never."""

    eval_iters: int = 4
    """Global batches of validation data per evaluation."""

    compile: bool = False
    """Compile every transformer block with torch.compile."""

    max_nan_skips: int = 0
    """Steps with a NaN or infinite loss or gradient norm to skip (no update) before the
    run stops; 0 stops at the first one."""

    watchdog_multiple: float = 10.0
    """A training step taking longer than this many times the median step time (and
    than watchdog_min_timeout_s) dumps every rank's Python stack and exits with code
    76, so SLURM can requeue the job; 0 disables the watchdog."""

    watchdog_min_timeout_s: float = 300.0
    """The watchdog never fires before a step has run this long."""

    collective_timeout_s: int | None = None
    """Seconds a collective may block before the process group fails; None takes
    MEGAGPT_COLLECTIVE_TIMEOUT_S (set by megagpt launch) or 600."""

    memory_check: bool = True
    """Refuse at start-up, before allocating, a layout that `megagpt plan` predicts will
    not fit in the device's memory (naming layouts that would); false starts anyway."""

    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    """Stop the run when a validation metric stops improving (off by default)."""


@dataclass
class CheckpointConfig:
    interval: int = 0
    """Save a checkpoint every this many steps; 0 saves only at the end of training."""

    dir: str | None = None
    """Checkpoint directory; None means <train.output_dir>/checkpoints."""

    resume: str = "none"
    """Where to start from: none (fresh weights), auto (the newest complete checkpoint
    in checkpoint.dir, or fresh if there is none), or a checkpoint directory. Any
    layout can resume from any other."""

    partial_load: bool = False
    """Resume even where the checkpoint's tensors and the model's differ (another
    n_layers, a changed vocabulary): tensors of the same name and shape are loaded, the
    others keep their fresh initial values, the optimizer starts fresh, and every
    difference is logged. Off, any difference stops the run with the list."""

    async_save: bool = True
    """Write checkpoints in the background: training waits only while the state is
    copied to host memory."""

    keep_last: int = 2
    """Keep this many of the newest checkpoints and delete older ones; 0 keeps all."""

    keep_every: int = 0
    """Also keep every checkpoint whose step is a multiple of this; 0 keeps none extra."""

    keep_best: str | None = None
    """Also keep the checkpoint with the best value of this evaluation metric (e.g.
    val_loss), named by the `best` pointer beside `latest`; an evaluation that sets a
    new best is saved even between checkpoint.interval steps. null: off."""

    keep_best_mode: Literal["auto", "min", "max"] = "auto"
    """Whether lower (min) or higher (max) values of keep_best are better; auto as
    train.early_stopping.mode."""


@dataclass
class LoggingConfig:
    log_interval: int = 10
    """Log training metrics every this many steps (and at the first and last step)."""

    tensorboard: bool = True
    """Write TensorBoard event files to <train.output_dir>/tensorboard."""

    level: Literal["DEBUG", "INFO", "WARNING"] = "INFO"
    """Console log level of rank 0."""

    all_ranks: bool = False
    """Log from every rank instead of only rank 0."""

    peak_tflops: float | None = None
    """Peak dense TFLOP/s of one device at the training precision, for MFU. None looks
    up known GPUs and measures fp32 matmul throughput on CPU."""

    wandb: bool = False
    """Also log every metric to Weights & Biases (pip install 'megagpt[wandb]'), in
    <train.output_dir>/wandb; WANDB_MODE=offline keeps it on disk for `wandb sync`."""

    wandb_project: str = "megagpt"
    """The W&B project of the run (with logging.wandb)."""

    wandb_name: str | None = None
    """The W&B run's display name; None: the name of train.output_dir."""


LORA_TARGETS = (
    "qkv_proj",
    "q_proj",
    "k_proj",
    "v_proj",
    "out_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
"""Every projection LoRA can adapt: attention (fused or separate q/k/v, output) and MLP."""


@dataclass
class LoraConfig:
    rank: int = 0
    """Rank of the low-rank adapters; 0 turns LoRA off (every weight is trained). With a
    rank, the weights of finetune.init stay frozen and only the adapters are trained."""

    alpha: float = 16.0
    """Scale of the adapters' update: a projection computes W x + (alpha / rank) B A x."""

    dropout: float = 0.0
    """Dropout on the adapters' input (not on the frozen projection's)."""

    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    """Projections that get adapters, in every layer (those the model lacks are skipped):
    qkv_proj or q_proj/k_proj/v_proj, out_proj, gate_proj, up_proj, down_proj."""


@dataclass
class FinetuneConfig:
    init: str | None = None
    """The weights to fine-tune: a megagpt checkpoint (step_N/, checkpoints/ root or run
    directory, saved on any layout) or a Hugging Face GPT-2, Llama or Mixtral directory. The
    optimizer and learning-rate schedule start fresh at step 0; once the fine-tune has
    checkpoints of its own, checkpoint.resume continues from those instead."""

    pack: bool = True
    """Pack several examples into each window of data.seq_len tokens (attention never
    crosses from one into another); false pads every example to data.seq_len."""

    lora: LoraConfig = field(default_factory=LoraConfig)
    """Low-rank adapters (LoRA) instead of training every weight."""

    lm_loss_weight: float = 0.5
    """Classification: weight of the auxiliary language-modelling loss on the texts,
    added to the classification loss (GPT-1 used 0.5; 0 turns it off)."""

    labels: list[str] = field(default_factory=list)
    """Classification: the label names in id order; set from the data's manifest."""


@dataclass
class EvalConfig:
    tasks: list[str] = field(default_factory=list)
    """Downstream tasks evaluated inside the training loop: local files (or NAME=FILE)
    of multiple-choice rows {"context", "choices", "answer"}, cloze rows {"context",
    "continuation"}, or text (.txt, or rows {"text"}) for bits per byte; logged as
    eval/<task>/acc, acc_norm, ppl, bpb (see megagpt/data/tasks.py)."""

    interval: int | None = None
    """Evaluate the tasks every this many steps, and at the end; None: at every
    validation (train.eval_interval); 0: never."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """Shape of the network."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """How the work is split across processes."""

    data: DataConfig = field(default_factory=DataConfig)
    """Where the tokens come from and how they are cut into samples."""

    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""

    train: TrainConfig = field(default_factory=TrainConfig)
    """Length, batch and precision of the run."""

    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """When and where checkpoints are written."""

    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """What is logged and where."""

    eval: EvalConfig = field(default_factory=EvalConfig)
    """Downstream tasks scored during training."""

    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    """Fine-tuning on labeled data: the weights to start from and how examples are batched."""
