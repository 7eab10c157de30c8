"""Graph branch of the spatial GCN encoder: multi-layer GCN and GATv2 layers over a
:class:`~atlasfit.models.topic._sampling.LayeredGraph`, with explicit forward and backward (spec §4.4).

The branch maps the (normalised) encoder inputs :math:`X_{\\mathcal S_L}` of the subgraph's nodes to
one row per seed cell, :math:`N = g_{L-1}\\circ\\cdots\\circ g_0(X)` (:math:`B\\times H`), which the first
encoder layer mixes with the cell's own path (``_nn._first_layer``):
:math:`a = \\alpha\\,\\hat xW_0 + (1-\\alpha)N + b_0`. Layer :math:`j` reads the rows of hop
:math:`L-j` and writes the rows of hop :math:`L-1-j` through ``adj[j]`` (sparse, never densified);
every layer but the last adds a bias and a ReLU (the last layer's bias would duplicate :math:`b_0`).

* **GCN** (``gcn_conv_type="gcn"``): :math:`g_j(h) = \\tilde A_j\\,(hW^g_j)` with :math:`\\tilde A_j` the
  exact or sampled block of :math:`\\hat A` (weights kept). Parameters ``Wg`` (layer 0, :math:`F\\times H`)
  and ``Wg{j}`` (:math:`H\\times H`), biases ``bg{j}``.
* **GATv2** (``gcn_conv_type="gatv2"``), :math:`n_h` heads of width :math:`c = H/n_h`, concatenated:

  .. math:: g^L = hW^L,\\quad g^R = h_{\\rm out}W^R + b^R,\\quad
            e_{ij,k} = a_k^\\top\\mathrm{LeakyReLU}_{0.2}(g^R_{i,k} + g^L_{j,k}),\\quad
            \\alpha_{ij,k} = \\mathrm{softmax}_{j\\in\\mathcal N(i)}(e_{ij,k}),\\quad
            g_j(h)_{i,k} = \\textstyle\\sum_j\\alpha_{ij,k}\\,g^L_{j,k}

  over the pattern of ``adj[j]`` (self loop included; edge weights unused, as GATv2Conv). Parameters
  ``gat{j}/WL``, ``gat{j}/WR``, ``gat{j}/bR`` and ``gat{j}/a`` (:math:`n_h\\times c`), biases ``bg{j}``.
  No attention dropout (deterministic given the subgraph).

Segment sums over edges (per target and per source) are sparse products with 0/1 incidence
matrices in CSR order, so they run on SciPy or CuPy and give the same bits on every call.
The first layer accepts a CSR input (:math:`O(\\mathrm{nnz}\\cdot H)` products).
"""

from __future__ import annotations

from ._sparse import input_matmul, input_tmatmul, is_sparse, sparse_module, xp_of

LEAKY_SLOPE = 0.2


def conv_type(p: dict, prefix: str) -> str:
    """``"gatv2"`` when the parameters hold attention layers, else ``"gcn"``."""
    return "gatv2" if f"{prefix}gat0/a" in p else "gcn"


def _rows(h, n):
    return h[:n] if not is_sparse(h) else h.tocsr()[:n]


class _Edges:
    """Edge lists of a CSR block in CSR order: ``dst``/``src`` (E,), and incidence matrices
    ``T`` (n_out x E) and ``S`` (n_in x E) for the segment sums over targets and sources."""

    def __init__(self, P, xp):
        sp = sparse_module(P)
        n_out, n_in = P.shape
        E = int(P.indices.shape[0])
        self.E = E
        self.src = P.indices
        self.dst = xp.repeat(xp.arange(n_out, dtype=P.indices.dtype), xp.diff(P.indptr))
        ones = xp.ones(E, dtype=P.data.dtype)
        eid = xp.arange(E, dtype=P.indices.dtype)
        self.T = sp.csr_matrix((ones, eid, P.indptr), shape=(n_out, E))
        self.S = sp.csr_matrix((ones, (self.src, eid)), shape=(n_in, E)).tocsr()
        deg = xp.diff(P.indptr)
        if n_out and int(deg.min()) < 1:
            raise ValueError("GATv2 layer: every target needs at least its self loop in the layer block "
                             "(build the blocks with _sampling.layered_subgraph)")
        self.indptr = P.indptr
        # padded slot of every edge in its target's row (segment max on the GPU, see _segment_softmax)
        self.slot = eid - P.indptr[self.dst]
        self.width = int(deg.max()) if n_out else 0
        self.n_out = n_out


def _segment_softmax(e, ed: _Edges, xp):
    """Softmax of the edge scores ``e`` (E, k) over the in-edges of every target, shifted by each
    target's maximum: contiguous segments (CSR order) reduced in place on the CPU, a padded
    (targets x max in-degree x k) array on the GPU."""
    if xp.__name__ == "numpy":
        mx = xp.maximum.reduceat(e, ed.indptr[:-1], axis=0)
    else:
        pad = xp.full((ed.n_out, max(ed.width, 1), e.shape[1]), -xp.inf, dtype=e.dtype)
        pad[ed.dst, ed.slot] = e
        mx = pad.max(axis=1)
    ex = xp.exp(e - mx[ed.dst])
    den = xp.asarray(ed.T @ ex)
    return ex / den[ed.dst]


def gat_forward(P, h, WL, WR, bR, a):
    """One GATv2 layer (no output bias) over the pattern of ``P`` (n_out, n_in); ``h`` (n_in, d) dense
    or CSR. Returns ``(out (n_out, n_h c), cache)``."""
    xp = xp_of(h)
    heads, c = a.shape
    ed = _Edges(P, xp)
    gl = input_matmul(h, WL)
    gr = input_matmul(_rows(h, P.shape[0]), WR) + bR
    glj = gl[ed.src].reshape(ed.E, heads, c)  # the source's message, gathered once per edge
    s = gr[ed.dst].reshape(ed.E, heads, c) + glj
    dt = s.dtype.type
    slope = xp.where(s > 0, dt(1.0), dt(LEAKY_SLOPE))
    t = s * slope
    e = (t * a[None]).sum(axis=2)
    al = _segment_softmax(e, ed, xp)
    msg = al[:, :, None] * glj
    out = xp.asarray(ed.T @ msg.reshape(ed.E, heads * c))
    return out, (P, h, ed, glj, t, slope, al)


def gat_backward(dout, cache, WL, WR, a, need_dh: bool = True):
    """Backward of :func:`gat_forward`: ``(dh, dWL, dWR, dbR, da)`` (``dh`` None unless ``need_dh``).

    With :math:`\\partial\\alpha_{e,k} = \\partial o_{i,k}\\cdot g^L_{j,k}` and the segment-softmax
    Jacobian :math:`\\partial e_{e,k} = \\alpha_{e,k}(\\partial\\alpha_{e,k} - \\sum_{e'\\to i}\\alpha_{e',k}\\partial\\alpha_{e',k})`:
    :math:`\\partial a_k = \\sum_e\\partial e_{e,k}t_{e,k}`, :math:`\\partial s = \\partial e\\,a\\odot\\mathrm{LeakyReLU}'(s)`,
    :math:`\\partial g^L_j = \\sum_{e: j\\to\\cdot}(\\alpha\\partial o_i + \\partial s_e)`,
    :math:`\\partial g^R_i = \\sum_{e:\\cdot\\to i}\\partial s_e`.
    """
    P, h, ed, glj, t, slope, al = cache
    xp = xp_of(dout)
    heads, c = a.shape
    do = dout.reshape(-1, heads, c)[ed.dst]  # (E, heads, c)
    dal = (do * glj).sum(axis=2)
    sal = xp.asarray(ed.T @ (al * dal))
    de = al * (dal - sal[ed.dst])
    da = (de[:, :, None] * t).sum(axis=0)
    ds = de[:, :, None] * a[None] * slope
    dgl_e = (al[:, :, None] * do + ds).reshape(ed.E, heads * c)
    dgl = xp.asarray(ed.S @ dgl_e)
    dgr = xp.asarray(ed.T @ ds.reshape(ed.E, heads * c))
    dWL = input_tmatmul(h, dgl)
    h_out = _rows(h, P.shape[0])
    dWR = input_tmatmul(h_out, dgr)
    dbR = dgr.sum(axis=0)
    dh = None
    if need_dh:
        dh = dgl @ WL.T
        dh[: P.shape[0]] += dgr @ WR.T
    return dh, dWL, dWR, dbR, da


def _gcn_name(j: int) -> str:
    return "Wg" if j == 0 else f"Wg{j}"


def graph_forward(p: dict, prefix: str, adj: list, xs):
    """The graph branch :math:`N` (B, H) for the layer blocks ``adj`` (input side first) and the
    inputs ``xs`` (n_L, F) of the subgraph's nodes. Returns ``(N, cache)``; ``cache[j] = (adj[j], layer
    input, attention cache or None, pre-activation of an inner layer or None)``."""
    xp = xp_of(xs)
    gat = conv_type(p, prefix) == "gatv2"
    L = len(adj)
    h = xs
    layers = []
    for j, P in enumerate(adj):
        if gat:
            q = f"{prefix}gat{j}/"
            out, c = gat_forward(P, h, p[q + "WL"], p[q + "WR"], p[q + "bR"], p[q + "a"])
        else:
            hw = input_matmul(h, p[prefix + _gcn_name(j)])
            out, c = xp.asarray(P @ hw), None
        pre = None
        if j < L - 1:
            pre = out + p[f"{prefix}bg{j}"]
            out = pre * (pre > 0)
        layers.append((P, h, c, pre))
        h = out
    return h, layers


def graph_backward(p: dict, prefix: str, dN, layers) -> dict:
    """Backward of :func:`graph_forward` for :math:`\\partial N`; returns the parameter gradients
    (GCN: :math:`\\partial W^g_j = h_j^\\top\\tilde A_j^\\top\\partial o_j`, :math:`\\partial h_j = \\tilde A_j^\\top\\partial o_j W^{g\\top}_j`;
    ReLU and bias of the inner layers as usual; GATv2: :func:`gat_backward`)."""
    xp = xp_of(dN)
    gat = conv_type(p, prefix) == "gatv2"
    g: dict = {}
    d = dN
    for j in range(len(layers) - 1, -1, -1):
        P, h, c, pre = layers[j]
        if pre is not None:
            d = d * (pre > 0)
            g[f"{prefix}bg{j}"] = d.sum(axis=0)
        if gat:
            q = f"{prefix}gat{j}/"
            dh, g[q + "WL"], g[q + "WR"], g[q + "bR"], g[q + "a"] = gat_backward(d, c, p[q + "WL"], p[q + "WR"], p[q + "a"],
                                                                           need_dh=j > 0)
        else:
            W = p[prefix + _gcn_name(j)]
            dhw = xp.asarray(P.T @ d)
            g[prefix + _gcn_name(j)] = input_tmatmul(h, dhw)
            dh = dhw @ W.T if j > 0 else None
        d = dh
    return g
