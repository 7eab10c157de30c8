"""Spatial graph preprocessing and per-cell covariate plumbing of the topic model (spec §1.5, §2.2, §4).

A spatial graph is a cells x cells adjacency (the ``.obsp`` matrix of the data) whose edges stay
within one sample. A shard holds whole samples, so both spatial modes are local to a shard:

* **SGC** (``spatial_mode="sgc"``, §4.5): the encoder input of modality :math:`m` is precomputed once
  per shard as :math:`\\log(1 + [X, \\hat AX, \\ldots, \\hat A^LX])` with
  :math:`X = x/\\max(\\ell,1)\\cdot\\mathrm{med}` (:func:`sgc_features`).
* **GCN** (``spatial_mode="gcn"``, §4.4): the first encoder layer adds a graph branch, with one
  layer the convolution :math:`\\hat A_{\\mathcal B,\\mathcal S}(\\hat X_{\\mathcal S}W_g)` where
  :math:`\\mathcal S` is the exact one-hop neighbourhood of the minibatch cells :math:`\\mathcal B`
  (:func:`neighbourhood`). Rows of :math:`\\hat A` restricted to :math:`\\mathcal B` use the degrees of
  the *full* within-sample graph, so the one-layer convolution of a minibatch cell is exactly its
  full-graph value. Deeper GCN and GATv2 branches (``_gnn.py``) read the ``gcn_n_layers``-hop
  subgraph of :func:`gcn_minibatch_graph` (``_sampling.py``: exact, or neighbour sampling keyed by
  (seed, epoch, step, sample) with ``gcn_sampling="approx"``).

Both use :math:`\\hat A = D^{-1/2}(A+I)D^{-1/2}` with :math:`D_{ii} = 1 + \\sum_j A_{ij}`, keeping edge
weights. This fixes the reference quirks of §11 D: degrees get +1 for the one identity added (not +2),
zero libraries are guarded, weights are not dropped, neighbourhoods are exact by default and always
at inference, sampling is without replacement and re-weighted (unbiased), and every modality uses
the graph of its own cells.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sps

from ._config import TopicModelConfig
from ._sampling import layered_subgraph, sample_rngs
from ._sparse import minibatch_rows

_SYM_RTOL = 1e-10


def check_adjacency(
    adj, n_cells: int, *, name: str = "spatial graph", require_symmetric: bool = True, ids=None
) -> sps.csr_matrix:
    """Validate a cells x cells adjacency and return it as float64 CSR without explicit zeros.

    Errors name the first offending entry: wrong shape (not square or not ``n_cells``), non-finite or
    negative weights, and (``require_symmetric``) asymmetric weights, which the symmetric
    normalisation :math:`D^{-1/2}(A+I)D^{-1/2}` needs. ``ids`` maps row positions to the cell indices
    used in messages (default: the positions).

    Examples
    --------
    >>> import numpy as np
    >>> check_adjacency(np.array([[0, 1.0], [1.0, 0]]), 2).nnz
    2
    """
    if not (sps.issparse(adj) or isinstance(adj, np.ndarray)):
        adj = np.asarray(adj)
    if adj.ndim != 2 or adj.shape[0] != adj.shape[1]:
        raise ValueError(f"{name}: adjacency must be square (cells x cells), got shape {adj.shape}")
    if adj.shape[0] != n_cells:
        raise ValueError(
            f"{name}: adjacency is {adj.shape[0]} x {adj.shape[1]} but there are {n_cells} cells; "
            "pass the .obsp graph of exactly these cells, in the same order"
        )
    A = sps.csr_matrix(adj, dtype=np.float64)
    A.eliminate_zeros()
    A.sort_indices()
    cid = (lambda i: int(i)) if ids is None else (lambda i: int(ids[i]))
    if A.nnz and not np.all(np.isfinite(A.data)):
        i = int(np.flatnonzero(~np.isfinite(A.data))[0])
        row = int(np.searchsorted(A.indptr, i, side="right") - 1)
        raise ValueError(f"{name}: non-finite edge weight at cell {cid(row)} -> cell {cid(A.indices[i])}; fix the graph")
    if A.nnz and A.data.min() < 0:
        i = int(np.flatnonzero(A.data < 0)[0])
        row = int(np.searchsorted(A.indptr, i, side="right") - 1)
        raise ValueError(
            f"{name}: negative edge weight {A.data[i]} at cell {cid(row)} -> cell {cid(A.indices[i])}; "
            "edge weights must be >= 0"
        )
    if require_symmetric:
        D = (A - A.T).tocoo()
        scale = float(A.data.max()) if A.nnz else 0.0
        bad = np.abs(D.data) > _SYM_RTOL * max(scale, 1e-300)
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            r, c = int(D.row[j]), int(D.col[j])
            raise ValueError(
                f"{name}: adjacency is not symmetric: weight(cell {cid(r)}, cell {cid(c)}) = {A[r, c]} but the reverse is "
                f"{A[c, r]}; symmetrise it first, e.g. A = A.maximum(A.T) or (A + A.T) / 2"
            )
    return A


def normalized_adjacency(adj) -> sps.csr_matrix:
    """:math:`\\hat A = D^{-1/2}(A+I)D^{-1/2}` with :math:`D_{ii} = 1 + \\sum_j A_{ij}` (one self loop, weights kept).

    Examples
    --------
    >>> import numpy as np
    >>> normalized_adjacency(np.array([[0, 1.0], [1.0, 0]])).toarray().round(12).tolist()
    [[0.5, 0.5], [0.5, 0.5]]
    """
    A = sps.csr_matrix(adj, dtype=np.float64)
    n = A.shape[0]
    M = (A + sps.identity(n, format="csr", dtype=np.float64)).tocsr()
    deg = np.asarray(M.sum(axis=1)).ravel()
    deg[deg <= 0] = 1.0
    s = sps.diags(1.0 / np.sqrt(deg))
    out = (s @ M @ s).tocsr()
    out.sort_indices()
    return out


def sgc_features(adj, X, n_layers: int = 1, *, median: float | None = None, transform: str = "log1p", check: bool = True):
    """SGC encoder inputs of one modality: :math:`[X, \\hat AX, \\ldots, \\hat A^LX]` (§4.5).

    ``transform="log1p"`` (count modalities): :math:`X = x/\\max(\\ell,1)\\cdot\\mathrm{med}` with
    :math:`\\ell` the row sums and ``median`` (default: lower median of :math:`\\max(\\ell,1)` over these
    cells), smoothing, then :math:`\\log(1+\\cdot)` elementwise. ``transform="none"`` (Gaussian
    modalities): the raw values are smoothed, nothing else.

    ``adj`` is the (n, n) adjacency of these cells (no edges to cells outside them); ``X`` (n, F)
    dense or sparse. Returns (n, F (L+1)), sparse CSR when ``X`` is sparse, else a dense NumPy array.

    Examples
    --------
    >>> import numpy as np
    >>> A = np.array([[0, 1.0], [1.0, 0]])
    >>> sgc_features(A, np.array([[2.0, 0.0], [0.0, 2.0]]), 1, median=2.0, transform="none").round(12).tolist()
    [[2.0, 0.0, 1.0, 1.0], [0.0, 2.0, 1.0, 1.0]]
    """
    if transform not in ("log1p", "none"):
        raise ValueError(f"sgc_features: transform {transform!r}: use 'log1p' or 'none'")
    if int(n_layers) != n_layers or n_layers < 1:
        raise ValueError(f"sgc_features: n_layers must be an integer >= 1, got {n_layers}")
    sparse_in = sps.issparse(X)
    Xc = sps.csr_matrix(X, dtype=np.float64) if sparse_in else np.asarray(X, dtype=np.float64)
    if Xc.ndim != 2:
        raise ValueError(f"sgc_features: X must be 2-D (cells x features), got shape {Xc.shape}")
    A = check_adjacency(adj, Xc.shape[0]) if check else sps.csr_matrix(adj, dtype=np.float64)
    Ah = normalized_adjacency(A)
    if transform == "log1p":
        lib = np.maximum(np.maximum(np.asarray(Xc.sum(axis=1)).ravel(), 0.0), 1.0)
        med = float(np.sort(lib)[(lib.size - 1) // 2]) if median is None else float(median)
        if not med > 0:
            raise ValueError(f"sgc_features: median must be > 0, got {med}")
        scale = med / lib
        Xc = sps.diags(scale) @ Xc if sparse_in else Xc * scale[:, None]
    blocks = [Xc]
    for _ in range(int(n_layers)):
        blocks.append(Ah @ blocks[-1])
    if sparse_in:
        out = sps.hstack([sps.csr_matrix(b) for b in blocks], format="csr")
        if transform == "log1p":
            out.data = np.log1p(out.data)
        return out
    out = np.concatenate([np.asarray(b) for b in blocks], axis=1)
    return np.log1p(out) if transform == "log1p" else out


def neighbourhood(adj_hat, rows):
    """Rows ``rows`` of :math:`\\hat A` restricted to their one-hop neighbourhood :math:`\\mathcal S`.

    Returns ``(sub, cols)``: ``sub`` is (len(rows), |S|) CSR with ``sub[i, j] = adj_hat[rows[i], cols[j]]``
    and ``cols`` the sorted neighbourhood (it contains ``rows``, because :math:`\\hat A` has self loops).
    Then :math:`(\\hat A H)_{\\text{rows}} = \\text{sub}\\,H_{\\text{cols}}` exactly.

    Examples
    --------
    >>> import numpy as np
    >>> Ah = normalized_adjacency(np.array([[0, 1.0, 0], [1.0, 0, 0], [0, 0, 0]]))
    >>> sub, cols = neighbourhood(Ah, np.array([0]))
    >>> cols.tolist(), sub.shape
    ([0, 1], (1, 2))
    """
    R = adj_hat[np.asarray(rows)]
    cols = np.unique(R.indices)
    return R[:, cols].tocsr(), cols


def _labels_per_row(parts) -> np.ndarray:
    return np.concatenate([np.full(k, i, dtype=np.int64) for i, (_, k) in enumerate(parts)]) if parts else np.zeros(0, np.int64)


def _local_graph(G, rows, parts, n_cells: int, name: str) -> sps.csr_matrix:
    """The shard's block of a (n_cells, n_cells) graph, checked: square, matching cells, finite,
    non-negative, symmetric, and with every edge inside one sample."""
    shape = tuple(G.shape) if hasattr(G, "shape") else np.shape(G)
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"{name}: adjacency must be square (cells x cells), got shape {shape}")
    if shape[0] != n_cells:
        raise ValueError(
            f"{name}: adjacency is {shape[0]} x {shape[1]} but there are {n_cells} cells; "
            "pass the .obsp graph of exactly these cells, in the same order"
        )
    full_rows = sps.csr_matrix(G[rows] if sps.issparse(G) else np.asarray(G)[rows], dtype=np.float64)
    full_rows.eliminate_zeros()
    local = full_rows[:, rows].tocsr()
    if local.nnz != full_rows.nnz:
        r = int(np.flatnonzero(np.diff(full_rows.indptr) != np.diff(local.indptr))[0])
        raise ValueError(
            f"{name}: cell {int(rows[r])} has edges to cells of other samples; the graph must be "
            "within-sample (block diagonal over samples)"
        )
    local = check_adjacency(local, rows.size, name=name, ids=rows)
    lab = _labels_per_row(parts)
    co = local.tocoo()
    cross = lab[co.row] != lab[co.col]
    if cross.any():
        j = int(np.flatnonzero(cross)[0])
        raise ValueError(
            f"{name}: edge between cell {int(rows[co.row[j]])} (sample {parts[lab[co.row[j]]][0]!r}) and "
            f"cell {int(rows[co.col[j]])} (sample {parts[lab[co.col[j]]][0]!r}); the graph must be within-sample"
        )
    return local


def load_shard_extras(extras, rows, parts, cfg: TopicModelConfig, n_cells: int) -> dict:
    """Shard-local covariates and graph for :func:`~atlasfit.models.topic._shard.load_shard` (``rows``: the shard's global cell indices,
    ``parts``: ``[(sample name, n_cells), ...]`` in row order; ``n_cells``: all cells).

    ``extras`` (or ``None``) may hold, aligned with all cells: ``"batch"`` integer codes in
    ``[0, n_batches)`` (needed when ``cfg.needs_batch``), ``"cont"`` (n_cells, n_continuous_covariates)
    and ``"graph"`` the (n_cells, n_cells) ``.obsp`` adjacency shared by all modalities, or
    ``{modality: adjacency}`` (needed for ``cfg.spatial_mode``; a missing modality is an error, not a
    silent misalignment as in the reference, §11 item 25). Returns entries for the shard state:
    ``batch``, ``cont``, ``adj[m]`` (the shard-local symmetric adjacency, edges only within samples)
    and ``adj_hat[m]`` (its normalisation). Only the shard's rows of the graph are read and checked.

    Examples
    --------
    >>> import numpy as np
    >>> cfg = TopicModelConfig(("rna",), (4,), ("multinomial",), n_topics=2, n_batches=2)
    >>> st = load_shard_extras({"batch": np.array([0, 1, 1])}, np.array([2, 0]), [("s", 2)], cfg, 3)
    >>> st["batch"].tolist()
    [1, 0]
    """
    extras = {} if extras is None else dict(extras)
    unknown = set(extras) - {"batch", "cont", "graph"}
    if unknown:
        raise ValueError(f"unknown covariate/graph inputs {sorted(unknown)}; use 'batch', 'cont' and 'graph'")
    rows = np.asarray(rows, dtype=np.int64)
    out: dict = {}
    if cfg.needs_batch:
        if extras.get("batch") is None:
            raise ValueError(
                f"the model has a categorical covariate (n_batches={cfg.n_batches}) but no per-cell batch codes "
                "were given; pass integer codes in [0, n_batches) for every cell"
            )
        b = check_batch_codes(extras["batch"], cfg.n_batches)
        if b.shape[0] != n_cells:
            raise ValueError(f"batch codes have {b.shape[0]} entries; expected one per cell ({n_cells})")
        out["batch"] = b[rows]
    if cfg.n_cont_encoded:
        if extras.get("cont") is None:
            raise ValueError(
                f"the model encodes {cfg.n_continuous_covariates} continuous covariates but none were given; "
                "pass a (n_cells, n_continuous_covariates) array"
            )
        c = np.asarray(extras["cont"], dtype=np.float64)
        if c.shape != (n_cells, cfg.n_continuous_covariates):
            raise ValueError(
                f"continuous covariates have shape {c.shape}; expected ({n_cells}, {cfg.n_continuous_covariates})"
            )
        c = c[rows]
        if not np.all(np.isfinite(c)):
            r = int(np.flatnonzero(~np.isfinite(c).all(axis=1))[0])
            raise ValueError(f"continuous covariates: non-finite value at cell {int(rows[r])}; impute or drop it")
        out["cont"] = c
    if cfg.spatial_mode is not None:
        G = extras.get("graph")
        if G is None:
            raise ValueError(
                f"spatial_mode={cfg.spatial_mode!r} needs the spatial graph: pass the .obsp adjacency "
                "(cells x cells, edges within samples) of all cells, or {modality: adjacency}"
            )
        per_mod = G if isinstance(G, dict) else {m: G for m in cfg.modalities}
        missing = [m for m in cfg.modalities if per_mod.get(m) is None]
        if missing:
            raise ValueError(
                f"spatial graph: no graph for modalities {missing}; spatial_mode={cfg.spatial_mode!r} encodes every "
                "modality over a graph, so give one per modality (or one shared adjacency)"
            )
        done: dict = {}  # one shared matrix is checked and normalised once
        out["adj"], out["adj_hat"] = {}, {}
        for m in cfg.modalities:
            key = id(per_mod[m])
            if key not in done:
                name = "spatial graph" if not isinstance(G, dict) else f"spatial graph of modality {m!r}"
                local = _local_graph(per_mod[m], rows, parts, n_cells, name)
                done[key] = (local, normalized_adjacency(local))
            out["adj"][m], out["adj_hat"][m] = done[key]
    return out


def check_batch_codes(batch, n_batches: int) -> np.ndarray:
    """Validate per-cell batch codes (integers in ``[0, n_batches)``) and return them as int64.

    Examples
    --------
    >>> check_batch_codes([0, 2, 1], 3).tolist()
    [0, 2, 1]
    """
    b = np.asarray(batch)
    if b.ndim != 1:
        raise ValueError(f"batch codes must be 1-D (one integer per cell), got shape {b.shape}")
    if b.size and not np.issubdtype(b.dtype, np.integer):
        if not (np.all(np.isfinite(b)) and np.all(b == np.round(b))):
            bad = int(np.flatnonzero(~np.isfinite(b) | (b != np.round(b)))[0])
            raise ValueError(f"batch codes must be integers; cell {bad} has {b[bad]!r}. Encode categories as 0..C-1")
    bi = b.astype(np.int64)
    if bi.size and (bi.min() < 0 or bi.max() >= n_batches):
        bad = int(np.flatnonzero((bi < 0) | (bi >= n_batches))[0])
        raise ValueError(
            f"batch code {int(bi[bad])} of cell {bad} is outside [0, n_batches={n_batches}); "
            "encode the categories as 0..C-1 and set n_batches=C"
        )
    return bi


def minibatch_extras(state: dict, local, lib_median: dict | None, xp=np, key=None) -> dict:
    """Keyword arguments of :func:`~atlasfit.models.topic.forward_cells` for the shard rows ``local``.

    ``batch`` and ``cont_covariates`` rows; for SGC the precomputed ``enc_inputs`` rows (computed once
    per shard with the dataset median ``lib_median[m]``, or the shard's own lower median when it is
    ``None``); for GCN the ``graph`` of the minibatch (:func:`gcn_minibatch_graph`; ``key`` =
    (seed, epoch, step) keys neighbour sampling). Empty when no extension is configured.
    """
    cfg = state["cfg"]
    dtype = state["dtype"]
    local = np.asarray(local)
    out: dict = {}
    if "batch" in state:
        out["batch"] = xp.asarray(state["batch"][local])
    if "cont" in state:
        out["cont_covariates"] = xp.asarray(state["cont"][local], dtype=dtype)
    if cfg.spatial_mode == "sgc":
        key = None if lib_median is None else tuple(float(lib_median[m]) for m in cfg.modalities)
        if state.get("_sgc_key", "unset") != key:
            state["_sgc"] = {
                m: sgc_features(
                    state["adj"][m],
                    state["x"][m],
                    cfg.sgc_n_layers,
                    median=None if lib_median is None else lib_median[m],
                    transform="none" if lik == "gaussian" or not cfg.normalize_encoder_inputs else "log1p",
                    check=False,
                )
                for m, lik in zip(cfg.modalities, cfg.likelihoods)
            }
            state["_sgc_key"] = key
        out["enc_inputs"] = {m: _dense_rows(state["_sgc"][m], local, dtype, xp) for m in cfg.modalities}
    elif cfg.spatial_mode == "gcn":
        out["graph"] = gcn_minibatch_graph(state, local, key, xp)
    return out


def gcn_minibatch_graph(state: dict, local, key, xp=np) -> dict:
    """The ``graph`` argument of :func:`~atlasfit.models.topic.forward_cells` for the shard rows ``local``:
    per modality the :math:`L`-hop :class:`~atlasfit.models.topic._sampling.LayeredGraph` blocks
    (``"adj"``, in the model dtype on the array module ``xp``) and the raw rows of its nodes
    (``"x_nbr"``; CSR stays CSR). ``gcn_sampling="approx"`` samples neighbours with the generators
    keyed ``(*key, sample id)`` (``key`` = (seed, epoch, step)); one shared graph is built once."""
    cfg, dtype = state["cfg"], state["dtype"]
    fan = cfg.gcn_fan_out if cfg.gcn_sampling == "approx" else None
    kw = {}
    if fan is not None:
        if key is None:
            raise ValueError("gcn_sampling='approx' needs the step's key (seed, epoch, step) to draw the neighbours")
        if "_owner" not in state:  # the sample (position in parts) of every shard row
            state["_owner"] = np.repeat(np.arange(len(state["parts"])), [k for _, _, k in state["parts"]])
        kw = {"owner": state["_owner"]}
    adj, x_nbr, done = {}, {}, {}
    for m in cfg.modalities:
        gid = id(state["adj_hat"][m])
        if gid not in done:
            if fan is not None:  # fresh generators per graph: each graph's draws depend only on the key
                kw["rngs"] = sample_rngs(key, [sid for sid, _, _ in state["parts"]])
            g = layered_subgraph(state["adj_hat"][m], local, cfg.gcn_n_layers, fan, **kw)
            done[gid] = ([_sparse_like(a.astype(dtype), xp) for a in g.adj], g.nodes)
        adj[m], nodes = done[gid]
        x_nbr[m] = minibatch_rows(state["x"][m], nodes, dtype, sparse=True,
                                  device="cupy" if xp is not np else None)
    return {"adj": adj, "x_nbr": x_nbr}


def _dense_rows(X, rows, dtype, xp):
    sub = X[rows]
    if hasattr(sub, "toarray"):
        sub = sub.toarray()
    return xp.asarray(sub, dtype=dtype)


def _sparse_like(S, xp):
    if xp is np:
        return S
    import cupyx.scipy.sparse as cps  # noqa: PLC0415 - optional GPU dependency

    return cps.csr_matrix(S)
