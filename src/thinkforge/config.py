"""Structured configs: the schema Hydra composes into, validated before any work starts.

Hydra rejects unknown keys and wrong types at composition time; the `__post_init__` checks below reject values
that type-check but cannot work (a micro batch larger than the batch, an unknown attention backend, ...). They run
when `validate` converts the composed config to these dataclasses, i.e. before a model or a dataset is touched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from thinkforge.errors import one_of, require
from thinkforge.keys import check_known_keys
from thinkforge.rollout.settings import RolloutConfig, SamplingConfig, ToolsConfig


def config_dir() -> str:
    """The `conf/` shipped inside the wheel, or the repository's own `conf/` for an editable install."""
    packaged = resources.files("thinkforge") / "conf"
    if packaged.is_dir():
        return str(packaged)
    return str(Path(__file__).resolve().parents[2] / "conf")


ATTN_IMPLEMENTATIONS = ("auto", "flash_attention_2", "sdpa", "eager")
DTYPES = ("auto", "float32", "bfloat16")
CANONICAL_FIELDS = ("text", "prompt", "completion", "messages", "answer", "tests", "chosen", "rejected")


LORA_EXPORTS = ("merged", "adapter")


@dataclass
class LoraConfig:
    """LoRA adapters through peft: only they train, and the base weights with the adapter switched off are the
    reference (DPO) and KL anchor (GRPO), so no second copy of the model is held."""

    # 0: no adapter, the whole model trains
    rank: int = 0
    # the adapter's output is scaled by alpha / rank
    alpha: float = 32.0
    # dropout on the adapter's input (peft's lora_dropout)
    dropout: float = 0.0
    # module names (e.g. [q_proj, v_proj]) or all-linear (every linear layer but the LM head)
    target_modules: Any = "all-linear"
    # merged: the export is the HF model with the adapter folded in (the next stage's start); adapter: the
    # adapter alone (adapter_config.json + adapter_model.safetensors), for peft to load onto its base
    export: str = "merged"

    def __post_init__(self) -> None:
        require(self.rank >= 0, "model.lora.rank", f"must be >= 0 (0: no adapter); got {self.rank}")
        require(self.alpha > 0, "model.lora.alpha", f"must be positive; got {self.alpha}")
        require(0 <= self.dropout < 1, "model.lora.dropout", f"must be in [0, 1); got {self.dropout}")
        targets = self.target_modules
        require(
            targets == "all-linear"
            or (not isinstance(targets, str) and len(targets) > 0 and all(isinstance(t, str) for t in targets)),
            "model.lora.target_modules",
            f"must be all-linear or a non-empty list of module names; got {targets!r}",
        )
        one_of(self.export, LORA_EXPORTS, "model.lora.export")


@dataclass
class ModelConfig:
    # An HF hub id or a local directory (an earlier stage's export). When null, `config` builds a fresh model.
    name_or_path: Optional[str] = None
    # HF config fields for a model built from scratch (`model_type` selects the architecture).
    config: Optional[dict[str, Any]] = None
    # Tokenizer id or directory; null means: the model's own, or the built-in synthetic-task tokenizer.
    tokenizer: Optional[str] = None
    # auto: flash_attention_2 on GPU when flash-attn is installed and the architecture has it, else sdpa, else eager; or
    # one of them by name
    attn_implementation: str = "auto"
    # The compute dtype: auto is bfloat16 on GPU, float32 on CPU. Parameters and optimizer state are fp32 in any
    # case (bf16 weights round small updates away); fp16 is not offered, as it needs loss scaling.
    dtype: str = "auto"
    # Recompute each layer's activations in the backward pass (non-reentrant): less memory, one more forward.
    gradient_checkpointing: bool = False
    # Run the model's own Python from its repository (architectures transformers does not ship).
    trust_remote_code: bool = False
    # The initial weights' seed of a model built from `config` (the same on every device and strategy).
    init_seed: int = 0
    # Rows of this many tokens go through the LM head at once when computing log-probs.
    logprob_chunk_size: int = 2048
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        require(
            (self.name_or_path is None) != (self.config is None),
            "model",
            "set exactly one of model.name_or_path (load pretrained) or model.config (build from scratch)",
        )
        if self.config is not None:
            require("model_type" in self.config, "model.config.model_type", "is required to pick an architecture")
        one_of(self.attn_implementation, ATTN_IMPLEMENTATIONS, "model.attn_implementation")
        one_of(self.dtype, DTYPES, "model.dtype")
        require(self.logprob_chunk_size > 0, "model.logprob_chunk_size", "must be positive")


SYNTHETIC_TASKS = ("math", "code", "tool")


@dataclass
class SyntheticConfig:
    # math: word problems with a boxed answer; code: the same stories as Python functions graded by their tests;
    # tool: products of two (level + 1)-digit numbers, solved by calling the Python tool (data/synthetic_tool.py)
    task: str = "math"
    # problems in the train split
    num_train: int = 4000
    # problems in the test split, which shares no prompt with the train split
    num_val: int = 200
    # difficulty, 1 to 5: math and code, the operations in a story (from 3, multiplication; from 4, division); tool,
    # operands of level + 1 digits; levels cycle from min_level to max_level
    min_level: int = 1
    # the hardest level
    max_level: int = 3
    # the largest starting quantity and amount added: 9 keeps every operand one digit
    max_number: int = 20
    # the share of solutions that give only the answer, with an empty <think> (see data/synthetic.py)
    answer_only_fraction: float = 0.0
    # the share of solutions that box the answer; the rest write "The answer is 12." as raw corpora do, which
    # graders and RL rewards (reading only \boxed{}) do not accept
    boxed_fraction: float = 1.0
    # code: the share of solutions that forget their last step (see data/synthetic_code.py)
    buggy_fraction: float = 0.0
    # the generator's seed: the same settings and seed give the same problems
    seed: int = 0

    def __post_init__(self) -> None:
        one_of(self.task, SYNTHETIC_TASKS, "data.synthetic.task")
        require(self.num_train > 0 and self.num_val > 0, "data.synthetic", "num_train and num_val must be positive")
        require(1 <= self.min_level <= self.max_level <= 5, "data.synthetic", "need 1 <= min_level <= max_level <= 5")
        require(self.max_number >= 2, "data.synthetic", "max_number must be at least 2")
        require(0 <= self.answer_only_fraction <= 1, "data.synthetic.answer_only_fraction", "must be in [0, 1]")
        require(0 <= self.boxed_fraction <= 1, "data.synthetic.boxed_fraction", "must be in [0, 1]")
        require(0 <= self.buggy_fraction <= 1, "data.synthetic.buggy_fraction", "must be in [0, 1]")


@dataclass
class DataConfig:
    # "synthetic", a .jsonl/.json/.parquet file, or a `datasets` hub name.
    train: Optional[str] = "synthetic"
    # Held-out rows, in the same forms as train; null: none (stages that train on prompt + answer
    # rows then hold out some of them).
    val: Optional[str] = "synthetic"
    # The split read from a hub dataset or the synthetic task (train or test); a file has one.
    train_split: str = "train"
    # The split data.val is read from, as train_split.
    val_split: str = "test"
    # Canonical field -> column in the source; override one with e.g. data.fields.prompt=problem.
    fields: dict[str, str] = field(default_factory=lambda: {name: name for name in CANONICAL_FIELDS})
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    # A system turn put first in every conversation that has none of its own.
    system_prompt: Optional[str] = None
    # The longest sequence midtrain, SFT and DPO train on: a packed row's capacity, one conversation, a DPO pair's
    # prompt + reply. GRPO's prompts are bounded by stage.max_prompt_length, its completions by the stage too.
    max_sequence_length: int = 512
    # Sequences packed into rows of up to max_sequence_length tokens, each with its own position_ids (no padding, no
    # attention across them); false: one sequence a row, padded.
    pack: bool = True
    # What to do with a sequence longer than max_sequence_length: split it into pieces, truncate it, or drop it.
    overflow: str = "split"
    # A malformed row stops the run (naming file, row and field) or is skipped and counted.
    bad_rows: str = "error"
    # The validation loss reads at most this many rows of data.val.
    max_val_rows: int = 256
    # Items per optimizer step over all processes: rows (midtrain, SFT: packed, or one sequence a row without
    # data.pack), pairs (DPO), prompts (GRPO, each sampled stage.sampling.num_samples times).
    batch_size: int = 16
    # Items per forward and backward on each process; a step accumulates the gradients of batch_size / (processes
    # x micro_batch_size) such micro-batches.
    micro_batch_size: int = 8
    # Unpacked rows are padded to their micro-batch's longest sequence, rounded up to this multiple (null: 64 on
    # GPU, 8 on CPU).
    pad_to_multiple_of: Optional[int] = None
    # Sequences of similar length share the micro-batches of a step (the step still trains on the same global
    # batch): less padding, the same loss.
    group_by_length: bool = False
    # The order training rows are drawn in, reshuffled every pass.
    seed: int = 0

    def __post_init__(self) -> None:
        require(self.train is not None, "data.train", "is required: 'synthetic', a .jsonl/.parquet path or a hub name")
        one_of(self.overflow, ("split", "truncate", "drop"), "data.overflow")
        one_of(self.bad_rows, ("error", "skip"), "data.bad_rows")
        require(self.max_sequence_length > 1, "data.max_sequence_length", "must be at least 2")
        require(self.micro_batch_size > 0, "data.micro_batch_size", "must be positive")
        require(
            self.pad_to_multiple_of is None or self.pad_to_multiple_of > 0,
            "data.pad_to_multiple_of",
            "must be positive (or null)",
        )
        unknown = sorted(set(self.fields) - set(CANONICAL_FIELDS))
        require(not unknown, "data.fields", f"unknown canonical fields {unknown}; known: {', '.join(CANONICAL_FIELDS)}")
        require(
            self.batch_size % self.micro_batch_size == 0,
            "data.batch_size",
            f"must be a multiple of data.micro_batch_size ({self.micro_batch_size}); got {self.batch_size}",
        )


@dataclass
class OptimConfig:
    # the tiny demo model's, trained from scratch; a pretrained model wants 1e-6 to 2e-5 (Stage warns)
    lr: float = 3e-3
    # AdamW's decoupled weight decay, on matrices only (not on norms and biases)
    weight_decay: float = 0.1
    # AdamW's (beta1, beta2)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    # AdamW's epsilon
    eps: float = 1e-8
    # the learning rate rises linearly to lr over this many optimizer steps
    warmup_steps: int = 10
    # The cosine schedule decays to lr * min_lr_ratio at trainer.max_steps.
    min_lr_ratio: float = 0.1
    # gradients are clipped to this global L2 norm
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        require(self.lr > 0, "optim.lr", "must be positive")
        require(len(self.betas) == 2, "optim.betas", "must be two numbers")
        require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
        require(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        require(self.max_grad_norm > 0, "optim.max_grad_norm", "must be positive")


@dataclass
class TrainerConfig:
    # optimizer steps the stage trains for
    max_steps: int = 60
    # the validation loss on data.val every this many steps (none without data.val)
    val_every: int = 30
    # metrics are logged every this many steps
    log_every: int = 1
    # a checkpoint (checkpoints/, and last.ckpt to resume from) every this many steps
    ckpt_every: int = 30
    # also save checkpoints/last.ckpt every this many minutes of training (null: by steps alone), so a kill
    # without warning loses at most this much; a stop signal saves at once (thinkforge.preemption)
    ckpt_every_minutes: Optional[float] = 10.0
    # Lightning's validation batches before training, to fail early on a broken val split
    num_sanity_val_steps: int = 0

    def __post_init__(self) -> None:
        require(self.max_steps > 0, "trainer.max_steps", "must be positive")
        require(
            self.ckpt_every_minutes is None or self.ckpt_every_minutes > 0,
            "trainer.ckpt_every_minutes",
            "must be positive (or null)",
        )
        require(self.val_every > 0 and self.log_every > 0, "trainer", "val_every and log_every must be positive")
        require(self.ckpt_every > 0, "trainer.ckpt_every", "must be positive")


@dataclass
class HardwareConfig:
    # cpu, gpu (cuda is the same), or auto (a GPU when there is one)
    accelerator: str = "cpu"
    # Processes per node: GPUs, or CPU processes with strategy=fsdp.
    devices: int = 1
    # Nodes (under SLURM, the job's).
    num_nodes: int = 1
    # "single" (one process) or "fsdp" (FSDP2 fully_shard over all processes).
    strategy: str = "single"
    # torch.distributed's backend: gloo (CPU) or nccl (GPU); null: Lightning's choice for the accelerator.
    process_group_backend: Optional[str] = None
    # FSDP2: free each layer's gathered parameters after its forward and gather them again for the backward (less
    # memory, one more all-gather per layer).
    reshard_after_forward: bool = True
    # torch.compile each decoder layer (fuses its norms, RoPE and activations); the first steps pay the compilation
    compile: bool = False

    def __post_init__(self) -> None:
        one_of(self.accelerator, ("cpu", "gpu", "cuda", "auto"), "hardware.accelerator")
        one_of(self.strategy, ("single", "fsdp"), "hardware.strategy")
        require(self.devices > 0 and self.num_nodes > 0, "hardware", "devices and num_nodes must be positive")
        require(
            self.strategy == "fsdp" or (self.devices == 1 and self.num_nodes == 1),
            "hardware.strategy",
            "more than one process needs strategy=fsdp",
        )


def greedy() -> SamplingConfig:
    """Held-out scores' default: one greedy completion per prompt, as long as the stage's own (max_new_tokens null)."""
    return SamplingConfig(num_samples=1, temperature=0.0, max_new_tokens=None)


@dataclass
class HeldOutConfig:
    """Generation on held-out prompts (data.val) after the stage: accuracy, EOS rate, completion length."""

    # held-out prompts scored: greedy accuracy, EOS rate, completion length (0: off)
    num_prompts: int = 64
    # max_new_tokens null: the stage's own completion length (GRPO's at its last step, rollout DPO's sampling
    # budget, else data.max_sequence_length), so a 16K-token reasoning stage is not scored on 160 tokens
    sampling: SamplingConfig = field(default_factory=greedy)
    # pass@k beside pass@1: k samples at `pass_k_temperature` on the first `pass_k_prompts` prompts (0: off).
    # What RL can reach: it sharpens what the model already samples, so pass@k bounds its greedy gain.
    pass_k: int = 0
    # pass@k's prompts: the first this many held-out prompts
    pass_k_prompts: int = 100
    # pass@k's sampling temperature
    pass_k_temperature: float = 1.0
    # scores during the stage too, every this many optimizer steps, logged as heldout/* curves and drawn in
    # curves.png; null: a handful of points in an RL stage (GRPO, DPO: at most 4 between the start and the end,
    # every ceil(max_steps / 5) steps), none in midtrain and SFT; 0: at the end only
    every_n_steps: Optional[int] = None
    # pass@k and the sampled pass@1 at those points too (k samples a prompt each time); false: the points score
    # greedy pass@1, EOS rate and length, and pass@k is measured at the start and the end
    pass_k_at_points: bool = False
    # keep the best-scoring point's weights in export_best/ (and its scores in heldout_best.json) by this
    # held-out metric: accuracy (greedy pass@1), or sampled_accuracy or pass@<k> when the points measure them
    # (pass_k_at_points); null: keep the last only
    keep_best: Optional[str] = None
    # the first samples of each held-out point, beside heldout.json (heldout_samples.jsonl: all of rank 0's) and,
    # with logger=wandb, as a table: prompt, completion, gold answer, whether it was right
    log_samples: int = 8

    def __post_init__(self) -> None:
        require(self.num_prompts >= 0, "heldout.num_prompts", "must be >= 0 (0 switches held-out evaluation off)")
        self.sampling.check("heldout.sampling")
        require(
            self.pass_k >= 0 and self.pass_k_prompts > 0, "heldout.pass_k", "need pass_k >= 0 and pass_k_prompts > 0"
        )
        require(self.pass_k_temperature > 0, "heldout.pass_k_temperature", "must be positive (pass@k samples)")
        require(
            self.every_n_steps is None or self.every_n_steps >= 0,
            "heldout.every_n_steps",
            "must be >= 0 (0: score at the end only) or null (the stage's default)",
        )
        require(self.log_samples >= 0, "heldout.log_samples", "must be >= 0")
        if self.keep_best is not None:
            sampled = self.pass_k and self.pass_k_at_points
            kept = ("accuracy", "sampled_accuracy", f"pass@{self.pass_k}") if sampled else ("accuracy",)
            require(
                self.keep_best in kept,
                "heldout.keep_best",
                f"must be one of {', '.join(kept)} (a held-out metric measured here, higher is better); "
                f"got {self.keep_best!r}",
            )
            require(self.num_prompts > 0, "heldout.keep_best", "needs held-out prompts (heldout.num_prompts > 0)")


@dataclass
class StageSchema:
    """The base of every stage's schema (`thinkforge.stage_configs`): which Stage class runs, and its knobs."""

    _target_: str = MISSING

    def check_data(self, data: DataConfig) -> None:
        """Checks of data settings this stage cannot work with; none by default."""

    def longest_prompt(self, data: DataConfig) -> int:
        """The longest prompt the stage samples from (vLLM's context is this plus the longest completion)."""
        return data.max_sequence_length

    def trains_on_answers(self) -> bool:
        """Whether the stage's training rows are prompt + gold answer (RL, rollout DPO): held-out prompts can then
        be cut from them when data.val is null."""
        return False

    def samples_rows_before_training(self) -> str | None:
        """What the stage samples from its starting model before it trains (rollout DPO's pairs, rejection-sampled
        SFT's replies), named for an error: those are one-turn samples, which take no tools."""
        return None

    def uses_reference(self) -> bool:
        """Whether the stage holds a frozen copy of its starting checkpoint (DPO's reference, GRPO's KL anchor)."""
        return False

    def reads_stated_answers(self) -> bool:
        """Whether the stage grades stated answers (stage.answer_extraction=lenient); held-out scores then read
        them too, or they would grade another format than the one the stage trains."""
        return False


@dataclass
class TrainConfig:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    # The stage and its knobs: stage=midtrain|sft|dpo|grpo (their keys below).
    stage: Any = MISSING
    hardware: HardwareConfig = MISSING
    # Loggers by name (logger=default|csv|wandb|mlflow, conf/logger/); null: none.
    logger: Any = None
    # More Lightning callbacks: name -> {_target_: a class, its arguments}; a null entry is switched off.
    callbacks: Any = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    heldout: HeldOutConfig = field(default_factory=HeldOutConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    tools: ToolsConfig = field(default_factory=ToolsConfig)
    # Seeds the rest: Lightning's seed_everything, rollouts', held-out and own samples' sampling.
    seed: int = 1234
    # A Lightning checkpoint to resume this same run from (step, optimizer, scheduler, data position); "last" is
    # this run directory's newest checkpoint if there is one.
    ckpt_path: Optional[str] = "last"
    # The run directory (Hydra's: logs/<stage>/runs/<time>).
    output_dir: str = MISSING
    # Compose and validate, print the config, and stop.
    dry_run: bool = False

    def __post_init__(self) -> None:
        world = self.hardware.devices * self.hardware.num_nodes
        require(
            self.data.batch_size % (world * self.data.micro_batch_size) == 0,
            "data.batch_size",
            f"{self.data.batch_size} must split evenly into {world} processes x micro batches of "
            f"{self.data.micro_batch_size}",
        )
        require(
            isinstance(self.stage, StageSchema),
            "stage",
            "must select a stage config built on a stage schema (stage=midtrain|sft|dpo|grpo)",
        )
        self.stage.check_data(self.data)
        sampled = self.stage.samples_rows_before_training()
        require(
            not (sampled and self.tools.enabled),
            "tools.tool",
            f"{sampled} are one-turn samples and take no tools: set tools=none (multi-turn rows with their tool "
            "turns can be trained from a file)",
        )


@dataclass
class PipelineConfig:
    """A recipe: stages run in order, each stage's HF export becoming the next stage's model."""

    # Names the run directory (logs/pipeline/<name>-seed<seed>), so re-running a recipe resumes it.
    name: str = MISSING
    # One line on what the recipe does, printed with its plan.
    description: str = ""
    # The first stage's model; later stages start from the previous export with the same loading options.
    model: ModelConfig = MISSING
    hardware: HardwareConfig = MISSING
    # name -> {overrides: [thinkforge-train overrides, e.g. stage=grpo], init_from: <an earlier stage; default the
    # previous one>, export: <what the stages after it start from: last (the last step's weights) or best (the
    # best held-out point's, which needs heldout.keep_best)>, <config values, e.g. optim: {lr: 1e-6}>}
    stages: dict[str, Any] = field(default_factory=dict)
    # Data settings for every stage, over the recipe's own (e.g. data.train=/data/prompts.jsonl for all of
    # DeepScaleR's GRPO stages); stages.<name>.data.* sets one stage's.
    data: dict[str, Any] = field(default_factory=dict)
    # Every stage's seed: model init, data order and sampling move together.
    seed: int = 0
    # Where every stage's run directory goes (logs/pipeline/<name>-seed<seed>/<stage>).
    output_dir: str = MISSING
    # Compose and validate every stage, print the plan, and stop.
    dry_run: bool = False
    # With dry_run: print every stage's full config too.
    verbose: bool = False
    # Run thinkforge-doctor's checks on every stage instead of training.
    doctor: bool = False

    def __post_init__(self) -> None:
        require(bool(self.stages), "stages", "a recipe needs at least one stage")
        real = [name for name, entry in self.stages.items() if isinstance(entry, dict) and "overrides" in entry]
        for name, entry in self.stages.items():
            require(
                not isinstance(entry, dict) or "overrides" in entry,
                f"stages.{name}",
                f"not a stage of this recipe; its stages are {', '.join(real)} (a new stage needs an `overrides` list)",
            )
            require(isinstance(entry, dict), f"stages.{name}", "must be a mapping with an `overrides` list")
            overrides = entry.get("overrides", [])
            require(
                isinstance(overrides, list) and any(str(o).startswith("stage=") for o in overrides),
                f"stages.{name}.overrides",
                "must be a list of thinkforge-train overrides that picks a stage (stage=midtrain|sft|dpo|grpo)",
            )
        names = list(self.stages)
        for position, (name, entry) in enumerate(self.stages.items()):
            source = entry.get("init_from")
            require(
                source is None or source in names[:position],
                f"stages.{name}.init_from",
                f"must name an earlier stage ({', '.join(names[:position]) or 'none before it'}); got {source!r}",
            )
            one_of(entry.get("export", "last"), ("last", "best"), f"stages.{name}.export")
            require(
                entry.get("export", "last") == "last" or (entry.get("heldout") or {}).get("keep_best") is not None,
                f"stages.{name}.export",
                f"best needs stages.{name}.heldout.keep_best: the held-out metric that picks the best point",
            )


def validate(cfg: DictConfig) -> Any:
    """Every `__post_init__` check on a composed config, and every key known to its schema (one added with `+`
    past the schema is refused, naming the closest known keys); raises ConfigError naming the key."""
    check_known_keys(cfg)
    return OmegaConf.to_object(cfg)
