"""The README's Python examples run as written."""

from __future__ import annotations

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples_and_quick_start():
    text = README.read_text()
    assert "make demo" in text and "make test" in text
    assert len(python_blocks()) >= 2


def test_readme_examples_run():
    namespace: dict = {}
    for i, block in enumerate(python_blocks()):
        try:
            exec(compile(block, f"README.md[python block {i}]", "exec"), namespace)  # noqa: S102
        except Exception as err:  # pragma: no cover - the failure message is the point
            pytest.fail(f"README python block {i} failed: {err!r}")
