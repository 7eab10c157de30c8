"""A planted multimodal topic atlas (RNA counts + binary peaks) with known topics, and the scores used
to compare a fitted topic model with it (matched topic correlation, per-token log-likelihood).

Used by the topic-model tutorial, benchmarks and acceptance test.

Generative model (issue 4, "Acceptance"), drawn with NumPy only:

* ``K`` topics; per-modality topic-feature distributions :math:`\\phi_{mk}\\sim\\mathrm{Dir}(0.05)`.
* 4 samples. Sample :math:`s` has its own cell-topic concentration
  :math:`\\alpha_{sk} = 0.1\\,K\\,\\mathrm{softmax}(0.3\\,g_{s})_k` (mean concentration 0.1, so
  :math:`\\theta_n\\sim\\mathrm{Dir}(\\alpha_s)` is :math:`\\mathrm{Dir}(0.1)` up to a small tilt of the topic
  abundances) and a small feature shift: :math:`\\phi^{(s)}_{mk}\\propto\\phi_{mk}\\,e^{0.1\\,\\epsilon_{smf}}`
  (:math:`g,\\epsilon\\sim\\mathcal N(0,1)`). These are the "small shifts" between samples; the model
  is fitted without sample covariates.
* RNA (counts): library :math:`\\ell_n\\sim\\mathrm{LogNormal}(\\log 2000, 0.5)` (rounded, >= 1),
  :math:`x_n\\sim\\mathrm{Multinomial}(\\ell_n, \\theta_n\\phi^{(s)}_{\\rm rna})`.
* Peaks (binary): peak depth model = binarised Poisson fragments. Fragments per cell
  :math:`d_n\\sim\\mathrm{LogNormal}(\\log 200, 0.5)`, fragment counts
  :math:`c_{nf}\\sim\\mathrm{Poisson}(d_n(\\theta_n\\phi^{(s)}_{\\rm atac})_f)` and :math:`x_{nf}=1[c_{nf}>0]`,
  i.e. :math:`P(x_{nf}=1) = 1-\\exp(-d_n\\rho_{nf})` (an open peak is one with at least one fragment,
  as in binarised ATAC).

Held-out cells are drawn from the same model (same samples) with a different stream.

The peak depth is deliberately modest (about 165 open peaks of 5,000 per cell): with deeper cells the
strongest peaks of a topic are open in nearly every cell of that topic (saturation), so even the
open-peak frequencies of nearly pure cells correlate < 0.9 with the planted :math:`\\phi` (measured:
0.92 / 0.89 / 0.82 mean matched correlation at a median of 150 / 300 / 600 fragments), whatever the
fitted model. ``atac_ceiling`` in the results is that empirical ceiling for the data actually drawn.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

__all__ = ["PlantedAtlas", "planted_topic_atlas", "matched_correlation", "planted_per_token_ll",
           "per_token_ll_sparse", "atac_ceiling"]


@dataclass
class PlantedAtlas:
    """Training and held-out matrices plus the planted parameters."""

    x_train: dict  # modality -> CSR (n_train, F_m), float64
    x_test: dict
    sample_train: np.ndarray
    sample_test: np.ndarray
    theta_train: np.ndarray  # (n_train, K)
    theta_test: np.ndarray
    phi: dict  # modality -> (K, F_m), the planted phi (before sample shifts)
    phi_sample: dict  # modality -> (S, K, F_m), per-sample shifted phi

    def to_mudata(self, split: str = "train"):
        """The ``"train"`` or ``"test"`` cells as a MuData: one AnnData per modality (CSR counts /
        0-1 peaks, features ``<modality>_<j>``), cells ``cell_<i>`` (test: ``test_<i>``), ``obs["sample"]``
        (``s0``, ``s1``, ...) and ``obs["top_topic"]`` (the planted topic with the largest share), and
        the planted proportions in ``obsm["theta"]`` of every modality.

        Examples
        --------
        >>> a = planted_topic_atlas(60, 20, n_genes=15, n_peaks=25, n_topics=3)
        >>> m = a.to_mudata()
        >>> m.n_obs, m["atac"].shape, m.obs["sample"].iloc[0][:1]
        (60, (60, 25), 's')
        """
        import anndata as ad
        import mudata as md
        import pandas as pd

        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        X = self.x_train if split == "train" else self.x_test
        sample = self.sample_train if split == "train" else self.sample_test
        theta = self.theta_train if split == "train" else self.theta_test
        prefix = "cell" if split == "train" else "test"
        obs = pd.DataFrame(
            {"sample": pd.Categorical([f"s{int(s)}" for s in sample]),
             "top_topic": pd.Categorical([f"topic_{int(k)}" for k in theta.argmax(axis=1)])},
            index=[f"{prefix}_{i}" for i in range(len(sample))],
        )
        mods = {}
        for m, Xm in X.items():
            var = pd.DataFrame(index=[f"{m}_{j}" for j in range(Xm.shape[1])])
            mods[m] = ad.AnnData(sp.csr_matrix(Xm, dtype=np.float32), obs=obs.copy(), var=var,
                                 obsm={"theta": theta})
        from ..io._mudata import mudata_options

        with mudata_options():  # no pull_on_update FutureWarning
            mdata = md.MuData(mods)
        mdata.obs["sample"] = obs["sample"]
        mdata.obs["top_topic"] = obs["top_topic"]
        return mdata


def _draw_cells(rng, n, alpha_s, phi_s, n_genes_lib, frag_mu, modalities, kinds, chunk=2000):
    S = alpha_s.shape[0]
    sample = rng.integers(0, S, size=n)
    K = alpha_s.shape[1]
    theta = np.empty((n, K))
    for s in range(S):
        idx = np.flatnonzero(sample == s)
        theta[idx] = rng.dirichlet(alpha_s[s], size=idx.size)
    out = {}
    for m, kind in zip(modalities, kinds):
        blocks = []
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            rho = np.empty((hi - lo, phi_s[m].shape[2]))
            for s in range(S):
                j = np.flatnonzero(sample[lo:hi] == s)
                rho[j] = theta[lo + j] @ phi_s[m][s]
            rho /= rho.sum(axis=1, keepdims=True)
            if kind == "counts":
                lib = np.maximum(np.rint(rng.lognormal(np.log(n_genes_lib), 0.5, size=hi - lo)), 1).astype(np.int64)
                X = np.vstack([rng.multinomial(lib[i], rho[i]) for i in range(hi - lo)]).astype(np.float64)
            else:
                d = rng.lognormal(np.log(frag_mu), 0.5, size=hi - lo)
                X = (rng.poisson(d[:, None] * rho) > 0).astype(np.float64)
            blocks.append(sp.csr_matrix(X))
        out[m] = sp.vstack(blocks, format="csr")
    return out, sample, theta


def planted_topic_atlas(
    n_train: int = 20_000,
    n_test: int = 2_000,
    *,
    n_genes: int = 2_000,
    n_peaks: int = 5_000,
    n_topics: int = 10,
    n_samples: int = 4,
    theta_alpha: float = 0.1,
    phi_alpha: float = 0.05,
    lib_median: float = 2000.0,
    frag_median: float = 200.0,
    seed: int = 0,
) -> PlantedAtlas:
    """Draw the planted atlas described in the module docstring.

    ``n_peaks=0`` gives an RNA-only atlas (the scvi-tools comparison).

    Examples
    --------
    >>> a = planted_topic_atlas(200, 50, n_genes=30, n_peaks=40, n_topics=3)
    >>> a.x_train["rna"].shape, a.x_test["atac"].shape, a.phi["rna"].shape
    ((200, 30), (50, 40), (3, 30))
    """
    modalities, kinds, phi, phi_s, alpha_s = _planted_params(n_genes, n_peaks, n_topics, n_samples,
                                                             theta_alpha, phi_alpha, seed)
    r_tr = np.random.default_rng(np.random.SeedSequence([seed, 5]))
    r_te = np.random.default_rng(np.random.SeedSequence([seed, 6]))
    xtr, str_, thtr = _draw_cells(r_tr, n_train, alpha_s, phi_s, lib_median, frag_median, modalities, kinds)
    xte, ste, thte = _draw_cells(r_te, n_test, alpha_s, phi_s, lib_median, frag_median, modalities, kinds)
    return PlantedAtlas(xtr, xte, str_, ste, thtr, thte, phi, phi_s)


def _planted_params(n_genes, n_peaks, n_topics, n_samples, theta_alpha, phi_alpha, seed):
    """The planted parameters of :func:`planted_topic_atlas` (drawn from the key ``(seed, 4)``):
    ``(modalities, kinds, phi, phi_sample, alpha_sample)``."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 4]))
    K, S = n_topics, n_samples
    modalities, kinds, sizes = ["rna"], ["counts"], [n_genes]
    if n_peaks > 0:
        modalities.append("atac")
        kinds.append("binary")
        sizes.append(n_peaks)
    phi, phi_s = {}, {}
    for m, F in zip(modalities, sizes):
        ph = rng.dirichlet(np.full(F, phi_alpha), size=K)
        ph = np.maximum(ph, 1e-300)
        ph /= ph.sum(axis=1, keepdims=True)
        phi[m] = ph
        shift = np.exp(0.1 * rng.standard_normal((S, 1, F)))
        pss = ph[None] * shift
        phi_s[m] = pss / pss.sum(axis=2, keepdims=True)
    g = rng.standard_normal((S, K))
    alpha_s = theta_alpha * K * np.exp(0.3 * g) / np.exp(0.3 * g).sum(axis=1, keepdims=True)
    return modalities, kinds, phi, phi_s, alpha_s


def planted_per_token_ll(atlas: PlantedAtlas, modality: str) -> float:
    """Held-out per-token log-likelihood under the planted parameters (true :math:`\\theta_n` and the
    cell's sample-shifted :math:`\\phi`), the same formula as
    :func:`atlasfit.models.topic.per_token_log_likelihood`."""
    X = atlas.x_test[modality].tocsr()
    num = 0.0
    for s in np.unique(atlas.sample_test):
        idx = np.flatnonzero(atlas.sample_test == s)
        rho = atlas.theta_test[idx] @ atlas.phi_sample[modality][s]
        Xs = X[idx].tocoo()
        num += float((Xs.data * np.log(np.clip(rho[Xs.row, Xs.col], 1e-300, None))).sum())
    return num / float(X.sum())


def per_token_ll_sparse(theta, phi, X) -> float:
    """:math:`\\sum_{nf}x_{nf}\\log(\\theta_n\\phi)_f/\\sum x` evaluated on the nonzeros of sparse ``X``
    only (same value as :func:`atlasfit.models.topic.per_token_log_likelihood`, no dense copy)."""
    X = sp.csr_matrix(X).tocoo()
    theta = np.asarray(theta, dtype=np.float64)
    phi = np.asarray(phi, dtype=np.float64)
    rho = np.einsum("ik,ki->i", theta[X.row], phi[:, X.col])
    return float((X.data * np.log(np.clip(rho, 1e-300, None))).sum() / X.data.sum())


def matched_correlation(phi_hat, phi_true):
    """Hungarian matching of learned to planted topics on the Pearson correlation of their feature
    distributions; returns ``(matched correlations in planted-topic order, assignment)``."""
    from scipy.optimize import linear_sum_assignment

    K = phi_true.shape[0]
    Kh = phi_hat.shape[0]
    C = np.corrcoef(np.vstack([phi_true, phi_hat]))[:K, K:K + Kh]
    r, c = linear_sum_assignment(-C)
    return C[r, c], c


def atac_ceiling(atlas: PlantedAtlas, modality: str = "atac", purity: float = 0.9) -> float:
    """Mean matched correlation of the open-peak frequency among nearly pure training cells
    (:math:`\\max_k\\theta_{nk} > 0.9`) with the planted :math:`\\phi`: what binarisation leaves
    recoverable. Topics with fewer than 5 such cells are skipped."""
    X = atlas.x_train[modality]
    th = atlas.theta_train
    dom, top = th.argmax(1), th.max(1)
    keep, rows = [], []
    for k in range(th.shape[1]):
        sel = (dom == k) & (top > purity)
        if sel.sum() >= 5:
            keep.append(k)
            rows.append(np.asarray(X[sel].mean(axis=0)).ravel())
    r, _ = matched_correlation(np.vstack(rows), atlas.phi[modality][keep])
    return float(r.mean())


