"""The settings of sampling and of the engines that sample, beside the engines and free of torch, so that composing
a config stays fast.

`SamplingConfig` is the one schema of how to sample, wherever a model is sampled: GRPO's rollouts (`stage.sampling`),
rollout DPO's pairs and rejection-sampled SFT's replies (`stage.sampling`), held-out scores (`heldout.sampling`) and
`thinkforge-eval` (`sampling`). Its temperature and token budget may be schedules over the optimizer steps;
`at(step)` gives the `SamplingParams` an engine takes for one call.

`RolloutConfig` picks the engine (`rollout.engine`); each engine's own knobs live under its own key
(`rollout.hf.*`, `rollout.vllm.*`) and are checked when that engine is chosen.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Optional

from thinkforge.errors import one_of, require


@dataclass(frozen=True)
class SamplingParams:
    """One engine call's sampling: every value fixed (schedules resolved)."""

    num_samples: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    # generation of a sample also ends after any of these strings (e.g. "</think>" for budget forcing)
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.max_new_tokens < 1:
            raise ValueError("num_samples and max_new_tokens must be positive")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("need temperature >= 0 and 0 < top_p <= 1")


def scheduled(value: Any, step: int) -> Any:
    """A constant, or a piecewise-constant schedule {from_step: value} (e.g. context lengthening 8K→16K→24K, an
    annealed temperature): the value of the last entry at or before `step`."""
    if not isinstance(value, Mapping):
        return value
    return [
        setting for start, setting in sorted((int(start), setting) for start, setting in value.items()) if start <= step
    ][-1]


def check_schedule(value: Any, key: str, kind: type, *, allow_zero: bool = False) -> None:
    """A number, or a piecewise-constant schedule {from_step: value} that starts at step 0; every value positive
    (or >= 0 with `allow_zero`), and whole when `kind` is int."""
    settings = value.values() if isinstance(value, Mapping) else [value]
    if isinstance(value, Mapping):
        require(bool(value), key, "a schedule needs at least one {from_step: value} entry")
        steps = sorted(int(step) for step in value)
        require(steps[0] == 0, key, f"a schedule must start at step 0; got steps {steps}")
    for setting in settings:
        require(
            isinstance(setting, (int, float))
            and not isinstance(setting, bool)
            and (setting >= 0 if allow_zero else setting > 0),
            key,
            f"every value must be a {'non-negative' if allow_zero else 'positive'} {kind.__name__}; got {setting!r}",
        )
        if kind is int:
            require(float(setting).is_integer(), key, f"every value must be a whole number of tokens; got {setting!r}")


@dataclass
class SamplingConfig:
    """How to sample: the same knobs wherever a model is sampled."""

    # completions per prompt (GRPO: the group size)
    num_samples: int = 1
    # a number, or a schedule {from_step: temperature}; 0 is greedy decoding
    temperature: Any = 1.0
    # nucleus sampling: the smallest set of tokens whose probabilities reach top_p (1.0: every token)
    top_p: float = 1.0
    # new tokens per completion: a number, or a schedule {from_step: tokens} (iterative context lengthening);
    # null where the owner fills it in (held-out scores: the stage's own completion length)
    max_new_tokens: Any = 256
    # generation also ends after any of these strings
    stop: list[str] = field(default_factory=list)

    def check(self, key: str, *, min_samples: int = 1, sampled: bool = False) -> None:
        """The owner's checks, naming its key (`stage.sampling`, ...): `sampled` where a temperature of 0 cannot
        work (RL and rollout pairs need samples that differ)."""
        require(
            self.num_samples >= min_samples,
            f"{key}.num_samples",
            f"must be at least {min_samples}; got {self.num_samples}",
        )
        check_schedule(self.temperature, f"{key}.temperature", float, allow_zero=not sampled)
        require(0 < self.top_p <= 1, f"{key}.top_p", f"must be in (0, 1]; got {self.top_p}")
        if self.max_new_tokens is not None:
            check_schedule(self.max_new_tokens, f"{key}.max_new_tokens", int)

    def at(self, step: int = 0, *, max_new_tokens: int | None = None) -> SamplingParams:
        """The settings of optimizer step `step`; `max_new_tokens` fills a budget left null."""
        budget = scheduled(self.max_new_tokens, step) if self.max_new_tokens is not None else max_new_tokens
        if budget is None:
            raise ValueError("max_new_tokens is null and no fallback was given")
        return SamplingParams(
            num_samples=self.num_samples,
            temperature=float(scheduled(self.temperature, step)),
            top_p=self.top_p,
            max_new_tokens=int(budget),
            stop_strings=tuple(self.stop),
        )


TOOLS = ("python",)
TOOL_SYNTAXES = ("auto", "hermes", "fenced")


@dataclass
class ToolsConfig:
    """Python the model may call while it reasons (`tools=python`): generation stops at a call, the sandbox runs it,
    its output comes back as the chat template's tool turn, and generation goes on, until the answer, `max_turns`
    or the sampling's token budget, which counts the whole completion (the tool's tokens too)."""

    # null: no tools; python: the sandboxed Python tool
    tool: Optional[str] = None
    # how the model writes a call: hermes (the chat template's `<tool_call>` JSON, as Qwen2.5's), fenced (a
    # ```python block ended by ``` and a new line), auto (hermes where the template has it, else fenced)
    syntax: str = "auto"
    # model turns per sample; a call in the last one is not run
    max_turns: int = 4
    # each call's wall-clock seconds: past them its whole process group is killed and the result says it timed out
    wall_s: float = 5.0
    # each call's CPU seconds: past them it is stopped, which reads as timed out too
    cpu_s: int = 5
    # each call's address space in MiB: past it, its allocation fails with a MemoryError the model is shown
    memory_mb: int = 1024
    # characters of a call's output the model is shown; the rest is cut, with a note saying how much
    max_output_chars: int = 512
    # seconds of tool time per rank and training step; calls past it are not run (null: no budget)
    step_budget_s: Optional[float] = 120.0
    # added to a sample's reward for each call that failed: an error, a time-out, a limit (negative to discourage
    # them; 0: the reward reads the answer alone)
    failed_call_reward: float = 0.0
    # added for each call that was not run: written in the last of max_turns, or past the step's tool budget
    over_budget_call_reward: float = 0.0
    # calls run at once (null: one per core)
    workers: Optional[int] = None

    def __post_init__(self) -> None:
        if self.tool is not None:
            one_of(self.tool, TOOLS, "tools.tool")
        one_of(self.syntax, TOOL_SYNTAXES, "tools.syntax")
        require(self.max_turns >= 1, "tools.max_turns", f"must be at least 1; got {self.max_turns}")
        require(self.wall_s > 0 and self.cpu_s > 0, "tools.wall_s", "the wall and CPU limits must be positive")
        require(self.memory_mb >= 64, "tools.memory_mb", f"must be at least 64 (Python needs it); got {self.memory_mb}")
        require(self.max_output_chars > 0, "tools.max_output_chars", "must be positive")
        require(
            self.step_budget_s is None or self.step_budget_s > 0, "tools.step_budget_s", "must be positive (or null)"
        )
        require(self.workers is None or self.workers > 0, "tools.workers", "must be positive (or null)")

    @property
    def enabled(self) -> bool:
        return self.tool is not None


ROLLOUT_ENGINES = ("hf", "vllm", "vllm_server")
VLLM_DTYPES = ("auto", "float32", "bfloat16")


@dataclass
class HFEngineConfig:
    """HF `generate` on the live policy: works everywhere, under FSDP too, and needs no weight sync."""

    # rows one generate call decodes at once (a training step's rollouts, held-out prompts, an eval's samples)
    batch_size: int = 64

    def check(self, key: str) -> None:
        require(self.batch_size > 0, f"{key}.batch_size", f"must be positive; got {self.batch_size}")


@dataclass
class VLLMEngineConfig:
    """vLLM in the trainer's own process (TRL's colocate mode), its weights synced from the policy before it
    samples after an optimizer step."""

    # its dtype (auto: the compute dtype)
    dtype: str = "auto"
    # the longest prompt + completion it serves (null: the stage's longest prompt plus its completion length)
    max_model_len: Optional[int] = None
    # eager mode (null: on CPU, where CUDA graphs do not exist)
    enforce_eager: Optional[bool] = None
    # reuse the KV cache of a prompt's shared prefix (a group's samples share their prompt)
    enable_prefix_caching: bool = True
    # GPU: the share of the GPU's memory it may take (weights, activations, KV cache)
    gpu_memory_utilization: float = 0.3
    # CPU: the GiB of its KV cache (VLLM_CPU_KVCACHE_SPACE)
    cpu_kv_cache_gib: float = 1.0
    # tokens one engine step may schedule; below 16384 seeded sampling crashed vllm-cpu 0.32
    max_num_batched_tokens: int = 16384
    # GPU: free the KV cache (sleep level 1) while the trainer runs, wake before sampling
    sleep_while_training: bool = True

    def check(self, key: str) -> None:
        one_of(self.dtype, VLLM_DTYPES, f"{key}.dtype")
        require(self.max_model_len is None or self.max_model_len > 1, f"{key}.max_model_len", "must be > 1 (or null)")
        require(0 < self.gpu_memory_utilization < 1, f"{key}.gpu_memory_utilization", "must be in (0, 1)")
        require(self.cpu_kv_cache_gib > 0, f"{key}.cpu_kv_cache_gib", "must be positive")
        require(self.max_num_batched_tokens > 0, f"{key}.max_num_batched_tokens", "must be positive")


def device_numbers(devices: str) -> list[int]:
    """'0-3,6' -> [0, 1, 2, 3, 6]; ValueError for anything else."""
    numbers: list[int] = []
    for part in devices.split(","):
        first, _, last = part.strip().partition("-")
        numbers += range(int(first), int(last or first) + 1)
    return numbers


@dataclass
class VLLMServerConfig(VLLMEngineConfig):
    """vLLM as its own server process on devices the trainer does not use (`rollout/vllm_server.py`), its weights
    pushed after every optimizer step and checked. `sleep_while_training` does not apply: it never waits."""

    # servers started elsewhere (another node, a SLURM job step): their base URLs, separated by ","; null starts
    # `replicas` of them with the stage
    url: Optional[str] = None
    # servers the stage starts, each on its share of cpus or gpus; requests go round-robin and every weight push reaches
    # all of them
    replicas: int = 1
    # CPU cores its workers run on (VLLM_CPU_OMP_THREADS_BIND: "1", "4-7"); several replicas share them out in
    # equal, contiguous parts ("0-7" for two: "0-3" and "4-7"); null: vLLM's own choice
    cpus: Optional[str] = None
    # the GPUs it sees (CUDA_VISIBLE_DEVICES: "1", or "2-3" here too), shared out between replicas as cpus are
    gpus: Optional[str] = None
    # a directory the trainer and the server both read, for the pushed weights (null: /dev/shm, one machine)
    push_dir: Optional[str] = None
    # seconds to wait for a started server to answer /health
    start_timeout_s: float = 600.0
    # seconds to wait for any one request (a prompt's samples, a weight push)
    request_timeout_s: float = 600.0
    # requests sent at once (one per prompt); the server batches them
    max_requests_in_flight: int = 256
    # more `vllm serve` arguments, as on its command line
    extra_args: list[str] = field(default_factory=list)

    def check(self, key: str) -> None:
        super().check(key)
        require(self.start_timeout_s > 0 and self.request_timeout_s > 0, f"{key}.start_timeout_s", "must be positive")
        require(self.max_requests_in_flight > 0, f"{key}.max_requests_in_flight", "must be positive")
        for url in self.urls():
            require(url.startswith(("http://", "https://")), f"{key}.url", f"must be http(s) URLs; got {url!r}")
        require(self.replicas >= 1, f"{key}.replicas", "must be at least 1")
        require(
            self.url is None or self.replicas == 1,
            f"{key}.replicas",
            "is for servers the stage starts; servers started elsewhere are the URLs of `url`",
        )
        for devices in ("cpus", "gpus"):
            value = getattr(self, devices)
            if value is None or self.replicas == 1:
                continue
            try:
                count = len(device_numbers(value))
            except ValueError:
                count = 0
            require(
                count > 0 and count % self.replicas == 0,
                f"{key}.{devices}",
                f"must list devices ('0-7', '0,2,4,6') that share out evenly between {self.replicas} replicas; "
                f"got {value!r}",
            )

    def urls(self) -> list[str]:
        """The base URLs of the servers started elsewhere (none when the stage starts its own)."""
        return [url.strip().rstrip("/") for url in self.url.split(",")] if self.url else []

    def each_replica(self) -> list[VLLMServerConfig]:
        """The settings of each server the stage starts, on its own share of the cores or GPUs."""

        def share(value: str | None, index: int) -> str | None:
            if value is None or self.replicas == 1:
                return value
            numbers = device_numbers(value)
            size = len(numbers) // self.replicas
            return ",".join(str(number) for number in numbers[index * size : (index + 1) * size])

        return [
            replace(self, replicas=1, cpus=share(self.cpus, index), gpus=share(self.gpus, index))
            for index in range(self.replicas)
        ]


@dataclass
class RolloutConfig:
    """The engine that samples: GRPO rollouts, rollout-DPO pairs, rejection samples, held-out scores,
    `thinkforge-eval` and `thinkforge-data`'s sampling commands. `hf`: HF generate on the live policy (no weight
    sync). `vllm`: vLLM in the trainer's own process, fed the policy's weights after every optimizer step.
    `vllm_server`: vLLM as its own server process, pushed the weights after every optimizer step."""

    # hf | vllm | vllm_server (rollout=<engine>), as above
    engine: str = "hf"
    hf: HFEngineConfig = field(default_factory=HFEngineConfig)
    vllm: VLLMEngineConfig = field(default_factory=VLLMEngineConfig)
    vllm_server: VLLMServerConfig = field(default_factory=VLLMServerConfig)

    def __post_init__(self) -> None:
        one_of(self.engine, ROLLOUT_ENGINES, "rollout.engine")
        self.settings.check(f"rollout.{self.engine}")

    @property
    def settings(self) -> HFEngineConfig | VLLMEngineConfig | VLLMServerConfig:
        """The chosen engine's own knobs."""
        chosen: HFEngineConfig | VLLMEngineConfig | VLLMServerConfig = getattr(self, self.engine)
        return chosen
