"""topomics 0.0.1's keywords (spec ``topic_model.md`` §6-§8) mapped onto
:class:`~atlasfit.MultimodalAmortizedLDA`'s names, so a reference script runs after changing its
import (see ``atlasfit._aliases`` and the table in ``docs/api.md``)."""

from __future__ import annotations

import math
from collections.abc import Mapping

from ..._aliases import rename_aliases, warn_ignored

#: constructor / ``from_data`` keywords with the same meaning under another name
MODEL_ALIASES = {"dispersion_rna": "dispersion", "aggregation_type": "aggregation"}


def model_kwargs(who: str, modalities, layers, batch_key, cfg: dict):
    """Translate topomics' ``from_mudata`` / ``from_data`` / constructor keywords in ``cfg`` (in place).

    Returns ``(modalities, layers, batch_key, kl_weight)``:

    - ``modality_order`` -> ``modalities``, ``layer_dict`` -> ``layers``;
    - ``dispersion_rna`` -> ``dispersion`` (the fixed NB size), ``aggregation_type`` -> ``aggregation``;
    - ``categorical_covariate_keys`` (at most one key, as the reference) -> ``batch_key``;
    - ``kl_weight``: the KL weight the warm-up reaches (§1.9), returned (training uses it, §3.4);
    - ``encoder_scale_factor``: unused by the reference too; ignored with a warning.

    Examples
    --------
    >>> cfg = {"dispersion_rna": 2.0, "categorical_covariate_keys": ["batch"], "kl_weight": 0.5}
    >>> model_kwargs("f", None, None, None, cfg), cfg
    ((None, None, 'batch', 0.5), {'dispersion': 2.0})
    """
    rename_aliases(cfg, MODEL_ALIASES, who)
    if "modality_order" in cfg:
        if modalities is not None:
            raise TypeError(f"{who}: give modalities= or its reference alias modality_order=, not both")
        modalities = cfg.pop("modality_order")
    if "layer_dict" in cfg:
        if layers is not None:
            raise TypeError(f"{who}: give layers= or its reference alias layer_dict=, not both")
        layers = cfg.pop("layer_dict")
    if "categorical_covariate_keys" in cfg:
        keys = cfg.pop("categorical_covariate_keys")
        keys = [] if keys is None else [keys] if isinstance(keys, str) else list(keys)
        if len(keys) > 1:
            raise ValueError(f"{who}: categorical_covariate_keys={keys}: one categorical covariate is supported "
                             "(as in the reference); combine the columns into one obs column first")
        if keys:
            if batch_key is not None and batch_key != keys[0]:
                raise TypeError(f"{who}: give batch_key= or its reference alias categorical_covariate_keys=, "
                                "not both")
            batch_key = keys[0]
    kl_weight = cfg.pop("kl_weight", 1.0)
    try:
        kl_weight = float(kl_weight)
    except (TypeError, ValueError):
        kl_weight = math.nan
    if not (math.isfinite(kl_weight) and kl_weight > 0):
        raise ValueError(f"{who}: kl_weight must be a positive number (the KL weight the warm-up reaches), got "
                         f"{cfg.get('kl_weight', kl_weight)!r}")
    if "encoder_scale_factor" in cfg:
        cfg.pop("encoder_scale_factor")
        warn_ignored(who, "encoder_scale_factor", "the reference does not use it either")
    return modalities, layers, batch_key, kl_weight


#: scvi ``plan_kwargs`` understood by ``train``: optimiser settings and the scvi KL warm-up (§3.4)
_OPTIM_KEYS = ("lr", "weight_decay", "betas", "eps")
_KL_PLAN = {"n_epochs_kl_warmup": "n_epochs_kl_warmup", "max_kl_weight": "kl_weight", "min_kl_weight": "min_kl_weight"}


def train_kwargs(who: str, opts: dict, *, train_size=None, early_stopping_monitor=None, early_stopping_patience=None,
                 accelerator=None, plan_kwargs: Mapping | None = None, check_val_every_n_epoch=None) -> dict:
    """Apply topomics / scvi ``train`` keywords to ``opts`` (atlasfit's ``train`` arguments; returned).

    - ``train_size`` -> ``validation_fraction = 1 - train_size``;
    - ``early_stopping_monitor="elbo_val"`` (the reference's validation ELBO, a loss) -> ``"val_loss"``;
    - ``early_stopping_patience`` -> ``patience``; ``accelerator`` (``"cpu"``, ``"gpu"``/``"cuda"``,
      ``"auto"``) -> ``device``;
    - ``plan_kwargs``: ``{"optim_kwargs": {lr, weight_decay, betas, eps}}`` -> the AdamW arguments and
      ``n_epochs_kl_warmup`` / ``max_kl_weight`` / ``min_kl_weight`` -> ``kl_kwargs`` of the
      ``"scvi400"`` schedule; other keys are an error;
    - ``check_val_every_n_epoch``: atlasfit validates every epoch; other values are ignored with a warning
      (an error with early stopping, whose patience the reference counts in checks).

    Examples
    --------
    >>> train_kwargs("f", {"patience": 10}, train_size=0.75, early_stopping_monitor="elbo_val",
    ...              plan_kwargs={"optim_kwargs": {"lr": 0.01}})
    {'patience': 10, 'validation_fraction': 0.25, 'monitor': 'val_loss', 'lr': 0.01}
    """
    if train_size is not None:
        ts = float(train_size)
        if not 0.0 < ts <= 1.0:
            raise ValueError(f"{who}: train_size must be in (0, 1], got {train_size!r}")
        opts["validation_fraction"] = 1.0 - ts
    if early_stopping_monitor is not None:
        if early_stopping_monitor not in ("elbo_val", "elbo_validation", "val_loss"):
            raise ValueError(f"{who}: early_stopping_monitor={early_stopping_monitor!r}: the reference's validation "
                             "loss is 'elbo_val' (atlasfit: monitor='val_loss'); or use monitor='val_ll_per_token'")
        opts["monitor"] = "val_loss"
    if early_stopping_patience is not None:
        opts["patience"] = int(early_stopping_patience)
    if accelerator is not None:
        dev = {"cpu": "cpu", "gpu": "gpu", "cuda": "gpu", "auto": "auto"}.get(str(accelerator))
        if dev is None:
            raise ValueError(f"{who}: accelerator={accelerator!r}: use 'cpu', 'gpu' or 'auto' (atlasfit: device=)")
        opts["device"] = dev
    if plan_kwargs:
        pk = dict(plan_kwargs)
        for k, v in dict(pk.pop("optim_kwargs", None) or {}).items():
            if k not in _OPTIM_KEYS:
                raise ValueError(f"{who}: plan_kwargs['optim_kwargs'][{k!r}] is not an AdamW setting here; "
                                 f"use {_OPTIM_KEYS}")
            opts[k] = tuple(v) if k == "betas" else float(v)
        kl = dict(opts.get("kl_kwargs") or {})
        for k in [k for k in pk if k in _KL_PLAN]:
            kl[_KL_PLAN[k]] = float(pk.pop(k)) if k != "n_epochs_kl_warmup" else int(pk.pop(k))
        if kl:
            opts["kl_kwargs"] = kl
        if pk:
            raise ValueError(f"{who}: plan_kwargs keys {sorted(pk)} are not supported; supported: 'optim_kwargs' "
                             f"({', '.join(_OPTIM_KEYS)}) and {sorted(_KL_PLAN)}")
    if check_val_every_n_epoch is not None and int(check_val_every_n_epoch) != 1:
        if opts.get("early_stopping"):  # patience counts checks in the reference: ignoring it would stop elsewhere
            raise ValueError(f"{who}: check_val_every_n_epoch={check_val_every_n_epoch} with early stopping: atlasfit "
                             "validates every epoch; drop it and multiply patience by it instead")
        warn_ignored(who, "check_val_every_n_epoch", "the validation cells are scored after every epoch (only "
                     "history_ has more rows)")
    return opts
