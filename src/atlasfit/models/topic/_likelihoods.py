"""Per-modality likelihoods of MultimodalAmortizedLDA (spec §1.7), dense and sparse-exact.

Dense forms take (B, F) arrays. The sparse forms take the minibatch as CSR and are exact: the
multinomial needs :math:`\\rho` only at the non-zeros; with the cloglog link the Bernoulli term over
all features is :math:`\\sum_{x=1}\\log(1-e^{-q}) + \\sum_{x=1}q - s_n\\sum_f\\rho_{nf}` and
:math:`\\sum_f\\rho_{nf} = \\theta_n\\cdot\\sum_f\\phi_{\\cdot f}`, so a cell costs :math:`O(\\mathrm{nnz}\\cdot K + K)`.
:func:`sparse_likelihood` / :func:`sparse_likelihood_backward` are the per-modality forward and backward
the per-cell passes in ``_loss.py`` call.
"""

from __future__ import annotations

import math

import numpy as np

from ..._xp import get_xp, to_numpy
from ._config import EPS32, TopicModelConfig
from ._nn import softmax, softmax_backward
from ._sparse import csr_like, entry_row_sums, row_ids, row_sums, sddmm, xp_of
from ._special import digamma, gammaln

_LOG_2PI = math.log(2.0 * math.pi)
_MU_FLOOR = 1e-8


def _expm1_cap(dtype) -> float:
    """Largest argument of ``expm1`` used for :math:`1/(e^q-1)` in the cloglog gradient: 90% of the log
    of the dtype's largest number (79.9 in float32, 638.9 in float64), so float32 does not overflow;
    beyond it the factor is below 2e-35 (float32) and adds nothing next to the 1 it is summed with."""
    return 0.9 * math.log(float(np.finfo(dtype).max))


def loglik_multinomial(x, rho):
    """Multinomial without coefficient (§1.7): :math:`\\sum_f\\tilde x_f\\log\\mathrm{clip}(\\rho_f,\\varepsilon_{32},1-\\varepsilon_{32})`.

    Returns ``(log p per cell, d log p / d rho)``. The reference's renormalisation
    :math:`\\rho/\\sum_f\\rho` is the identity on the simplex and leaves parameter gradients unchanged
    (its Jacobian only removes a per-cell constant, which the softmaxes annihilate), so it is omitted.

    Examples
    --------
    >>> import numpy as np
    >>> lp, g = loglik_multinomial(np.array([[2.0, 0.0]]), np.array([[0.5, 0.5]]))
    >>> round(float(lp[0]), 6), g.tolist()
    (-1.386294, [[4.0, 0.0]])
    """
    xp = get_xp(x, rho)
    xt = xp.round(xp.maximum(x, 0.0))
    rc = xp.clip(rho, EPS32, 1.0 - EPS32)
    ok = ((rho > EPS32) & (rho < 1.0 - EPS32)).astype(rho.dtype)
    return (xt * xp.log(rc)).sum(axis=1), xt / rc * ok


def loglik_nb_fixed(x, rho, lib, r):
    """NB with fixed size :math:`r` (§1.7): :math:`\\mu = \\max(\\ell\\rho, 10^{-8})`, :math:`p = \\mathrm{clip}(\\mu/(\\mu+r))`,

    .. math:: \\log p(\\tilde x) = \\log\\Gamma(\\tilde x+r) - \\log\\Gamma(r) - \\log\\Gamma(\\tilde x+1) + r\\log(1-p) + \\tilde x\\log p

    Returns ``(log p per cell, d log p / d rho)``.

    Examples
    --------
    >>> import numpy as np
    >>> lp, g = loglik_nb_fixed(np.array([[1.0]]), np.array([[1.0]]), np.array([1.0]), 1.0)
    >>> round(float(lp[0]), 6)
    -1.386294
    """
    xp = get_xp(x, rho)
    xt = xp.round(xp.maximum(x, 0.0))
    mu_raw = lib[:, None] * rho
    mu = xp.maximum(mu_raw, _MU_FLOOR)
    p = mu / (mu + r)
    pc = xp.clip(p, EPS32, 1.0 - EPS32)
    ok = ((p > EPS32) & (p < 1.0 - EPS32) & (mu_raw > _MU_FLOOR)).astype(rho.dtype)
    lp = gammaln(xt + r) - gammaln(xp.asarray(r, dtype=rho.dtype)) - gammaln(xt + 1.0) + r * xp.log1p(-pc) + xt * xp.log(pc)
    dp = xt / pc - r / (1.0 - pc)
    return lp.sum(axis=1), dp * ok * (r / (mu + r) ** 2) * lib[:, None]


def loglik_nb_learned(x, rho, lib, d):
    """Gamma-Poisson with size :math:`a = 1/(d^2+10^{-8})` and mean :math:`\\mu=\\max(\\ell\\rho,10^{-8})` (§1.7):

    .. math:: \\log p = \\log\\Gamma(\\tilde x+a) - \\log\\Gamma(a) - \\log\\Gamma(\\tilde x+1)
              + a\\log\\frac a{a+\\mu} + \\tilde x\\log\\frac\\mu{a+\\mu}

    Returns ``(log p per cell, d log p/d rho, d log p/d d)`` with the last summed over cells (and over
    features when ``d`` has shape (1,)), using :math:`\\partial a/\\partial d = -2d/(d^2+10^{-8})^2` (§3.7).
    """
    xp = get_xp(x, rho)
    xt = xp.round(xp.maximum(x, 0.0))
    mu_raw = lib[:, None] * rho
    mu = xp.maximum(mu_raw, _MU_FLOOR)
    den = d * d + 1e-8
    a = 1.0 / den
    lam = xp.log(a + mu)
    lp = gammaln(xt + a) - gammaln(a) - gammaln(xt + 1.0) + a * (xp.log(a) - lam) + xt * (xp.log(mu) - lam)
    dmu = xt / mu - (a + xt) / (a + mu)
    da = digamma(xt + a) - digamma(a) + xp.log(a) + 1.0 - lam - (a + xt) / (a + mu)
    da_sum = da.sum(axis=0)
    if d.shape[0] == 1:
        da_sum = da_sum.sum(keepdims=True)
    dd = da_sum * (-2.0 * d / (den * den))
    return lp.sum(axis=1), dmu * (mu_raw > _MU_FLOOR).astype(rho.dtype) * lib[:, None], dd


def loglik_bernoulli(x, rho, scale, link: str = "clip"):
    """Bernoulli (§1.7) with :math:`q_{nf}=\\rho_{nf}s_n`,
    :math:`\\log p = \\sum_f\\tilde x\\log p + (1-\\tilde x)\\log(1-p)`, :math:`\\tilde x=\\mathrm{round}(\\mathrm{clip}(x,0,1))`.

    ``link="clip"`` (the reference): :math:`p=\\mathrm{clip}(\\min(q,1),\\varepsilon_{32},1-\\varepsilon_{32})`;
    the gradient is zero wherever :math:`q` leaves :math:`(\\varepsilon_{32}, 1-\\varepsilon_{32})`, so a
    topic whose features saturate (:math:`q\\ge1`) gets no signal to come back.
    ``link="cloglog"``: :math:`p = 1-e^{-q}` (a feature is open when a Poisson(:math:`q`) count is
    positive, the binarised-count model), smooth for every :math:`q>0`:
    :math:`\\partial\\log p/\\partial q = \\tilde x/(e^q-1) - (1-\\tilde x)`. For small :math:`q` both agree.

    ``scale`` is :math:`s_n` (:math:`\\ell_n` for ``bernoulli_scaling="depth"``,
    :math:`\\ell_n/\\bar\\ell` for ``"reference"``). Returns ``(log p per cell, d log p / d rho)``.
    """
    xp = get_xp(x, rho)
    xt = xp.round(xp.clip(x, 0.0, 1.0))
    q = rho * scale[:, None]
    if link == "cloglog":
        ok = (q > EPS32).astype(rho.dtype)
        qc = xp.maximum(q, EPS32)
        lp = (xt * xp.log(-xp.expm1(-qc)) - (1.0 - xt) * qc).sum(axis=1)
        em = xp.expm1(xp.minimum(qc, _expm1_cap(qc.dtype)))  # no overflow in float32 (q > 88)
        return lp, (xt / em - (1.0 - xt)) * ok * scale[:, None]
    if link != "clip":
        raise ValueError(f"bernoulli link {link!r}: use 'clip' or 'cloglog'")
    pm = xp.minimum(q, 1.0)
    pc = xp.clip(pm, EPS32, 1.0 - EPS32)
    ok = ((q > EPS32) & (q < 1.0 - EPS32)).astype(rho.dtype)
    lp = (xt * xp.log(pc) + (1.0 - xt) * xp.log1p(-pc)).sum(axis=1)
    return lp, (xt / pc - (1.0 - xt) / (1.0 - pc)) * ok * scale[:, None]


def sparse_kernel_ok(cfg: TopicModelConfig, m: str) -> bool:
    """Whether modality ``m`` has sparse-exact kernels (a CSR minibatch stays sparse): the
    multinomial and the ``"cloglog"`` Bernoulli likelihoods, with or without a spatial encoder (the
    SGC and GCN encoder inputs and the graph branch read CSR rows too). The other likelihoods (NB,
    Gaussian, the reference ``"clip"`` Bernoulli) densify that modality's minibatch rows.

    Examples
    --------
    >>> cfg = TopicModelConfig(("rna", "atac"), (5, 6), ("multinomial", "gamma_poisson"), n_topics=2)
    >>> sparse_kernel_ok(cfg, "rna"), sparse_kernel_ok(cfg, "atac")
    (True, False)
    """
    lik = cfg.likelihood(m)
    return lik == "multinomial" or (lik == "bernoulli" and cfg.bernoulli_link == "cloglog")


def loglik_multinomial_sparse(X, rho):
    """:func:`loglik_multinomial` on a CSR minibatch ``X`` (B, F) with ``rho`` given only at its
    stored entries (:func:`~._sparse.sddmm`): a zero count contributes :math:`0\\cdot\\log\\rho = 0`, so

    .. math:: \\log p_n = \\sum_{f:\\,x_{nf}\\neq0}\\tilde x_{nf}\\log\\mathrm{clip}(\\rho_{nf}),\\qquad
              \\partial\\log p_n/\\partial\\rho_{nf} = \\tilde x_{nf}/\\mathrm{clip}(\\rho_{nf})\\ \\text{(0 elsewhere)}

    :math:`O(\\mathrm{nnz})`. Returns ``(log p per cell, gradient at the stored entries)``.

    Examples
    --------
    >>> import numpy as np, scipy.sparse as sp
    >>> lp, g = loglik_multinomial_sparse(sp.csr_matrix(np.array([[2.0, 0.0]])), np.array([0.5]))
    >>> round(float(lp[0]), 6), g.tolist()
    (-1.386294, [4.0])
    """
    xp = xp_of(X)
    xt = xp.round(xp.maximum(X.data, 0.0))
    rc = xp.clip(rho, EPS32, 1.0 - EPS32)
    ok = ((rho > EPS32) & (rho < 1.0 - EPS32)).astype(rho.dtype)
    return entry_row_sums(X, xt * xp.log(rc)), xt / rc * ok


def loglik_bernoulli_sparse(X, rho, scale, rho_rowsum, rows=None):
    """Complementary log-log Bernoulli (:func:`loglik_bernoulli` with ``link="cloglog"``) on a CSR
    minibatch ``X`` (B, F), :math:`O(\\mathrm{nnz})`.

    With :math:`q_{nf} = s_n\\rho_{nf}` and :math:`\\log(1-p_{nf}) = -q_{nf}`, the sum over the zeros is
    the sum over all features minus the sum over the ones:

    .. math:: \\log p_n = \\sum_{f:\\,\\tilde x_{nf}=1}\\big[\\log(1-e^{-\\max(q_{nf},\\varepsilon_{32})}) + q_{nf}\\big]
              - s_n\\sum_f\\rho_{nf}

    where :math:`\\sum_f\\rho_{nf} = \\theta_n\\cdot\\sum_f\\phi_{\\cdot f}` is ``rho_rowsum`` (B,), and
    ``rho`` holds :math:`\\rho` at the stored entries only. The gradient splits into a part at the
    stored entries and a rank-1 part that every feature of cell :math:`n` shares:

    .. math:: \\frac{\\partial\\log p_n}{\\partial\\rho_{nf}} = \\tilde x_{nf}\\,s_n\\Big(\\frac{[q_{nf}>\\varepsilon_{32}]}{e^{q_{nf}}-1} + 1\\Big) - s_n

    Difference from the dense kernel: it clamps :math:`q` at :math:`\\varepsilon_{32}` for the zeros
    too (:math:`-\\max(q,\\varepsilon_{32})`, zero gradient below), while here the zeros use the exact
    :math:`-q`; the two differ only where :math:`q_{nf} < 1.2\\cdot10^{-7}`.

    Returns ``(log p per cell, gradient at the stored entries, rank-1 gradient (B,))``.

    Examples
    --------
    >>> import numpy as np, scipy.sparse as sp
    >>> X = sp.csr_matrix(np.array([[1.0, 0.0]]))
    >>> lp, g, u = loglik_bernoulli_sparse(X, np.array([0.25]), np.array([2.0]), np.array([1.0]))
    >>> bool(np.isclose(lp[0], np.log(1 - np.exp(-0.5)) - 1.5)), u.tolist()
    (True, [-2.0])
    """
    xp = xp_of(X)
    if rows is None:
        rows = row_ids(X)
    xt = xp.round(xp.clip(X.data, 0.0, 1.0))
    se = scale[rows]
    q = rho * se
    ok = (q > EPS32).astype(rho.dtype)
    qc = xp.maximum(q, EPS32)
    em = xp.expm1(xp.minimum(qc, _expm1_cap(qc.dtype)))  # 1/em: 0 to the dtype's precision beyond the cap
    lp = entry_row_sums(X, xt * (xp.log(-xp.expm1(-qc)) + q)) - scale * rho_rowsum
    return lp, xt * se * (ok / em + 1.0), -scale


def loglik_gaussian(x, mean, sigma):
    """Gaussian (§1.7): :math:`\\sum_f -\\tfrac12\\log2\\pi - \\log\\varsigma_f - (x_f-\\mu^G_f)^2/(2\\varsigma_f^2)`.

    Returns ``(log p per cell, d/d mean, d/d sigma summed over cells)``.
    """
    r = x - mean
    s2 = sigma * sigma
    xp = get_xp(x, mean)
    lp = (-0.5 * _LOG_2PI - xp.log(sigma) - r * r / (2.0 * s2)).sum(axis=1)
    dsig = (-1.0 / sigma + r * r / (s2 * sigma)).sum(axis=0)
    return lp, r / s2, dsig


# --------------------------------------------------------------------------- sparse per-modality passes


def _bernoulli_scale(cfg: TopicModelConfig, m: str, lib, bern_depth):
    """:math:`s_n`: the depth :math:`\\ell_n` or :math:`\\ell_n/\\bar\\ell` (§1.7)."""
    if cfg.bernoulli_scaling == "depth":
        return lib
    ref = lib.mean() if bern_depth is None else bern_depth[m]
    if not float(ref) > 0:
        raise ValueError(
            f"modality {m!r}: mean depth is 0, so bernoulli_scaling='reference' is undefined; "
            "use bernoulli_scaling='depth' or drop empty cells"
        )
    return lib / ref


def _sparse_likelihood(cfg: TopicModelConfig, m: str, lik: str, X, theta, draws: dict, batch, bern_depth, entry: dict):
    """Sparse-exact likelihood of modality ``m`` for the CSR rows ``X`` (B, F): :math:`\\rho` only at
    the stored entries, :math:`O(\\mathrm{nnz}\\cdot K)` (:func:`~._sparse.sddmm`).

    With decoder batch offsets there are :math:`P` topic-feature matrices :math:`\\phi^{(c)}`, one per
    batch present; they are stacked as a (P F, K) table and each entry's column :math:`f` of a cell
    of batch :math:`c` is read at row :math:`pF + f`. Fills ``entry`` for :func:`backward_cells`
    and returns :math:`\\log p` per cell.
    """
    xp = xp_of(X)
    F = X.shape[1]
    K = theta.shape[1]
    Z = draws[f"Z/{m}"]
    eta = Z + draws[f"b/{m}"][None, :] if cfg.has_background(m) else Z
    if cfg.batch_offsets:  # phi^(c) = softmax_f(eta + tb Delta_c), one per batch present
        tb, dl = draws[f"tb/{m}"], draws[f"delta/{m}"]
        bnp = to_numpy(batch)
        cbs = np.unique(bnp)
        phis = xp.stack([softmax(eta + tb[:, None] * dl[int(cb)][None, :], axis=1) for cb in cbs])
        bidx = xp.asarray(np.searchsorted(cbs, bnp))
    else:
        cbs, bidx = None, None
        phis = softmax(eta, axis=1)[None]
    P = phis.shape[0]
    phiT = xp.ascontiguousarray(phis.transpose(0, 2, 1).reshape(P * F, K))
    rows = row_ids(X)
    cols = X.indices if P == 1 else X.indices.astype(xp.int64) + bidx[rows].astype(xp.int64) * F
    rho = _rho_at_entries(theta, phis, phiT, X, rows, cols, bidx)
    entry.update(sparse=True, X=X, cols=cols, phis=phis, phiT=phiT, bidx=bidx, cbs=cbs, u=None)
    if lik == "multinomial":
        lp, g = loglik_multinomial_sparse(X, rho)
    else:
        r = phis.sum(axis=2)  # (P, K): sum_f phi_kf (1 up to rounding)
        rsum = theta @ r[0] if P == 1 else (theta * r[bidx]).sum(axis=1)
        s = _bernoulli_scale(cfg, m, xp.maximum(row_sums(X), 0.0), bern_depth)
        lp, g, u = loglik_bernoulli_sparse(X, rho, s, rsum, rows)
        entry.update(u=u, r=r)
    entry["g"] = g
    return lp


#: ρ at the stored entries comes from one dense θφ product (then a gather) when at least this
#: fraction of the minibatch's entries is stored: a BLAS product of B·F·K multiply-adds is then
#: faster than gathering nnz·K pairs (measured on one core with the planted atlas's 256-cell parts:
#: RNA rows 24% stored, 0.5 ms dense vs 4.5 ms gathered; peaks 3.5% stored, 1.0 ms vs 0.65 ms).
DENSE_RHO_FRACTION = 1.0 / 16.0


def _rho_at_entries(theta, phis, phiT, X, rows, cols, bidx):
    """:math:`\\rho_{nf} = \\theta_n\\cdot\\phi^{(c(n))}_{\\cdot f}` at the stored entries of ``X``: the sampled
    product :func:`~._sparse.sddmm` (:math:`O(\\mathrm{nnz}\\cdot K)`), or for a dense enough minibatch
    (:data:`DENSE_RHO_FRACTION`) the dense product read at the entries (the same sums)."""
    xp = xp_of(theta)
    B, F = X.shape
    if X.nnz < DENSE_RHO_FRACTION * B * F:
        return sddmm(theta, phiT, rows, cols)
    if phis.shape[0] == 1:
        R = theta @ phis[0]
    else:
        R = xp.empty((B, F), dtype=theta.dtype)
        for p in range(phis.shape[0]):
            idx = xp.flatnonzero(bidx == p)
            R[idx] = theta[idx] @ phis[p]
    return xp.take(R.ravel(), rows.astype(xp.int64) * F + X.indices)


def _sparse_likelihood_backward(cfg: TopicModelConfig, entry: dict, theta, c: float, draws: dict, m: str, g: dict):
    """Backward of :func:`_sparse_likelihood` with :math:`G = c\\,\\partial\\log p/\\partial\\rho`
    (stored entries plus the Bernoulli rank-1 part :math:`u_n\\mathbf 1^\\top`):

    .. math:: \\partial\\theta_n \\mathrel{+}= \\sum_f G_{nf}\\phi^{(c(n))}_{\\cdot f} = G^{\\rm sp}_n\\phi^\\top + u_n r^{(c(n))},\\qquad
              A^{(c)} = \\sum_{n\\in c}\\theta_n^\\top G_n = (G^{\\rm sp}_c)^\\top\\theta_c + (\\textstyle\\sum_{n\\in c}\\theta_n u_n)\\mathbf 1^\\top

    (:math:`r^{(c)}_k = \\sum_f\\phi^{(c)}_{kf}`; both sparse products are :math:`O(\\mathrm{nnz}\\cdot K)`),
    then :math:`\\partial\\eta = \\sum_c \\mathrm{softmax\\_backward}(\\phi^{(c)}, A^{(c)})`. Returns
    :math:`\\partial\\theta` and fills ``g`` with the gradients w.r.t. the draws.
    """
    X, phis, phiT = entry["X"], entry["phis"], entry["phiT"]
    xp = xp_of(theta)
    P, K, F = phis.shape
    B = theta.shape[0]
    M = csr_like(X, c * entry["g"], shape=(B, P * F), indices=entry["cols"])
    dtheta = xp.asarray(M @ phiT)
    A = xp.asarray(M.T @ theta).reshape(P, F, K).transpose(0, 2, 1)  # (P, K, F)
    if entry["u"] is not None:
        cu = c * entry["u"]
        tu = theta * cu[:, None]
        r = entry["r"]
        if P == 1:
            dtheta = dtheta + cu[:, None] * r[0][None, :]
            A = A + tu.sum(axis=0)[None, :, None]
        else:
            bidx = entry["bidx"]
            dtheta = dtheta + cu[:, None] * r[bidx]
            onehot = (bidx[:, None] == xp.arange(P)[None, :]).astype(theta.dtype)
            A = A + (onehot.T @ tu)[:, :, None]
    de = softmax_backward(phis, A, axis=2)  # (P, K, F)
    if cfg.batch_offsets:
        tb, dl = draws[f"tb/{m}"], draws[f"delta/{m}"]
        cbs = xp.asarray(entry["cbs"])
        deta = de.sum(axis=0)
        g[f"draw/tb/{m}"] = (de * dl[cbs][:, None, :]).sum(axis=(0, 2))
        ddl = xp.zeros_like(dl)
        ddl[cbs] = (de * tb[None, :, None]).sum(axis=1)
        g[f"draw/delta/{m}"] = ddl
    else:
        deta = de[0]
    g[f"draw/Z/{m}"] = deta
    if cfg.has_background(m):
        g[f"draw/b/{m}"] = deta.sum(axis=0)
    return dtheta
