"""Train topomics 0.0.1's ``MultimodalAmortizedLDA`` (rna + atac) on one exported planted data set and
save what the comparison needs.

Runs in the peer venv ``/work/peers/topomics`` (Python 3.12, topomics 0.0.1 + torch-geometric), never
in atlasfit's; driven by ``benchmarks/bench_topic_atlas.py --side-by-side``. Input: ``--data`` a
directory of ``scipy.sparse.save_npz`` files written by that script: ``rna_train.npz``,
``atac_train.npz`` (training cells), ``rna_ho.npz``, ``atac_ho.npz`` (held-out cells) and
``rna_ho_obs.npz`` (the observed half of the held-out RNA counts, for document completion).

The model gets topomics' defaults: ``n_inputs_modalities=[F_rna, F_atac]``,
``likelihoods=["multinomial", "bernoulli"]``, ``modality_names=["rna", "atac"]``, ``n_topics``, every
other constructor argument at its default (n_hidden 128, weight_mode "cell", background on,
regularisers on); ``train(max_epochs=E, batch_size=256, train_size=1.0, validation_size=0.0,
accelerator="cpu")`` (``lr`` only when ``--lr`` is given). Quirks met (see
``/work/shared/peers/results_topic_peers.md``): ``import topomics`` needs torch-geometric;
``train_size=1.0`` needs ``validation_size=0.0``; new data needs an ``obs["_indices"]`` column.

Output: ``--out`` JSON (epoch wall times, settings, versions) and, next to it, ``.npz`` with
``theta_recon`` (held-out cells, theta from the full cell), ``theta_dc`` (theta from the observed RNA
half + the full atac), ``phi_rna``, ``phi_atac`` (topics x features): topomics' Monte-Carlo means
(``get_cell_topic_dist`` / ``get_feature_topic_dist``, ``--eval-samples`` draws).

Usage::

    /work/peers/topomics/bin/python benchmarks/peers/topomics_lda_runner.py --data DIR --out r.json \\
        --n-topics 10 --epochs 5 --batch-size 256 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--n-topics", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=None, help="default: topomics' own")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-samples", type=int, default=1000)
    a = ap.parse_args(argv)

    import logging

    import numpy as np
    import torch

    torch.set_num_threads(a.threads)
    import anndata as ad
    import scipy.sparse as sp
    import scvi
    from lightning.pytorch.callbacks import Callback

    logging.getLogger("scvi").setLevel(logging.WARNING)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    scvi.settings.seed = a.seed
    scvi.settings.dl_num_workers = 0
    torch.set_num_threads(a.threads)
    import topomics
    from topomics.models import MultimodalAmortizedLDA

    def load(name):
        return sp.load_npz(os.path.join(a.data, name)).tocsr().astype(np.float32)

    rna_tr, atac_tr = load("rna_train.npz"), load("atac_train.npz")
    rna_ho, atac_ho, rna_obs = load("rna_ho.npz"), load("atac_ho.npz"), load("rna_ho_obs.npz")
    F_rna, F_atac = rna_tr.shape[1], atac_tr.shape[1]
    var = [f"rna_{j}" for j in range(F_rna)] + [f"atac_{j}" for j in range(F_atac)]

    def mm_adata(rna, atac):
        x = ad.AnnData(sp.hstack([rna, atac], format="csr"))
        x.var_names = var
        x.obs_names = [f"c{i}" for i in range(x.n_obs)]
        x.obs["_indices"] = np.arange(x.n_obs)
        return x

    class EpochTimer(Callback):
        def __init__(self):
            self.starts, self.ends = [], []

        def on_train_epoch_start(self, trainer, pl_module):
            self.starts.append(time.perf_counter())

        def on_train_epoch_end(self, trainer, pl_module):
            self.ends.append(time.perf_counter())

    t0 = time.perf_counter()
    adata = mm_adata(rna_tr, atac_tr)
    MultimodalAmortizedLDA.setup_anndata(adata)
    model = MultimodalAmortizedLDA(adata, n_inputs_modalities=[F_rna, F_atac], likelihoods=["multinomial", "bernoulli"],
                                   modality_names=["rna", "atac"], n_topics=a.n_topics)
    t_construct = time.perf_counter() - t0
    timer = EpochTimer()
    extra = {} if a.lr is None else {"lr": a.lr}
    t0 = time.perf_counter()
    model.train(max_epochs=a.epochs, batch_size=a.batch_size, train_size=1.0, validation_size=0.0,
                accelerator="cpu", callbacks=[timer], enable_progress_bar=False, enable_model_summary=False,
                **extra)
    t_train = time.perf_counter() - t0

    t0 = time.perf_counter()
    kw = dict(batch_size=a.batch_size, n_samples=a.eval_samples)
    theta_recon = np.asarray(model.get_cell_topic_dist(mm_adata(rna_ho, atac_ho), **kw), dtype=np.float64)
    theta_dc = np.asarray(model.get_cell_topic_dist(mm_adata(rna_obs, atac_ho), **kw), dtype=np.float64)
    phis = model.get_feature_topic_dist(as_dict=True, n_samples=a.eval_samples)
    phi_rna = np.asarray(phis[0], dtype=np.float64).T  # features x topics -> topics x features
    phi_atac = np.asarray(phis[1], dtype=np.float64).T
    t_eval = time.perf_counter() - t0
    np.savez(os.path.splitext(a.out)[0] + ".npz", theta_recon=theta_recon, theta_dc=theta_dc, phi_rna=phi_rna,
             phi_atac=phi_atac)
    res = {
        "tool": "topomics", "version": getattr(topomics, "__version__", "0.0.1"), "scvi": scvi.__version__,
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "n_train": int(rna_tr.shape[0]), "n_heldout": int(rna_ho.shape[0]), "epochs": a.epochs,
        "batch_size": a.batch_size, "lr": a.lr, "epoch_s": [e - s for s, e in zip(timer.starts, timer.ends)],
        "construct_s": t_construct, "train_wall_s": t_train, "eval_wall_s": t_eval,
    }
    with open(a.out, "w") as fh:
        json.dump(res, fh, indent=1)
    print(json.dumps({k: v for k, v in res.items() if k != "epoch_s"}))


if __name__ == "__main__":
    main()
