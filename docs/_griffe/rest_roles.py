"""A griffe extension for the API reference: reStructuredText habits to Markdown.

The libraries' docstrings are Google style with a few reStructuredText constructs that
Markdown does not know. Before mkdocstrings renders a docstring, this rewrites (in the
loaded copy only; the source is untouched):

* roles such as :func:`x`, :class:`x`, :mod:`x`, :meth:`x`, :data:`x`, :math:`x`: to
  inline code (`x`), so no cross-reference has to resolve;
* ``.. math::`` directives: to an indented literal block;
* an Args entry whose list of several names wraps: onto one line, so that it parses;
* an ``Example:`` section heading: to ``Examples:``, so that the doctest lines render
  as code rather than as an admonition of Markdown text.
"""

import re

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|mod|meth|data|attr|obj|exc|math|const):`~?([^`]+)`")
MATH = re.compile(r"^(\s*)\.\. math::\s*(.*)$", re.MULTILINE)
EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
# An Args entry naming several parameters whose list of names wraps onto the next line.
NAMES = r"(?:\*{0,2}\w+, )*\*{0,2}\w+"
WRAPPED_NAMES = re.compile(rf"^(\s+)({NAMES},)\n\1\s+(?={NAMES}:)", re.MULTILINE)


def markdown_docstring(text: str) -> str:
  """``text`` with the reStructuredText roles, math directives and headings rewritten."""
  text = WRAPPED_NAMES.sub(r"\1\2 ", text)
  text = ROLE.sub(lambda match: f"``{match.group(1)}``", text)
  text = MATH.sub(lambda match: f"{match.group(1)}Math:\n\n{match.group(1)}    "
                  f"{match.group(2)}", text)
  return EXAMPLE.sub(lambda match: f"{match.group(1)}Examples:", text)


class ReSTToMarkdown(griffe.Extension):
  """Rewrites every loaded object's docstring with :func:`markdown_docstring`."""

  def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
    del kwargs
    if obj.docstring is not None:
      obj.docstring.value = markdown_docstring(obj.docstring.value)
