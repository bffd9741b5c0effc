"""Lightning callbacks: they decide *when*; the math lives in :mod:`lightning_influence.api`.

Add all three to a Trainer (order does not matter). The first of them to be set up creates the
Trainer's :class:`~lightning_influence.callbacks.run.InfluenceRun` and the others receive it: it
holds what the stages share (task, tracked layers, merged fit options, factors) and checks before
training that the callbacks present make a whole.

- :class:`InfluenceStatistics` accumulates the K-FAC covariances (after fit, or during training);
- :class:`EigenCorrection` finalizes and saves the EK-FAC factors;
- :class:`InfluenceScores` logs top influential examples and self-influence flags.

:class:`InfluenceValidation` (optional) compares the factors with LiSSA (and PBRF) and logs how
well they agree.

:class:`DocumentInfluence` (language models) logs which training documents drive the completions
of prompt + completion queries: document-, token- and layer-wise, with low-rank query batching.

:class:`InfluenceIndex` (optional) writes a compressed index of the training gradients, built
from the scoring pass of the callbacks before it, and answers new queries from it
(:meth:`InfluenceIndex.query`) without a pass over the training data.
"""

from typing import Any

from lightning_influence.callbacks.document_influence import DocumentInfluence
from lightning_influence.callbacks.eigen_correction import EigenCorrection
from lightning_influence.callbacks.influence_index import InfluenceIndex
from lightning_influence.callbacks.influence_scores import InfluenceScores
from lightning_influence.callbacks.influence_statistics import InfluenceStatistics
from lightning_influence.callbacks.influence_validation import InfluenceValidation
from lightning_influence.callbacks.run import InfluenceRun
from lightning_influence.options import FitOptions, ScoreOptions

__all__ = ["DocumentInfluence", "EigenCorrection", "InfluenceIndex", "InfluenceRun",
           "InfluenceScores",
           "InfluenceStatistics", "InfluenceValidation", "influence_callbacks"]


def influence_callbacks(task: Any = None, strategy: str = "ekfac", mode: str = "after_fit",
                        fit: FitOptions | None = None, score: ScoreOptions | None = None,
                        **score_kwargs: Any) -> list:
    """The three callbacks with common defaults: ``Trainer(callbacks=influence_callbacks(...))``;
    ``fit`` goes to :class:`EigenCorrection`, ``score`` and ``score_kwargs`` (``num_queries``,
    ``top_k``, ``flag_fraction``, ...) to :class:`InfluenceScores`."""
    extra = {"fit": fit} if fit is not None else {}
    scores = {"score": score} if score is not None else {}
    return [InfluenceStatistics(task=task, mode=mode), EigenCorrection(strategy=strategy, **extra),
            InfluenceScores(**scores, **score_kwargs)]
