"""Configuration, fixed priors, likelihood weights and the KL schedule of the topic model.

Notation follows ``specs/topic_model.md`` (sections in brackets).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ._sampling import check_fan_out

#: Likelihood strings understood by the model (§1.7). ``"nb"`` is NB without background (§11 item 17).
LIKELIHOODS = ("multinomial", "gamma_poisson", "nb", "bernoulli", "gaussian")
COUNT_LIKELIHOODS = ("multinomial", "gamma_poisson", "nb", "bernoulli")
WEIGHT_MODES = ("equal", "universal", "cell")
AGGREGATIONS = ("moe", "attention")
TOPIC_FEATURE_PRIORS = ("logistic_normal", "horseshoe")
SPATIAL_MODES = (None, "sgc", "gcn")
#: Graph layers of ``spatial_mode="gcn"`` (§4.4) and their reference spellings (topomics' ``gcn_conv_type``).
GCN_CONV_TYPES = {"gcn": "gcn", "gatv2": "gatv2", "GCNConv": "gcn", "GATv2Conv": "gatv2", "gat": "gatv2"}
#: Subgraphs of the GCN encoder (§4.3): exact L-hop neighbourhoods or neighbour sampling ("approx").
GCN_SAMPLING = ("exact", "approx")

#: Decoder batch-offset priors (§1.5): :math:`\tau^b\sim\mathrm{Beta}(0.5, 0.5)`,
#: :math:`\Delta\sim\mathrm{StudentT}(\nu=10, 0, 0.01)`.
BATCH_TAU_AB = 0.5
BATCH_DELTA_DF = 10.0
BATCH_DELTA_SCALE = 0.01
#: Horseshoe slab :math:`c_m\sim\mathrm{InvGamma}(0.5, 0.5)` and the :math:`10^{-8}` of :math:`\tilde\lambda` (§1.3b).
HS_SLAB_AB = 0.5
HS_EPS = 1e-8

CLAMP_EPS = 1e-5
CLAMP_MAX = 1e5
EPS32 = float(np.finfo(np.float32).eps)


@dataclass(frozen=True)
class TopicModelConfig:
    """Static description of a MultimodalAmortizedLDA model (spec §1–§3, §12).

    Parameters
    ----------
    modalities
        Modality names, in the order of the concatenated feature axis.
    n_features
        Features per modality, :math:`F_m`.
    likelihoods
        One of ``"multinomial"``, ``"gamma_poisson"`` (NB with background), ``"nb"`` (NB without
        background, as in the reference), ``"bernoulli"``, ``"gaussian"`` per modality.
    n_topics
        :math:`K`.
    n_hidden, n_layers, dropout, bn_eps, bn_momentum, var_eps
        Encoder: ``n_layers`` blocks Linear-BatchNorm-ReLU-Dropout of width ``n_hidden`` (§2.2).
    cell_topic_prior
        ``None`` (:math:`\\alpha=1/K`), a float or a length-K sequence (§1.2).
    topic_feature_prior
        ``None`` (:math:`a=1/K`) or a float (§1.3a).
    use_feature_background, learnable_bg, bg_offset
        Feature background on ``"gamma_poisson"`` modalities (§1.4).
    dispersion, learnable_dispersion, global_dispersion
        NB size :math:`r` when fixed; learned :math:`d` with HalfCauchy prior otherwise (§1.7).
    weight_mode, aggregation, att_dim
        Mixture weights (§2.3): ``"equal"``, ``"universal"``, ``"cell"``; ``aggregation="attention"``
        replaces them by attention scores.
    likelihood_weight_mode, likelihood_weight_ref
        Per-modality likelihood weights :math:`w_m` (§1.8).
    entropy_weight, topic_variance_weight, regularizer_sign
        :math:`\\lambda_H`, :math:`\\lambda_V` and their sign (§3.3): ``"reference"`` adds
        :math:`+\\lambda H` and :math:`+\\lambda V` to the minimised loss (what the reference does:
        a penalty); ``"documented"`` subtracts them (the documented "bonus").
    normalize_encoder_inputs
        log1p of depth-normalised counts as encoder input (§2.2).
    topic_feature_prior_type
        ``"logistic_normal"`` (default, §1.3a) or ``"horseshoe"`` (regularised horseshoe, §1.3b):
        :math:`Z_{mkf}=\\beta_{mkf}\\tilde\\lambda_{mkf}` with LogNormal :math:`q` for
        :math:`c_m,\\tau_{mk},\\delta_{mf},\\lambda_{mkf}` and Normal :math:`q` for :math:`\\beta_{mkf}`.
    n_batches, decoder_batch_offsets
        Number of categories :math:`C` of the one categorical covariate (``batch`` codes per cell;
        0 = no covariate). With ``n_batches >= 1`` and ``decoder_batch_offsets`` the decoder logits get
        per-modality per-batch feature offsets :math:`\\tau^b_{mk}\\Delta_{m,c(n),f}` (§1.5).
    encode_covariates, n_continuous_covariates
        Encoder covariates (§2.2): the one-hot batch code (needs ``n_batches >= 2``; scvi ignores a
        1-category covariate) and/or ``n_continuous_covariates`` continuous values per cell are
        concatenated to every encoder input, in the order :math:`[\\hat x, \\text{cont}, \\text{onehot}]`.
    spatial_mode, sgc_n_layers, gcn_alpha_init
        ``None`` (default), ``"sgc"`` (encoder input :math:`\\log(1+[X,\\hat AX,\\ldots,\\hat A^LX])`
        precomputed per sample with :math:`L` = ``sgc_n_layers``, §4.5) or ``"gcn"`` (first encoder
        layer :math:`\\alpha\\,XW_0 + (1-\\alpha)\\hat A_{\\mathcal B,\\mathcal S}X_{\\mathcal S}W_g + b_0`,
        :math:`\\alpha=\\sigma(a_\\alpha)` learned, initialised at ``gcn_alpha_init``; §4.4), both over the
        within-sample graph with :math:`\\hat A = D^{-1/2}(A+I)D^{-1/2}` (see ``_spatial.py``).
    gcn_n_layers, gcn_conv_type, gcn_heads, gcn_sampling, gcn_fan_out
        The graph branch of ``spatial_mode="gcn"`` (§4.3, §4.4; ``_gnn.py``, ``_sampling.py``):
        ``gcn_n_layers`` graph layers (``>= 1``; 1 = the one-layer convolution above), each
        ``"gcn"`` (:math:`\\tilde A\\,hW`, default) or ``"gatv2"`` (GATv2 attention with
        ``gcn_heads`` heads of width ``n_hidden / gcn_heads``, concatenated; the reference's
        ``"GATv2Conv"`` / ``"GCNConv"`` are accepted), ReLU between layers. ``gcn_sampling="exact"``
        (default) reads the exact ``gcn_n_layers``-hop neighbourhood of a minibatch; ``"approx"``
        samples at most ``gcn_fan_out[h]`` neighbours per node at hop ``h`` (without replacement,
        re-weighted so that a GCN layer is unbiased; an integer applies to every hop; default 10),
        keyed by (seed, epoch, step, sample). Evaluation always uses the exact neighbourhoods.
    bernoulli_scaling
        ``"depth"`` (default, corrected): :math:`p = \\min(\\ell_n\\rho_{nf}, 1)`, so the expected number
        of ones of a cell is its observed number of ones. ``"reference"``:
        :math:`p = \\min(\\rho_{nf}\\ell_n/\\bar\\ell, 1)` (§1.7, mis-scaled, §11 item 16).
    bernoulli_link
        ``"cloglog"`` (default): :math:`p = 1 - e^{-q}` with :math:`q` the scaled rate above (an open
        feature is a positive Poisson count, as in binarised ATAC), smooth everywhere. ``"clip"`` (the
        reference): :math:`p = \\min(q, 1)`, with no gradient where :math:`q \\ge 1`; on the planted
        atlas a peak topic that saturates there stays stuck (docs/topic_model.md, "Measured"). See
        :func:`~atlasfit.models.topic.loglik_bernoulli`.

    Examples
    --------
    >>> cfg = TopicModelConfig(("rna",), (50,), ("gamma_poisson",), n_topics=4)
    >>> cfg.n_modalities, cfg.has_background("rna")
    (1, True)
    """

    modalities: tuple[str, ...]
    n_features: tuple[int, ...]
    likelihoods: tuple[str, ...]
    n_topics: int = 20
    n_hidden: int = 128
    n_layers: int = 1
    dropout: float = 0.1
    bn_eps: float = 1e-3
    bn_momentum: float = 0.01
    var_eps: float = 1e-4
    cell_topic_prior: float | Sequence[float] | None = None
    topic_feature_prior: float | None = None
    use_feature_background: bool = True
    learnable_bg: bool = True
    bg_offset: float = 1e-15
    dispersion: float = 1.0
    learnable_dispersion: bool = False
    global_dispersion: bool = True
    weight_mode: str = "equal"
    aggregation: str = "moe"
    att_dim: int = 32
    likelihood_weight_mode: str = "none"
    likelihood_weight_ref: str = "mean"
    entropy_weight: float = 0.01
    topic_variance_weight: float = 1.0
    regularizer_sign: str = "reference"
    normalize_encoder_inputs: bool = True
    bernoulli_scaling: str = "depth"
    bernoulli_link: str = "cloglog"
    topic_feature_prior_type: str = "logistic_normal"
    n_batches: int = 0
    decoder_batch_offsets: bool = True
    encode_covariates: bool = False
    n_continuous_covariates: int = 0
    spatial_mode: str | None = None
    sgc_n_layers: int = 1
    gcn_alpha_init: float = 0.7
    gcn_n_layers: int = 1
    gcn_conv_type: str = "gcn"
    gcn_heads: int = 4
    gcn_sampling: str = "exact"
    gcn_fan_out: int | Sequence[int] | None = None

    def __post_init__(self):
        object.__setattr__(self, "modalities", tuple(str(m) for m in self.modalities))
        object.__setattr__(self, "n_features", tuple(int(f) for f in self.n_features))
        object.__setattr__(self, "likelihoods", tuple(str(s) for s in self.likelihoods))
        M = len(self.modalities)
        if M == 0:
            raise ValueError("TopicModelConfig: give at least one modality")
        if len(set(self.modalities)) != M:
            raise ValueError(f"TopicModelConfig: modality names must be unique, got {self.modalities}")
        if len(self.n_features) != M or len(self.likelihoods) != M:
            raise ValueError(
                f"TopicModelConfig: modalities ({M}), n_features ({len(self.n_features)}) and "
                f"likelihoods ({len(self.likelihoods)}) must have the same length"
            )
        for m, f, lik in zip(self.modalities, self.n_features, self.likelihoods):
            if lik not in LIKELIHOODS:
                raise ValueError(f"modality {m!r}: unknown likelihood {lik!r}; use one of {LIKELIHOODS}")
            if f < 1:
                raise ValueError(f"modality {m!r}: n_features must be >= 1, got {f}")
        if self.n_topics < 2:
            raise ValueError(f"n_topics must be >= 2, got {self.n_topics}")
        if self.n_layers < 1 or self.n_hidden < 1:
            raise ValueError("n_layers and n_hidden must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.weight_mode not in WEIGHT_MODES:
            raise ValueError(f"weight_mode {self.weight_mode!r}: use one of {WEIGHT_MODES}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation {self.aggregation!r}: use one of {AGGREGATIONS}")
        if self.likelihood_weight_mode not in ("none", "inverse_features", "sqrt_inverse_features"):
            raise ValueError(
                f"likelihood_weight_mode {self.likelihood_weight_mode!r}: use 'none', "
                "'inverse_features' or 'sqrt_inverse_features'"
            )
        if self.likelihood_weight_ref not in ("mean", "median", "max"):
            raise ValueError(f"likelihood_weight_ref {self.likelihood_weight_ref!r}: use 'mean', 'median' or 'max'")
        if self.regularizer_sign not in ("reference", "documented"):
            raise ValueError(f"regularizer_sign {self.regularizer_sign!r}: use 'reference' or 'documented'")
        if self.bernoulli_scaling not in ("depth", "reference"):
            raise ValueError(f"bernoulli_scaling {self.bernoulli_scaling!r}: use 'depth' or 'reference'")
        if self.bernoulli_link not in ("clip", "cloglog"):
            raise ValueError(f"bernoulli_link {self.bernoulli_link!r}: use 'clip' (reference) or 'cloglog'")
        if self.topic_feature_prior is not None and not np.isscalar(self.topic_feature_prior):
            raise ValueError("topic_feature_prior must be None or a float (one value for every topic and feature)")
        if self.dispersion <= 0:
            raise ValueError(f"dispersion (NB size r) must be > 0, got {self.dispersion}")
        if self.topic_feature_prior_type not in TOPIC_FEATURE_PRIORS:
            raise ValueError(
                f"topic_feature_prior_type {self.topic_feature_prior_type!r}: use one of {TOPIC_FEATURE_PRIORS}"
            )
        if int(self.n_batches) != self.n_batches or self.n_batches < 0:
            raise ValueError(f"n_batches must be an integer >= 0 (0 = no batch covariate), got {self.n_batches}")
        object.__setattr__(self, "n_batches", int(self.n_batches))
        if self.encode_covariates and self.n_batches < 2 and self.n_continuous_covariates == 0:
            raise ValueError(
                "encode_covariates=True needs a categorical covariate with >= 2 categories (n_batches >= 2) "
                f"or continuous covariates (n_continuous_covariates >= 1); got n_batches={self.n_batches}"
            )
        if int(self.n_continuous_covariates) != self.n_continuous_covariates or self.n_continuous_covariates < 0:
            raise ValueError(f"n_continuous_covariates must be an integer >= 0, got {self.n_continuous_covariates}")
        object.__setattr__(self, "n_continuous_covariates", int(self.n_continuous_covariates))
        if self.spatial_mode not in SPATIAL_MODES:
            raise ValueError(f"spatial_mode {self.spatial_mode!r}: use None, 'sgc' or 'gcn'")
        if int(self.sgc_n_layers) != self.sgc_n_layers or self.sgc_n_layers < 1:
            raise ValueError(f"sgc_n_layers must be an integer >= 1, got {self.sgc_n_layers}")
        object.__setattr__(self, "sgc_n_layers", int(self.sgc_n_layers))
        if not 0.0 < self.gcn_alpha_init < 1.0:
            raise ValueError(f"gcn_alpha_init must be in (0, 1) (the self-path weight), got {self.gcn_alpha_init}")
        self._check_gcn()
        cell_topic_alpha(self)  # validates cell_topic_prior

    def _check_gcn(self):
        if isinstance(self.gcn_n_layers, bool) or int(self.gcn_n_layers) != self.gcn_n_layers or self.gcn_n_layers < 1:
            raise ValueError(f"gcn_n_layers must be an integer >= 1, got {self.gcn_n_layers}")
        object.__setattr__(self, "gcn_n_layers", int(self.gcn_n_layers))
        if self.gcn_conv_type not in GCN_CONV_TYPES:
            raise ValueError(f"gcn_conv_type {self.gcn_conv_type!r}: use 'gcn' or 'gatv2' (or 'GCNConv' / 'GATv2Conv')")
        object.__setattr__(self, "gcn_conv_type", GCN_CONV_TYPES[self.gcn_conv_type])
        if int(self.gcn_heads) != self.gcn_heads or self.gcn_heads < 1:
            raise ValueError(f"gcn_heads must be an integer >= 1, got {self.gcn_heads}")
        object.__setattr__(self, "gcn_heads", int(self.gcn_heads))
        if self.gcn_conv_type == "gatv2" and self.n_hidden % self.gcn_heads:
            raise ValueError(f"gcn_conv_type='gatv2' concatenates gcn_heads={self.gcn_heads} heads into n_hidden="
                             f"{self.n_hidden} units: choose n_hidden divisible by gcn_heads")
        if self.gcn_sampling not in GCN_SAMPLING:
            raise ValueError(f"gcn_sampling {self.gcn_sampling!r}: use 'exact' (L-hop neighbourhoods) or 'approx' "
                             "(neighbour sampling with gcn_fan_out)")
        if self.gcn_sampling == "approx" or self.gcn_fan_out is not None:
            object.__setattr__(self, "gcn_fan_out", check_fan_out(self.gcn_fan_out, self.gcn_n_layers))

    @property
    def n_modalities(self) -> int:
        return len(self.modalities)

    def likelihood(self, m: str) -> str:
        return self.likelihoods[self.modalities.index(m)]

    def n_feat(self, m: str) -> int:
        return self.n_features[self.modalities.index(m)]

    def has_background(self, m: str) -> bool:
        """Background only for ``"gamma_poisson"`` with ``use_feature_background`` (§1.4)."""
        return self.use_feature_background and self.likelihood(m) == "gamma_poisson"

    def learns_background(self, m: str) -> bool:
        return self.has_background(m) and self.learnable_bg

    def learns_dispersion(self, m: str) -> bool:
        return self.learnable_dispersion and self.likelihood(m) in ("gamma_poisson", "nb")

    def dispersion_shape(self, m: str) -> tuple[int]:
        return (1,) if self.global_dispersion else (self.n_feat(m),)

    @property
    def horseshoe(self) -> bool:
        """True for ``topic_feature_prior_type="horseshoe"`` (§1.3b)."""
        return self.topic_feature_prior_type == "horseshoe"

    @property
    def batch_offsets(self) -> bool:
        """True when the decoder has per-batch feature offsets (§1.5)."""
        return self.decoder_batch_offsets and self.n_batches >= 1

    @property
    def needs_batch(self) -> bool:
        """True when per-cell batch codes must be supplied (decoder offsets or one-hot encoder input)."""
        return self.batch_offsets or (self.encode_covariates and self.n_batches >= 2)

    @property
    def n_onehot(self) -> int:
        """Width of the one-hot batch block of the encoder input (0 when not encoded)."""
        return self.n_batches if (self.encode_covariates and self.n_batches >= 2) else 0

    @property
    def n_cont_encoded(self) -> int:
        """Width of the continuous-covariate block of the encoder input."""
        return self.n_continuous_covariates if self.encode_covariates else 0

    @property
    def regularizer_factor(self) -> float:
        """+1 for the reference sign (penalty), -1 for the documented sign (bonus), §3.3."""
        return 1.0 if self.regularizer_sign == "reference" else -1.0


def logistic_normal_approximation(alpha) -> tuple[np.ndarray, np.ndarray]:
    """Laplace approximation of a Dirichlet in the softmax basis (§1.1).

    .. math::
        \\mu_d = \\log\\alpha_d - \\tfrac1D\\sum_j\\log\\alpha_j,\\qquad
        \\sigma_d^2 = \\frac{1-2/D}{\\alpha_d} + \\frac1{D^2}\\sum_j\\frac1{\\alpha_j}

    Returns ``(mu, sigma)`` (standard deviations).

    Examples
    --------
    >>> mu, sigma = logistic_normal_approximation([0.1] * 10)
    >>> round(float(abs(mu).max()), 12), round(float(sigma[0] ** 2), 6)
    (0.0, 9.0)
    """
    a = np.asarray(alpha, dtype=np.float64)
    if a.ndim != 1 or a.size < 2 or not np.all(a > 0):
        raise ValueError("logistic_normal_approximation: alpha must be a vector of >= 2 positive values")
    D = a.size
    mu = np.log(a) - np.log(a).mean()
    var = (1.0 - 2.0 / D) / a + (1.0 / a).sum() / D**2
    return mu, np.sqrt(var)


def cell_topic_alpha(cfg: TopicModelConfig) -> np.ndarray:
    """Dirichlet concentration of :math:`\\theta_n` (§1.2): ``None`` -> 1/K, float -> constant, sequence -> as is."""
    K = cfg.n_topics
    p = cfg.cell_topic_prior
    if p is None:
        return np.full(K, 1.0 / K)
    if np.isscalar(p):
        a = np.full(K, float(p))
    else:
        a = np.asarray(p, dtype=np.float64)
        if a.shape != (K,):
            raise ValueError(f"cell_topic_prior has length {a.size}; it must have n_topics={K} entries")
    if not np.all(a > 0):
        raise ValueError("cell_topic_prior must be > 0")
    return a


def cell_topic_prior(cfg: TopicModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """Prior mean and standard deviation :math:`(\\mu_\\theta, \\sigma_\\theta)` of :math:`z_n` (§1.2).

    Examples
    --------
    >>> cfg = TopicModelConfig(("rna",), (50,), ("multinomial",), n_topics=10)
    >>> mu, sd = cell_topic_prior(cfg)
    >>> round(float(sd[0]), 6)
    3.0
    """
    return logistic_normal_approximation(cell_topic_alpha(cfg))


def topic_feature_prior_sigma(cfg: TopicModelConfig, m: str) -> float:
    """Prior standard deviation :math:`\\sigma^\\phi_m = \\sqrt{(1-1/F_m)/a}` of the logits :math:`Z_{mk}` (§1.3a).

    Examples
    --------
    >>> cfg = TopicModelConfig(("rna",), (100,), ("multinomial",), n_topics=4)
    >>> round(topic_feature_prior_sigma(cfg, "rna") ** 2, 6)
    3.96
    """
    a = 1.0 / cfg.n_topics if cfg.topic_feature_prior is None else float(cfg.topic_feature_prior)
    if a <= 0:
        raise ValueError("topic_feature_prior must be > 0")
    F = cfg.n_feat(m)
    return math.sqrt(max(1.0 - 1.0 / F, 0.0) / a) if F > 1 else math.sqrt(1.0 / a)


def likelihood_weights(cfg: TopicModelConfig) -> dict[str, float]:
    """Per-modality likelihood weights :math:`w_m` (§1.8).

    ``F_ref`` is the mean, the *lower* median (torch convention) or the max of the :math:`F_m`.

    Examples
    --------
    >>> cfg = TopicModelConfig(("a", "b"), (100, 400), ("multinomial",) * 2, n_topics=3,
    ...                        likelihood_weight_mode="inverse_features", likelihood_weight_ref="median")
    >>> likelihood_weights(cfg)
    {'a': 1.0, 'b': 0.25}
    """
    F = np.asarray(cfg.n_features, dtype=np.float64)
    if cfg.likelihood_weight_ref == "mean":
        ref = F.mean()
    elif cfg.likelihood_weight_ref == "median":
        ref = np.sort(F)[(F.size - 1) // 2]
    else:
        ref = F.max()
    if cfg.likelihood_weight_mode == "none":
        w = np.ones_like(F)
    elif cfg.likelihood_weight_mode == "inverse_features":
        w = ref / F
    else:
        w = np.sqrt(ref / F)
    return {m: float(v) for m, v in zip(cfg.modalities, w)}


def kl_weight_schedule(
    epoch: int,
    schedule: str = "scvi400",
    *,
    max_epochs: int | None = None,
    kl_weight: float = 1.0,
    n_epochs_kl_warmup: int = 400,
    min_kl_weight: float = 1e-6,
    warmup_fraction: float = 0.25,
    warmup_min: float = 0.01,
) -> float:
    """KL weight :math:`\\beta_t` used in the training loss at a given (0-based) epoch (§3.4).

    ``"scvi400"`` (what the reference actually trains with):
    :math:`\\beta = \\min(\\text{kl\\_weight},\\ m + (\\text{kl\\_weight} - m)\\,e/E_w)` with
    :math:`m` = ``min_kl_weight`` (1e-6) and :math:`E_w` = ``n_epochs_kl_warmup`` (400);
    with the default ``kl_weight=1`` this is scvi's ``min(1, 1e-6 + (1-1e-6) e/400)``.

    ``"documented"`` (topomics' own warm-up): linear from ``warmup_min`` (0.01) to ``kl_weight`` over
    the first :math:`\\lfloor` ``warmup_fraction`` :math:`\\cdot` ``max_epochs`` :math:`\\rfloor` epochs, then constant.

    ``"constant"``: ``kl_weight`` at every epoch.

    Examples
    --------
    >>> kl_weight_schedule(100)
    0.25000075
    >>> kl_weight_schedule(10, "documented", max_epochs=80)
    0.505
    >>> kl_weight_schedule(3, "constant", kl_weight=0.5)
    0.5
    """
    if epoch < 0:
        raise ValueError(f"kl_weight_schedule: epoch must be >= 0, got {epoch}")
    if schedule == "scvi400":
        if n_epochs_kl_warmup <= 0:
            return float(kl_weight)
        return float(min(kl_weight, min_kl_weight + (kl_weight - min_kl_weight) * epoch / n_epochs_kl_warmup))
    if schedule == "documented":
        if max_epochs is None:
            raise ValueError("kl_weight_schedule('documented') needs max_epochs")
        n_warm = int(math.floor(warmup_fraction * max_epochs))
        if n_warm <= 0 or epoch >= n_warm:
            return float(kl_weight)
        return float(warmup_min + (kl_weight - warmup_min) * epoch / n_warm)
    if schedule == "constant":
        return float(kl_weight)
    raise ValueError(f"kl_weight_schedule: unknown schedule {schedule!r}; use 'scvi400', 'documented' or 'constant'")
