"""Differential-expression (spec §7.4) and pathway (§7.5) outputs of a fitted :class:`~atlasfit.GEDI`."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ...engine import gather_by_sample, ordered_sum
from . import _shard as sh
from ._kernels import diff_exp, diff_O, diff_Q


class _GediOutputs:
    """Mixin of :class:`~atlasfit.GEDI`: contrasts of the covariates H and pathway summaries of C."""

    # ------------------------------------------------------------------ differential (§7.4)

    def get_diff_Q(self, contrast) -> pd.DataFrame:
        """Metagene effect of a covariate contrast (spec §7.4): diffQ = [R_1 h_c, …, R_K h_c]
        (genes x K), h_c the contrast vector over H's covariates (no rotation of H, as in the
        reference's fit).

        Examples
        --------
        See :class:`GEDI`.
        """
        hc = self.contrast(contrast)
        return pd.DataFrame(diff_Q(self.shared_["R"], hc), index=self.feature_names_)

    def get_diff_O(self, contrast) -> pd.Series:
        """Offset effect of a contrast (spec §7.4): diffO = R_o h_c (genes): the change of the sample
        gene offset o_i that the contrast predicts."""
        hc = self.contrast(contrast)
        return pd.Series(diff_O(self.shared_["Ro"], hc), index=self.feature_names_)

    def get_diff_exp(self, contrast, include_offset: bool = False) -> np.ndarray:
        """Cell-level differential expression of a contrast (spec §7.4), cells x genes, log scale:
        diffExp = Σ_k (R_k h_c)(D_k B[k, :]) = diffQ · DB, plus diffO in every cell when
        ``include_offset`` (the reference's "full" mode). Rows in the caller's cell order."""
        dQ = self.get_diff_Q(contrast).to_numpy()
        dO = self.get_diff_O(contrast).to_numpy() if include_offset else 0.0
        D = self.get_D()
        loc = self._gather()
        return self._cells({g: (diff_exp(dQ, D[:, None] * loc[g]["B"]) + np.reshape(dO, (-1, 1))).T
                            for g in self.sample_names_})

    def diff_expression(self, contrast, include_offset: bool = True) -> pd.DataFrame:
        """Per-gene differential expression of a contrast (spec §7.4 summarised over cells).

        With d = diffO (if ``include_offset``, else 0), q_j = row j of diffQ and the cell averages
        m = (1/N) Σ_n DB_n, G = (1/N) Σ_n DB_n DB_nᵀ (reduced per sample, no cell gather):

        - ``mean`` = d_j + q_jᵀ m: average log-fold change of gene j over cells;
        - ``rms`` = sqrt(d_j² + 2 d_j q_jᵀ m + q_jᵀ G q_j): root-mean-square over cells of
          d_j + diffExp[j, n], the size of the effect whatever its sign in each cell type;
          rank genes by it for a contrast that acts through the factors.

        Returns
        -------
        pandas.DataFrame
            Genes x (``mean``, ``rms``, ``offset``), sorted by ``rms`` descending.
        """
        dQ = self.get_diff_Q(contrast).to_numpy()
        dO = self.get_diff_O(contrast).to_numpy() if include_offset else np.zeros(len(dQ))
        m, G = self._db_means()
        qm = dQ @ m
        ms = dO * dO + 2.0 * dO * qm + np.einsum("jk,kl,jl->j", dQ, G, dQ)
        df = pd.DataFrame({"mean": dO + qm, "rms": np.sqrt(np.clip(ms, 0.0, None)), "offset": dO},
                          index=self.feature_names_)
        return df.sort_values("rms", ascending=False, kind="stable")

    def _db_means(self):
        """m = (1/N) Σ_n DB_n and G = (1/N) Σ_n DB_n DB_nᵀ, reduced per sample in global order."""
        D = self.get_D()
        order = self.sample_names_
        N = self.plan_.N(self.modality_)
        if self._engine is not None:
            res = gather_by_sample(self._engine.map(sh.db_moments, D))
            stats = [res[g][0] for g in order]
        else:  # a loaded model: from the saved per-sample state
            loc = self._gather()
            stats = []
            for g in order:
                DB = D[:, None] * loc[g]["B"]
                stats.append((DB.sum(axis=1), DB @ DB.T))
        return ordered_sum([s[0] for s in stats]) / N, ordered_sum([s[1] for s in stats]) / N

    # ------------------------------------------------------------------ pathways (§7.5)

    def pathway_associations(self) -> pd.DataFrame:
        """Gene-pathway associations (spec §7.5): Z Aᵀ (genes x pathways): gene j's metagene
        projected on pathway p's factor signature A[p, :]."""
        self._need_C("pathway_associations")
        return pd.DataFrame(self.shared_["Z"] @ self.shared_["A"].T, index=self.feature_names_,
                            columns=self.pathway_names_)

    def top_pathway_genes(self, pathway: str, n: int = 20) -> list[str]:
        """The ``n`` genes with the largest absolute association with ``pathway`` (spec §7.5)."""
        assoc = self.pathway_associations()
        if pathway not in assoc.columns:
            raise KeyError(f"GEDI: unknown pathway {pathway!r}; pathways: {list(assoc.columns)[:10]}...")
        col = assoc[pathway].abs().to_numpy()
        idx = np.argsort(-col, kind="stable")[:n]
        return [str(g) for g in assoc.index[idx]]

    def pathway_scores(self) -> pd.DataFrame:
        """Per-cell pathway activity (spec §7.2/§7.5): ADB = A diag(D) B (C used unrotated, so
        C_rot = I), cells x pathways, rows in the caller's cell order."""
        self._need_C("pathway_scores")
        A, D = self.shared_["A"], self.get_D()
        loc = self._gather()
        scores = self._cells({g: (A @ (D[:, None] * loc[g]["B"])).T for g in self.sample_names_})
        return pd.DataFrame(scores, columns=self.pathway_names_)

    def pathway_gradient(self, pathway: str) -> np.ndarray:
        """Direction of ``pathway`` in the embedding (spec §7.5): A[p, :] ∘ D (K), the same for every
        cell."""
        A = self.get_A()
        if pathway not in A.index:
            raise KeyError(f"GEDI: unknown pathway {pathway!r}")
        return A.loc[pathway].to_numpy() * self.get_D()
