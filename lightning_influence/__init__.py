"""lightning-influence: EK-FAC influence functions as PyTorch Lightning callbacks.

Sign convention: a positive score means the training example is a *proponent* (helpful):
up-weighting it lowers the query's loss. Negative scores are opponents.
"""

from lightning_influence.callbacks import (
    EigenCorrection,
    InfluenceScores,
    InfluenceStatistics,
    influence_callbacks,
)
from lightning_influence.factors import (
    STRATEGIES,
    CorruptFactorsError,
    FactorMismatchError,
    Factors,
    LayerFactors,
    Preconditioner,
)
from lightning_influence.fitting import fit_covariances, fit_factors
from lightning_influence.options import FitOptions, ScoreOptions
from lightning_influence.passes import ordered_loader
from lightning_influence.ranking import StreamingTopK, detection_report, flag_top_fraction
from lightning_influence.score_store import ScoreStoreMismatchError
from lightning_influence.scoring import (
    BoundInfluence,
    PairwiseResult,
    SelfResult,
    bind,
    compute_pairwise_scores,
    compute_self_scores,
    query_gradients,
)
from lightning_influence.task import (
    CausalLMTask,
    ClassificationTask,
    RegressionTask,
    Task,
    resolve_task,
)
from lightning_influence.tracking import SUPPORTED_MODULES, LayerTracker

__version__ = "0.1.0"

# The Hydra structured configs (callback schemas and option types) go into Hydra's ConfigStore
# here, so that `pkg://lightning_influence.conf` (which imports this package) finds them.
from lightning_influence.configs import register_configs  # noqa: E402

register_configs()

__all__ = [
    "BoundInfluence",
    "bind",
    "STRATEGIES",
    "Preconditioner",
    "ScoreStoreMismatchError",
    "CorruptFactorsError",
    "SUPPORTED_MODULES",
    "CausalLMTask",
    "EigenCorrection",
    "InfluenceScores",
    "InfluenceStatistics",
    "influence_callbacks",
    "ClassificationTask",
    "FactorMismatchError",
    "FitOptions",
    "ScoreOptions",
    "Factors",
    "LayerFactors",
    "LayerTracker",
    "PairwiseResult",
    "RegressionTask",
    "SelfResult",
    "StreamingTopK",
    "Task",
    "compute_pairwise_scores",
    "compute_self_scores",
    "detection_report",
    "fit_covariances",
    "fit_factors",
    "flag_top_fraction",
    "ordered_loader",
    "query_gradients",
    "resolve_task",
]
