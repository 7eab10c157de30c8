"""Streaming writer of atlas stores (one sample of one modality in memory at a time)."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import write_elem

from ._integrity import ALGORITHM, RECORDS_KEY, RecordBook
from ._layout import (
    ATLAS_KEY,
    FORMAT_VERSION,
    SOURCE_ROW,
    Appender1D,
    CategoricalAppender,
    CSRAppender,
    DenseAppender,
    dataframe_attrs,
    empty_dict_group,
    open_root,
    set_encoding,
)
from ._validate import (
    AtlasValidationError,
    check_block,
    check_kind,
    check_labels,
    check_unique,
)


class _Null:
    """Sink used when only validating: accepts appends, writes nothing."""

    n = 0

    def append(self, values) -> None:
        pass

    def finish(self) -> None:
        pass


def _is_categorical_like(s: pd.Series) -> bool:
    return isinstance(s.dtype, pd.CategoricalDtype) or s.dtype == object or pd.api.types.is_string_dtype(s.dtype)


def _storable(dt: np.dtype) -> np.dtype:
    """The stored dtype of an element: float16 becomes float32 (exact), everything else is kept."""
    dt = np.dtype(dt)
    return np.dtype(np.float32) if dt == np.float16 else dt


class _ModalityWriter:
    """Appends the samples of one modality to ``mod/<name>`` (or only checks them when dry)."""

    def __init__(self, mods_group, name: str, kind: str, first: ad.AnnData, sample_key: str):
        self.name, self.kind, self.sample_key = name, kind, sample_key
        self.dry = mods_group is None
        self.var_names = pd.Index(first.var_names)
        check_unique(self.var_names, what="feature", mod=name)
        self.n_vars = first.n_vars
        if self.n_vars == 0:
            raise AtlasValidationError(
                f"modality '{name}' has no features (0 columns); drop it (modalities=[...] without "
                f"'{name}') or give it its features"
            )
        self.samples: list[str] = []
        self.counts: list[int] = []
        self.n = 0
        self.hashes: list[np.ndarray] = []
        # elements: None = X, else layer name
        self.elements = ([None] if first.X is not None else []) + list(first.layers.keys())
        if not self.elements:
            raise AtlasValidationError(f"modality '{name}' has neither X nor layers; give it data")
        self.obs_cols = [c for c in first.obs.columns if c not in (sample_key, SOURCE_ROW)]
        self.obsm_keys = list(first.obsm.keys())
        self.storage: dict[str, str] = {}
        for el in self.elements:
            arr = first.X if el is None else first.layers[el]
            dense = kind == "binary" or (kind == "continuous" and not sp.issparse(arr))
            self.storage["X" if el is None else f"layers/{el}"] = "dense" if dense else "csr"
        # integrity records: per element, per sample, computed on the bytes written (no second pass)
        self.records = {key: RecordBook(st) for key, st in self.storage.items()}
        # float16 is widened to float32 (documented conversion: SciPy's sparse matrices and most
        # BLAS kernels have no float16); the values are unchanged
        self.dtypes = {
            ("X" if el is None else f"layers/{el}"): _storable((first.X if el is None else first.layers[el]).dtype)
            for el in self.elements
        }
        if self.dry:
            self.g = None
            self.sinks = {}
            return
        self.g = g = mods_group.create_group(name)
        layers_g = empty_dict_group(g, "layers")
        self.sinks: dict = {}
        for el in self.elements:
            key = "X" if el is None else f"layers/{el}"
            parent, nm = (g, "X") if el is None else (layers_g, el)
            dt = self.dtypes[key]
            if self.storage[key] == "dense":
                if kind == "binary" and dt.kind != "f":
                    dt = np.dtype(np.float32)
                self.sinks[key] = DenseAppender(parent, nm, self.n_vars, dt)
            else:
                self.sinks[key] = CSRAppender(parent, nm, self.n_vars, dt)
        self.obs_g = g.create_group("obs")
        self.sinks["obs/_index"] = Appender1D(self.obs_g, "_index", str, encoding=("string-array", "0.2.0"))
        for c in self.obs_cols:
            col = first.obs[c]
            if _is_categorical_like(col):
                cats = list(col.cat.categories) if isinstance(col.dtype, pd.CategoricalDtype) else None
                ordered = bool(col.cat.ordered) if isinstance(col.dtype, pd.CategoricalDtype) else False
                self.sinks[f"obs/{c}"] = CategoricalAppender(self.obs_g, str(c), cats, ordered)
            elif col.dtype.kind in "biuf":
                self.sinks[f"obs/{c}"] = Appender1D(self.obs_g, str(c), col.dtype)
            else:
                raise AtlasValidationError(
                    f"modality '{name}' obs column '{c}' has unsupported dtype {col.dtype}; convert it to "
                    "a numpy numeric, bool, string or categorical column"
                )
        self.sinks["obs/__sample"] = CategoricalAppender(self.obs_g, sample_key)
        self.sinks["obs/__source"] = Appender1D(self.obs_g, SOURCE_ROW, np.int64)
        obsm_g = empty_dict_group(g, "obsm")
        for k in self.obsm_keys:
            v = first.obsm[k]
            if isinstance(v, pd.DataFrame):
                raise AtlasValidationError(
                    f"modality '{name}' obsm['{k}'] is a DataFrame; give a numpy or sparse array"
                )
            if sp.issparse(v):
                self.sinks[f"obsm/{k}"] = CSRAppender(obsm_g, k, v.shape[1], v.dtype)
            else:
                v = np.asarray(v)
                self.sinks[f"obsm/{k}"] = DenseAppender(obsm_g, k, v.shape[1], v.dtype)
        write_elem(g, "var", first.var)
        for nm in ("varm", "obsp", "varp"):
            empty_dict_group(g, nm)

    # ------------------------------------------------------------------ checks + append
    def add(self, sample: str, a: ad.AnnData, source_rows: np.ndarray) -> None:
        mod = self.name
        if a.n_obs == 0:
            raise AtlasValidationError(
                f"modality '{mod}' has an empty sample '{sample}' (zero cells); drop the sample from "
                "this modality or give it cells"
            )
        if not pd.Index(a.var_names).equals(self.var_names):
            vn = pd.Index(a.var_names)
            diff = next((i for i in range(min(len(vn), len(self.var_names))) if vn[i] != self.var_names[i]),
                        min(len(vn), len(self.var_names)))
            got = vn[diff] if diff < len(vn) else "<none>"
            exp = self.var_names[diff] if diff < len(self.var_names) else "<none>"
            raise AtlasValidationError(
                f"modality '{mod}' sample '{sample}' has different features than the first sample "
                f"(first at position {diff}: '{got}' vs '{exp}'); every sample of a modality needs the "
                "same var_names in the same order"
            )
        names = pd.Index(a.obs_names.astype(str))
        check_unique(names, what="cell", mod=mod, sample=sample)
        if self.sample_key in a.obs.columns:
            labels = check_labels(a.obs[self.sample_key], names, mod=mod, sample_key=self.sample_key)
            bad = np.flatnonzero(labels != sample)
            if bad.size:
                raise AtlasValidationError(
                    f"modality '{mod}': cell '{names[bad[0]]}' has obs['{self.sample_key}'] = "
                    f"'{labels[bad[0]]}' but was given as part of sample '{sample}'; fix the labels or the stream"
                )
        missing_cols = [c for c in self.obs_cols if c not in a.obs.columns]
        extra_cols = [c for c in a.obs.columns if c not in self.obs_cols and c not in (self.sample_key, SOURCE_ROW)]
        if missing_cols or extra_cols:
            raise AtlasValidationError(
                f"modality '{mod}' sample '{sample}' has obs columns {list(a.obs.columns)} but the first "
                f"sample had {self.obs_cols} (missing {missing_cols}, extra {extra_cols}); give every "
                "sample the same obs columns"
            )
        if sorted(a.obsm.keys()) != sorted(self.obsm_keys):
            raise AtlasValidationError(
                f"modality '{mod}' sample '{sample}' has obsm keys {sorted(a.obsm.keys())} but the first "
                f"sample had {sorted(self.obsm_keys)}; give every sample the same obsm keys"
            )
        elements = ([None] if a.X is not None else []) + list(a.layers.keys())
        if elements != self.elements:
            raise AtlasValidationError(
                f"modality '{mod}' sample '{sample}' has elements {elements} (None = X) but the first sample "
                f"had {self.elements}; give every sample the same X / layers"
            )
        for el in self.elements:
            key = "X" if el is None else f"layers/{el}"
            block = a.X if el is None else a.layers[el]
            if np.dtype(block.dtype) == np.float16:
                block = block.astype(np.float32)
            if self.storage[key] == "csr":
                block = sp.csr_matrix(block)
            else:
                block = block.toarray() if sp.issparse(block) else np.asarray(block)
            check_block(block, mod=mod, sample=sample, kind=self.kind, element=key,
                        obs_names=names, var_names=self.var_names)
            if not self.dry:
                self.records[key].add(self.sinks[key].append(block))
        self.hashes.append(pd.util.hash_array(names.to_numpy(dtype=object)))
        if not self.dry:
            self.sinks["obs/_index"].append(names.to_numpy(dtype=object))
            for c in self.obs_cols:
                s = self.sinks[f"obs/{c}"]
                col = a.obs[c]
                if isinstance(s, CategoricalAppender):
                    s.append(col.astype(object))
                else:
                    if not np.can_cast(col.dtype, s.arr.dtype, casting="same_kind"):
                        raise AtlasValidationError(
                            f"modality '{mod}' sample '{sample}' obs column '{c}' has dtype {col.dtype} "
                            f"but the first sample had {s.arr.dtype}; use one dtype per column"
                        )
                    s.append(col.to_numpy())
            self.sinks["obs/__sample"].append(np.full(a.n_obs, sample, dtype=object))
            self.sinks["obs/__source"].append(np.asarray(source_rows, dtype=np.int64))
            for k in self.obsm_keys:
                self.sinks[f"obsm/{k}"].append(a.obsm[k])
        self.samples.append(sample)
        self.counts.append(int(a.n_obs))
        self.n += int(a.n_obs)

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.counts, dtype=np.int64)]).astype(np.int64)

    def info(self) -> dict:
        return {
            "kind": self.kind,
            "samples": np.asarray(self.samples, dtype=object),
            "offsets": self.offsets,
            "has_X": bool(self.elements and self.elements[0] is None),
            "n_vars": int(self.n_vars),
        }

    def integrity(self) -> dict:
        """``{"algorithm": "crc32", "X": {field: per-sample int64}, "layers": {name: {...}}}``."""
        out: dict = {"algorithm": ALGORITHM}
        for key, book in self.records.items():
            if key == "X":
                out["X"] = book.arrays()
            else:
                out.setdefault("layers", {})[key.split("/", 1)[1]] = book.arrays()
        return out

    def finish(self) -> None:
        if self.dry:
            return
        for s in self.sinks.values():
            if hasattr(s, "finish"):
                s.finish()
        cols = list(self.obs_cols) + [self.sample_key, SOURCE_ROW]
        dataframe_attrs(self.obs_g, [str(c) for c in cols])
        uns = empty_dict_group(self.g, "uns")
        write_elem(uns, ATLAS_KEY, {**self.info(), "format_version": FORMAT_VERSION,
                                    "sample_key": self.sample_key})
        set_encoding(self.g, "anndata", "0.1.0", encoder="atlasfit", **{"encoder-version": FORMAT_VERSION})


def _check_cross(writers: dict[str, _ModalityWriter], sample_index: dict[str, int], tmp) -> None:
    """Duplicate cell names within a modality, and names shared by modalities in different samples."""
    all_h, all_s, all_m = [], [], []
    for mi, (mod, w) in enumerate(writers.items()):
        if not w.hashes:
            continue
        h = np.concatenate(w.hashes)
        u, first_idx, cnt = np.unique(h, return_index=True, return_counts=True)
        if (cnt > 1).any():
            dup_hash = u[cnt > 1][0]
            rows = np.flatnonzero(h == dup_hash)
            name = _name_at(tmp, mod, int(rows[1]))
            raise AtlasValidationError(
                f"modality '{mod}' has duplicate cell name {name} (rows {rows.tolist()} in store order, in "
                "different samples); make the names unique, e.g. prefix them with the sample"
            )
        samp = np.repeat([sample_index[s] for s in w.samples], w.counts)
        all_h.append(u)
        all_s.append(samp[first_idx])
        all_m.append(np.full(u.shape[0], mi))
    if len(all_h) < 2:
        return
    h, s, m = np.concatenate(all_h), np.concatenate(all_s), np.concatenate(all_m)
    order = np.argsort(h, kind="stable")
    h, s, m = h[order], s[order], m[order]
    same = (h[1:] == h[:-1]) & (s[1:] != s[:-1])
    if same.any():
        i = int(np.flatnonzero(same)[0])
        mods = list(writers)
        names = list(sample_index)
        raise AtlasValidationError(
            f"a cell name is in sample '{names[s[i]]}' of modality '{mods[m[i]]}' but in sample "
            f"'{names[s[i + 1]]}' of modality '{mods[m[i + 1]]}'; cells are matched by name across "
            "modalities, so a shared cell needs the same sample label everywhere"
        )


def _name_at(tmp, mod: str, row: int) -> str:
    if tmp is None:
        return "(name not kept in a dry run)"
    g = open_root(tmp, "r")
    return repr(str(g[f"mod/{mod}/obs/_index"][row]))


def _write_root(root, writers: dict[str, _ModalityWriter], samples: list[str], sample_key: str) -> None:
    """Root obs/var/obsmap/varmap/obsm/varm/uns exactly as mudata computes them for these modalities."""
    mods = list(writers)
    # global obs rows: modality-major union of cell names; shared samples hold the same cells, so the
    # new cells of a modality are exactly the cells of its samples not held by an earlier modality.
    blocks = []  # (owner mod, sample, n)
    seen: set[str] = set()
    for mod in mods:
        w = writers[mod]
        for s, n in zip(w.samples, w.counts):
            if s not in seen:
                blocks.append((mod, s, n))
        seen.update(w.samples)
    obs_g = root.create_group("obs")
    idx = Appender1D(obs_g, "_index", str, encoding=("string-array", "0.2.0"))
    n_glob = int(sum(n for _, _, n in blocks))
    # obsmap / membership masks: 4 + 1 bytes per global cell and modality, built in memory
    maps = {m: np.zeros(n_glob, dtype=np.uint32) for m in mods}
    pos = {m: dict(zip(writers[m].samples, writers[m].offsets[:-1])) for m in mods}
    start = 0
    for owner, s, n in blocks:
        o = int(pos[owner][s])
        idx.append(writers[owner].g["obs/_index"][o : o + n])
        for m in mods:
            if s in pos[m]:
                off = int(pos[m][s])
                maps[m][start : start + n] = np.arange(off + 1, off + n + 1, dtype=np.uint32)
        start += n
    write_elem(root, "obsmap", maps)
    write_elem(root, "obsm", {m: (v > 0).reshape(-1, 1) for m, v in maps.items()})
    dataframe_attrs(obs_g, [])
    # var: concatenation of the modalities' features (mudata, axis 0)
    var_names = np.concatenate([writers[m].var_names.to_numpy(dtype=object) for m in mods])
    write_elem(root, "var", pd.DataFrame(index=pd.Index(var_names.astype(str))))
    varmap, varm = {}, {}
    start = 0
    J = len(var_names)
    for m in mods:
        j = writers[m].n_vars
        vm = np.zeros(J, dtype=np.uint32)
        vm[start : start + j] = np.arange(1, j + 1, dtype=np.uint32)
        varmap[m] = vm
        varm[m] = (vm > 0).reshape(-1, 1)
        start += j
    write_elem(root, "varmap", varmap)
    write_elem(root, "varm", varm)
    for nm in ("obsp", "varp"):
        empty_dict_group(root, nm)
    uns = empty_dict_group(root, "uns")
    book = uns.create_group(ATLAS_KEY)
    set_encoding(book, "dict", "0.1.0")
    write_elem(book, "format_version", FORMAT_VERSION)
    write_elem(book, "sample_key", sample_key)
    write_elem(book, "samples", np.asarray(samples, dtype=object))
    write_elem(book, "modalities", np.asarray(mods, dtype=object))
    mg = book.create_group("mods")
    set_encoding(mg, "dict", "0.1.0")
    for m in mods:
        write_elem(mg, m, {**writers[m].info(), RECORDS_KEY: writers[m].integrity()})
    mod_g = root["mod"]
    mod_g.attrs["mod-order"] = mods
    root.attrs.update({"axis": 0, "encoding-type": "MuData", "encoding-version": "0.1.0",
                       "encoder": "atlasfit", "encoder-version": FORMAT_VERSION})
    # written LAST: an atlas store without this flag is partial and refused by open/validate
    write_elem(book, "complete", True)


def _run_stream(tmp, stream, *, sample_key: str, kinds: Mapping[str, str], mod_order=None):
    """Consume the stream: check every sample block, append it (unless ``tmp`` is None)."""
    root = open_root(tmp, "w") if tmp is not None else None
    mods_group = root.create_group("mod") if root is not None else None
    if mods_group is not None:
        set_encoding(mods_group, "dict", "0.1.0")
    writers: dict[str, _ModalityWriter] = {}
    sample_index: dict[str, int] = {}
    counters: dict[str, int] = {}
    for item in stream:
        try:
            sample, mods = item
        except (TypeError, ValueError):
            raise AtlasValidationError(
                "write_atlas: each stream item must be (sample_name, {modality: AnnData})"
            ) from None
        if sample is None or (isinstance(sample, float) and np.isnan(sample)):
            raise AtlasValidationError(
                f"write_atlas: a stream item has a missing sample name ({sample!r}); name every sample"
            )
        sample = str(sample)
        if sample in sample_index:
            raise AtlasValidationError(
                f"write_atlas: sample '{sample}' appears twice in the stream; give one item per sample "
                "holding all of its cells"
            )
        if not isinstance(mods, Mapping) or not mods:
            raise AtlasValidationError(
                f"write_atlas: sample '{sample}' has no modalities; give {{modality: AnnData}}"
            )
        sample_index[sample] = len(sample_index)
        ref: tuple[str, pd.Index] | None = None
        for mod, a in mods.items():
            mod = str(mod)
            if not isinstance(a, ad.AnnData):
                raise AtlasValidationError(
                    f"write_atlas: modality '{mod}' of sample '{sample}' is {type(a).__name__}, not AnnData"
                )
            if mod not in writers:
                kind = check_kind(mod, kinds.get(mod, "counts"))
                writers[mod] = _ModalityWriter(mods_group, mod, kind, a, sample_key)
                counters[mod] = 0
            n = a.n_obs
            if SOURCE_ROW in a.obs.columns:
                src_rows = a.obs[SOURCE_ROW].to_numpy().astype(np.int64)
            else:
                src_rows = np.arange(counters[mod], counters[mod] + n, dtype=np.int64)
            counters[mod] += n
            names = pd.Index(a.obs_names.astype(str))
            if ref is None or n == 0:
                if n:
                    ref = (mod, names)
            else:
                rmod, rnames = ref
                check_unique(names, what="cell", mod=mod, sample=sample)
                pos = names.get_indexer(rnames)
                if len(names) != len(rnames) or (pos < 0).any():
                    extra = names.difference(rnames)
                    missing = rnames.difference(names)
                    cell, where = (missing[0], f"in '{rmod}' but not in '{mod}'") if len(missing) else (
                        extra[0], f"in '{mod}' but not in '{rmod}'")
                    raise AtlasValidationError(
                        f"modalities '{rmod}' and '{mod}' hold different cells for shared sample "
                        f"'{sample}' (first: cell '{cell}' is {where}); cells are matched by name, so a "
                        "shared sample needs the same cells in every modality (drop or add the cells)"
                    )
                if not np.array_equal(pos, np.arange(n)):
                    a = a[pos]
                    src_rows = src_rows[pos]
            writers[mod].add(sample, a, src_rows)
    if not sample_index:
        raise AtlasValidationError("write_atlas: the source is empty (no samples); give at least one sample")
    unknown = [m for m in kinds if m not in writers]
    if unknown:
        raise AtlasValidationError(
            f"kinds names modalities {unknown} that are not in the data (have {list(writers)}); fix kinds"
        )
    _check_cross(writers, sample_index, tmp)
    if mod_order is not None:
        writers = {m: writers[m] for m in mod_order if m in writers}
    for w in writers.values():
        w.finish()
        if root is not None:
            g = w.g
            src = g["obs/" + SOURCE_ROW][:]
            if not np.array_equal(np.sort(src), np.arange(w.n)):
                raise AtlasValidationError(
                    f"modality '{w.name}': obs['{SOURCE_ROW}'] given in the stream is not a permutation "
                    f"of 0..{w.n - 1}; drop the column to let write_atlas number the rows"
                )
    if root is not None:
        _write_root(root, writers, list(sample_index), sample_key)
    return writers


def write_atlas(
    store,
    stream: Iterable[tuple[str, Mapping[str, ad.AnnData]]],
    *,
    sample_key: str = "sample",
    kinds: Mapping[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write an atlas store from a stream of samples, holding one sample at a time.

    Parameters
    ----------
    store
        Target directory (Zarr, MuData layout). Written into a temporary sibling and renamed into
        place at the end; on any error the temporary is removed and an existing target is untouched.
    stream
        Iterable of ``(sample_name, {modality: AnnData})``, one item per sample, in the global sample
        order. Each AnnData holds that sample's cells of the modality (unique obs_names; the same
        var in every item of a modality; X and/or layers, sparse or dense; optional obs columns and
        obsm arrays, appended sample by sample). A modality that lacks the sample is left out of
        the item. Shared samples must hold the same cells in every modality (matched by name; cells
        are reordered to the order of the first modality of the item).
    sample_key
        Name of the obs column that receives the sample labels.
    kinds
        ``{modality: "counts" | "binary" | "continuous"}`` (default ``"counts"``): counts are stored
        as CSR (source dtype kept) and must be finite integers >= 0; binary is stored dense and
        must be 0, 1 or NaN; continuous must be finite (stored as given, dense or CSR).
    overwrite
        Replace an existing ``store``.

    Returns
    -------
    pathlib.Path
        The store path.

    Examples
    --------
    >>> import anndata as ad, numpy as np, scipy.sparse as sp, tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> items = [(s, {"rna": ad.AnnData(sp.csr_matrix(np.ones((2, 3), np.float32)))}) for s in "AB"]
    >>> for s, m in items:
    ...     m["rna"].obs_names = [f"{s}{i}" for i in range(2)]
    >>> p = write_atlas(os.path.join(d, "a.zarr"), items)
    >>> open_atlas(p).samples["rna"].tolist()
    [2, 2]
    """
    return _write_atlas(store, stream, sample_key=sample_key, kinds=kinds, overwrite=overwrite)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unavailable."""
    import ctypes
    import os

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0


def _write_atlas(store, stream, *, sample_key, kinds, overwrite, mod_order=None) -> Path:
    store = Path(store).absolute()
    try:
        if store.exists() and not overwrite:
            raise FileExistsError(f"write_atlas: '{store}' exists; pass overwrite=True to replace it")
        store.parent.mkdir(parents=True, exist_ok=True)
        kinds = dict(kinds or {})
        for m, k in kinds.items():
            check_kind(m, k)
        tmp = store.parent / f".{store.name}.atlasfit-tmp-{uuid.uuid4().hex[:12]}"
        try:
            _run_stream(tmp, stream, sample_key=sample_key, kinds=kinds, mod_order=mod_order)
            if store.exists():
                if _exchange(tmp, store):  # atomic swap: the old store now lies at tmp
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    trash = store.parent / f".{store.name}.atlasfit-old-{uuid.uuid4().hex[:12]}"
                    store.rename(trash)
                    tmp.rename(store)
                    shutil.rmtree(trash, ignore_errors=True)
            else:
                tmp.rename(store)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        close = getattr(stream, "close", None)
        if callable(close):
            close()
    return store


from ._open import open_atlas  # noqa: E402  (doctest namespace)
