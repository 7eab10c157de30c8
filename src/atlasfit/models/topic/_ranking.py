"""Ranking the features of a topic: by probability, lift or LDAvis relevance.

A feature that is frequent everywhere (MALAT1, mitochondrial and ribosomal genes) has a large
:math:`\\hat\\phi_{kf}` in every topic and tops every raw ranking. Lift divides by the feature's marginal
probability; relevance (Sievert & Shirley 2014, LDAvis) interpolates between the two on the log scale:

.. math::

    p_f = \\sum_k w_k \\hat\\phi_{kf}, \\qquad
    \\mathrm{lift}_{kf} = \\hat\\phi_{kf} / p_f, \\qquad
    r_{kf}(\\lambda) = \\lambda \\log \\hat\\phi_{kf} + (1 - \\lambda) \\log \\mathrm{lift}_{kf}

with topic weights :math:`w` (uniform by default; LDAvis uses each topic's share of the corpus tokens).
:math:`\\lambda = 1` ranks by probability, :math:`\\lambda = 0` by lift.
"""

from __future__ import annotations

import numpy as np

#: ranking methods of :func:`feature_scores`
METHODS = ("probability", "relevance", "lift")
#: LDAvis's suggested weight of log-probability in the relevance (its user study found ~0.6 best)
DEFAULT_LAMBDA = 0.6


def check_ranking(method: str, lambda_: float, where: str) -> None:
    """Raise a ``ValueError`` naming the argument when ``method`` or ``lambda_`` is not valid."""
    if method not in METHODS:
        raise ValueError(f"{where}: method={method!r} is not one of {list(METHODS)}")
    lam = float(lambda_)
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"{where}: lambda_={lambda_!r} must lie in [0, 1] (1: probability, 0: lift; LDAvis "
                         f"suggests {DEFAULT_LAMBDA})")


def feature_scores(phi, method: str = "relevance", lambda_: float = DEFAULT_LAMBDA, topic_weights=None) -> np.ndarray:
    """Scores (topics x features) whose descending order ranks each topic's features.

    Parameters
    ----------
    phi
        Topic-feature distributions, topics x features, each row summing to 1 (any scores with
        ``method="probability"``, which returns them unchanged).
    method
        ``"probability"``: :math:`\\hat\\phi_{kf}`; ``"lift"``: :math:`\\hat\\phi_{kf}/p_f`;
        ``"relevance"``: :math:`\\lambda\\log\\hat\\phi_{kf} + (1-\\lambda)\\log(\\hat\\phi_{kf}/p_f)`.
    lambda_
        The relevance weight :math:`\\lambda \\in [0, 1]`.
    topic_weights
        Weights :math:`w_k \\ge 0` of the marginal :math:`p_f = \\sum_k w_k\\hat\\phi_{kf}` (normalised to
        sum 1); ``None``: uniform.

    Examples
    --------
    >>> phi = np.array([[0.5, 0.4, 0.1], [0.5, 0.1, 0.4]])     # feature 0 is half of every topic
    >>> feature_scores(phi, "lift").round(2).tolist()
    [[1.0, 1.6, 0.4], [1.0, 0.4, 1.6]]
    >>> np.argsort(-feature_scores(phi, "relevance", 0.6), axis=1)[:, 0].tolist()
    [1, 2]
    """
    check_ranking(method, lambda_, "feature_scores")
    phi = np.asarray(phi, dtype=np.float64)
    if method == "probability":
        return phi.copy()
    if phi.ndim != 2 or not np.all(np.isfinite(phi)) or np.any(phi < 0):
        raise ValueError("feature_scores: phi must be a finite, non-negative (topics x features) array of "
                         "probabilities; Gaussian modalities' loadings can only be ranked with "
                         "method='probability'")
    K = phi.shape[0]
    if topic_weights is None:
        w = np.full(K, 1.0 / K)
    else:
        w = np.asarray(topic_weights, dtype=np.float64).ravel()
        if w.shape != (K,) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(f"feature_scores: topic_weights must be {K} finite weights >= 0 with a positive sum "
                             f"(one per topic), got {np.asarray(topic_weights).shape} values")
        w = w / w.sum()
    tiny = np.finfo(np.float64).tiny
    p = np.maximum(w @ phi, tiny)  # marginal feature probability p_f
    if method == "lift":
        return phi / p[None, :]
    lam = float(lambda_)
    log_phi = np.log(np.maximum(phi, tiny))
    return lam * log_phi + (1.0 - lam) * (log_phi - np.log(p)[None, :])
