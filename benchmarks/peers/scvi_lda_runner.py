"""Train scvi-tools' AmortizedLDA on one planted data set and save what the comparison needs.

Runs in the peer venv ``/work/peers/scvi`` (torch 2.13.0 CPU + scvi-tools), never in atlasfit's;
driven by ``benchmarks/bench_topic_vs_scvi.py`` and ``benchmarks/bench_topic_atlas.py``. Input: an
``.npz`` with the training and held-out count matrices in CSR parts
(``{train,test}_{data,indices,indptr,shape}``), or a directory written by ``bench_topic_atlas.py``
(``rna_train.npz``, ``rna_ho.npz``, ``rna_ho_obs.npz`` from ``scipy.sparse.save_npz``; the last is the
observed half of the held-out counts, whose theta is saved as ``theta_dc_mc``). Output: ``--out`` JSON
(per-epoch wall times, settings, versions) and ``--out`` with ``.npz``: the held-out topic proportions
and the topic-feature matrix, so the log-likelihood is computed by the driver's own code, not by
scvi's ``get_elbo``/``get_perplexity``.

Saved estimates:

* ``theta_mc`` = ``model.get_latent_representation(adata_test, n_samples=S)`` (scvi's MC mean),
  ``phi_mc`` = ``model.get_feature_by_topic(n_samples=S).T``;
* ``theta_mean`` = softmax of the encoder means (eval mode), ``phi_mean`` = softmax of the
  variational means of the topic-feature logits (plug-in estimates, no sampling).

Usage::

    /work/peers/scvi/bin/python benchmarks/peers/scvi_lda_runner.py --data d.npz --out r.json \\
        --n-topics 10 --epochs 5 --batch-size 256 --lr 0.01 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import time


def _csr(z, prefix):
    import scipy.sparse as sp

    return sp.csr_matrix(
        (z[f"{prefix}_data"], z[f"{prefix}_indices"], z[f"{prefix}_indptr"]), shape=tuple(z[f"{prefix}_shape"])
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--n-topics", type=int, default=10)
    ap.add_argument("--n-hidden", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--default-lr", action="store_true", help="leave lr at scvi-tools' default (ignore --lr)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-samples", type=int, default=1000)
    a = ap.parse_args(argv)

    import numpy as np
    import torch

    torch.set_num_threads(a.threads)
    import anndata as ad
    import lightning.pytorch as pl
    import scvi

    scvi.settings.seed = a.seed
    scvi.settings.num_threads = a.threads
    torch.set_num_threads(a.threads)

    Xobs = None
    if os.path.isdir(a.data):
        import scipy.sparse as sp

        def load(name):
            return sp.load_npz(os.path.join(a.data, name)).tocsr().astype(np.float32)

        Xtr, Xte, Xobs = load("rna_train.npz"), load("rna_ho.npz"), load("rna_ho_obs.npz")
    else:
        z = np.load(a.data)
        Xtr = _csr(z, "train").astype(np.float32)
        Xte = _csr(z, "test").astype(np.float32)
    adata = ad.AnnData(X=Xtr)
    adata_te = ad.AnnData(X=Xte)
    scvi.model.AmortizedLDA.setup_anndata(adata)
    model = scvi.model.AmortizedLDA(adata, n_topics=a.n_topics, n_hidden=a.n_hidden)

    class EpochTimer(pl.Callback):
        def __init__(self):
            self.times = []
            self._t = None

        def on_train_epoch_start(self, trainer, pl_module):
            self._t = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):
            self.times.append(time.perf_counter() - self._t)

    timer = EpochTimer()
    t0 = time.perf_counter()
    model.train(
        max_epochs=a.epochs,
        batch_size=a.batch_size,
        **({} if a.default_lr else {"lr": a.lr}),
        train_size=1.0,
        accelerator="cpu",
        callbacks=[timer],
        enable_progress_bar=False,
        logger=False,
        enable_checkpointing=False,
    )
    train_wall = time.perf_counter() - t0

    t1 = time.perf_counter()
    theta_mc = model.get_latent_representation(adata_te, n_samples=a.eval_samples).to_numpy()
    phi_mc = model.get_feature_by_topic(n_samples=a.eval_samples).to_numpy().T
    extra_arrays = {}
    if Xobs is not None:
        extra_arrays["theta_dc_mc"] = model.get_latent_representation(
            ad.AnnData(X=Xobs), n_samples=a.eval_samples).to_numpy()
    guide = model.module.guide
    guide.eval()
    with torch.no_grad():
        dist_, _ = guide.encoder(torch.as_tensor(Xte.toarray()))
        theta_mean = torch.softmax(dist_.loc, dim=1).numpy()
        phi_mean = torch.softmax(guide.topic_feature_posterior_mu, dim=1).numpy()
    eval_wall = time.perf_counter() - t1
    np.savez(
        os.path.splitext(a.out)[0] + ".npz",
        theta_mc=theta_mc,
        phi_mc=phi_mc,
        theta_mean=theta_mean,
        phi_mean=phi_mean,
        **extra_arrays,
    )
    res = {
        "tool": "scvi-tools",
        "version": scvi.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "n_train": int(Xtr.shape[0]),
        "n_test": int(Xte.shape[0]),
        "n_features": int(Xtr.shape[1]),
        "n_topics": a.n_topics,
        "n_hidden": a.n_hidden,
        "epochs": a.epochs,
        "batch_size": a.batch_size,
        "lr": None if a.default_lr else a.lr,
        "epoch_s": timer.times,
        "train_wall_s": train_wall,
        "eval_wall_s": eval_wall,
    }
    with open(a.out, "w") as fh:
        json.dump(res, fh, indent=1)
    print(json.dumps({k: v for k, v in res.items() if k != "epoch_s"}))


if __name__ == "__main__":
    main()
