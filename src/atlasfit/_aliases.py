"""Reference call forms: the keywords of multigedi 1.1.0 and topomics 0.0.1 that atlasfit accepts.

A reference keyword is either **mapped** onto atlasfit's name (same meaning: ``use_gpu`` ->
``device``, ``aggregation_type`` -> ``aggregation``, ...), or, when it has no meaning here and
ignoring it cannot change a result (thread counts, tracking intervals, output folders), **accepted
and ignored** with a one-time :class:`ReferenceKeywordWarning` saying so. The table of aliases is in
``docs/api.md``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

__all__ = ["ReferenceKeywordWarning", "rename_aliases", "warn_ignored"]

_WARNED: set = set()


class ReferenceKeywordWarning(UserWarning):
    """A reference keyword was accepted and ignored (it has no effect on atlasfit's results)."""


def warn_ignored(who: str, key: str, why: str) -> None:
    """Warn once per process and ``(who, key)`` that the reference keyword ``key`` is ignored.

    Examples
    --------
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as w:
    ...     warnings.simplefilter("always")
    ...     warn_ignored("doc.example", "num_threads", "threads come from the Dask workers")
    ...     warn_ignored("doc.example", "num_threads", "threads come from the Dask workers")
    >>> len(w)
    1
    """
    if (who, key) in _WARNED:
        return
    _WARNED.add((who, key))
    warnings.warn(f"{who}: {key}= (a reference keyword) is accepted and ignored: {why}",
                  ReferenceKeywordWarning, stacklevel=3)


def rename_aliases(kwargs: dict, aliases: Mapping[str, str], who: str) -> dict:
    """Move the reference keywords of ``kwargs`` to atlasfit's names (in place; returns ``kwargs``).

    Giving both a reference keyword and its atlasfit name is a ``TypeError``.

    Examples
    --------
    >>> rename_aliases({"aggregation_type": "moe"}, {"aggregation_type": "aggregation"}, "f")
    {'aggregation': 'moe'}
    """
    for old, new in aliases.items():
        if old in kwargs:
            if new in kwargs:
                raise TypeError(f"{who}: give {new}= or its reference alias {old}=, not both")
            kwargs[new] = kwargs.pop(old)
    return kwargs
