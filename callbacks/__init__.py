"""Lightning callbacks for Haipai (YAML: `class_path: callbacks.X`)."""

from callbacks.fit_summary import FitSummary

__all__ = ["FitSummary"]
