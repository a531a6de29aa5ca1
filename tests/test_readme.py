"""Every Python block of the README (and of docs/, where there are any) runs.

The blocks of one file run in order in one namespace, as a reader pastes them into
one session, so the documented API cannot drift from the code.
"""

import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
DOCUMENTS = [REPO / "README.md"] + sorted((REPO / "docs").glob("**/*.md"))
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def python_blocks(path):
  """``[(line, source), ...]`` of the ```python blocks of a Markdown file."""
  text = path.read_text(encoding="utf-8")
  return [(text[:match.start()].count("\n") + 2, match.group(1))
          for match in BLOCK.finditer(text)]


DOCUMENTS_WITH_CODE = [path for path in DOCUMENTS if python_blocks(path)]


def test_the_readme_has_python_examples():
  assert len(python_blocks(REPO / "README.md")) >= 5


@pytest.mark.parametrize("path", DOCUMENTS_WITH_CODE,
                         ids=[str(p.relative_to(REPO)) for p in DOCUMENTS_WITH_CODE])
def test_python_blocks_run_in_order(path):
  namespace = {"__name__": f"doc_{path.stem}"}
  for line, source in python_blocks(path):
    code = compile(source, f"{path.relative_to(REPO)}:{line}", "exec")
    exec(code, namespace)  # noqa: S102 (documentation examples, from this repository)
