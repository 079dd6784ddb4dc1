"""The test tree mirrors `src/thinkforge`: `tests/<package>/test_<module>[_<topic>].py` tests that module, so the
tests of a file are found from its name. Runs through several modules live in `runs/`, the project's own
contracts (conf defaults, docs, layers, public API) in `project/`."""

from __future__ import annotations

from pathlib import Path

import thinkforge

PACKAGE = Path(thinkforge.__file__).parent
TESTS = Path(__file__).resolve().parents[1]
NOT_MODULES = {"runs", "project"}


def names_a_module(test_file: Path) -> bool:
    """`test_math_answer_forms.py` in `rewards/` names `rewards/math.py`: some leading words of the name are a
    module of the matching folder (a package's own tests may take its name: `doctor/test_doctor.py`)."""
    folder = PACKAGE / test_file.parent.relative_to(TESTS)
    words = test_file.stem.removeprefix("test_").split("_")
    candidates = ["_".join(words[:n]) for n in range(1, len(words) + 1)]
    return any((folder / f"{name}.py").exists() or name == folder.name for name in candidates)


def test_every_test_file_sits_beside_the_module_it_tests():
    test_files = [path for path in TESTS.rglob("test_*.py") if path.relative_to(TESTS).parts[0] not in NOT_MODULES]
    assert len(test_files) > 20
    assert [str(path.relative_to(TESTS)) for path in test_files if not names_a_module(path)] == []


def test_every_test_folder_is_a_package_or_a_named_group():
    folders = {path.name for path in TESTS.iterdir() if path.is_dir() and not path.name.startswith((".", "__"))}
    assert {folder for folder in folders - NOT_MODULES if not (PACKAGE / folder).is_dir()} == set()
