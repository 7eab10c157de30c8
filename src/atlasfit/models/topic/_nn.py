"""Per-modality encoder with explicit forward and backward passes (spec §2.2).

Every function works on NumPy or CuPy arrays (``xp = get_xp(...)``). Shapes: ``B`` cells, ``H``
hidden units, ``K`` topics. Weights are stored as ``(fan_in, fan_out)`` so a layer is ``h @ W + b``.
"""

from __future__ import annotations

from ..._xp import get_xp
from ._config import CLAMP_EPS, CLAMP_MAX
from ._gnn import graph_backward, graph_forward
from ._params import sigmoid
from ._sparse import csr_like, encoder_layout, input_matmul, input_tmatmul, is_sparse, row_ids, row_sums, xp_of

#: Exponent cap for the variance head: exp(20) > CLAMP_MAX, so the clamp is active (zero gradient) anyway.
_EXP_CAP = 20.0


def clampsym(t):
    """:math:`\\mathrm{clampsym}(t)`: NaN -> 0, then clip to :math:`[-10^5, 10^5]`; returns ``(value, pass)``.

    ``pass`` is 1 where the clamp is inactive (the derivative there is 1, elsewhere 0).

    Examples
    --------
    >>> import numpy as np
    >>> v, g = clampsym(np.array([np.nan, 2.0, 1e6]))
    >>> v.tolist(), g.tolist()
    ([0.0, 2.0, 100000.0], [0.0, 1.0, 0.0])
    """
    xp = get_xp(t)
    finite = xp.isfinite(t)
    t0 = xp.where(xp.isnan(t), 0.0, t)
    v = xp.clip(t0, -CLAMP_MAX, CLAMP_MAX)
    ok = (finite & (xp.abs(t0) < CLAMP_MAX)).astype(t.dtype)
    return v, ok


def clamppos(t):
    """:math:`\\mathrm{clamppos}(t)`: NaN -> :math:`10^{-5}`, then clip to :math:`[10^{-5}, 10^5]`; returns ``(value, pass)``.

    Examples
    --------
    >>> import numpy as np
    >>> v, g = clamppos(np.array([0.0, 2.0, np.inf]))
    >>> v.tolist(), g.tolist()
    ([1e-05, 2.0, 100000.0], [0.0, 1.0, 0.0])
    """
    xp = get_xp(t)
    t0 = xp.where(xp.isnan(t), CLAMP_EPS, t)
    v = xp.clip(t0, CLAMP_EPS, CLAMP_MAX)
    ok = (xp.isfinite(t) & (t0 > CLAMP_EPS) & (t0 < CLAMP_MAX)).astype(t.dtype)
    return v, ok


def lower_median(v):
    """Lower median (torch convention: the smaller middle value for an even count).

    Examples
    --------
    >>> import numpy as np
    >>> float(lower_median(np.array([4.0, 1.0, 3.0, 2.0])))
    2.0
    """
    xp = get_xp(v)
    s = xp.sort(v.ravel())
    return s[(s.shape[0] - 1) // 2]


def normalize_counts(x, median=None):
    """Encoder input of a count modality (§2.2).

    .. math:: \\hat x_{nf} = \\log\\big(1 + x_{nf}/\\max(\\ell_n,1)\\cdot \\operatorname{med}\\big),
              \\qquad \\ell_n = \\max(0, \\textstyle\\sum_f x_{nf})

    ``median=None`` uses the lower median of :math:`\\max(\\ell_n,1)` over the rows of ``x`` (the
    reference's minibatch median); otherwise the given value (e.g. a fixed dataset median).

    A CSR ``x`` gives a CSR result with the same stored entries (:math:`\\log(1+0)=0`, so
    :math:`\\hat x` has the sparsity of :math:`x`; the same arithmetic, entry by entry).

    Examples
    --------
    >>> import numpy as np
    >>> normalize_counts(np.array([[1.0, 1.0], [0.0, 4.0]]), median=2.0).round(4).tolist()
    [[0.6931, 0.6931], [0.0, 1.0986]]
    """
    xp = xp_of(x)
    lib = xp.maximum(xp.maximum(row_sums(x), 0.0), 1.0)
    med = lower_median(lib) if median is None else median
    if is_sparse(x):
        return csr_like(x, xp.log1p(x.data / lib[row_ids(x)] * med))
    return xp.log1p(x / lib[:, None] * med)


def batchnorm_train_forward(a, gamma, beta, eps):
    """Training-mode BatchNorm with the statistics of the rows of ``a`` (biased variance).

    .. math:: \\hat a = (a - \\bar a)/\\sqrt{s^2 + \\epsilon},\\qquad y = \\gamma\\hat a + \\beta

    Returns ``(y, cache)`` with ``cache = (a_hat, inv_std)``.
    """
    mu = a.mean(axis=0)
    d = a - mu
    var = (d * d).mean(axis=0)
    inv_std = 1.0 / (var + eps) ** 0.5
    ah = d * inv_std
    return gamma * ah + beta, (ah, inv_std)


def batchnorm_train_backward(dy, cache, gamma):
    """Backward of :func:`batchnorm_train_forward` (batch statistics are functions of ``a``).

    .. math:: \\partial a = \\frac{\\rm inv\\_std}{B}\\big(B\\,\\partial\\hat a - \\textstyle\\sum\\partial\\hat a
              - \\hat a\\sum \\partial\\hat a\\,\\hat a\\big),\\quad \\partial\\hat a = \\gamma\\,\\partial y

    Returns ``(da, dgamma, dbeta)``.
    """
    ah, inv_std = cache
    B = dy.shape[0]
    dgamma = (dy * ah).sum(axis=0)
    dbeta = dy.sum(axis=0)
    dah = dy * gamma
    da = (inv_std / B) * (B * dah - dah.sum(axis=0) - ah * (dah * ah).sum(axis=0))
    return da, dgamma, dbeta


def _first_layer(p: dict, prefix: str, h, gcn):
    """Pre-activation of layer 0: :math:`hW_0 + b_0`, or with a graph (``gcn = (adj, xs)``, §4.4)

    .. math:: a = \\alpha\\,hW_0 + (1-\\alpha)\\,N + b_0, \\qquad \\alpha = \\sigma(a_\\alpha)

    where :math:`N` is the graph branch (:func:`~atlasfit.models.topic._gnn.graph_forward`) over the
    layer blocks ``adj`` (a list, input side first; one (B, S) matrix for one layer, then
    :math:`N = \\hat A_{\\mathcal B,\\mathcal S}(X_{\\mathcal S}W_g)`) and the (S, F) encoder inputs ``xs``
    of the subgraph's nodes. ``h`` may be dense, CSR or :class:`~._sparse.SparseBlocks`
    (:math:`[\\hat x, \\text{cov}]` with :math:`\\hat x` CSR: :math:`\\hat xW_{0,[:F]} + \\text{cov}\\,W_{0,[F:]}`,
    :math:`O(\\mathrm{nnz}\\cdot H)`). Returns ``(a, gcache)``.
    """
    if gcn is None:
        return input_matmul(h, p[f"{prefix}W0"]) + p[f"{prefix}b0"], None
    adj, xs = gcn
    adj = adj if isinstance(adj, (list, tuple)) else [adj]
    xp = xp_of(h)
    al = sigmoid(p[f"{prefix}alpha"], xp)
    own = input_matmul(h, p[f"{prefix}W0"])
    nei, layers = graph_forward(p, prefix, adj, xs)
    return al * own + (1.0 - al) * nei + p[f"{prefix}b0"], (layers, own, nei, al)


def encoder_forward(p: dict, prefix: str, xh, masks, n_layers: int, bn_eps: float, var_eps: float, gcn=None):
    """Training-mode encoder of one modality (§2.2) with clamps.

    .. math::
        h^{(l)} = \\mathrm{Drop}\\big(\\mathrm{ReLU}(\\mathrm{BN}(h^{(l-1)}W_l + b_l))\\big),\\quad
        \\mu = \\mathrm{clampsym}(hW_\\mu + b_\\mu),\\quad
        v = \\mathrm{clamppos}(\\exp(hW_v + b_v) + \\epsilon_v)

    ``masks[l]`` is the inverted-dropout mask of layer ``l`` (0 or 1/(1-p); all ones for no dropout).
    Returns ``(mu, v, cache, bn_sums)``; ``bn_sums[l] = (sum_n a, sum_n a**2)`` of the pre-BN activations
    (used on the driver to update running statistics). ``gcn = (adj, xs)`` adds the graph convolution
    to the first layer (:func:`_first_layer`, ``spatial_mode="gcn"``).
    """
    xp = xp_of(xh)
    h = xh
    layers = []
    bn_sums = []
    gcache = None
    for l in range(n_layers):
        if l == 0:
            h = encoder_layout(h)  # sparse input: read in the layout of the sparse products (kept for the backward)
            a, gcache = _first_layer(p, prefix, h, gcn)
        else:
            a = h @ p[f"{prefix}W{l}"] + p[f"{prefix}b{l}"]
        bn_sums.append((a.sum(axis=0), (a * a).sum(axis=0)))
        y, bn_cache = batchnorm_train_forward(a, p[f"{prefix}g{l}"], p[f"{prefix}be{l}"], bn_eps)
        relu = (y > 0).astype(y.dtype)
        h_new = y * relu * masks[l]
        layers.append((h, bn_cache, relu, masks[l]))
        h = h_new
    pre_mu = h @ p[f"{prefix}W_mu"] + p[f"{prefix}b_mu"]
    pre_v = h @ p[f"{prefix}W_v"] + p[f"{prefix}b_v"]
    mu, ok_mu = clampsym(pre_mu)
    ev = xp.exp(xp.minimum(pre_v, _EXP_CAP))
    v, ok_v = clamppos(ev + var_eps)
    ok_v = ok_v * (pre_v < _EXP_CAP)
    cache = {"layers": layers, "h": h, "ok_mu": ok_mu, "ok_v": ok_v, "ev": ev, "gcn": gcache}
    return mu, v, cache, bn_sums


def encoder_backward(p: dict, prefix: str, cache: dict, dmu, dv, n_layers: int) -> dict:
    """Backward of :func:`encoder_forward`: gradients of every encoder parameter given
    :math:`\\partial\\mu`, :math:`\\partial v` (the input is data, so no gradient is returned for it).

    Uses :math:`\\partial v/\\partial(\\text{pre-activation}) = \\exp(\\cdot)` where the clamp is inactive.
    With a graph branch: :math:`\\partial W_0 = h^\\top(\\alpha\\,\\partial a)`, the branch's parameters from
    :math:`\\partial N = (1-\\alpha)\\partial a` (:func:`~atlasfit.models.topic._gnn.graph_backward`; one GCN
    layer: :math:`\\partial W_g = X_{\\mathcal S}^\\top\\hat A_{\\mathcal B,\\mathcal S}^\\top\\partial N`),
    :math:`\\partial a_\\alpha = \\alpha(1-\\alpha)\\sum\\partial a\\odot(hW_0 - N)`.
    """
    g = {}
    dpre_mu = dmu * cache["ok_mu"]
    dpre_v = dv * cache["ok_v"] * cache["ev"]
    h = cache["h"]
    g[f"{prefix}W_mu"] = h.T @ dpre_mu
    g[f"{prefix}b_mu"] = dpre_mu.sum(axis=0)
    g[f"{prefix}W_v"] = h.T @ dpre_v
    g[f"{prefix}b_v"] = dpre_v.sum(axis=0)
    dh = dpre_mu @ p[f"{prefix}W_mu"].T + dpre_v @ p[f"{prefix}W_v"].T
    for l in range(n_layers - 1, -1, -1):
        h_in, bn_cache, relu, mask = cache["layers"][l]
        dy = dh * mask * relu
        da, dgam, dbeta = batchnorm_train_backward(dy, bn_cache, p[f"{prefix}g{l}"])
        g[f"{prefix}g{l}"] = dgam
        g[f"{prefix}be{l}"] = dbeta
        g[f"{prefix}b{l}"] = da.sum(axis=0)
        gc = cache.get("gcn") if l == 0 else None
        if gc is None:
            g[f"{prefix}W{l}"] = input_tmatmul(h_in, da)  # sparse input: O(nnz H)
        else:
            layers, own, nei, al = gc
            g[f"{prefix}W0"] = input_tmatmul(h_in, al * da)
            g.update(graph_backward(p, prefix, (1.0 - al) * da, layers))
            g[f"{prefix}alpha"] = (da * (own - nei)).sum(keepdims=True).reshape(1) * (al * (1.0 - al))
        if l > 0:
            dh = da @ p[f"{prefix}W{l}"].T
    return g


def encoder_eval(p: dict, prefix: str, xh, bn_state: dict, n_layers: int, bn_eps: float, var_eps: float, gcn=None):
    """Eval-mode encoder (running BatchNorm statistics, no dropout, §5); returns clamped ``(mu, v)``.

    ``gcn = (adj, xs)`` as in :func:`encoder_forward` (the neighbourhood is exact, so inference is
    deterministic, unlike the reference's sampled subgraphs, §11 item 24).
    """
    xp = xp_of(xh)
    h = xh
    for l in range(n_layers):
        a = _first_layer(p, prefix, h, gcn)[0] if l == 0 else h @ p[f"{prefix}W{l}"] + p[f"{prefix}b{l}"]
        rm = bn_state[f"{prefix}rm{l}"]
        rv = bn_state[f"{prefix}rv{l}"]
        y = p[f"{prefix}g{l}"] * (a - rm) / (rv + bn_eps) ** 0.5 + p[f"{prefix}be{l}"]
        h = xp.maximum(y, 0.0)
    mu, _ = clampsym(h @ p[f"{prefix}W_mu"] + p[f"{prefix}b_mu"])
    v, _ = clamppos(xp.exp(xp.minimum(h @ p[f"{prefix}W_v"] + p[f"{prefix}b_v"], _EXP_CAP)) + var_eps)
    return mu, v


def softmax(t, axis=-1):
    """Softmax along ``axis`` (max-shifted).

    Examples
    --------
    >>> import numpy as np
    >>> softmax(np.array([0.0, np.log(3.0)])).tolist()
    [0.25, 0.75]
    """
    xp = get_xp(t)
    e = xp.exp(t - t.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def softmax_backward(y, dy, axis=-1):
    """Vector-Jacobian product of the softmax: :math:`\\partial t = y\\odot(\\partial y - \\sum y\\,\\partial y)`."""
    return y * (dy - (y * dy).sum(axis=axis, keepdims=True))
