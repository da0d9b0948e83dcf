"""The Python code blocks of README.md and docs/*.md run, and the guarantees name real tests."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def python_blocks(page: Path) -> list[str]:
  return BLOCK.findall(page.read_text())


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: p.name)
def test_code_blocks_run(page):
  """Each page's ```python blocks run in order in one namespace (as a reader would paste them)."""
  namespace = {"__name__": f"docs_{page.stem}"}
  for i, block in enumerate(python_blocks(page)):
    try:
      exec(compile(block, f"{page.name} block {i + 1}", "exec"), namespace)
    except Exception as e:  # name the block
      raise AssertionError(f"{page.name}, code block {i + 1} failed: {e!r}\n{block}") from e


def test_every_guarantee_names_tests_that_exist():
  """docs/guarantees.md cites, for each check, the tests that make it fire."""
  text = (ROOT / "docs" / "guarantees.md").read_text()
  cited = set(re.findall(r"`(test_\w+)`", text))
  assert len(cited) >= 15, cited
  defined = set()
  for path in (ROOT / "tests").glob("test_*.py"):
    defined |= set(re.findall(r"^def (test_\w+)", path.read_text(), re.MULTILINE))
  assert cited <= defined, sorted(cited - defined)
