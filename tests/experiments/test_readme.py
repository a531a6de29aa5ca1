"""Every Python block of the README runs.

The blocks run in order in one namespace, as a reader pastes them into one session, so
the documented API cannot drift from the code. The documentation pages under docs/ are
checked the same way, one page at a time, by tests/experiments/test_docs.py.
"""

import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[2]
README = REPO / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def python_blocks(path):
  """``[(line, source), ...]`` of the ```python blocks of a Markdown file."""
  text = path.read_text(encoding="utf-8")
  return [(text[:match.start()].count("\n") + 2, match.group(1))
          for match in BLOCK.finditer(text)]


def test_the_readme_has_an_inq_and_a_comq_example():
  sources = [source for _, source in python_blocks(README)]
  assert any("inq_jax.inq(" in source for source in sources)
  assert any("comq_jax.comq(" in source for source in sources)


def test_the_readme_keeps_the_two_commands():
  text = README.read_text(encoding="utf-8")
  assert ('pip install -e ".[experiments]" && python -m experiments.digits '
          '--config=inq_5bit\n') in text
  assert "\nbash .ci/run\n" in text


def test_the_readme_python_blocks_run_in_order():
  namespace = {"__name__": "doc_README"}
  for line, source in python_blocks(README):
    code = compile(source, f"README.md:{line}", "exec")
    exec(code, namespace)  # noqa: S102 (documentation examples, from this repository)
