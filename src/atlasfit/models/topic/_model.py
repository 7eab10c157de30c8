"""User-facing :class:`MultimodalAmortizedLDA` (scverse style): the facade over the topic-model modules.

Split as scvi-tools splits model / module / training plan:

* ``_data.py``: registration (AnnData / MuData / dict / atlas store; a store registers metadata only)
  and the training layout (seeded per-sample validation split, the shards' block reader);
* ``_shard.py``: the shard loader (each shard reads its own samples) and the non-step shard functions;
* ``_training.py``: ``train`` (checks, shards, engine, checkpoints) on the loop of ``_fit.py``;
* ``_fit.py``: the one training loop (``init_shared`` + ``epoch_step`` on :func:`atlasfit.engine.run_fit`);
* ``_train.py`` / ``_loss.py`` / ``_nn.py``: the per-step shard functions and the maths;
* ``_evaluate.py`` / ``_summaries.py``: cells to evaluate, the ``get_*`` posterior summaries, the
  per-epoch validation scores (an engine round);
* ``_io.py``: save / load and results written into an atlas store.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ._config import TopicModelConfig
from ._data import _as_list, _Registered, register_config
from ._evaluate import _EvalMixin
from ._fit import (
    _TrainingMixin,
)
from ._getters import _GettersMixin
from ._io import _PersistenceMixin
from ._optim import AdamWState
from ._reference import model_kwargs
from ._summaries import _SummariesMixin
from ._train import TopicFit
from ._training import _TrainMethod

#: The model's default floating type: float32, as scvi-tools and topomics train. Measured on the planted
#: RNA 2k + peaks 5k atlas (20k cells, batch 1024, one process, this project's 2-core machine): about
#: 1.8x the float64 throughput (docs/topic_model.md); the finite-difference and sparse-vs-dense tests
#: run in float64.
DEFAULT_DTYPE = "float32"


class MultimodalAmortizedLDA(_TrainMethod, _TrainingMixin, _EvalMixin, _SummariesMixin, _GettersMixin, _PersistenceMixin):
    """Multimodal amortised LDA: per-modality encoders, a mixture of experts collapsed by moment
    matching, logistic-normal priors and per-modality likelihoods (``specs/topic_model.md``).

    Build it with :meth:`from_data` / :meth:`from_mudata`; then :meth:`train` and the ``get_*``
    summaries. Cells of every modality must be the same cells in the same order.

    Parameters
    ----------
    config
        The model configuration (:class:`~atlasfit.models.topic.TopicModelConfig`).
    data
        Registered data (internal; use the constructors).
    dtype
        ``"float32"`` (default, as scvi-tools and topomics train) or ``"float64"`` for parameters and
        minibatches. Measured on the planted RNA + peaks atlas (20k cells, batch 1024, one process):
        float32 trains about 1.8x faster than float64; held-out likelihoods agree (docs/topic_model.md).

    Attributes
    ----------
    config : TopicModelConfig
    train_indices_, validation_indices_ : numpy.ndarray
        Row positions of the training / validation cells in the registered data.
    n_epochs_ : int
        Epochs trained so far (over all calls of :meth:`train`).
    stopped_early_ : bool
        Whether the last :meth:`train` call ended by early stopping.

    Examples
    --------
    >>> import numpy as np, anndata as ad
    >>> rng = np.random.default_rng(0)
    >>> a = ad.AnnData(rng.poisson(2.0, (80, 15)).astype(np.float32))
    >>> model = MultimodalAmortizedLDA.from_data(a, n_topics=3, n_hidden=8)
    >>> model.train(max_epochs=2, batch_size=32, progress=False).get_latent_representation().shape
    (80, 3)
    """

    def __init__(self, config: TopicModelConfig, data: _Registered | None = None, *, dtype: str | None = None):
        self.config = config
        self.dtype = np.dtype(DEFAULT_DTYPE if dtype is None else dtype).type
        self._data = data
        self.feature_names_ = {m: pd.Index(data.var_names[m]) for m in config.modalities} if data else {}
        self.layers_: dict = {}
        self.sample_key_: str | None = None
        self.spatial_key_: str | None = None
        self.batch_key_: str | None = None
        self.batch_categories_: list = []
        self.continuous_covariate_keys_: list | None = None
        self._fit: TopicFit | None = None
        self._opt: AdamWState | None = None
        self._local: dict = {}  # {sample: {omega, omega_m, omega_v, omega_t}} of the training cells (cell weights)
        self._omega_cache = None
        self._split_cache = None
        self._saved_split = None  # (train, validation) of a loaded model without data
        self._history: list[dict] = []
        self.n_epochs_ = 0
        self.stopped_early_ = False
        self._train_settings: dict = {}
        self._theta_prev = None  # global mean theta of the last step (theta_bar_sync="lagged")
        self._engine = None  # the shards kept after train() for the summaries (close() releases them)
        self._cell_map_cache = None
        self.best_epoch_: int | None = None
        self.kl_weight_ = 1.0  # the KL weight the warm-up reaches (topomics' kl_weight, §1.9; train's default)

    @classmethod
    def from_data(
        cls,
        data,
        modalities: Sequence[str] | None = None,
        likelihoods: Sequence[str] | Mapping[str, str] | None = None,
        sample_key: str | None = None,
        n_topics: int = 20,
        *,
        layers: str | Mapping[str, str] | None = None,
        spatial_key: str | None = None,
        batch_key: str | None = None,
        continuous_covariate_keys: Sequence[str] | None = None,
        dtype: str | None = None,
        **cfg,
    ) -> MultimodalAmortizedLDA:
        """Register data and build the model in one call.

        Parameters
        ----------
        data
            An AnnData (one modality, named ``modalities[0]`` or ``"rna"``), a MuData, a dict of
            AnnData, a dict of ``(n_cells, n_features)`` arrays, or an atlas store path / Atlas (read
            sample by sample with :meth:`atlasfit.io.Atlas.read_block`, in store order).
        modalities
            Modalities to use, in order (default: all).
        likelihoods
            One per modality (list or ``{modality: likelihood}``), from ``"multinomial"``,
            ``"gamma_poisson"``, ``"nb"``, ``"bernoulli"``, ``"gaussian"``. Default per modality:
            binary data (store kind ``binary``, or all values 0/1) -> ``"bernoulli"``; counts ->
            ``"gamma_poisson"`` for an RNA-like name (``rna``, ``gex``, ``genes``, ...) and
            ``"multinomial"`` otherwise (the seed's rule, §8); store kind ``continuous`` -> ``"gaussian"``.
        sample_key
            obs column with the sample labels (MuData global obs first, then the modalities' obs);
            ``None``: one sample (stores always use their own key). Samples define the shards and
            stratify minibatches and the validation split.
        n_topics
            :math:`K`.
        layers
            Layer to read instead of ``X``: one name for every modality or ``{modality: layer}``.
        spatial_key
            ``.obsp`` key of a within-sample spatial graph (checked to exist, shape (n, n)); kept in
            ``spatial_graphs_`` and given to the spatial encoders (``spatial_mode="sgc"`` / ``"gcn"``).
        batch_key, continuous_covariate_keys
            obs columns of the categorical covariate (codes in order of first appearance;
            ``n_batches`` is set from it: decoder batch offsets §1.5, and the encoder one-hot with
            ``encode_covariates=True``) and of continuous encoder covariates (§2.2; sets
            ``n_continuous_covariates`` and ``encode_covariates=True``).
        dtype
            ``"float32"`` (default, :data:`DEFAULT_DTYPE`) or ``"float64"``.
        **cfg
            Any other :class:`~atlasfit.models.topic.TopicModelConfig` field (``n_hidden``,
            ``weight_mode``, ``likelihood_weight_mode``, ``learnable_dispersion``, ...), or a keyword of
            the reference (topomics): ``dispersion_rna`` (= ``dispersion``), ``aggregation_type``
            (= ``aggregation``), ``categorical_covariate_keys`` (one key = ``batch_key``),
            ``modality_order`` (= ``modalities``), ``layer_dict`` (= ``layers``), ``kl_weight`` (the
            KL weight the warm-up reaches, :attr:`kl_weight_`; unlike the reference, whose training
            ignores it (§3.4), :meth:`train` uses it unless ``kl_kwargs`` sets ``kl_weight``) and
            ``encoder_scale_factor`` (unused by the reference; ignored with a warning).

        Returns
        -------
        MultimodalAmortizedLDA

        Examples
        --------
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> d = {"rna": rng.poisson(1.5, (50, 10)), "atac": (rng.random((50, 20)) < 0.3).astype(float)}
        >>> MultimodalAmortizedLDA.from_data(d, n_topics=4).config.likelihoods
        ('gamma_poisson', 'bernoulli')
        """
        modalities, layers, batch_key, kl_weight = model_kwargs(f"{cls.__name__}.from_data", modalities, layers,
                                                                batch_key, cfg)
        reg, config = register_config(data, modalities, likelihoods, sample_key, n_topics, layers, spatial_key,
                                      batch_key, continuous_covariate_keys, cfg)
        names = list(config.modalities)
        model = cls(config, reg, dtype=dtype)
        model.kl_weight_ = kl_weight
        model.layers_ = _as_list(layers, names, "layers")
        model.sample_key_ = sample_key if reg.source is None else None
        model.spatial_key_ = spatial_key
        model.batch_key_ = batch_key
        model.batch_categories_ = list(reg.batch_categories)
        model.continuous_covariate_keys_ = None if not continuous_covariate_keys else list(continuous_covariate_keys)
        return model

    @classmethod
    def from_mudata(
        cls,
        mdata,
        modalities: Sequence[str] | None = None,
        likelihoods: Sequence[str] | Mapping[str, str] | None = None,
        sample_key: str | None = None,
        n_topics: int = 20,
        **kwargs,
    ) -> MultimodalAmortizedLDA:
        """Build the model from a MuData (cells aligned across ``mdata.mod``) or an atlas store (a MuData
        layout on disk: path or :class:`atlasfit.io.Atlas`, read by the shards); see :meth:`from_data`.

        Examples
        --------
        >>> import numpy as np, anndata as ad, mudata as md
        >>> rng = np.random.default_rng(0)
        >>> mdata = md.MuData({"rna": ad.AnnData(rng.poisson(2.0, (40, 8)).astype(float)),
        ...                    "atac": ad.AnnData((rng.random((40, 12)) < 0.2).astype(float))})
        >>> cfg = MultimodalAmortizedLDA.from_mudata(mdata, n_topics=3).config
        >>> dict(zip(cfg.modalities, cfg.likelihoods)) == {"rna": "gamma_poisson", "atac": "bernoulli"}
        True
        """
        import mudata as md

        from ...io import Atlas

        if not isinstance(mdata, (md.MuData, str, Path, Atlas)):
            raise TypeError(f"from_mudata needs a MuData or an atlas store path, got {type(mdata).__name__}; use "
                            "from_data for AnnData or dict inputs")
        return cls.from_data(mdata, modalities, likelihoods, sample_key, n_topics, **kwargs)

    @property
    def history_(self) -> pd.DataFrame:
        """Per-epoch training record (a pandas DataFrame).

        One row per epoch: ``epoch``, ``beta``, ``train_loss`` (mean over steps of the full-data-scale
        loss :math:`\\mathcal L_t`, spec §3.1), ``train_loss_per_cell`` (divided by :math:`N`) and, with a
        validation split, ``val_loss`` (:math:`-`:meth:`get_elbo` on the validation cells),
        ``val_ll_per_token`` and ``val_ll_per_token/<modality>`` (see :meth:`get_perplexity`).
        """
        return pd.DataFrame(self._history)

    @property
    def spatial_graphs_(self) -> dict:
        """``{modality: (n, n) CSR}`` graphs read from ``.obsp[spatial_key]`` (empty without ``spatial_key``)."""
        return {} if self._data is None else dict(self._data.spatial)

    @property
    def is_trained(self) -> bool:
        """Whether :meth:`train` has run (or a trained model was loaded)."""
        return self._fit is not None

    def _check_trained(self):
        if self._fit is None:
            raise RuntimeError("the model is not trained: call train() first (or MultimodalAmortizedLDA.load)")
