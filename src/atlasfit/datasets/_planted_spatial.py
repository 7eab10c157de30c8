"""Planted spatial topic atlas: cells on a grid per sample, topic proportions smooth in space (the
check of the spatial encoders, issue 13 item 5; ``tests/test_topic_spatial_gnn.py``,
``benchmarks/bench_topic_spatial.py``)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sps


def king_grid(side: int) -> sps.csr_matrix:
    """The 8-neighbour (king-move) graph of a ``side`` x ``side`` grid, cells in row-major order.

    Examples
    --------
    >>> g = king_grid(3)
    >>> int(g.nnz), g[4].nnz, g[0].nnz
    (40, 8, 3)
    """
    idx = np.arange(side * side).reshape(side, side)
    r, c = [], []
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                a = idx[max(0, -dy):side - max(0, dy), max(0, -dx):side - max(0, dx)]
                b = idx[max(0, dy):side - max(0, -dy), max(0, dx):side - max(0, -dx)]
                r.append(a.ravel())
                c.append(b.ravel())
    return sps.csr_matrix((np.ones(sum(map(len, r))), (np.concatenate(r), np.concatenate(c))),
                          shape=(side * side,) * 2)


def planted_spatial_atlas(n_samples=2, side=20, n_topics=4, n_features=60, depth=4, sharpness=1.5, seed=0):
    """Cells on a ``side`` x ``side`` grid per sample; topic proportions smooth in space
    (:math:`\\theta_{nk}\\propto\\exp(-s\\,|r_n - c_k|^2 / (2(\\text{side}/4)^2))` around random
    centres :math:`c_k`, one set per sample); counts multinomial with Poisson(``depth``) + 2 tokens
    from :math:`\\theta_n\\phi`, :math:`\\phi_k\\sim\\mathrm{Dir}(0.1)`; the king-move grid graph
    (8 neighbours) within each sample. Tokens are split at random in two halves (binomial
    thinning): ``x_fit`` to train on, ``x_held`` held out. Returns a dict with ``x_fit``, ``x_held``
    (cells x features), ``theta``, ``phi``, ``sample`` labels and the block-diagonal ``graph``.

    Examples
    --------
    >>> a = planted_spatial_atlas(n_samples=2, side=5, seed=0)
    >>> a["x_fit"].shape, a["graph"].shape, sorted(set(a["sample"].tolist()))
    ((50, 60), (50, 50), ['s0', 's1'])
    """
    rng = np.random.default_rng(seed)
    phi = rng.dirichlet(np.full(n_features, 0.1), size=n_topics)
    yy, xx = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    pos = np.stack([yy.ravel(), xx.ravel()], 1).astype(float)
    grid = king_grid(side)
    xs, thetas = [], []
    for _ in range(n_samples):
        centres = rng.uniform(0, side, (n_topics, 2))
        logit = -sharpness * ((pos[:, None, :] - centres[None]) ** 2).sum(-1) / (2 * (side / 4) ** 2)
        th = np.exp(logit - logit.max(1, keepdims=True))
        th /= th.sum(1, keepdims=True)
        lib = rng.poisson(depth, len(pos)) + 2
        xs.append(np.stack([rng.multinomial(n, q) for n, q in zip(lib, th @ phi)]))
        thetas.append(th)
    X = np.vstack(xs)
    x_fit = rng.binomial(X, 0.5)
    return {"x_fit": x_fit, "x_held": X - x_fit, "theta": np.vstack(thetas), "phi": phi,
            "sample": np.repeat([f"s{i}" for i in range(n_samples)], side * side),
            "graph": sps.block_diag([grid] * n_samples, format="csr")}


def completion_ll_per_token(theta, phi, x_held) -> float:
    """Document completion score: :math:`\\sum_{n,f} x^{\\rm held}_{nf}\\log(\\theta\\phi)_{nf} / \\sum x^{\\rm held}`
    (multinomial per-token log-likelihood of held-out tokens; ``theta`` estimated from the other tokens).

    Examples
    --------
    >>> import numpy as np
    >>> round(completion_ll_per_token(np.array([[1.0, 0.0]]), np.array([[0.5, 0.5], [1.0, 0.0]]), np.array([[2, 2]])), 6)
    -0.693147
    """
    x = np.asarray(x_held, dtype=np.float64)
    return float((x * np.log(np.asarray(theta) @ np.asarray(phi))).sum() / x.sum())
