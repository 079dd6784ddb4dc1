"""rollout=vllm_server's settings and launch, without vLLM: replicas on their own cores, servers reached by URL, and
the rank-0 relay every FSDP rank learns a server's outcome from."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import compose_config

from thinkforge.config import validate
from thinkforge.errors import ConfigError
from thinkforge.rollout.settings import RolloutConfig, VLLMServerConfig
from thinkforge.rollout.vllm_server import ServerError, TrainerRanks, VLLMServer, free_ports, server_command


def test_each_replica_gets_its_own_cores_and_the_launch_binds_them():
    settings = VLLMServerConfig(replicas=2, cpus="0-3,6,7,12-13", gpus="2-3")
    first, second = settings.each_replica()
    assert (first.cpus, first.gpus, second.cpus, second.gpus) == ("0,1,2,3", "2", "6,7,12,13", "3")
    _, variables = server_command("model", second, host="127.0.0.1", port=8001, max_model_len=256, seed=0)
    assert variables["VLLM_CPU_OMP_THREADS_BIND"] == "6,7,12,13" and variables["CUDA_VISIBLE_DEVICES"] == "3"
    # one replica takes the setting as vLLM reads it (its own '|' between tensor-parallel workers included)
    one = VLLMServerConfig(cpus="0-3|4-7")
    assert [replica.cpus for replica in one.each_replica()] == ["0-3|4-7"]


def test_servers_started_elsewhere_are_listed_by_url():
    settings = VLLMServerConfig(url="http://node1:8000/, http://node2:8000")
    assert settings.urls() == ["http://node1:8000", "http://node2:8000"]
    assert VLLMServerConfig().urls() == []


@pytest.mark.parametrize(
    ("settings", "refusal"),
    [
        (VLLMServerConfig(url="node1:8000"), r"rollout.vllm_server.url: must be http\(s\) URLs; got 'node1:8000'"),
        (VLLMServerConfig(url="http://a:1", replicas=2), "rollout.vllm_server.replicas: is for servers the stage"),
        (VLLMServerConfig(replicas=0), "rollout.vllm_server.replicas: must be at least 1"),
        (VLLMServerConfig(replicas=2, cpus="0-2"), "rollout.vllm_server.cpus: must list devices .* evenly between 2"),
        (VLLMServerConfig(replicas=2, gpus="a,b"), "rollout.vllm_server.gpus: must list devices"),
    ],
)
def test_settings_that_cannot_be_served_are_refused_naming_the_key(settings, refusal):
    with pytest.raises(ConfigError, match=refusal):
        RolloutConfig(engine="vllm_server", vllm_server=settings)


def test_the_command_line_sets_the_replicas():
    cfg = validate(
        compose_config(
            "stage=grpo", "rollout=vllm_server", "rollout.vllm_server.replicas=2", "rollout.vllm_server.cpus=0-1"
        )
    )
    assert [replica.cpus for replica in cfg.rollout.vllm_server.each_replica()] == ["0", "1"]
    # docs/long-runs.md's form for servers started elsewhere
    cfg = validate(
        compose_config("stage=grpo", "rollout=vllm_server", "rollout.vllm_server.url='http://a:8000,http://b:8000'")
    )
    assert cfg.rollout.vllm_server.urls() == ["http://a:8000", "http://b:8000"]


def test_ports_handed_out_together_are_distinct():
    assert len(set(free_ports(8))) == 8


def test_a_single_process_relays_rank_zeros_outcome_to_itself():
    ranks = TrainerRanks(synced=False)
    assert ranks.from_first(lambda: ("http://127.0.0.1:1", "/dev/shm/x")) == ("http://127.0.0.1:1", "/dev/shm/x")

    def fails() -> None:
        raise ServerError("the vLLM server at http://127.0.0.1:1 exited with code -9 while starting")

    with pytest.raises(ServerError, match="exited with code -9"):
        ranks.from_first(fails)
    ranks.all_ok(None, "pushing the weights")
    with pytest.raises(ServerError, match="rank 0 failed pushing the weights: disk full"):
        ranks.all_ok("disk full", "pushing the weights")


def started_server(tmp_path, **settings) -> VLLMServer:
    """A server as `VLLMServer.start` leaves it, its process a stand-in that never answers."""
    folder = tmp_path / "thinkforge-vllm-server-x"
    folder.mkdir()
    (folder / "server.log").write_text("INFO loading the model\nERROR out of memory\n")
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    [port] = free_ports(1)
    return VLLMServer(f"http://127.0.0.1:{port}", VLLMServerConfig(**settings), process, folder / "server.log")


def test_a_closed_server_leaves_nothing_behind(tmp_path):
    server = started_server(tmp_path)
    server.close()
    assert server.process.poll() is not None and not (tmp_path / "thinkforge-vllm-server-x").exists()


def test_a_server_that_fails_keeps_the_log_its_error_names(tmp_path):
    server = started_server(tmp_path, start_timeout_s=0.5)
    named_with_its_tail = r"(?s)did not answer /health .*; its log: \S+server.log\n.*ERROR out of memory"
    with pytest.raises(ServerError, match=named_with_its_tail):
        server.wait_ready()
    server.close()
    assert server.process.poll() is not None and (tmp_path / "thinkforge-vllm-server-x" / "server.log").exists()
