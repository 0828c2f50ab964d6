"""Lightning callbacks for Haipai (YAML: `class_path: callbacks.X`)."""

from callbacks.fit_summary import FitSummary
from callbacks.flop_budget import FlopBudget
from callbacks.router_telemetry import RouterTelemetry

__all__ = ["FitSummary", "FlopBudget", "RouterTelemetry"]
