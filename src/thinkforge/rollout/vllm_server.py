"""vLLM as its own server process (`rollout=vllm_server`), on devices the trainer does not use, through vLLM's own API:
one or more replicas, fed by one trainer process or by every rank of an FSDP one.

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
import contextlib
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
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist

from thinkforge.chat import ChatFormat
from thinkforge.progress import GenerationProgress
from thinkforge.rollout.base import EnginePrompt, Rollout, prompt_token_ids, rollout_of
from thinkforge.rollout.settings import SamplingParams, VLLMServerConfig
from thinkforge.rollout.vllm import request_plan, request_seed
from thinkforge.rollout.weight_check import read_elements

log = logging.getLogger(__name__)

#: the worker extension, by the name vLLM's workers import it under (this module may run as __main__)
WEIGHT_READER = "thinkforge.rollout.vllm_server.WeightReader"
#: a shard of the weights file the trainer writes for the server, in bytes (one shard in memory at a time)
SHARD_BYTES = 1 << 30

T = TypeVar("T")


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


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free now (held open together, so none is handed out twice)."""
    with contextlib.ExitStack() as stack:
        probes = [stack.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [int(probe.getsockname()[1]) for probe in probes]


def free_port() -> int:
    [port] = free_ports(1)
    return port


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
    """One `vllm serve` process: started by this trainer (`start`), or started elsewhere and reached at `url`."""

    def __init__(
        self,
        url: str,
        settings: VLLMServerConfig,
        process: subprocess.Popen[bytes] | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.url, self.settings, self.process, self.log_path = url.rstrip("/"), settings, process, log_path
        self.failed = False

    @classmethod
    def start(
        cls, model_dir: str | Path, settings: VLLMServerConfig, *, port: int, max_model_len: int, seed: int
    ) -> VLLMServer:
        """Starts a server on this machine, on `settings`' cores or GPUs, without waiting for it to be ready."""
        command, variables = server_command(
            model_dir, settings, host="127.0.0.1", port=port, max_model_len=max_model_len, seed=seed
        )
        # its log and its temporary files go in one folder of its own: vLLM leaves its RPC sockets and the
        # rendezvous file of its workers in the temporary directory (three sockets and one file per start here)
        folder = Path(tempfile.mkdtemp(prefix="thinkforge-vllm-server-"))
        log_path = folder / "server.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                command,
                env={**os.environ, **variables, "TMPDIR": str(folder)},
                stdout=log_file,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )
        log.info("vLLM server starting at http://127.0.0.1:%d (pid %d, log %s)", port, process.pid, log_path)
        return cls(f"http://127.0.0.1:{port}", settings, process, log_path)

    def log_tail(self, lines: int = 15) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def failure(self, message: str) -> ServerError:
        """The error that stops the run, with the log of a server this trainer started, which `close` then keeps."""
        self.failed = True
        if self.log_path is None:
            return ServerError(message)
        return ServerError(f"{message}; its log: {self.log_path}\n{self.log_tail()}")

    def check_alive(self, doing: str) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise self.failure(f"the vLLM server at {self.url} exited with code {self.process.returncode} {doing}")

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
        raise self.failure(
            f"the vLLM server at {self.url} did not answer /health within "
            f"rollout.vllm_server.start_timeout_s={self.settings.start_timeout_s:g} s"
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
            raise self.failure(
                f"the vLLM server at {self.url} refused {path} {doing}: HTTP {error.code} {error.read()[:500]!r}"
            ) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
            self.check_alive(doing)
            raise self.failure(
                f"no answer from the vLLM server at {self.url}{path} {doing} within "
                f"rollout.vllm_server.request_timeout_s={self.settings.request_timeout_s:g} s: {error}"
            ) from None
        return json.loads(payload) if payload else None

    def close(self) -> None:
        """Stops a server this process started and removes its folder, unless an error named its log."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.log_path is not None and not self.failed:
            shutil.rmtree(self.log_path.parent, ignore_errors=True)


class TrainerRanks:
    """The trainer's data-parallel ranks as one server sees them (FSDP: `synced`): rank 0 starts the server and has
    it reload what every rank wrote; the others learn the outcome from rank 0, so all stop with the same line."""

    def __init__(self, synced: bool) -> None:
        self.rank = dist.get_rank() if synced else 0
        self.world_size = dist.get_world_size() if synced else 1

    def from_first(self, make: Callable[[], T]) -> T:
        """`make()`, run on rank 0 only: its value on every rank, or its error raised on every rank."""
        outcome: list[Any] = [None]
        if self.rank == 0:
            try:
                outcome[0] = ("value", make())
            except Exception as error:
                outcome[0] = ("error", str(error))
                if self.world_size > 1:
                    dist.broadcast_object_list(outcome, src=0)
                raise
        if self.world_size > 1:
            dist.broadcast_object_list(outcome, src=0)
        kind, value = outcome[0]
        if kind == "error":
            raise ServerError(f"on rank 0: {value}")
        return cast(T, value)

    def all_ok(self, error: str | None, doing: str) -> None:
        """Raises on every rank when any rank had an `error` while `doing`."""
        errors = [error]
        if self.world_size > 1:
            errors = [None] * self.world_size
            dist.all_gather_object(errors, error)
        failed = [(rank, message) for rank, message in enumerate(errors) if message is not None]
        if failed:
            raise ServerError("; ".join(f"rank {rank} failed {doing}: {message}" for rank, message in failed))


def push_directory(settings: VLLMServerConfig) -> Path:
    """A fresh directory for the pushed weights, under `push_dir` (default /dev/shm: memory, not disk)."""
    base = Path(settings.push_dir) if settings.push_dir else Path("/dev/shm" if Path("/dev/shm").is_dir() else "/tmp")
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="thinkforge-weights-", dir=base))


class VLLMServerEngine:
    """The `RolloutEngine` over one or more vLLM servers (replicas): requests spread over them in turn, the
    policy's weights pushed to every one after every optimizer step and read back from each. Under FSDP (`synced`)
    rank 0 starts the servers, every rank samples its own prompts from them and writes its share of the weights for
    the push (on one node through /dev/shm; across nodes `push_dir` must be a directory both sides read)."""

    holds_weights = True

    def __init__(
        self,
        model_dir: str | Path,
        chat: ChatFormat,
        settings: VLLMServerConfig,
        *,
        max_model_len: int,
        seed: int,
        synced: bool = False,
    ) -> None:
        self.tokenizer, self.end_ids, self.settings = chat.tokenizer, chat.end_ids, settings
        self.ranks = TrainerRanks(synced)
        self.servers: list[VLLMServer] = []

        def start() -> tuple[list[str], str]:
            """Rank 0's: starts the replicas side by side (or reaches those started elsewhere), waits for each."""
            if settings.url:
                self.servers = [VLLMServer(url, settings) for url in settings.urls()]
            else:
                replicas = settings.each_replica()
                self.servers = [
                    VLLMServer.start(model_dir, one, port=port, max_model_len=max_model_len, seed=seed)
                    for one, port in zip(replicas, free_ports(len(replicas)))
                ]
            try:
                for server in self.servers:
                    server.wait_ready()
                    server.post(
                        "/update_weight_version", {"new_version": "0"}, "while setting the starting weights' version"
                    )
            except BaseException:
                for server in self.servers:
                    server.close()
                raise
            return [server.url for server in self.servers], str(push_directory(settings))

        urls, push_dir = self.ranks.from_first(start)
        if not self.servers:
            self.servers = [VLLMServer(url, settings) for url in urls]
        self.version, self.push_dir = "0", Path(push_dir)

    def on_every_server(self, call: Callable[[VLLMServer], None]) -> None:
        """`call` on every replica at once (each waits on its own server)."""
        with ThreadPoolExecutor(max_workers=len(self.servers)) as pool:
            for done in [pool.submit(call, server) for server in self.servers]:
                done.result()

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
        owners, params = request_plan(sampling, len(prompts), self.end_ids)

        def sample(request: int, index: int) -> dict[str, Any]:
            body = {
                "token_ids": encoded[index],
                "sampling_params": {**params, "seed": request_seed(seed, index)},
                "return_token_ids": True,
            }
            server = self.servers[request % len(self.servers)]
            reply: dict[str, Any] = server.post("/inference/v1/generate", body, f"while sampling prompt {index}")
            return reply

        with ThreadPoolExecutor(max_workers=max(1, min(self.settings.max_requests_in_flight, len(owners)))) as pool:
            pending = [pool.submit(sample, request, index) for request, index in enumerate(owners)]
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
        """Writes the weights in shards of about `SHARD_BYTES` (under FSDP, every rank the tensors of its turn, as
        each is gathered), has the server reload them in place, tags them with `version` and drops the prefix
        cache computed with the old ones."""
        from safetensors.torch import save_file

        rank = self.ranks.rank
        for stale in self.push_dir.glob(f"rank{rank:03d}-*.safetensors"):
            stale.unlink()
        shard: dict[str, torch.Tensor] = {}
        size, count, error = 0, 0, None

        def write() -> None:
            nonlocal shard, size, count, error
            try:
                save_file(shard, str(self.push_dir / f"rank{rank:03d}-{count:05d}.safetensors"))
            except OSError as failure:
                error = f"writing the weights to {self.push_dir}: {failure}"
            shard, size, count = {}, 0, count + 1

        # every rank reads every tensor (under FSDP each is gathered by all ranks together)
        for index, (name, tensor) in enumerate(weights):
            if index % self.ranks.world_size != rank or error is not None:
                continue
            # a tied weight comes under each name: each is its own tensor in the file (vLLM on CPU keeps two copies)
            shard[name] = tensor.detach().to("cpu", copy=True).contiguous()
            size += tensor.numel() * tensor.element_size()
            if size >= SHARD_BYTES:
                write()
        if shard:
            write()
        self.ranks.all_ok(error, "pushing the weights")

        def reload(server: VLLMServer) -> None:
            server.post(
                "/collective_rpc",
                {"method": "reload_weights", "kwargs": {"weights_path": str(self.push_dir)}},
                "while reloading the pushed weights",
            )
            server.post("/update_weight_version", {"new_version": str(version)}, "while tagging the pushed weights")
            server.post("/reset_prefix_cache", {}, "while dropping the prefix cache of the old weights")

        self.ranks.from_first(lambda: self.on_every_server(reload))
        self.version = str(version)

    def read_weights(self, positions: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor | None]]:
        """Every replica's elements, by its URL."""
        request = json.dumps({name: index.tolist() for name, index in positions.items()})
        copies = {}
        for server in self.servers:
            reply = server.post(
                "/collective_rpc",
                {"method": "thinkforge_read_elements", "args": [request]},
                "while reading weights back for the check",
            )
            [elements] = reply["results"]
            copies[f"the server at {server.url}"] = {
                name: None if entry is None else torch.tensor(entry[1], dtype=getattr(torch, entry[0]))
                for name, entry in elements.items()
            }
        return copies

    def sleep(self) -> None:
        """Nothing to free: the server runs on devices the trainer does not use."""

    def close(self) -> None:
        """Stops the servers this trainer started (rank 0's)."""
        for server in self.servers:
            server.close()
        if self.ranks.rank == 0:
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
