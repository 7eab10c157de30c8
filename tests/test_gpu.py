"""GPU path: the same kernels on CuPy arrays (``pytest -m gpu``). Skipped without CuPy and a device;
CPU runs never import CuPy (these tests are deselected by default and importorskip otherwise)."""

from __future__ import annotations

import numpy as np
import pytest
from test_multigedi_model import fixture_mudata, model_for
from test_multigedi_parity import TOL, score_state

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cupy():
    cp = pytest.importorskip("cupy")
    try:
        if not cp.cuda.is_available():
            pytest.skip("CuPy is installed but no CUDA device is visible")
    except Exception as err:  # CUDA driver errors surface as various exception types
        pytest.skip(f"CUDA unavailable: {err}")
    return cp


def test_multigedi_gpu_matches_reference_fixture(cupy):
    # reference numbers: multigedi 1.1.0 stored states (tests/data), bar 1e-8 in float64
    d, cfg, mdata, conf = fixture_mudata()
    model = model_for(cfg, conf)
    model.device = "gpu"
    model.fit(mdata, max_iterations=10, progress=False)
    scores = score_state(model.export_state(), d, 10)
    worst = max(scores, key=scores.get)
    assert scores[worst] <= TOL, f"{worst}: {scores[worst]:.3g}"


def test_multigedi_gpu_float32_close_to_float64(cupy):
    d, cfg, mdata, conf = fixture_mudata()
    ref = model_for(cfg, conf).fit(mdata, max_iterations=10, progress=False)
    m32 = model_for(cfg, conf)
    m32.device = "gpu"
    m32.config = type(m32.config)(K=m32.config.K, mode=m32.config.mode, seed=m32.config.seed,
                                  dtype=np.float32, modalities=m32.config.modalities)
    m32.fit(mdata, max_iterations=10, progress=False)
    for m in conf:
        # bound: the CPU float32 test (tests/test_multigedi_parity.py) keeps 1e-3 after 10 iterations
        assert abs(m32.get_sigma2(m) - ref.get_sigma2(m)) <= 1e-3 * abs(ref.get_sigma2(m))


def _topic_data(n=400, seed=0):
    rng = np.random.default_rng(seed)
    theta = rng.dirichlet(np.full(4, 0.3), n)
    phi = rng.dirichlet(np.full(50, 0.1), 4)
    rna = np.vstack([rng.multinomial(300, t @ phi) for t in theta]).astype(float)
    atac = (rng.random((n, 80)) < 0.05 + 0.3 * (theta @ rng.random((4, 80)))).astype(float)
    return {"rna": rna, "atac": atac}, np.repeat(["a", "b"], n // 2)


def test_topic_model_gpu_follows_the_cpu_run(cupy):
    # same keys (init, minibatches, noise) on both devices: only float rounding differs, so after 3 epochs
    # the losses agree to 1e-6 relative in float64 (the CPU run is the reference)
    from atlasfit.models.topic import TopicModelConfig, train_serial

    data, sample = _topic_data()
    cfg = TopicModelConfig(("rna", "atac"), (50, 80), ("multinomial", "bernoulli"), n_topics=4, n_hidden=16)
    cpu = train_serial(data, cfg, sample=sample, n_epochs=3, batch_size=64, lr=1e-2, seed=0)
    gpu = train_serial(data, cfg, sample=sample, n_epochs=3, batch_size=64, lr=1e-2, seed=0, device="gpu")
    a = np.array([h["loss"] for h in cpu.history])
    b = np.array([h["loss"] for h in gpu.history])
    np.testing.assert_allclose(b, a, rtol=1e-6)
    for k, v in cpu.params.items():
        np.testing.assert_allclose(np.asarray(gpu.params[k]), v, rtol=1e-5, atol=1e-8, err_msg=k)
