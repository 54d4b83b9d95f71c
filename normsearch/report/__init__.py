"""What a run shows a person: the terminal summary, the HTML/Markdown report and its figures.

- :mod:`~normsearch.report.summary`: the lines ``normsearch run`` prints at the end;
- :mod:`~normsearch.report.document`: :func:`write_report` (``report.html`` + ``report.md``);
- :mod:`~normsearch.report.render`: the document model (blocks) and its HTML/Markdown renderers;
- :mod:`~normsearch.report.figures`: the search's figures (matplotlib, PNG);
- one module per section that needs more than a figure: :mod:`~normsearch.report.confirmation`
  (verdict, confirmation table, proxy fidelity), :mod:`~normsearch.report.learned` (what the
  adaptive layers learned, via :mod:`~normsearch.report.introspect`), :mod:`~normsearch.report.audit`.
"""

from normsearch.report.document import write_report
from normsearch.report.summary import print_summary

__all__ = ["print_summary", "write_report"]
