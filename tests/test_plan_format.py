"""The plan file format stays version 1 while merge matrices, dynamic skipping and provenance are typed fields:
files written before the typed fields (tests/data/plans_v1, written by the methods of commit 27edf60) load and save
byte-identically with the same digest, every kind of v1 document round-trips, and code that builds plans with
``extra={...}`` or reads ``plan.extra[...]`` keeps getting what it got."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest

from core.errors import MoEScopeError
from core.plan import MergeMatrices, Plan, Provenance

DATA = Path(__file__).parent / "data"
FIXTURES = sorted((DATA / "plans_v1").glob("*.json"))
DIGESTS = json.loads((DATA / "plans_v1_digests.json").read_text())
HEADER = {"format": "moescope-plan", "version": 1, "model": "org/moe", "top_k": 2,
          "layers": {"0": {"keep": [0, 1, 2, 3]}, "1": {"keep": [4, 5, 6, 7]}}}
EYE = [[1.0 if c == r else 0.0 for c in range(8)] for r in range(4)]
PROVENANCE = {"method": "frequency", "parameters": {}, "seed": None,
              "target": {"keep": 4, "ratio": None, "top_k": 2},
              "calibration": {"task": "lm", "split": "calibration", "limit": None, "digest": "4bc9d20947733251"},
              "forward_passes": 5, "wall_time_s": 0.123}

V1_DOCUMENTS = {
    "plain": {**HEADER},
    "plain-nulls": {**HEADER, "model": None, "top_k": None, "layers": {}},
    "merge": {**HEADER, "merge": {"0": {"router": EYE, "experts": EYE}, "1": {"router": EYE, "experts": EYE}}},
    "merge-with-ints-and-entry-extras": {**HEADER, "merge": {"0": {"router": [[1, 0, 0, 0, 0, 0, 0, 0]] * 4,
                                                                   "experts": EYE, "note": "hand-made"}}},
    "dynamic-skip": {**HEADER, "dynamic_skip": {"0": 0.5, "1": 0.25}},
    "dynamic-skip-ints": {**HEADER, "dynamic_skip": {"0": 0, "1": 1}},
    "dynamic-skip-empty": {**HEADER, "dynamic_skip": {}},
    "provenance": {**HEADER, **PROVENANCE, "scores": {"0": [1.5, 2.5]}},
    "provenance-partial": {**HEADER, "method": "custom", "cancelled": False, "planned_on": "org/other"},
    "unknown-extras": {**HEADER, "scores": [1.5], "notes": {"nested": [1, "two", None, {"3": 4.5}]}, "": 0},
    # typed and unknown keys interleaved, typed ones first and last: each stays where the file put it
    "interleaved": {**HEADER, "dynamic_skip": {"1": 0.5}, "note": "x", "seed": 3, "merge": {"0": {
        "router": EYE, "experts": EYE}}, "fitness": {"curve": [1.0]}, "method": "eep", "calibration": None},
}


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_plans_written_before_the_typed_fields_load_and_save_byte_identically(path, tmp_path):
    text = path.read_text()
    plan = Plan.load(path)
    assert plan.to_json() == text
    assert plan.save(tmp_path / "again.json").read_text() == text
    assert plan.digest() == DIGESTS[path.name]  # result caches keyed by the digest still hit
    data = json.loads(text)
    assert dict(plan.extra) == {k: v for k, v in data.items() if k not in HEADER}  # old reads see the same values
    assert not set(plan.extra.unknown) & {"merge", "dynamic_skip", "method", "seed", "wall_time_s", "planned_on"}
    assert plan.provenance.method == data.get("method")
    assert plan.provenance.forward_passes == data.get("forward_passes")
    assert (plan.merge_matrices is None) == ("merge" not in data)
    assert (plan.skip_thresholds is None) == ("dynamic_skip" not in data)


@pytest.mark.parametrize("name", sorted(V1_DOCUMENTS))
def test_every_kind_of_v1_document_round_trips(name):
    data = copy.deepcopy(V1_DOCUMENTS[name])
    plan = Plan.from_dict(copy.deepcopy(data))
    assert plan.to_dict() == data and list(plan.to_dict()) == list(data)
    assert plan.to_json() == json.dumps(data, indent=2) + "\n"
    again = Plan.from_dict(json.loads(plan.to_json()))
    assert again == plan and again.digest() == plan.digest()


def test_typed_fields_hold_what_the_file_says():
    plan = Plan.from_dict(copy.deepcopy(V1_DOCUMENTS["interleaved"]))
    assert plan.merge_matrices == {0: MergeMatrices(router=EYE, experts=EYE)}
    assert plan.skip_thresholds == {1: 0.5} and plan.dynamic_skip == {1: 0.5}
    assert plan.provenance == Provenance(method="eep", seed=3, calibration=None)
    assert plan.extra.unknown == {"note": "x", "fitness": {"curve": [1.0]}}
    assert tuple(plan.merge[0][0].shape) == (4, 8)
    ints = Plan.from_dict(copy.deepcopy(V1_DOCUMENTS["dynamic-skip-ints"]))
    assert ints.dynamic_skip == {0: 0.0, 1: 1.0} and all(type(b) is float for b in ints.dynamic_skip.values())


def test_extra_given_at_construction_moves_into_the_typed_fields():
    merge = {"0": {"router": EYE, "experts": EYE}}
    plan = Plan(layers={0: [0, 1, 2, 3]}, top_k=2, model="org/moe",
                extra={"method": "eep", "seed": None, "merge": merge, "dynamic_skip": {0: 0.5}, "note": [1]})
    assert plan.provenance.method == "eep" and plan.merge_matrices == {0: MergeMatrices(EYE, EYE)}
    assert plan.skip_thresholds == {0: 0.5} and plan.extra.unknown == {"note": [1]}
    # reads written against the free-form dict see the same values
    assert plan.extra.get("method") == "eep" and plan.extra["seed"] is None and "seed" in plan.extra
    assert plan.extra["merge"] == merge and "merge" in plan.extra and plan.extra["dynamic_skip"] == {"0": 0.5}
    assert plan.extra.get("wall_time_s") is None and "wall_time_s" not in plan.extra
    assert plan.extra.get("calibration", {}) == {}
    assert list(plan.to_dict())[5:] == ["method", "seed", "merge", "dynamic_skip", "note"]
    assert plan.to_dict()["dynamic_skip"] == {"0": 0.5}


def test_writes_through_extra_go_to_the_typed_fields():
    plan = Plan(layers={0: [0, 1, 2, 3]}, extra={"scores": [1.0]})
    plan.extra["merge"] = {"0": {"router": EYE, "experts": EYE}}  # as EEP's merging_plan does
    assert plan.merge_matrices == {0: MergeMatrices(EYE, EYE)} and "merge" not in plan.extra.unknown
    assert plan.extra.pop("scores") == [1.0] and plan.extra.unknown == {}  # as the random method does
    plan.extra["cancelled"] = True
    assert plan.provenance.cancelled is True
    del plan.extra["merge"]
    assert plan.merge_matrices is None and "merge" not in plan.to_dict()
    with pytest.raises(MoEScopeError, match="between 0 and 1"):
        plan.extra["dynamic_skip"] = {"0": 2.0}
    with pytest.raises(KeyError):
        del plan.extra["seed"]


def test_typed_fields_set_in_code_are_written():
    plan = Plan(layers={0: [0, 1]}, extra={"note": "n"})
    plan.provenance.method = "custom"
    plan.skip_thresholds = {1: 0.25}
    assert list(plan.to_dict())[5:] == ["note", "dynamic_skip", "method"]
    again = Plan.loads(plan.to_json())
    assert again == plan and again.extra["method"] == "custom"


def test_copies_keep_typed_fields_and_order():
    plan = Plan.from_dict(copy.deepcopy(V1_DOCUMENTS["interleaved"]))
    moved = dataclasses.replace(plan, model="org/other")
    assert moved.to_dict() == {**plan.to_dict(), "model": "org/other"}
    assert list(moved.to_dict()) == list(plan.to_dict())
    rebuilt = Plan(layers=plan.layers, top_k=plan.top_k, model=plan.model, extra=dict(plan.extra))
    assert rebuilt.to_json() == plan.to_json()
    moved.provenance.seed = 4
    assert plan.provenance.seed == 3  # the copy does not share its provenance


@pytest.mark.parametrize("key,value", [("method", 5), ("seed", "abc"), ("seed", True), ("parameters", [1]),
                                       ("forward_passes", 1.5), ("wall_time_s", "1 s"), ("cancelled", 0),
                                       ("calibration", "lm"), ("target", 4), ("planned_on", ["m"])])
def test_provenance_of_the_wrong_type_is_one_sentence(key, value):
    with pytest.raises(MoEScopeError, match=f'"{key}" must be') as err:
        Plan.from_dict({**HEADER, key: value})
    assert "\n" not in str(err.value)
    with pytest.raises(MoEScopeError, match=f'"{key}" must be'):
        Plan(layers={}, extra={key: value})


def test_an_export_records_where_it_was_planned_as_before(tmp_path):
    from core.export import export_pruned
    from core.model import MoEModel

    from .tiny_models import build, char_tokenizer

    mm = MoEModel(build("mixtral"), tokenizer=char_tokenizer(), source="tiny-mixtral")
    plan = Plan(layers={0: [0, 1, 2, 3], 1: [4, 5, 6, 7]}, top_k=2, model="elsewhere/moe",
                extra={"method": "frequency", "note": "hand"})
    out = export_pruned(mm, plan, tmp_path / "out")
    assert (out / "moescope-plan.json").read_text() == (DATA / "plans_v1" / "exported.json").read_text()
    assert plan.provenance.planned_on is None and plan.model == "elsewhere/moe"  # the plan itself is unchanged
