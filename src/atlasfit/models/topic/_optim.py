"""AdamW with decoupled weight decay on dicts of arrays (torch.optim.AdamW semantics, spec §6)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..._xp import get_xp


@dataclass
class AdamWState:
    """First and second moments per parameter name and the shared step count."""

    step: int = 0
    m: dict = field(default_factory=dict)
    v: dict = field(default_factory=dict)


def owned_copies(arrays: dict) -> dict:
    """C-contiguous copies of a dict's arrays, for a caller that then updates them in place
    (``adamw_step(..., inplace=True)``) while the originals stay as they were.

    Examples
    --------
    >>> import numpy as np
    >>> a = {"w": np.ones(2)}
    >>> b = owned_copies(a)
    >>> b["w"] += 1; a["w"].tolist()
    [1.0, 1.0]
    """
    return {k: a.copy(order="C") for k, a in arrays.items()}


def adamw_init(params: dict) -> AdamWState:
    """Zero moments for every entry of ``params``.

    Examples
    --------
    >>> import numpy as np
    >>> adamw_init({"w": np.ones(2)}).m["w"].tolist()
    [0.0, 0.0]
    """
    st = AdamWState()
    for k, p in params.items():
        xp = get_xp(p)
        st.m[k] = xp.zeros_like(p)
        st.v[k] = xp.zeros_like(p)
    return st


#: Elements per block of the CPU update: the ~14 elementwise passes of one block stay in the cache
#: (measured on 1M float32 parameters: 8.4 ms unblocked, 2.7 ms in blocks of 16-64k; same bits).
UPDATE_BLOCK = 32768


def _update_into(p, g, m, v, po, mo, vo, t, u, b1, b2, bc1, bc2, lr, eps, weight_decay, xp) -> None:
    """The AdamW formula on one block, written into ``po, mo, vo`` (``t, u``: scratch of the same size).
    The same operations in the same order as the formula, so blocking does not change any bit."""
    xp.multiply(m, b1, out=mo)
    xp.multiply(g, 1.0 - b1, out=t)
    mo += t
    xp.multiply(v, b2, out=vo)
    xp.multiply(g, g, out=t)
    t *= 1.0 - b2
    vo += t
    xp.sqrt(vo, out=t)
    t /= bc2**0.5
    t += eps
    xp.multiply(mo, lr / bc1, out=u)
    u /= t
    xp.multiply(p, 1.0 - lr * weight_decay, out=po)
    po -= u


def adamw_update(p, g, m, v, step: int, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                 inplace: bool = False):
    """One AdamW update of a single array (returns new ``p, m, v``; ``step`` is 1-based).

    .. math::
        p \\leftarrow p(1-\\eta\\lambda);\\quad m \\leftarrow \\beta_1 m + (1-\\beta_1)g;\\quad
        v \\leftarrow \\beta_2 v + (1-\\beta_2)g^2;\\quad
        p \\leftarrow p - \\frac{\\eta}{1-\\beta_1^t}\\,\\frac{m}{\\sqrt{v}/\\sqrt{1-\\beta_2^t} + \\epsilon}

    The inputs are not modified (they may be shared with other shards) unless ``inplace``: then
    ``p, m, v`` are overwritten and returned (the same operations in the same order, so the same
    bits; no new arrays: ~20% faster for 1M float32 parameters on this project's machine). On the
    CPU, arrays larger than :data:`UPDATE_BLOCK` are updated block by block (memory-bound
    otherwise); on a GPU in one go.
    """
    xp = get_xp(p)
    b1, b2 = betas
    bc1 = 1.0 - b1**step
    bc2 = 1.0 - b2**step
    n = p.size
    block = UPDATE_BLOCK if xp.__name__ == "numpy" else n
    if inplace and not all(a.flags.c_contiguous and getattr(a.flags, "writeable", True) for a in (p, m, v)):
        raise ValueError("adamw_update(inplace=True) needs writeable C-contiguous p, m, v")
    if n <= block:  # scratch t in g's dtype and u in m's, as the formula's temporaries would be
        po, mo, vo = (p, m, v) if inplace else (xp.empty_like(a) for a in (p, m, v))
        t, u = xp.empty_like(g), xp.empty_like(m)
        _update_into(p, g, m, v, po, mo, vo, t, u, b1, b2, bc1, bc2, lr, eps, weight_decay, xp)
        return po, mo, vo
    ins = [xp.ascontiguousarray(a).reshape(-1) for a in (p, g, m, v)]
    outs = [p, m, v] if inplace else [xp.empty(a.shape, dtype=a.dtype) for a in (p, m, v)]
    flat = ins + [a.reshape(-1) for a in outs]
    t, u = xp.empty(block, dtype=g.dtype), xp.empty(block, dtype=m.dtype)
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        _update_into(*(a[lo:hi] for a in flat), t[: hi - lo], u[: hi - lo], b1, b2, bc1, bc2, lr, eps,
                     weight_decay, xp)
    return tuple(outs)


def adamw_step(
    params: dict,
    grads: dict,
    state: AdamWState,
    *,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    inplace: bool = False,
) -> dict:
    """One AdamW step on every entry of ``params`` (decay applies to all of them, as in the reference).

    Defaults are torch.optim.AdamW's (lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 0.01).
    ``state`` is updated in place; the new parameters are returned as a new dict (``inplace``: the
    arrays of ``params`` and of the moments are overwritten, for a caller that owns them).

    Examples
    --------
    >>> import numpy as np
    >>> st = adamw_init({"w": np.array([1.0])})
    >>> adamw_step({"w": np.array([1.0])}, {"w": np.array([2.0])}, st, lr=0.1)["w"].round(6).tolist()
    [0.899]
    """
    state.step += 1
    out = {}
    for k, p in params.items():
        if k not in grads:
            raise KeyError(f"adamw_step: no gradient for parameter {k!r}")
        out[k], state.m[k], state.v[k] = adamw_update(
            p, grads[k], state.m[k], state.v[k], state.step, lr, betas, eps, weight_decay, inplace
        )
    return out
