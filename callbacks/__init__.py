"""Lightning callbacks for Haipai (YAML: `class_path: callbacks.X`)."""

from callbacks.acm_phases import ACMPhases
from callbacks.curriculum import CurriculumSwitch, DepthCurriculum
from callbacks.fit_summary import FitSummary
from callbacks.flop_budget import FlopBudget
from callbacks.graceful_stop import GracefulStop
from callbacks.growth import GrowthSchedule
from callbacks.nonfinite import NonFiniteGuard
from callbacks.post_training_quantization import PostTrainingQuantization
from callbacks.router_telemetry import RouterTelemetry
from callbacks.router_tuning import RouterTuning

__all__ = ["ACMPhases", "CurriculumSwitch", "DepthCurriculum", "FitSummary", "FlopBudget", "GracefulStop",
           "GrowthSchedule", "NonFiniteGuard", "PostTrainingQuantization", "RouterTelemetry", "RouterTuning"]
