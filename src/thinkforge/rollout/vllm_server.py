"""vLLM as its own server process (`rollout=vllm_server`), on devices the trainer does not use, through vLLM's own API.

- Sampling: `/inference/v1/generate`, token ids in and out with the processed log-probs (`--enable-scale-out`), one
  request per prompt, all in flight at once so the server batches them, each seeded as the colocated engine seeds
  it: the same weights sample the same tokens in either engine.
- Weights: the trainer writes them as safetensors to a directory the server can read (`/dev/shm` by default), then
  `/collective_rpc` `reload_weights` (vLLM's in-place reload, which repacks them as its kernels want),
  `/update_weight_version` with the optimizer step, and `/reset_prefix_cache`. Every sample reports the version
  that generated it (`weight_versions`); a sample of any other version than the one pushed stops the run.
- The check after each push reads elements back through the `WeightReader` worker extension
  (`--worker-extension-cls`, `/collective_rpc`; `VLLM_SERVER_DEV_MODE=1` enables both RPC endpoints).

Every wait has a timeout that names what it waited for, and a server that exits stops the run in one line with its
exit code and log. A server this process started dies with it (PR_SET_PDEATHSIG) and is stopped by `close()`.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch

from thinkforge.chat import ChatFormat
from thinkforge.progress import GenerationProgress
from thinkforge.rollout.base import EnginePrompt, Rollout, prompt_token_ids, rollout_of
from thinkforge.rollout.settings import SamplingParams, VLLMServerConfig
from thinkforge.rollout.weight_check import read_elements

log = logging.getLogger(__name__)

#: the worker extension, by the name vLLM's workers import it under (this module may run as __main__)
WEIGHT_READER = "thinkforge.rollout.vllm_server.WeightReader"
#: a shard of the weights file the trainer writes for the server, in bytes (one shard in memory at a time)
SHARD_BYTES = 1 << 30


class ServerError(RuntimeError):
    """The rollout server failed, timed out, or exited."""


class WeightReader:
    """Mixed into vLLM's worker by `--worker-extension-cls`: the server's side of the weight check."""

    model_runner: Any

    def thinkforge_read_elements(self, request: str) -> dict[str, Any]:
        """{name: positions} as JSON -> {name: [dtype, values] or None for a tensor kept in a layout of its own}."""
        positions = {name: torch.tensor(index, dtype=torch.long) for name, index in json.loads(request).items()}
        values = read_elements(self.model_runner.get_model(), positions)
        return {
            name: None if value is None else [str(value.dtype).removeprefix("torch."), value.float().tolist()]
            for name, value in values.items()
        }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def die_with_parent() -> None:
    """Runs in the server's process before it starts: the kernel sends it SIGTERM when the trainer dies, even by
    SIGKILL, so no server is left holding cores and memory."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def server_command(
    model_dir: str | Path, settings: VLLMServerConfig, *, host: str, port: int, max_model_len: int, seed: int
) -> tuple[list[str], dict[str, str]]:
    """The `vllm serve` command line and the environment variables a thinkforge trainer needs its server to run with
    (scale-out generate, RPC endpoints, the weight reader, processed log-probs), on this machine's device."""
    on_gpu = torch.cuda.is_available()
    dtype = {"auto": "bfloat16" if on_gpu else "float32"}.get(settings.dtype, settings.dtype)
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--tokenizer", str(model_dir),
        "--host", host, "--port", str(port),
        "--dtype", dtype, "--seed", str(seed),
        "--max-model-len", str(settings.max_model_len or max_model_len),
        "--max-num-batched-tokens", str(settings.max_num_batched_tokens),
        "--logprobs-mode", "processed_logprobs",
        "--enable-scale-out",
        "--worker-extension-cls", WEIGHT_READER,
    ]  # fmt: skip
    if (not on_gpu) if settings.enforce_eager is None else settings.enforce_eager:
        command.append("--enforce-eager")
    if not settings.enable_prefix_caching:
        command.append("--no-enable-prefix-caching")
    if on_gpu:
        command += ["--gpu-memory-utilization", str(settings.gpu_memory_utilization)]
    command += settings.extra_args
    variables = {"VLLM_SERVER_DEV_MODE": "1"}
    if not on_gpu:
        variables["VLLM_CPU_KVCACHE_SPACE"] = f"{settings.cpu_kv_cache_gib:g}"
    if settings.cpus is not None:
        variables["VLLM_CPU_OMP_THREADS_BIND"] = settings.cpus
    if settings.gpus is not None:
        variables["CUDA_VISIBLE_DEVICES"] = settings.gpus
    return command, variables


class VLLMServer:
    """A `vllm serve` process this trainer starts, or (settings.url) one started elsewhere."""

    def __init__(self, model_dir: str | Path, settings: VLLMServerConfig, *, max_model_len: int, seed: int) -> None:
        self.settings = settings
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None
        if settings.url:
            self.url = settings.url.rstrip("/")
            self.wait_ready()
            return
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        command, variables = server_command(
            model_dir, settings, host="127.0.0.1", port=port, max_model_len=max_model_len, seed=seed
        )
        handle, name = tempfile.mkstemp(prefix="thinkforge-vllm-server-", suffix=".log")
        os.close(handle)
        self.log_path = Path(name)
        with self.log_path.open("wb") as log_file:
            self.process = subprocess.Popen(
                command,
                env={**os.environ, **variables},
                stdout=log_file,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )
        log.info("vLLM server starting at %s (pid %d, log %s)", self.url, self.process.pid, self.log_path)
        self.wait_ready()

    def log_tail(self, lines: int = 15) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def check_alive(self, doing: str) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise ServerError(
                f"the vLLM server at {self.url} exited with code {self.process.returncode} {doing}; "
                f"its log: {self.log_path}\n{self.log_tail()}"
            )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.settings.start_timeout_s
        while time.monotonic() < deadline:
            self.check_alive("while starting")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1.0)
        raise ServerError(
            f"the vLLM server at {self.url} did not answer /health within "
            f"rollout.vllm_server.start_timeout_s={self.settings.start_timeout_s:g} s; its log: {self.log_path}"
        )

    def post(self, path: str, body: dict[str, Any], doing: str) -> Any:
        """POSTs JSON and returns the decoded reply; a refusal, a timeout or a dead server stops the run naming it."""
        request = urllib.request.Request(
            f"{self.url}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=self.settings.request_timeout_s) as response:
                payload = response.read()
        except urllib.error.HTTPError as error:
            raise ServerError(
                f"the vLLM server at {self.url} refused {path} {doing}: HTTP {error.code} {error.read()[:500]!r}"
            ) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
            self.check_alive(doing)
            raise ServerError(
                f"no answer from the vLLM server at {self.url}{path} {doing} within "
                f"rollout.vllm_server.request_timeout_s={self.settings.request_timeout_s:g} s: {error}"
            ) from None
        return json.loads(payload) if payload else None

    def close(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class VLLMServerEngine:
    """The `RolloutEngine` over a vLLM server: the policy's weights pushed to it after every optimizer step."""

    holds_weights = True

    def __init__(
        self, model_dir: str | Path, chat: ChatFormat, settings: VLLMServerConfig, *, max_model_len: int, seed: int
    ) -> None:
        self.tokenizer, self.end_ids, self.settings = chat.tokenizer, chat.end_ids, settings
        self.server = VLLMServer(model_dir, settings, max_model_len=max_model_len, seed=seed)
        self.version = "0"
        self.post(
            "/update_weight_version", {"new_version": self.version}, "while setting the starting weights' version"
        )
        base = (
            Path(settings.push_dir) if settings.push_dir else Path("/dev/shm" if Path("/dev/shm").is_dir() else "/tmp")
        )
        base.mkdir(parents=True, exist_ok=True)
        self.push_dir = Path(tempfile.mkdtemp(prefix="thinkforge-weights-", dir=base))

    def post(self, path: str, body: dict[str, Any], doing: str) -> Any:
        return self.server.post(path, body, doing)

    def generate(
        self,
        prompts: Sequence[EnginePrompt],
        sampling: SamplingParams,
        *,
        seed: int,
        progress: GenerationProgress | None = None,
    ) -> list[list[Rollout]]:
        """Every prompt's request in flight at once; seeded per prompt as the colocated engine seeds them."""
        encoded = prompt_token_ids(self.tokenizer, prompts)
        greedy = sampling.temperature == 0
        copies, n = (sampling.num_samples, 1) if greedy else (1, sampling.num_samples)
        owners = [index for index in range(len(prompts)) for _ in range(copies)]
        params = {
            "n": n,
            "temperature": sampling.temperature,
            "top_p": 1.0 if greedy else sampling.top_p,
            "max_tokens": sampling.max_new_tokens,
            "logprobs": 0,
            "stop_token_ids": list(self.end_ids),
            "stop": list(sampling.stop_strings) or None,
            "include_stop_str_in_output": True,
            "skip_special_tokens": False,
        }

        def sample(index: int) -> dict[str, Any]:
            body = {
                "token_ids": encoded[index],
                "sampling_params": {**params, "seed": (seed * 1_000_003 + index) % 2**31},
                "return_token_ids": True,
            }
            reply: dict[str, Any] = self.post("/inference/v1/generate", body, f"while sampling prompt {index}")
            return reply

        with ThreadPoolExecutor(max_workers=max(1, min(self.settings.max_requests_in_flight, len(owners)))) as pool:
            pending = [pool.submit(sample, index) for index in owners]
            for done in as_completed(pending):
                choices = done.result()["choices"]
                if progress is not None:
                    progress.end_batch(len(choices), sum(len(choice["token_ids"]) for choice in choices))
            replies = [request.result() for request in pending]
        groups: list[list[Rollout]] = [[] for _ in prompts]
        for index, reply in zip(owners, replies):
            for choice in reply["choices"]:
                self.check_version(choice, index)
                logprobs = [entry["logprob"] for entry in (choice["logprobs"] or {}).get("content") or []]
                groups[index].append(
                    rollout_of(
                        self.tokenizer, index, choice["token_ids"], logprobs, self.end_ids, sampling.stop_strings
                    )
                )
        return groups

    def check_version(self, choice: dict[str, Any], index: int) -> None:
        """Every token of a sample was generated by the weights pushed last."""
        versions = {span["version"] for span in choice.get("weight_versions") or []}
        if versions and versions != {self.version}:
            raise ServerError(
                f"the vLLM server sampled prompt {index} with weights version(s) {sorted(versions)}, not the "
                f"{self.version} pushed last: its weights are not the trainer's"
            )

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]], *, version: int = 0) -> None:
        """Writes the weights in shards of about `SHARD_BYTES`, has the server reload them in place, tags them with
        `version` and drops the prefix cache computed with the old ones."""
        shutil.rmtree(self.push_dir, ignore_errors=True)
        self.push_dir.mkdir(parents=True)
        from safetensors.torch import save_file

        shard: dict[str, torch.Tensor] = {}
        size, count = 0, 0
        for name, tensor in weights:
            # a tied weight comes under each name: each is its own tensor in the file (vLLM on CPU keeps two copies)
            shard[name] = tensor.detach().to("cpu", copy=True).contiguous()
            size += tensor.numel() * tensor.element_size()
            if size >= SHARD_BYTES:
                save_file(shard, str(self.push_dir / f"model-{count:05d}.safetensors"))
                shard, size, count = {}, 0, count + 1
        if shard:
            save_file(shard, str(self.push_dir / f"model-{count:05d}.safetensors"))
        self.post(
            "/collective_rpc",
            {"method": "reload_weights", "kwargs": {"weights_path": str(self.push_dir)}},
            "while reloading the pushed weights",
        )
        self.version = str(version)
        self.post("/update_weight_version", {"new_version": self.version}, "while tagging the pushed weights")
        self.post("/reset_prefix_cache", {}, "while dropping the prefix cache of the old weights")

    def read_weights(self, positions: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        request = json.dumps({name: index.tolist() for name, index in positions.items()})
        reply = self.post(
            "/collective_rpc",
            {"method": "thinkforge_read_elements", "args": [request]},
            "while reading weights back for the check",
        )
        [elements] = reply["results"]
        return {
            name: None if entry is None else torch.tensor(entry[1], dtype=getattr(torch, entry[0]))
            for name, entry in elements.items()
        }

    def sleep(self) -> None:
        """Nothing to free: the server runs on devices the trainer does not use."""

    def close(self) -> None:
        self.server.close()
        shutil.rmtree(self.push_dir, ignore_errors=True)


def main() -> None:
    """`python -m thinkforge.rollout.vllm_server MODEL_DIR --port 8000`: a server for a trainer elsewhere (another
    node, a SLURM job step), run with what `rollout.vllm_server.url` expects of it; arguments after `--` go to vLLM."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("model_dir", help="the HF directory (or hub id) the trainer starts from")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-model-len", type=int, required=True, help="the longest prompt + completion")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpus", default=None, help="CPU cores its workers bind to (VLLM_CPU_OMP_THREADS_BIND)")
    parser.add_argument("--gpus", default=None, help="the GPUs it uses (CUDA_VISIBLE_DEVICES)")
    parser.add_argument("vllm_args", nargs="*", help="more `vllm serve` arguments, after --")
    args = parser.parse_args()
    settings = VLLMServerConfig(cpus=args.cpus, gpus=args.gpus, extra_args=args.vllm_args)
    command, variables = server_command(
        args.model_dir, settings, host=args.host, port=args.port, max_model_len=args.max_model_len, seed=args.seed
    )
    print(" ".join(f"{name}={value}" for name, value in variables.items()), " ".join(command), flush=True)
    os.execvpe(command[0], command, {**os.environ, **variables})


if __name__ == "__main__":
    main()
