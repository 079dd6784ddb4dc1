"""thinkforge-doctor: the documented command passes on the default config, and each check fails when the
property it guards is broken on purpose."""

from __future__ import annotations

import torch
from conftest import FAST, compose_config, run_cli

from thinkforge import doctor
from thinkforge.backbone import CausalLM, load_hf_model
from thinkforge.chat import ChatFormat
from thinkforge.config import validate
from thinkforge.losses import LossSum
from thinkforge.rollout.settings import SamplingParams
from thinkforge.stages import base as stage_base
from thinkforge.stages.causal import CausalLMStage
from thinkforge.stages.sft import SFT


def test_doctor_passes_on_the_default_config(tmp_path):
    result = run_cli(cwd=tmp_path, program="thinkforge-doctor")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = result.stdout[result.stdout.index("check ") :]
    for check in (
        "template and mask",
        "split: micro-batches",
        "split: packed vs unpacked",
        "resume equivalence",
        "budget",
    ):
        assert any(line.startswith(check) and " pass " in line for line in table.splitlines()), (check, table)
    assert " fail " not in table
    [_report] = (tmp_path / "logs" / "doctor" / "midtrain").glob("*/doctor.json")


def test_template_check_fails_when_the_end_token_is_not_a_target(tmp_path, chat, tokenizer):
    run = validate(compose_config(*FAST, "stage=sft", output_dir=tmp_path))
    assert doctor.check_template(SFT(run, chat).probe()).status == "pass"
    # a template that closes no reply with a special token: the reply's end is never trained
    tokenizer = tokenizer.__class__.from_pretrained(_saved(tokenizer, tmp_path))
    tokenizer.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    finding = doctor.check_template(SFT(run, ChatFormat(tokenizer)).probe())
    assert finding.status == "fail" and "never learns to stop" in finding.measured


def _saved(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    return tmp_path / "tokenizer"


def test_split_check_fails_for_a_loss_averaged_per_micro_batch(tmp_path, monkeypatch):
    cfg = compose_config(*FAST, "data.synthetic.num_train=64", output_dir=tmp_path)
    assert doctor.check_micro_batches(cfg, tmp_path / "right").status == "pass"
    token_mean = CausalLMStage.loss_sum
    monkeypatch.setattr(
        CausalLMStage, "loss_sum", lambda self, batch: LossSum(token_mean(self, batch).mean(), torch.tensor(1), {})
    )
    monkeypatch.setattr(CausalLMStage, "count_units", lambda self, batch: torch.tensor(1))
    finding = doctor.check_micro_batches(cfg, tmp_path / "broken")
    assert finding.status == "fail" and "gradient accumulation" in finding.advice


def test_logprob_check_fails_for_a_sampler_at_another_temperature(chat):
    run = validate(compose_config(*FAST, output_dir="unused"))
    model = CausalLM(load_hf_model(run.model, chat, param_dtype=torch.float32))
    prompts = ["<|im_start|>user\n2 + 3?<|im_end|>\n<|im_start|>assistant\n"] * 2
    sampling = SamplingParams(2, 1.0, 1.0, 16)
    assert doctor.sampler_trainer_gap(model, chat, prompts, sampling) < doctor.LOGPROB_WARN
    assert doctor.sampler_trainer_gap(model, chat, prompts, sampling, score_temperature=0.6) > doctor.LOGPROB_FAIL


def test_grader_audit_fails_for_a_grader_that_accepts_any_boxed_number():
    golds = ["12", "\\frac{1}{2}", "(1, 2)", "x^2 + 1"]
    assert doctor.grader_audit(golds).status == "pass"
    lenient = doctor.grader_audit(golds, verifier=lambda texts, _: [float("\\boxed{" in text) for text in texts])
    assert lenient.status == "fail" and "hedged boxes" in lenient.measured and "unclosed <think>" in lenient.measured


def test_resume_check_fails_when_a_resume_skips_the_data_position(tmp_path, monkeypatch):
    cfg = compose_config(*FAST, "data.synthetic.num_train=64", output_dir=tmp_path)
    gap, _ = doctor.resume_gap(cfg, tmp_path / "right")
    assert gap == 0.0
    monkeypatch.setattr(stage_base, "data_position", lambda global_step, steps_per_batch: 0)
    gap, _ = doctor.resume_gap(cfg, tmp_path / "broken")
    assert gap > 1e-3


def test_pipeline_doctor_checks_every_stage(tmp_path):
    shrink = [f"stages.{name}.data.synthetic.num_train=64" for name in ("midtrain", "sft")]
    result = run_cli("doctor=true", "~stages.dpo", "~stages.grpo", *shrink, cwd=tmp_path, program="thinkforge-pipeline")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[doctor] stage midtrain (its own starting model)" in result.stdout
    assert "[doctor] stage sft (the recipe's model standing in for the previous export)" in result.stdout
    assert not (tmp_path / "logs" / "pipeline" / "demo-seed0" / "midtrain").exists(), "a doctor run trains no stage"
