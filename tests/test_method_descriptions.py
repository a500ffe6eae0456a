"""Methods describe themselves: label, kind, early stop and resume, and their parameters from the dataclass
fields (as scikit-learn's ``get_params``); plans record those parameters; frequency and soft activation count
routes in memory exactly as a recorded profile counts them."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from core.aggregate import expert_usage
from core.methods import (
    METHODS,
    SCORE,
    SEARCH,
    Target,
    catalog,
    describe,
    make_method,
    quick_methods,
)
from core.methods.usage import routing_usage
from core.profiling import profile_texts
from core.routing_profile import Profile

from .test_methods import TEXTS, lm_task, with_dead_experts


def test_every_method_describes_itself():
    infos = catalog()
    assert list(infos) == list(METHODS)
    for name, info in infos.items():
        assert info.name == name and info.label and info.kind in (SCORE, SEARCH)
    assert [n for n, i in infos.items() if i.is_search] == ["naee", "dynamic_skip", "eep"]
    assert [n for n, i in infos.items() if i.can_stop] == ["eep"] == [n for n, i in infos.items() if i.can_resume]
    assert [n for n, i in infos.items() if i.keeps_all_experts] == ["top_k"]
    assert quick_methods() == ["random", "frequency", "soft_activation", "reap"]
    assert describe("eep").label == "EEP (evolutionary search)"


@pytest.mark.parametrize("name", list(METHODS))
def test_parameters_are_the_dataclass_fields(name):
    fields = {f.name: f.default for f in dataclasses.fields(METHODS[name])
              if f.name not in ("name", "should_stop", "state_path")}
    assert describe(name).parameters == fields
    method = make_method(name)
    assert method.get_params() == fields
    if fields:
        key, default = next((k, v) for k, v in fields.items() if isinstance(v, int) and not isinstance(v, bool))
        assert make_method(name, **{key: default + 1}).get_params()[key] == default + 1


def test_a_frequency_plan_records_its_settings(tmp_path):
    plan = make_method("frequency", batch_size=2).plan(with_dead_experts(), lm_task(tmp_path), Target(keep=5))
    assert plan.extra["parameters"] == {"batch_size": 2}


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_routing_counts_in_memory_equal_a_recorded_profiles(tmp_path, batch_size):
    mm = with_dead_experts()
    calibration = lm_task(tmp_path)
    counts, mass, passes = routing_usage(mm, calibration, batch_size=batch_size)
    path = profile_texts(mm, {calibration.task.name: calibration.texts()}, tmp_path / "p.parquet",
                         batch_size=batch_size, progress=False)
    usage = expert_usage(Profile(path))
    assert passes == len(TEXTS)
    for layer in mm.layer_indices:
        rows = usage[usage.layer == layer].sort_values("expert")
        assert counts[layer].tolist() == rows["count"].tolist()
        np.testing.assert_allclose(mass[layer], rows["weight_mass"], rtol=1e-12)
