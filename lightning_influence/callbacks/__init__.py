"""Lightning callbacks: they decide *when*; the math lives in :mod:`lightning_influence.api`.

Add all three to a Trainer (order does not matter; each asks the previous stage for its result):

- :class:`InfluenceStatistics` accumulates the K-FAC covariances (after fit, or during training);
- :class:`EigenCorrection` finalizes and saves the EK-FAC factors;
- :class:`InfluenceScores` logs top influential examples and self-influence flags.

:class:`InfluenceValidation` (optional) compares the factors with LiSSA (and PBRF) and logs how
well they agree.

:class:`DocumentInfluence` (language models) logs which training documents drive the completions
of prompt + completion queries: document-, token- and layer-wise, with low-rank query batching.
"""

from lightning_influence.callbacks.document_influence import DocumentInfluence
from lightning_influence.callbacks.eigen_correction import EigenCorrection
from lightning_influence.callbacks.influence_scores import InfluenceScores
from lightning_influence.callbacks.influence_statistics import InfluenceStatistics
from lightning_influence.callbacks.influence_validation import InfluenceValidation

__all__ = ["DocumentInfluence", "EigenCorrection", "InfluenceScores", "InfluenceStatistics",
           "InfluenceValidation", "influence_callbacks"]


def influence_callbacks(task=None, strategy: str = "ekfac", mode: str = "after_fit",
                        **score_kwargs) -> list:
    """The three callbacks with common defaults: ``Trainer(callbacks=influence_callbacks(...))``."""
    return [InfluenceStatistics(task=task, mode=mode), EigenCorrection(strategy=strategy),
            InfluenceScores(**score_kwargs)]
