"""thinkforge from Python: the README's example runs as written, and a bad override is one catchable line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import thinkforge
from thinkforge.errors import ConfigError, UserError

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.e2e
def test_the_readmes_python_example_runs_as_written(tmp_path):
    example = re.search(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL).group(1)
    result = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    directory, accuracy = result.stdout.strip().splitlines()[-1].rsplit(" ", 1)
    assert 0.0 <= float(accuracy) <= 1.0
    assert (tmp_path / directory / "export" / "config.json").exists() and (tmp_path / "logs" / "sft").is_dir()


def test_a_bad_override_raises_the_one_line_a_command_prints(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^trainer\.max_step: no such key; did you mean trainer\.max_steps\?$"):
        thinkforge.train("trainer.max_step=2")
    with pytest.raises(UserError, match=r"^data\.train: .*missing\.jsonl: no such file$"):
        thinkforge.train("data=jsonl", f"data.train={tmp_path}/missing.jsonl")
    assert not (tmp_path / "logs").exists()
