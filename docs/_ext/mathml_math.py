"""Sphinx math as MathML, converted at build time by docutils.

The docstrings' formulas become MathML in the HTML itself, which browsers
render natively: the pages show their math offline, with no script loaded
from the network and nothing to install beyond docutils (a Sphinx
dependency). docutils' converter knows most of LaTeX's math; the few
commands it lacks that the docstrings use only set a delimiter's size
(``\\big``, ``\\Big``, ...: MathML stretches fences by itself) or have a
synonym it knows (``\\dots``), and are rewritten here. A formula it still
cannot convert is a warning (so an error under ``-W``), shown as its LaTeX
source.
"""

from __future__ import annotations

import re

from docutils import nodes
from docutils.utils.math import latex2mathml
from sphinx.util import logging
from sphinx.util.math import get_node_equation_number

logger = logging.getLogger(__name__)

_SIZES = re.compile(r"\\[Bb]igg?[lrm]?(?![A-Za-z])")
_SYNONYMS = {r"\dots": r"\ldots"}


def to_mathml(latex: str, block: bool) -> str:
  source = _SIZES.sub("", latex)
  for command, known in _SYNONYMS.items():
    source = source.replace(command, known)
  return latex2mathml.tex2mathml(source, as_block=block)


def _convert(translator, node, latex: str, block: bool) -> str | None:
  try:
    return to_mathml(latex, block)
  except Exception as error:  # docutils raises SyntaxError, sometimes others
    logger.warning("math not converted to MathML (%s): %s", error, latex,
                   location=node, type="mathml", subtype="unsupported")
    return None


def visit_inline(translator, node):
  latex = node.astext()
  mathml = _convert(translator, node, latex, block=False)
  if mathml is None:
    translator.body.append(f'<code class="math">{translator.encode(latex)}</code>')
  else:
    translator.body.append(f'<span class="math">{mathml}</span>')
  raise nodes.SkipNode


def visit_block(translator, node):
  parts = [p for p in re.split(r"\n\s*\n", node.astext()) if p.strip()]
  translator.body.append(translator.starttag(node, "div", CLASS="math"))
  if node.get("number"):
    number = get_node_equation_number(translator, node)
    translator.body.append(f'<span class="eqno">({number})</span>')
  for part in parts:
    mathml = _convert(translator, node, part, block=True)
    if mathml is None:
      translator.body.append(f"<pre>{translator.encode(part)}</pre>")
    else:
      translator.body.append(mathml)
  translator.body.append("</div>\n")
  raise nodes.SkipNode


def setup(app):
  app.add_html_math_renderer("mathml", (visit_inline, None), (visit_block, None))
  return {"parallel_read_safe": True, "parallel_write_safe": True}
