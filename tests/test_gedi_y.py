"""Single-modality GEDI with obs type "Y" (spec §1.2: Y is given, never updated; §2.11: V_i = 0).

Checks: (1) σ² after a fit equals the closed form of §2.11 recomputed from the fitted state and the
INPUT matrix (so Y was not updated and no variance term was added); (2) the start from Y = log1p(M)
is bit-identical to the start of obs type "M" on M (whose initial Y is log1p(M), §1.2); (3) a planted
low-rank Y is recovered (metagene subspace and cell embedding); (4) bad input is a clear error.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

import atlasfit


def _maxsin(A, B):
    """Sine of the largest principal angle between the column spans of A and B (0: same span)."""
    qa, _ = np.linalg.qr(A)
    qb, _ = np.linalg.qr(B)
    s = np.linalg.svd(qa.T @ qb, compute_uv=False)
    return float(np.sqrt(max(0.0, 1.0 - s.min() ** 2)))


def planted_Y(seed=0, J=60, I=6, n=40, K=3, noise=0.05):
    """Y_i = (Z0 + Q0_i) B0_i + (o0 + o0_i) 1ᵀ + noise, cells x genes; B0 with unit-norm cell columns x 2
    (the Bsphere model's embedding up to scale)."""
    rng = np.random.default_rng(seed)
    Z = rng.normal(0.0, 1.0, (J, K))
    o = rng.normal(0.0, 1.0, J)
    blocks, Bs = [], []
    for _ in range(I):
        B = rng.normal(size=(K, n))
        B = 2.0 * B / np.linalg.norm(B, axis=0)
        Q = 0.05 * rng.normal(size=(J, K))
        oi = 0.1 * rng.normal(size=J)
        blocks.append(((Z + Q) @ B + (o + oi)[:, None]).T)
        Bs.append(B.T)
    Y = np.vstack(blocks) + noise * rng.normal(size=(I * n, J))
    a = ad.AnnData(Y)
    a.obs["sample"] = np.repeat([f"s{i}" for i in range(I)], n)
    return a, Z, np.vstack(Bs)


def test_gedi_Y_sigma2_closed_form_and_Y_fixed():
    a, _, _ = planted_Y(J=30, I=3, n=30)
    Y = np.asarray(a.X)
    K = 3
    m = atlasfit.GEDI(K=K, obs_type="Y", sample_key="sample").fit(a, max_iterations=4, progress=False)
    loc = m._gather()
    Z, D, o, mod = m.shared_["Z"], m.get_D(), m.shared_["o"], m.modality_
    J, N, I = Z.shape[0], Y.shape[0], len(m.sample_names_)
    total = float((Z * Z).sum())  # ‖Z‖²/S_Z, S_Z = 1 (§1.4)
    for g in m.sample_names_:
        L = loc[g]
        Yi = Y[m.plan_.cells[g]].T  # the INPUT matrix: obs type Y is never updated (§2.10)
        Yhat = (Z + L[f"{mod}/Q"]) @ (D[:, None] * L["B"]) + (o + L[f"{mod}/o_i"])[:, None] + L[f"{mod}/s_i"][None, :]
        # e_i of §2.11 with λ_oi = λ_Qi = 1 (single-modal defaults) and V_i = 0 for Y
        total += float((L[f"{mod}/o_i"] ** 2).sum() + (L[f"{mod}/Q"] ** 2).sum() + ((Yi - Yhat) ** 2).sum())
    dof = J * (N + I) + I * J * K + K * J  # §2.11 with P = L = 0
    assert m.get_sigma2() == pytest.approx(total / dof, rel=1e-10)


def test_gedi_Y_start_equals_counts_start():
    # obs type M starts from Y = log1p(M) (§1.2); the same matrix given as Y starts bit-identically
    rng = np.random.default_rng(1)
    M = rng.poisson(3.0, (90, 25)).astype(np.float64)
    labels = np.repeat(["a", "b", "c"], 30)
    am = ad.AnnData(M)
    am.obs["sample"] = labels
    ay = ad.AnnData(np.log1p(M))
    ay.obs["sample"] = labels
    mm = atlasfit.GEDI(K=3, sample_key="sample").fit(am, max_iterations=0, progress=False)
    my = atlasfit.GEDI(K=3, obs_type="Y", sample_key="sample").fit(ay, max_iterations=0, progress=False)
    assert np.array_equal(mm.shared_["Z"], my.shared_["Z"])
    assert np.array_equal(mm.embedding(), my.embedding())


def test_gedi_Y_recovers_planted_low_rank():
    a, Z0, B0 = planted_Y()
    m = atlasfit.GEDI(K=3, obs_type="Y", sample_key="sample").fit(a, max_iterations=20, progress=False)
    # measured 0.070 / 0.145 (seed 0); random 60 x 3 / 240 x 3 matrices give 0.99998 (maximal angle)
    assert _maxsin(Z0, m.shared_["Z"]) < 0.2
    assert _maxsin(B0, m.embedding()) < 0.25
    assert m.history_["sigma2"].notna().all()


def test_gedi_Y_bad_input_is_a_clear_error():
    a, _, _ = planted_Y(J=10, I=2, n=10)
    a.X[3, 4] = np.nan
    with pytest.raises(ValueError, match=r"obs_type 'Y'.*non-finite.*sample 's0'"):
        atlasfit.GEDI(K=2, obs_type="Y", sample_key="sample").fit(a, max_iterations=1, progress=False)
    with pytest.raises(ValueError, match=r"single-modality.*GEDI\(obs_type='Y'\)"):
        atlasfit.MultiGEDI({"rna": {"obs_type": "Y"}}, sample_key="sample")
    with pytest.raises(ValueError, match="obs_type must be"):
        atlasfit.GEDI(K=2, obs_type="Z")
