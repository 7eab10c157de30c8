"""topomics' small getters (spec ``topic_model.md`` §7) on :class:`~atlasfit.MultimodalAmortizedLDA`:
the mean topic entropy, the regulariser weights and the regularisers' values on the last minibatch."""

from __future__ import annotations

import math

import numpy as np


class _GettersMixin:
    """``get_entropy``, ``get_entropy_weight``, ``get_topic_variance_weight``, ``get_last_entropy``,
    ``get_last_topic_variance``."""

    def get_entropy(self, data=None, cells=None, *, normalised: bool = True, n_samples: int = 100, seed: int = 0,
                    batch_size: int = 4096) -> float:
        """Mean topic entropy over cells (the reference's ``get_entropy``, §7):

        .. math:: \\bar H = \\frac1C\\sum_n -\\sum_k\\hat\\theta_{nk}\\log\\max(\\hat\\theta_{nk}, 10^{-8})

        with :math:`\\hat\\theta` of :meth:`get_latent_representation`, its rows renormalised to sum 1
        when ``normalised`` (nats; 0: one topic per cell, :math:`\\log K`: uniform). The per-cell
        values are :meth:`get_cell_entropy`.

        Examples
        --------
        >>> import numpy as np
        >>> from atlasfit import MultimodalAmortizedLDA
        >>> m = MultimodalAmortizedLDA.from_data({"rna": np.random.default_rng(0).poisson(2, (40, 6))},
        ...                                      n_topics=3, n_hidden=4).train(1, 20, progress=False)
        >>> bool(0.0 <= m.get_entropy() <= np.log(3))
        True
        """
        th = np.asarray(self.get_latent_representation(data, cells, n_samples=n_samples, seed=seed,
                                                       batch_size=batch_size), dtype=np.float64)
        if normalised:
            th = th / th.sum(axis=1, keepdims=True)
        return float(np.mean(-(th * np.log(np.maximum(th, 1e-8))).sum(axis=1)))

    def get_entropy_weight(self) -> float:
        """:math:`\\lambda_H` (``entropy_weight``), the weight of the per-cell topic entropy in the loss
        (§3.1); its sign is ``config.regularizer_sign`` (the reference's: a penalty, §3.3)."""
        return float(self.config.entropy_weight)

    def get_topic_variance_weight(self) -> float:
        """:math:`\\lambda_V` (``topic_variance_weight``), the weight of the minibatch topic variance
        :math:`\\sum_k\\widehat{\\mathrm{Var}}_n(\\theta_{nk})` in the loss (§3.1, sign as
        :meth:`get_entropy_weight`)."""
        return float(self.config.topic_variance_weight)

    def _last(self, key: str) -> float:
        if not self._history:
            raise RuntimeError(f"{key}: the model has not been trained yet; call train() first")
        return float(self._history[-1].get(key, math.nan))

    def get_last_entropy(self) -> float:
        """Mean training entropy :math:`\\frac1B\\sum_{n\\in\\mathcal B}H(\\theta_n)`,
        :math:`H(\\theta) = -\\sum_k\\theta_k\\log(\\theta_k + 10^{-5})` (the regulariser's, §3.1), over
        the last training minibatch of the last epoch, on its sampled :math:`\\theta_n` (training
        mode). Per epoch: ``history_["last_entropy"]``. NaN for a model saved before it was recorded.

        Examples
        --------
        >>> import numpy as np
        >>> from atlasfit import MultimodalAmortizedLDA
        >>> m = MultimodalAmortizedLDA.from_data({"rna": np.random.default_rng(0).poisson(2, (40, 6))},
        ...                                      n_topics=3, n_hidden=4).train(2, 20, progress=False)
        >>> bool(0.0 <= m.get_last_entropy() <= np.log(3))
        True
        """
        return self._last("last_entropy")

    def get_last_topic_variance(self) -> float:
        """Mean over topics of the unbiased variance of :math:`\\theta_{nk}` across the cells of the last
        training minibatch of the last epoch, :math:`\\frac1K\\sum_k\\widehat{\\mathrm{Var}}_n(\\theta_{nk})`
        (the topic-variance regulariser is :math:`\\lambda_V K` times it, §3.1). Per epoch:
        ``history_["last_topic_variance"]``."""
        return self._last("last_topic_variance")
