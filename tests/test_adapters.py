"""LoRA through peft in every stage: only the adapter trains, the base weights are the reference, exports reload
with plain transformers/peft, and FSDP runs resume exactly."""

from __future__ import annotations

import pytest
import torch
from conftest import FAST, compose_config, logged, read_metrics, run_cli
from peft import AutoPeftModelForCausalLM
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from thinkforge.backbone import CausalLM, build_backbone, load_hf_model
from thinkforge.chat import ChatFormat
from thinkforge.config import validate
from thinkforge.errors import ConfigError
from thinkforge.preflight import check_train_paths
from thinkforge.stages.completions import completion_scores
from thinkforge.tokenizer import build_synthetic_tokenizer
from thinkforge.training import build_stage, run_stage

LORA = ["model.lora.rank=8", "optim.lr=3e-3"]
GRPO_SMALL = [
    "stage=grpo",
    "stage.sampling.num_samples=4",
    "stage.sampling.max_new_tokens=16",
    "data.batch_size=4",
    "data.micro_batch_size=2",
    "heldout.num_prompts=0",
]


def _generates(directory, model) -> None:
    tokenizer = AutoTokenizer.from_pretrained(directory)
    inputs = tokenizer("Tom has 3 apples.", return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert output.shape[1] == inputs["input_ids"].shape[1] + 4


def test_merged_and_adapter_exports_reload_and_are_the_same_model(tmp_path):
    exports = {}
    for export in ("merged", "adapter"):
        run = tmp_path / export
        run_stage(compose_config(*FAST, "stage=sft", *LORA, f"model.lora.export={export}", output_dir=run))
        exports[export] = run / "export"
    merged = AutoModelForCausalLM.from_pretrained(exports["merged"])
    adapted = AutoPeftModelForCausalLM.from_pretrained(exports["adapter"])
    assert (exports["adapter"] / "adapter_config.json").exists()
    assert not (exports["adapter"] / "model.safetensors").exists(), "the adapter export holds the adapter alone"
    ids = torch.tensor([[5, 17, 42, 99, 3, 8]])
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids).logits, merged(ids).logits, atol=1e-4, rtol=1e-4)
    _generates(exports["merged"], merged)
    _generates(exports["adapter"], adapted)
    with pytest.raises(ConfigError, match="LoRA adapter alone"):
        check_train_paths(validate(compose_config(f"model.name_or_path={exports['adapter']}", "model.config=null")))

    start = load_hf_model(compose_config(*FAST).model, ChatFormat(build_synthetic_tokenizer())).state_dict()
    trained = load_file(exports["merged"] / "model.safetensors")
    assert torch.equal(trained["model.embed_tokens.weight"], start["model.embed_tokens.weight"]), "not adapted"
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(trained[name], start[name]), "the adapter's update is merged into its layer"


def test_the_reference_is_the_base_weights_without_a_second_copy(tmp_path):
    run = validate(compose_config(*FAST, "stage=dpo", *LORA, output_dir=tmp_path))
    stage = build_stage(run)
    stage.policy = build_backbone(run.model, run.hardware, stage.chat, mesh=None)
    stage.configure_model()
    base = load_hf_model(run.model, stage.chat, param_dtype=torch.float32)
    held = sum(p.numel() for model in (stage.policy, *stage.frozen.values()) for p in model.parameters())
    base_count = sum(p.numel() for p in base.parameters())
    assert not stage.frozen and held < 1.1 * base_count, (held, base_count)

    with torch.no_grad():  # move the adapter away from B = 0: the policy now differs from its base
        for name, parameter in stage.policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    batch = {
        "input_ids": torch.tensor([[5, 17, 42, 99, 3, 8]]),
        "labels": torch.tensor([[17, 42, 99, 3, 8, -100]]),
        "position_ids": torch.arange(6)[None],
        "unpack_index": torch.tensor([[0, 1, 2, 3, 4]]),
    }
    with stage.reference() as reference:
        reference_logps, _ = completion_scores(reference, batch)
    policy_logps, _ = completion_scores(stage.policy, batch)
    base_logps, _ = completion_scores(CausalLM(base), batch)
    torch.testing.assert_close(reference_logps, base_logps)
    assert not torch.allclose(policy_logps, base_logps), "outside the block the adapter is on"


def test_lora_under_fsdp_resumes_with_identical_losses(tmp_path):
    """GRPO with a KL term: the sharded adapter, its optimizer state, the frozen reference and the sampling RNG
    all come back (the data position's resume is tested without LoRA in tests/runs/test_distributed.py)."""
    overrides = [*FAST, *LORA, "hardware=cpu_fsdp", "trainer.max_steps=4", "logger=csv"]
    # a reward with a spread on the random model's completions, so that the steps train
    overrides += [*GRPO_SMALL, "stage.beta=0.04", "+stage.reward.repetition={weight: 1.0, ngram: 1}"]
    full = run_cli(*overrides, f"hydra.run.dir={tmp_path / 'full'}", cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]
    killed_dir = tmp_path / "killed"
    kill = ["+callbacks.kill._target_=faults.KillAtStep", "+callbacks.kill.step=2"]
    killed = run_cli(*overrides, f"hydra.run.dir={killed_dir}", *kill, cwd=tmp_path)
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = run_cli(*overrides, f"hydra.run.dir={killed_dir}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = logged(tmp_path / "full", "train/loss"), logged(killed_dir, "train/loss")
    assert [int(row["step"]) for row in read_metrics(killed_dir) if row.get("train/loss")] == [0, 1, 2, 3]
    assert got == pytest.approx(expected, abs=1e-6)
    assert len(set(expected.values())) > 1
    AutoModelForCausalLM.from_pretrained(killed_dir / "export")


def test_gradient_checkpointing_leaves_lora_losses_unchanged(tmp_path):
    losses = {}
    for checkpointing in ("false", "true"):
        run = tmp_path / checkpointing
        run_stage(
            compose_config(*FAST, "stage=sft", *LORA, f"model.gradient_checkpointing={checkpointing}", output_dir=run)
        )
        losses[checkpointing] = logged(run, "train/loss")
    assert losses["true"] == pytest.approx(losses["false"], abs=1e-5)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.lora.rank=-1", "model.lora.rank"),
        ("model.lora.dropout=1.0", "model.lora.dropout"),
        ("model.lora.export=both", "model.lora.export"),
        ("model.lora.target_modules=[]", "model.lora.target_modules"),
    ],
)
def test_bad_lora_settings_fail_early(override, key):
    with pytest.raises(ConfigError, match=key):
        validate(compose_config(override))
