"""Layered subgraphs for the multi-layer graph encoders: exact L-hop neighbourhoods and neighbour
sampling with fan-out (spec §4.3, ``gcn_sampling`` / ``gcn_fan_out``).

Everything here runs on the host (NumPy / SciPy) on one shard's within-sample graph; the kernels
of ``_gnn.py`` then read the result on the shard's device.

A :class:`LayeredGraph` of depth :math:`L` for the seed cells :math:`\\mathcal S_0` (a minibatch)
lists its nodes so that every hop is a *prefix*: :math:`\\mathcal S_0 \\subseteq \\mathcal S_1
\\subseteq\\ldots\\subseteq\\mathcal S_L`, the seeds first (in the given order), then the nodes first
reached at hop 1, and so on. Each node of :math:`\\mathcal S_{L-1}` has one set of in-edges (chosen
once, when it was on the frontier), all from nodes of the next hop. So layer :math:`j` of the
encoder (:math:`j = 0..L-1`) maps features of :math:`\\mathcal S_{L-j}` to features of
:math:`\\mathcal S_{L-1-j}` through the top-left block ``adj[j]`` (:math:`n_{L-1-j}\\times n_{L-j}`)
of one (:math:`n_{L-1}\\times n_L`) matrix, and the last layer gives the seeds' rows.

Edge values are entries of :math:`\\hat A = D^{-1/2}(A+I)D^{-1/2}` (``_spatial.normalized_adjacency``,
degrees of the full within-sample graph):

* ``exact``: every neighbour is kept, so :math:`(\\hat A H)_i` is exactly its full-graph value and
  the last layer's output for a seed is its full-graph :math:`L`-layer value;
* ``approx`` (neighbour sampling): the self loop is always kept; a node with :math:`d_i` other
  neighbours and fan-out :math:`f < d_i` keeps :math:`f` of them drawn uniformly **without**
  replacement, each re-weighted by :math:`d_i/f`. Then
  :math:`\\mathbb E[\\tilde A_{i\\cdot}] = \\hat A_{i\\cdot}`: one sampled GCN layer is an unbiased
  estimate of the exact one (the reference draws with replacement, ignores weights and re-normalises
  on the sampled subgraph, §11 item 24). GATv2 layers read only the sampled pattern (attention is a
  softmax over the kept neighbours and the self loop).

Draws are keyed per sample: ``keys[s]`` seeds the generator of sample ``s``, whose frontier depends
only on its own seeds (the graph has no edges between samples), so a sample's subgraph does not
depend on which other samples share its shard, nor on the number of workers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sps


@dataclass
class LayeredGraph:
    """Subgraph of :math:`L` hops around seed cells (see the module docstring).

    Attributes
    ----------
    nodes
        (n_L,) row positions (in the graph given to the builder) of the subgraph's nodes; the first
        ``sizes[0]`` are the seeds, in their given order.
    sizes
        :math:`(n_0, \\ldots, n_L)`, the prefix sizes of the hops.
    adj
        ``adj[j]``: CSR (``sizes[L-1-j]``, ``sizes[L-j]``) for encoder layer ``j`` (input side first):
        ``adj[0]`` reads the :math:`n_L` input nodes, ``adj[L-1]`` gives the :math:`n_0` seeds. Every row
        holds its self loop (column = its own position); columns are sorted within rows.
    """

    nodes: np.ndarray
    sizes: tuple
    adj: list

    @property
    def n_layers(self) -> int:
        return len(self.adj)


def check_fan_out(fan_out, n_layers: int) -> tuple:
    """``gcn_fan_out`` as a tuple of ``n_layers`` integers >= 1 (an integer is repeated; ``None``: 10
    per hop, the reference default).

    Examples
    --------
    >>> check_fan_out(5, 2), check_fan_out(None, 1), check_fan_out([3, 2], 2)
    ((5, 5), (10,), (3, 2))
    """
    if fan_out is None:
        return (10,) * int(n_layers)
    if np.isscalar(fan_out):
        fan_out = [fan_out] * int(n_layers)
    f = list(fan_out)
    if len(f) != n_layers:
        raise ValueError(f"gcn_fan_out has {len(f)} entries but gcn_n_layers={n_layers}; give one fan-out per hop "
                         f"(e.g. gcn_fan_out={[10] * n_layers}) or one integer for all")
    for v in f:
        if isinstance(v, bool) or int(v) != v or v < 1:
            raise ValueError(f"gcn_fan_out entries must be integers >= 1, got {fan_out!r}")
    return tuple(int(v) for v in f)


def _keep_sampled(R: sps.csr_matrix, frontier: np.ndarray, fan: int, rngs, owner: np.ndarray):
    """For the rows ``R`` of the frontier nodes: a boolean mask of the kept entries and their
    weights (self loop always; ``fan`` other neighbours without replacement when there are more,
    re-weighted by (number of others) / ``fan``). ``rngs[owner[r]]`` draws the keys of row ``r``
    (rows of one owner are contiguous, in order)."""
    nnz = R.indptr[1:] - R.indptr[:-1]
    row = np.repeat(np.arange(R.shape[0]), nnz)
    is_self = R.indices == frontier[row]
    n_other = nnz - np.bincount(row[is_self], minlength=R.shape[0])
    big = n_other > fan
    keep = np.ones(R.nnz, dtype=bool)
    w = R.data.copy()
    if not big.any():
        return keep, w
    # uniform keys for the entries of the over-full rows, drawn owner by owner (each from its own stream)
    u = np.full(R.nnz, -1.0)
    ent_big = big[row] & ~is_self
    own_e = owner[row]
    for o in np.unique(own_e[ent_big]):
        sel = np.flatnonzero(ent_big & (own_e == o))
        u[sel] = rngs[int(o)].random(sel.size)
    # rank of each entry within its row by key (self and small rows keep key -1: rank ignored)
    order = np.lexsort((u, row))
    rank = np.empty(R.nnz, dtype=np.int64)
    rank[order] = np.arange(R.nnz) - R.indptr[row[order]]
    n_self = nnz - n_other  # 1 (the self loop of A + I)
    drop = ent_big & (rank >= n_self[row] + fan)
    keep &= ~drop
    scale = np.where(big, n_other / max(fan, 1), 1.0)
    w = np.where(is_self, w, w * scale[row])
    return keep, w


def layered_subgraph(adj_hat, seeds, n_layers: int, fan_out=None, *, rngs=None, owner=None) -> LayeredGraph:
    """Build the :class:`LayeredGraph` of ``n_layers`` hops around ``seeds`` in ``adj_hat``.

    Parameters
    ----------
    adj_hat
        (n, n) CSR :math:`\\hat A` with its self loops (``_spatial.normalized_adjacency``).
    seeds
        Distinct row positions (the minibatch cells), in the order their encoder rows are wanted.
    n_layers
        :math:`L` >= 1.
    fan_out
        ``None``: exact neighbourhoods; else one fan-out per hop (neighbour sampling).
    rngs, owner
        With ``fan_out``: ``rngs[o]`` a ``numpy.random.Generator`` per owner (sample) and ``owner``
        (n,) the owner index of every row of ``adj_hat``.

    Examples
    --------
    >>> import numpy as np, scipy.sparse as sps
    >>> from atlasfit.models.topic._spatial import normalized_adjacency
    >>> path = sps.diags([1.0, 1.0], [-1, 1], shape=(5, 5))
    >>> g = layered_subgraph(normalized_adjacency(path), np.array([2]), 2)
    >>> g.nodes.tolist(), g.sizes, [a.shape for a in g.adj]
    ([2, 1, 3, 0, 4], (1, 3, 5), [(3, 5), (1, 3)])
    """
    A = adj_hat if sps.isspmatrix_csr(adj_hat) else sps.csr_matrix(adj_hat)
    seeds = np.asarray(seeds, dtype=np.int64)
    n = A.shape[0]
    if int(n_layers) != n_layers or n_layers < 1:
        raise ValueError(f"layered_subgraph: n_layers must be an integer >= 1, got {n_layers}")
    if np.unique(seeds).size != seeds.size:
        raise ValueError("layered_subgraph: seeds must be distinct")
    fans = None if fan_out is None else check_fan_out(fan_out, n_layers)
    if fans is not None and (rngs is None or owner is None):
        raise ValueError("layered_subgraph: neighbour sampling needs rngs and owner")
    pos = np.full(n, -1, dtype=np.int64)
    pos[seeds] = np.arange(seeds.size)
    nodes = [seeds]
    sizes = [seeds.size]
    frontier = seeds
    er, ec, ev = [], [], []
    for h in range(int(n_layers)):
        R = A[frontier]
        if fans is None:
            keep, w = np.ones(R.nnz, dtype=bool), R.data
        else:
            keep, w = _keep_sampled(R, frontier, fans[h], rngs, np.asarray(owner)[frontier])
        row = np.repeat(np.arange(R.shape[0]), np.diff(R.indptr))
        cols = R.indices[keep]
        new = np.unique(cols[pos[cols] < 0])
        pos[new] = sizes[-1] + np.arange(new.size)
        er.append(pos[frontier][row[keep]])
        ec.append(pos[cols])
        ev.append(w[keep])
        nodes.append(new)
        sizes.append(sizes[-1] + new.size)
        frontier = new
    n_out, n_in = sizes[-2], sizes[-1]
    M = sps.csr_matrix((np.concatenate(ev), (np.concatenate(er), np.concatenate(ec))), shape=(n_out, n_in))
    M.sort_indices()
    adj = []
    for j in range(int(n_layers)):
        r, c = sizes[n_layers - 1 - j], sizes[n_layers - j]
        e = M.indptr[r]
        adj.append(sps.csr_matrix((M.data[:e], M.indices[:e], M.indptr[: r + 1]), shape=(r, c)))
    return LayeredGraph(np.concatenate(nodes), tuple(int(s) for s in sizes), adj)


def sample_rngs(key, sample_ids) -> list:
    """One generator per sample, keyed ``(*key, sample id, 23)`` (e.g. key = (seed, epoch, step))."""
    return [np.random.default_rng(np.random.SeedSequence([*map(int, key), int(s), 23])) for s in sample_ids]
