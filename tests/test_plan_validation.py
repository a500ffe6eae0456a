"""Plan validation at the edge: every bad plan file or field is refused with one MoEScopeError sentence, never a
traceback; checks stay linear in the plan's size; hypothesis puts arbitrary JSON into every field."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import core.plan as plan_module
from core.errors import MoEScopeError
from core.plan import Plan, RoutingSpec, plan_source_warning, validate_plan

SPEC = RoutingSpec(family="tiny", moe_layers=(0, 1), n_experts=8, top_k=2)
SPECS = [SPEC, RoutingSpec(family="grouped", moe_layers=(1, 2), n_experts=8, top_k=2, n_groups=2, topk_group=1,
                           group_top_needs=2),
         RoutingSpec(family="fixed", moe_layers=(0,), n_experts=8, top_k=2, fixed_top_k=True, skippable=False)]


def _matrix(rows: int = 4, cols: int = 8) -> list[list[float]]:
    return [[1.0 if c == r else 0.0 for c in range(cols)] for r in range(rows)]


def valid_dict() -> dict:
    """A plan that validates against SPEC, with every known field and one unknown extra."""
    return {"format": "moescope-plan", "version": 1, "model": "tiny", "top_k": 2,
            "layers": {"0": {"keep": [0, 1, 2, 3]}, "1": {"keep": [4, 5, 6, 7]}},
            "merge": {"0": {"router": _matrix(), "experts": _matrix()}},
            "dynamic_skip": {"0": 0.5, "1": 0.25},
            "method": "test", "scores": {"0": [1.5, 2.5]}}


def with_value(path: tuple, value) -> dict:
    data = valid_dict()
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return data


def refused(data, *fragments: str) -> str:
    with pytest.raises(MoEScopeError) as err:
        Plan.from_dict(data)
    message = str(err.value)
    assert "\n" not in message and len(message) < 400
    for fragment in fragments:
        assert fragment in message
    return message


def test_the_valid_plan_validates_and_round_trips():
    plan = Plan.from_dict(valid_dict())
    validate_plan(plan, SPEC)
    assert set(plan.merge) == {0} and tuple(plan.merge[0][0].shape) == (4, 8)
    assert plan.dynamic_skip == {0: 0.5, 1: 0.25}
    again = Plan.from_dict(json.loads(plan.to_json()))
    assert again.extra == plan.extra and again.digest() == plan.digest()


# Plan files ------------------------------------------------------------------------------------------------------


def test_a_folder_is_refused_naming_it(tmp_path):
    with pytest.raises(MoEScopeError, match="is a folder") as err:
        Plan.load(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_unreadable_paths_are_one_sentence(tmp_path):
    (tmp_path / "file").write_text("{}")
    with pytest.raises(MoEScopeError, match="No plan file at"):
        Plan.load(tmp_path / "file" / "plan.json")  # a path through a file
    with pytest.raises(MoEScopeError, match="not a valid file path"):
        Plan.load("plan\x00.json")


def test_non_utf8_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "plan.json"
    path.write_bytes(b'{"format": "moescope-plan", "model": "caf\xe9"}')
    with pytest.raises(MoEScopeError, match="is not UTF-8") as err:
        Plan.load(path)
    assert str(path) in str(err.value)


def test_a_file_over_the_bound_is_refused_before_reading(tmp_path, monkeypatch):
    path = Plan.from_dict(valid_dict()).save(tmp_path / "plan.json")
    monkeypatch.setattr(plan_module, "MAX_PLAN_BYTES", 100)
    monkeypatch.setattr(Path, "open", lambda *a, **k: pytest.fail("read a file larger than the bound"))
    with pytest.raises(MoEScopeError, match="larger than") as err:
        Plan.load(path)
    assert str(path) in str(err.value)


def test_deep_nesting_is_refused_not_a_recursion_error(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(MoEScopeError, match="nests JSON deeper") as err:
        Plan.load(path)
    assert str(path) in str(err.value)
    # shallow enough for json to read, too deep for a plan: refused the same way, in the field
    path.write_text(json.dumps(with_value(("method",), json.loads("[" * 500 + "]" * 500))))
    with pytest.raises(MoEScopeError, match="nests JSON deeper"):
        Plan.load(path)


def test_a_number_too_long_to_read_is_one_sentence(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(valid_dict()).replace('"top_k": 2', '"top_k": ' + "9" * 5000))
    with pytest.raises(MoEScopeError, match="number too long"):
        Plan.load(path)


def test_field_errors_from_a_file_name_the_file(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(with_value(("dynamic_skip", "0"), "abc")))
    with pytest.raises(MoEScopeError, match="dynamic_skip") as err:
        Plan.load(path)
    assert str(err.value).startswith(str(path))


def test_loads_takes_an_upload_by_name():
    assert Plan.loads(json.dumps(valid_dict()).encode()).layers[0] == [0, 1, 2, 3]
    with pytest.raises(MoEScopeError, match="upload.json is not UTF-8"):
        Plan.loads(b"\xff\xfe", name="upload.json")


# Fields ----------------------------------------------------------------------------------------------------------

BAD_FIELDS = [
    # merge
    pytest.param(("merge",), [[1.0]], ["merge", "must be an object", "not a list"], id="merge-bare-list"),
    pytest.param(("merge",), None, ["merge", "not null"], id="merge-null"),
    pytest.param(("merge", "0"), {"router": _matrix()}, ["lacks 'experts'"], id="merge-missing-experts"),
    pytest.param(("merge", "0"), [_matrix(), _matrix()], ["layer 0", "not a list"], id="merge-entry-list"),
    pytest.param(("merge", "0", "router"), [[1.0] * 8, [1.0] * 7], ["ragged", "row 1"], id="merge-ragged"),
    pytest.param(("merge", "0", "experts"), [["a"] * 8] * 4, ["'experts'", "'a'", "finite numbers"],
                 id="merge-strings"),
    pytest.param(("merge", "0", "experts"), [[True] * 8] * 4, ["true", "finite numbers"], id="merge-bools"),
    pytest.param(("merge", "0", "router"), [[float("nan")] * 8] * 4, ["nan", "finite"], id="merge-nan"),
    pytest.param(("merge", "0", "router"), [[10 ** 400] * 8] * 4, ["finite"], id="merge-huge-int"),
    pytest.param(("merge", "0", "router"), [1.0] * 8, ["row 0", "list of numbers"], id="merge-vector"),
    pytest.param(("merge", "0", "router"), [], ["empty list"], id="merge-empty"),
    pytest.param(("merge", "0", "router"), [[]], ["empty row 0"], id="merge-empty-row"),
    pytest.param(("merge", "0", "router"), "eye", ["non-empty list of rows", "a string"], id="merge-string"),
    pytest.param(("merge", "x"), {"router": _matrix(), "experts": _matrix()}, ["'x'", "not a layer index"],
                 id="merge-layer-key"),
    # dynamic_skip
    pytest.param(("dynamic_skip", "0"), "abc", ["dynamic_skip", "layer 0", "'abc'", "between 0 and 1"],
                 id="skip-string"),
    pytest.param(("dynamic_skip", "0"), None, ["is null", "between 0 and 1"], id="skip-null"),
    pytest.param(("dynamic_skip", "0"), [0.5], ["a list", "between 0 and 1"], id="skip-list"),
    pytest.param(("dynamic_skip", "0"), 1.5, ["1.5", "between 0 and 1"], id="skip-out-of-range"),
    pytest.param(("dynamic_skip", "0"), float("nan"), ["nan"], id="skip-nan"),
    pytest.param(("dynamic_skip", "0"), True, ["true"], id="skip-bool"),
    pytest.param(("dynamic_skip",), [0.5, 0.5], ["must be an object", "not a list"], id="skip-bare-list"),
    pytest.param(("dynamic_skip",), None, ["not null"], id="skip-whole-null"),
    # layers and keep ids
    pytest.param(("layers", "0", "keep"), [0, True], ["true", "integers"], id="keep-bool"),
    pytest.param(("layers", "0", "keep"), [0, 1.0], ["1.0", "integers"], id="keep-float"),
    pytest.param(("layers", "0", "keep"), [0, None], ["null", "integers"], id="keep-null"),
    pytest.param(("layers", "0", "keep"), "0,1", ["keep", "list"], id="keep-string"),
    pytest.param(("layers", "0"), {"kept": [0, 1]}, ["keep"], id="layer-without-keep"),
    pytest.param(("layers", "²"), {"keep": [0, 1]}, ["'²'", "not a layer index"], id="layer-key-superscript"),
    pytest.param(("layers", "-1"), {"keep": [0, 1]}, ["'-1'", "not a layer index"], id="layer-key-negative"),
    pytest.param(("layers", "1" * 5000), {"keep": [0, 1]}, ["not a layer index"], id="layer-key-huge"),
    pytest.param(("layers", "00"), {"keep": [0, 1]}, ["layer 0 twice"], id="layer-key-twice"),
    # header and scalars
    pytest.param(("version",), True, ["version true"], id="version-bool"),
    pytest.param(("top_k",), True, ["top_k", "true"], id="top-k-bool"),
    pytest.param(("top_k",), "2", ["top_k", "'2'"], id="top-k-string"),
    pytest.param(("model",), ["m"], ["\"model\"", "a list"], id="model-list"),
]


@pytest.mark.parametrize("path,value,fragments", BAD_FIELDS)
def test_bad_fields_are_refused_with_one_sentence(path, value, fragments):
    refused(with_value(path, value), *fragments)


def test_unknown_extras_round_trip_untouched():
    data = with_value(("provenance",), {"nested": [1, "two", None, {"3": 4.5}]})
    plan = Plan.from_dict(data)
    assert plan.extra["provenance"] == data["provenance"]
    assert json.loads(plan.to_json())["provenance"] == data["provenance"]


def test_properties_of_plans_built_in_code_raise_only_moescope_errors():
    assert Plan(layers={}, extra={"dynamic_skip": {0: 0.5}}).dynamic_skip == {0: 0.5}  # int keys from code
    for extra in ({"merge": [1]}, {"merge": {"0": {"router": [[1.0], [1.0, 2.0]], "experts": [[1.0]]}}},
                  {"merge": {"0": {"router": [["a"]], "experts": [[1.0]]}}}, {"merge": {"0": {"router": [1.0]}}}):
        with pytest.raises(MoEScopeError, match="merge"):
            _ = Plan(layers={}, extra=extra).merge
    with pytest.raises(MoEScopeError, match="between 0 and 1"):
        _ = Plan(layers={}, extra={"dynamic_skip": {"0": "abc"}}).dynamic_skip


# validate_plan ---------------------------------------------------------------------------------------------------


def test_a_merge_for_a_layer_that_is_not_moe_is_refused():
    data = with_value(("merge", "5"), {"router": _matrix(8), "experts": _matrix(8)})
    with pytest.raises(MoEScopeError, match="merge names layer 5, which is not a MoE layer"):
        validate_plan(Plan.from_dict(data), SPEC)


def test_a_keep_list_longer_than_the_experts_is_refused():
    with pytest.raises(MoEScopeError, match="lists 9 experts but the model has only 8"):
        validate_plan(Plan(layers={0: list(range(8)) + [0]}), SPEC)


def test_many_unique_ids_validate():
    n = 200_000
    spec = RoutingSpec(family="huge", moe_layers=(0,), n_experts=n, top_k=2)
    validate_plan(Plan.from_dict({"format": "moescope-plan", "version": 1, "layers": {"0": {"keep": list(range(n))}}}),
                  spec)


def test_duplicate_ids_are_found_in_linear_time_with_a_short_message():
    # the old check called keep.count per id: 200k ids with duplicates took minutes (issue 20)
    n = 200_000
    spec = RoutingSpec(family="huge", moe_layers=(0,), n_experts=n, top_k=2)
    with pytest.raises(MoEScopeError, match=r"lists expert\(s\) \[0, 1, 2, .*, \.\.\.\] more than once") as err:
        validate_plan(Plan(layers={0: list(range(n // 2)) * 2}), spec)
    assert len(str(err.value)) < 200


def test_out_of_range_ids_are_listed_briefly():
    with pytest.raises(MoEScopeError, match="out of range") as err:
        validate_plan(Plan(layers={0: [0, 1] + list(range(100, 200))}), RoutingSpec("t", (0,), 150, 2))
    assert len(str(err.value)) < 200


# plan_source_warning ---------------------------------------------------------------------------------------------


def test_source_warning(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    monkeypatch.chdir(tmp_path)
    here = Plan(layers={}, model="./model/")
    assert plan_source_warning(here, tmp_path / "model") is None  # the same folder, written differently
    assert plan_source_warning(Plan(layers={}), "anything") is None  # the plan names no model
    assert plan_source_warning(Plan(layers={}, model="org/moe"), "org/moe") is None
    warning = plan_source_warning(Plan(layers={}, model="org/moe"), tmp_path / "model", path="p.json")
    assert warning is not None and "\n" not in warning
    assert warning.startswith("Plan p.json was made for model 'org/moe'") and str(tmp_path / "model") in warning
    assert "org/other" in plan_source_warning(here, "org/other")
    odd = plan_source_warning(Plan(layers={}, model="a\x00\ud800" + "x" * 5000), "org/moe")
    assert odd is not None and "\\x00" in odd and len(odd) < 600


# Property tests --------------------------------------------------------------------------------------------------

KEYS = st.one_of(st.text(max_size=6), st.from_regex(r"[0-9]{1,3}", fullmatch=True),
                 st.sampled_from(["0", "1", "2", "5", "00", "-1", "router", "experts", "keep"]))
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-3, 10),
                    st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 1), st.text(max_size=8))
JSON = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=9),
                                                     st.dictionaries(KEYS, inner, max_size=5)), max_leaves=40)
# a field value that is sometimes a well-formed matrix (so that merges reach validate_plan's shape checks)
MATRICES = st.integers(1, 9).flatmap(lambda cols: st.lists(st.lists(st.floats(-2, 2), min_size=cols, max_size=cols),
                                                           min_size=1, max_size=9))
VALUES = st.one_of(JSON, MATRICES, st.builds(lambda m: {"router": m, "experts": m}, MATRICES))

FIELDS = [("format",), ("version",), ("model",), ("top_k",), ("layers",), ("layers", "0"), ("layers", "1"),
          ("layers", "0", "keep"), ("layers", "0", "keep", 0), ("merge",), ("merge", "0"), ("merge", "0", "router"),
          ("merge", "0", "experts"), ("merge", "0", "router", 0), ("merge", "0", "experts", 0, 0), ("dynamic_skip",),
          ("dynamic_skip", "0"), ("method",)]
EXAMPLES = 200  # per property test; five tests, 1,000 generated plans in all


def accepted_plan_never_raises_anything_else(data) -> None:
    """``data`` is refused with MoEScopeError, or it is a plan whose every use either works or refuses with one."""
    try:
        plan = Plan.from_dict(data)
    except MoEScopeError:
        return
    for use in (lambda: plan.merge, lambda: plan.dynamic_skip, plan.digest, plan.to_json,
                *[lambda s=s, e=e: validate_plan(plan, s, for_export=e) for s in SPECS for e in (False, True)]):
        try:
            use()
        except MoEScopeError:
            pass
    again = Plan.from_dict(json.loads(plan.to_json()))  # what it writes, it reads back
    assert again.layers == plan.layers and again.top_k == plan.top_k and again.digest() == plan.digest()


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from(FIELDS), value=VALUES)
def test_any_json_in_any_field_is_a_plan_or_one_sentence(field, value):
    accepted_plan_never_raises_anything_else(with_value(field, value))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(section=st.sampled_from(["layers", "merge", "dynamic_skip"]), key=KEYS, value=VALUES)
def test_any_json_under_any_layer_key_is_a_plan_or_one_sentence(section, key, value):
    data = valid_dict()
    data[section][key] = value
    accepted_plan_never_raises_anything_else(data)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.text(max_size=12), value=VALUES)
def test_any_json_under_any_extra_key_is_a_plan_or_one_sentence(key, value):
    data = valid_dict()
    data[key] = value
    accepted_plan_never_raises_anything_else(data)


@settings(max_examples=EXAMPLES, deadline=None)
@given(data=st.one_of(JSON, st.builds(lambda d: {**valid_dict(), **d},
                                      st.dictionaries(st.sampled_from(sorted(valid_dict())), VALUES))))
def test_any_document_is_a_plan_or_one_sentence(data):
    accepted_plan_never_raises_anything_else(copy.deepcopy(data))


@settings(max_examples=EXAMPLES, deadline=None)
@given(raw=st.one_of(st.binary(max_size=64),
                     st.builds(lambda d, cut: json.dumps(d).encode()[:cut], st.just(valid_dict()), st.integers(0, 900))))
def test_any_bytes_load_as_a_plan_or_one_sentence(raw):
    try:
        plan = Plan.loads(raw, name="fuzz.json")
    except MoEScopeError as exc:
        assert "\n" not in str(exc)
    else:
        accepted_plan_never_raises_anything_else(plan.to_dict())

