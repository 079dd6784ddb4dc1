"""The docs say what the code does: docs/configuration.md is what the schemas generate, the README stays a
five-minute read, and every file it links to exists."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_configuration_reference_is_generated_from_the_schemas():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "configuration_doc.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_the_readme_is_short_and_its_links_exist():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 180
    links = re.findall(r"\]\(([^)#]+)\)", readme)
    assert links and [link for link in links if not (ROOT / link).exists() and "://" not in link] == []
