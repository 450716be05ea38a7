"""The HTML report: a self-contained page (images inline, no network asset) of examples and scores.

Contract: `compose_report` builds a `Report` from a run (the self-influence gallery, explanations,
clusters, plots); `write_report` writes it with every string from data escaped; `spec_report` is
what ``tracin report`` writes from a store and the user's spec.
"""

from tracin.report._compose import compose_report
from tracin.report._from_spec import spec_report
from tracin.report._html import Example, Explanation, Plot, Report, write_report

__all__ = [
    "Example",
    "Explanation",
    "Plot",
    "Report",
    "compose_report",
    "spec_report",
    "write_report",
]
