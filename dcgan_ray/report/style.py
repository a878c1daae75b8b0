"""What the study report and the run page share: matplotlib figures without pyplot, and the pages' CSS."""

from __future__ import annotations

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

PAGE_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1300px; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } .sub { color: #555; margin-top: 0; }
.badge { display: inline-block; padding: 0.2em 0.6em; margin: 0 0.3em 0.3em 0; border-radius: 0.8em; color: #fff; }
.note { background: #f4f6f8; border-left: 4px solid #90a4ae; padding: 0.6em 1em; }
table { border-collapse: collapse; font-size: 0.9em; margin: 1em 0; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.status { color: #fff; font-weight: 600; } tr.best td { background: #fffde7; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #555; font-size: 0.9em; }
"""


def new_figure(width: float, height: float) -> Figure:
    """A figure on the Agg canvas, laid out by matplotlib (the study report and the run page draw on these)."""
    # No pyplot: its global figure registry and backend switch do not belong in a long-lived driver process.
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig
