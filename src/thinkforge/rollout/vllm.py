"""vLLM in the trainer's own process (TRL's colocate mode), behind the `RolloutEngine` interface.

The engine holds its own copy of the weights: `update_weights` streams the policy's full parameters into it (one
RPC for all of them; under FSDP each parameter is gathered as the engine reads it) and drops its prefix cache,
whose keys and values were computed with the old weights. Log-probs come back processed (after temperature and
top-p), the distribution the tokens were drawn from, as the trainer scores them.

Creating an engine changes the process it lives in; `contained` undoes what would change the trainer's run:
the torch, numpy and Python RNG states (it re-seeds them), torch's thread count (it drops to 1 and replaces
`torch.set_num_threads` with a no-op) and the environment variables it sets for its own children (LD_PRELOAD,
...), except its own `VLLM_*` ones. It initialises `torch.distributed` when nothing did (a world of one), and joins
the process group Lightning already made under FSDP; that stays.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from thinkforge.chat import ChatFormat
from thinkforge.progress import GenerationProgress
from thinkforge.rollout.base import EnginePrompt, Rollout, prompt_token_ids, rollout_of
from thinkforge.rollout.settings import SamplingParams, VLLMEngineConfig
from thinkforge.rollout.weight_check import read_elements

log = logging.getLogger(__name__)

# the supported range: vLLM changes the internals used here (collective_rpc("reload_weights"), processed
# log-probs, TokensPrompt) from release to release
SUPPORTED = ((0, 11), (0, 33))


def check_version(version: str) -> None:
    """vLLM within SUPPORTED, or an error that says which versions work."""
    major_minor = tuple(int(part) for part in version.split("+")[0].split(".")[:2])
    low, high = SUPPORTED
    if not low <= major_minor < high:
        raise RuntimeError(
            f"vLLM {version} is not supported: thinkforge's vLLM engine works with "
            f">={low[0]}.{low[1]},<{high[0]}.{high[1]} (pip install -e '.[vllm]')"
        )


@contextlib.contextmanager
def contained() -> Iterator[None]:
    """Restores, after the block, what creating a vLLM engine changes in the process besides its own state."""
    import numpy

    environment = dict(os.environ)
    threads = torch.get_num_threads()
    python_state, numpy_state = random.getstate(), numpy.random.get_state()
    set_num_threads = torch.set_num_threads
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        try:
            yield
        finally:
            random.setstate(python_state)
            numpy.random.set_state(numpy_state)
            torch.set_num_threads = set_num_threads
            set_num_threads(threads)
            for name in set(os.environ) - set(environment):
                if not name.startswith("VLLM_"):
                    del os.environ[name]
            for name, value in environment.items():
                if os.environ.get(name) != value:
                    os.environ[name] = value


class RotaryNoticeFilter(logging.Filter):
    """Drops vLLM's "RotaryEmbedding: Failed to load weights", logged at every weight sync: the rotary tables are
    computed from the config, never loaded, so nothing failed."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("RotaryEmbedding" in message and "Failed to load weights" in message)


def quiet_vllm_notices() -> None:
    vllm_logger = logging.getLogger("vllm")
    for handler in [*vllm_logger.handlers, *logging.getLogger().handlers]:
        if not any(isinstance(existing, RotaryNoticeFilter) for existing in handler.filters):
            handler.addFilter(RotaryNoticeFilter())


def request_plan(sampling: SamplingParams, count: int, end_ids: Sequence[int]) -> tuple[list[int], dict[str, Any]]:
    """The requests for `count` prompts, as the prompt each samples, and the vLLM sampling parameters they share
    (all but the seed), for the colocated engine and the server alike. vLLM draws n samples of one request only
    when sampling: greedy decoding repeats the request instead."""
    greedy = sampling.temperature == 0
    copies, n = (sampling.num_samples, 1) if greedy else (1, sampling.num_samples)
    common = {
        "n": n,
        "temperature": sampling.temperature,
        "top_p": 1.0 if greedy else sampling.top_p,
        "max_tokens": sampling.max_new_tokens,
        "logprobs": 0,
        "stop_token_ids": list(end_ids),
        "stop": list(sampling.stop_strings) or None,
        "include_stop_str_in_output": True,
        "skip_special_tokens": False,
    }
    return [index for index in range(count) for _ in range(copies)], common


def request_seed(seed: int, index: int) -> int:
    """One seed per prompt: the same seed samples the same completions whatever else is in the batch, and in
    whichever engine or server replica."""
    return (seed * 1_000_003 + index) % 2**31


class VLLMEngine:
    holds_weights = True

    def __init__(
        self,
        model_dir: str | Path,
        chat: ChatFormat,
        config: VLLMEngineConfig,
        *,
        max_model_len: int,
        seed: int,
    ) -> None:
        """An engine serving `model_dir` (an HF directory or hub id) with the chat format's tokenizer: prompts arrive
        as token ids, so vLLM never re-tokenizes them differently from the trainer, and stop at its end tokens."""
        self.tokenizer, self.config = chat.tokenizer, config
        on_gpu = torch.cuda.is_available()
        # the engine runs inside this process: a separate engine process could not read the policy's weights
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if not on_gpu:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = f"{config.cpu_kv_cache_gib:g}"
        with contained():
            import vllm

            check_version(vllm.__version__)
            quiet_vllm_notices()
            dtype = {"auto": "bfloat16" if on_gpu else "float32"}.get(config.dtype, config.dtype)
            options: dict[str, Any] = (
                {
                    "gpu_memory_utilization": config.gpu_memory_utilization,
                    "enable_sleep_mode": config.sleep_while_training,
                }
                if on_gpu
                else {}
            )
            self.llm = vllm.LLM(
                model=str(model_dir),
                tokenizer=str(model_dir),
                dtype=dtype,
                seed=seed,
                max_model_len=config.max_model_len or max_model_len,
                enforce_eager=(not on_gpu) if config.enforce_eager is None else config.enforce_eager,
                enable_prefix_caching=config.enable_prefix_caching,
                max_num_batched_tokens=config.max_num_batched_tokens,
                logprobs_mode="processed_logprobs",
                **options,
            )
        self.end_ids = chat.end_ids
        self.sleeps = on_gpu and config.sleep_while_training
        self.asleep = False

    def generate(
        self,
        prompts: Sequence[EnginePrompt],
        sampling: SamplingParams,
        *,
        seed: int,
        progress: GenerationProgress | None = None,
    ) -> list[list[Rollout]]:
        """One call to vLLM for all of them, or, with `progress`, one per tenth of them, so that progress is heard
        of as it goes (each request has its own seed: the samples are the same either way)."""
        if progress is None or len(prompts) < 2:
            groups = self._generate(list(enumerate(prompts)), sampling, seed)
        else:
            chunk = -(-len(prompts) // 10)
            groups = []
            for start in range(0, len(prompts), chunk):
                done = self._generate(list(enumerate(prompts))[start : start + chunk], sampling, seed)
                progress.end_batch(
                    sum(len(group) for group in done), sum(len(r.token_ids) for group in done for r in group)
                )
                groups += done
        return groups

    def _generate(
        self, prompts: Sequence[tuple[int, EnginePrompt]], sampling: SamplingParams, seed: int
    ) -> list[list[Rollout]]:
        """`prompts`: (index in the whole call, text or token ids); the index seeds each request."""
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt

        self.wake_up()
        encoded = prompt_token_ids(self.tokenizer, [prompt for _, prompt in prompts])
        owners, common = request_plan(sampling, len(prompts), self.end_ids)
        params = [VLLMSamplingParams(**common, seed=request_seed(seed, prompts[position][0])) for position in owners]
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=encoded[position]) for position in owners], params, use_tqdm=False
        )
        groups: list[list[Rollout]] = [[] for _ in prompts]
        for position, output in zip(owners, outputs):
            groups[position] += [
                rollout_of(
                    self.tokenizer,
                    prompts[position][0],
                    completion.token_ids,
                    [step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids)],
                    self.end_ids,
                    sampling.stop_strings,
                )
                for completion in output.outputs
            ]
        return groups

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]], *, version: int = 0) -> None:
        self.wake_up()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        # cached prefixes hold keys and values of the old weights
        self.llm.reset_prefix_cache()

    def read_weights(self, positions: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor | None]]:
        """The elements of the engine's own parameters (one worker: no tensor parallelism here)."""
        self.wake_up()
        [elements] = self.llm.apply_model(lambda model: read_elements(model, positions))
        return {"the engine": dict(elements)}

    def sleep(self) -> None:
        """On GPU, free the KV cache while the trainer runs; a no-op on CPU, where vLLM cannot sleep."""
        if self.sleeps and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def close(self) -> None:
        """Nothing started outside this process: the engine is freed with this object."""

    def wake_up(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False
