"""Lightning callbacks for Haipai (YAML: `class_path: callbacks.X`)."""

from callbacks.fit_summary import FitSummary
from callbacks.flop_budget import FlopBudget

__all__ = ["FitSummary", "FlopBudget"]
