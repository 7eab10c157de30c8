"""Test helper: a module-scoped autouse fixture that makes float64 the topic model's default dtype.

Import it as ``from _topic_dtype import float64_topic_default  # noqa: F401`` in test modules that
check the API against float64 closed forms (to 1e-9 and tighter); module scope, so the module's
fitted-model fixtures see it too. The float32 default itself is tested in tests/test_topic_defaults.py.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module", autouse=True)
def float64_topic_default():
    from atlasfit.models.topic import _model

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_model, "DEFAULT_DTYPE", "float64")
        yield
