"""River's own contract checks (`river.checks`) over every AM estimator and every
`_unit_test_params` set, one pytest case per (estimator, params, check)."""
from __future__ import annotations

import gc

import pytest

pytest.importorskip("river")
pytest.importorskip("sklearn")  # river.checks builds some of its streams with scikit-learn

import torch
from river import checks

from amstream import AMConfig, make_learner
from amstream.river import AMClassifier, AMRegressor

ESTIMATORS = (AMClassifier, AMRegressor)


def _cases():
    for cls in ESTIMATORS:
        for i, params in enumerate(cls._unit_test_params()):
            model = cls(**params)
            for check in checks.yield_checks(model):
                if check.__name__ in model._unit_test_skips():
                    continue
                dataset = getattr(check, "keywords", {}).get("dataset")
                name = check.__name__ + (f"[{type(dataset).__name__}]" if dataset is not None else "")
                yield pytest.param(model, check, id=f"{cls.__name__}-{i}-{name}")


@pytest.fixture(autouse=True, scope="module")
def _fast_checks():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    # The first torch optimizer imports torch._dynamo: a few seconds and a great many objects.
    # Pay the import here, then freeze what exists, so that the gc.collect() calls of River's
    # memory check do not re-scan torch's import-time objects (seconds each otherwise).
    make_learner(AMConfig(arch=(2, 2, 2)))
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()
    torch.set_num_threads(before)


@pytest.mark.parametrize("model, check", list(_cases()))
def test_river_check(model, check):
    check(model.clone())
