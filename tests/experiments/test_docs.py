"""Every Python block of the documentation pages (docs/*.md) runs.

Each page is one test: its blocks run in order in one fresh namespace, as a reader
pastes them into one session, so the documented API cannot drift from the code. A block
that cannot run here (a GPU, a download, several hosts) is either fenced as another
language or preceded by the line

    <!-- docs-test: skip (the reason) -->

and is then reported as a skipped test of its own, with that reason, instead of running.
The results pages under docs/results/ are generated reports and hold no Python blocks.
"""

import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
PAGES = sorted(path for path in DOCS.glob("**/*.md")
               if DOCS / "results" not in path.parents)
BLOCK = re.compile(r"^(?:<!-- docs-test: skip \((?P<reason>.*?)\) -->\n)?"
                   r"```python\n(?P<source>.*?)^```", re.MULTILINE | re.DOTALL)
SKIP_MARK = re.compile(r"^<!-- docs-test: skip", re.MULTILINE)


def blocks(path):
  """``[(line, source, skip reason or None), ...]`` of a page's ```python blocks."""
  text = path.read_text(encoding="utf-8")
  found = []
  for match in BLOCK.finditer(text):
    fence = match.start("source") - len("```python\n")
    found.append((text[:fence].count("\n") + 2, match.group("source"), match.group("reason")))
  return found


def page_id(path):
  return str(path.relative_to(REPO))


PAGES_WITH_CODE = [path for path in PAGES if any(r is None for _, _, r in blocks(path))]
SKIPPED = [(path, line, reason) for path in PAGES for line, _, reason in blocks(path)
           if reason is not None]


def test_the_pages_have_python_examples():
  names = {path.name for path in PAGES_WITH_CODE}
  for page in ("getting-started.md", "inq.md", "comq.md", "models.md", "deployment.md"):
    assert page in names, page


def test_every_skip_marker_is_on_a_python_block():
  for path in PAGES:
    markers = len(SKIP_MARK.findall(path.read_text(encoding="utf-8")))
    assert markers == sum(r is not None for _, _, r in blocks(path)), page_id(path)


@pytest.mark.parametrize("path", PAGES_WITH_CODE, ids=[page_id(p) for p in PAGES_WITH_CODE])
def test_python_blocks_run_in_order(path):
  namespace = {"__name__": f"docs_{path.stem.replace('-', '_')}"}
  for line, source, reason in blocks(path):
    if reason is None:
      code = compile(source, f"{page_id(path)}:{line}", "exec")
      exec(code, namespace)  # noqa: S102 (documentation examples, from this repository)


@pytest.mark.parametrize("path, line, reason", SKIPPED,
                         ids=[f"{page_id(p)}:{line}" for p, line, _ in SKIPPED])
def test_blocks_marked_to_skip(path, line, reason):
  compile(dict((n, s) for n, s, _ in blocks(path))[line], f"{page_id(path)}:{line}", "exec")
  pytest.skip(f"{page_id(path)}:{line}: {reason}")
