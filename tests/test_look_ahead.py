"""The Prune page's speed by design: 95% intervals from per-example values, a streamed first estimate, and the
look-ahead that scores the settings next to the user's in the background and gives way to the user's own calls."""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path

import pytest

from core.evaluation import harness
from core.evaluation.interval import change_interval, mean_interval, score_interval, wilson_interval
from core.model import load_model
from core.workbench import PlanRequest, Workbench

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data" / "model"


@pytest.fixture(scope="module")
def mm():
    return load_model(str(SAMPLE))


# ----- intervals ---------------------------------------------------------------------------------------------
def test_mean_interval_is_the_t_free_normal_interval_of_the_mean():
    values = [1.0, 2.0, 4.0, 9.0]
    mean = sum(values) / 4
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 3)
    low, high = mean_interval(values)
    assert (low + high) / 2 == pytest.approx(mean)
    assert (high - low) / 2 == pytest.approx(1.959964 * sd / 2, rel=1e-6)


def test_weighted_interval_centres_on_the_token_weighted_mean():
    # two texts: nll 1.0 over 3 tokens, 3.0 over 1 token -> token-weighted mean 1.5, not 2.0
    low, high = mean_interval([1.0, 3.0], [3.0, 1.0])
    assert (low + high) / 2 == pytest.approx(1.5)
    # ratio estimator by hand: sum w^2 (v - R)^2 = 9*0.25 + 1*2.25 = 4.5; / (n(n-1)) = 2.25; sqrt 1.5; / mean w 2
    assert (high - low) / 2 == pytest.approx(1.959964 * 1.5 / 2, rel=1e-6)


def test_wilson_interval_stays_open_at_zero_and_matches_a_textbook_value():
    low, high = wilson_interval(0, 20)
    # 0 of 20: Wilson's upper bound is 16.1%, where the normal interval would be [0, 0]
    assert low == pytest.approx(0.0, abs=1e-9) and 15 < high < 17
    low, high = wilson_interval(10, 20)
    assert low == pytest.approx(29.9, abs=0.1) and high == pytest.approx(70.1, abs=0.1)
    assert score_interval([0.0] * 20) == (low0 := wilson_interval(0, 20)) and low0[1] > 0


def test_paired_change_interval_is_narrower_than_the_scores_spread():
    full = [10.0, 50.0, 90.0, 30.0, 70.0]
    pruned = [v - 5 + (i % 2) for i, v in enumerate(full)]  # a steady drop of about 5 on every example
    low, high = change_interval(pruned, full)
    assert -5.2 < low < -4.6 < high < -4.0  # differences -5, -4, -5, -4, -5: mean -4.6 ± 0.48
    assert high - low < (mean_interval(full)[1] - mean_interval(full)[0]) / 10
    with pytest.raises(ValueError, match="not the same examples"):
        change_interval(pruned, full[:3])


# ----- per-example values behind every score --------------------------------------------------------------------
@pytest.mark.parametrize("task", ["qa", "arithmetic", "qa_choice", "prose"])
def test_per_example_values_average_to_the_reported_metric(mm, task):
    ev = harness.Evaluator(mm, batch_size=64)
    result = ev.evaluate(task, None, "test", 24, agreement=False)
    assert result.samples, "every sample task's headline metric is a mean of per-example values"
    for metric, values in result.samples.items():
        assert len(values) == result.n_examples
        weights = result.weights.get(metric) or [1.0] * len(values)
        mean = sum(v * w for v, w in zip(values, weights)) / sum(weights)
        assert mean == pytest.approx(result.metrics[metric], rel=1e-9, abs=1e-9)
        low, high = result.interval(metric)
        assert low <= result.metrics[metric] <= high
    assert "samples" not in result.to_dict()  # JSON outputs stay as they were


def test_comparison_carries_intervals_and_a_zero_change_without_a_plan(mm):
    bench = Workbench(mm)
    plan = bench.plan(PlanRequest("frequency", "qa", keep=4))
    table = bench.compare(plan, ["qa_choice"], "test", 40, agreement=False).headlines()
    row = table.iloc[0]
    assert row.pruned_low <= row.pruned <= row.pruned_high
    assert row.delta_low <= row.delta <= row.delta_high
    same = bench.compare(None, ["qa_choice"], "test", 40).headlines().iloc[0]
    assert same.delta_low == same.delta_high == 0.0


# ----- the look-ahead ------------------------------------------------------------------------------------------
def test_neighbours_are_keep_plus_minus_one_and_two_then_top_k_then_other_fast_methods(mm):
    bench = Workbench(mm)  # sample model: 8 experts, top-2, keeps 2..8
    near = bench.neighbours(PlanRequest("frequency", "qa", keep=4))
    assert [(r.method, r.keep, r.top_k) for r in near] == [
        ("frequency", 5, None), ("frequency", 3, None), ("frequency", 6, None), ("frequency", 2, None),
        ("frequency", 4, 1),  # top-k 3 does not exist on a top-2 model
        ("random", 4, None), ("soft_activation", 4, None), ("reap", 4, None)]
    edge = bench.neighbours(PlanRequest("reap", "qa", keep=8, top_k=1))
    assert [(r.method, r.keep, r.top_k) for r in edge][:3] == [("reap", 7, 1), ("reap", 6, 1), ("reap", 8, None)]
    top_k_only = bench.neighbours(PlanRequest("top_k", "qa", ratio=0.0, top_k=1))
    assert top_k_only == []  # top-1 is the only reduction of a top-2 model


def test_prefetched_settings_are_served_from_the_cache_and_kept_off_the_chart_until_asked(mm, monkeypatch):
    bench = Workbench(mm)
    request = PlanRequest("frequency", "qa", keep=4)
    bench.compare(bench.plan(request), ["qa"], "test", 20, agreement=False)
    near = bench.neighbours(request)[:3]
    assert not any(bench.is_cached(r, ["qa"], "test", 20) for r in near)
    bench.prefetch(near, ["qa"], "test", 20)
    assert bench.wait_for_look_ahead(timeout=600)
    assert all(bench.is_cached(r, ["qa"], "test", 20) for r in near)
    assert bench.look_ahead_stats["scored"] == 3
    assert len(bench.sweep_table()) == 2  # the user's setting and the full model only
    monkeypatch.setattr(harness, "task_kind", lambda spec: pytest.fail("a prefetched setting was scored again"))
    result = bench.compare(bench.plan(near[0]), ["qa"], "test", 20, agreement=False)
    assert result.examples("qa") == 20
    assert len(bench.sweep_table()) == 3  # now on the chart


def test_look_ahead_gives_way_to_the_user_and_retries_afterwards(mm):
    bench = Workbench(mm)
    started, release = threading.Event(), threading.Event()
    real = bench.evaluator.evaluate
    background_calls = []

    def evaluate(spec, plan, split, limit, progress=None, agreement=True, **kw):
        if threading.current_thread().name == "moescope-look-ahead":
            background_calls.append(plan is not None)
            started.set()
            while not release.is_set():  # a long evaluation that reports progress after every batch
                progress("generating", 1, 2)
                time.sleep(0.01)
            progress("generating", 2, 2)
        return real(spec, plan, split, limit, progress=progress, agreement=agreement, **kw)

    bench.evaluator.evaluate = evaluate
    bench.prefetch([PlanRequest("frequency", "qa", keep=5)], ["qa"], "test", 12)
    assert started.wait(120)
    done = threading.Event()

    def user():  # the user's own call starts while the look-ahead is mid-evaluation
        bench.compare(bench.plan(PlanRequest("frequency", "qa", keep=3)), ["qa"], "test", 12, agreement=False)
        done.set()

    threading.Thread(target=user).start()
    assert done.wait(300), "the user's call finished although the look-ahead never released its evaluation"
    assert bench.look_ahead_stats["gave_way"] >= 1
    release.set()
    assert bench.wait_for_look_ahead(timeout=600)
    assert bench.look_ahead_stats["scored"] == 1  # retried after the user's call, and finished
    assert bench.is_cached(PlanRequest("frequency", "qa", keep=5), ["qa"], "test", 12)


def test_look_ahead_stops_part_way_through_a_forward_when_the_user_arrives(mm):
    """Progress callbacks come between batches, and one calibration batch of a 24 x 128 model took 3 s: the
    look-ahead must also stop inside a forward, before the next MoE block, so the user waits for one block."""
    bench = Workbench(mm)
    hooks_before = sum(len(layer.block._forward_pre_hooks) for layer in mm.layers)
    arrived, blocks_after_arrival, waits = threading.Event(), [], []

    def in_background() -> bool:
        return threading.current_thread().name == "moescope-look-ahead"

    def hold_first_block(module, args, output):  # the look-ahead's first forward pauses after block 0 ...
        if in_background() and not waits:
            waits.append(1)
            arrived.set()
            deadline = time.monotonic() + 120
            while not bench._front and time.monotonic() < deadline:  # ... until the user's call has begun
                time.sleep(0.005)

    def count(module, args, output):
        if in_background() and bench._front:
            blocks_after_arrival.append(module)

    handles = [mm.layers[0].block.register_forward_hook(hold_first_block)]
    handles += [layer.block.register_forward_hook(count) for layer in mm.layers[1:]]
    try:
        bench.prefetch([PlanRequest("frequency", "qa", keep=5)], ["qa"], "test", 12)
        assert arrived.wait(120)
        user = PlanRequest("frequency", "qa", keep=3)
        bench.compare(bench.plan(user), ["qa"], "test", 12, agreement=False)
        assert bench.look_ahead_stats["gave_way"] >= 1 and bench.look_ahead_stats["failed"] == 0
        # without the hooks the paused forward ran its other 3 blocks before giving way between batches
        assert blocks_after_arrival == []
        assert bench.wait_for_look_ahead(timeout=600)
        assert bench.look_ahead_stats["scored"] == 1  # retried after the user's call, and finished
        assert bench.is_cached(PlanRequest("frequency", "qa", keep=5), ["qa"], "test", 12)
        assert bench.is_cached(user, ["qa"], "test", 12)
    finally:
        for handle in handles:
            handle.remove()
        bench.close()
    assert sum(len(layer.block._forward_pre_hooks) for layer in mm.layers) == hooks_before  # its hooks are gone


def test_a_streamed_comparison_estimates_from_the_first_batch_then_refines(mm):
    bench = Workbench(mm)
    plan = bench.plan(PlanRequest("frequency", "qa", keep=3))
    estimates = []
    final = bench.compare(plan, ["qa_choice", "prose"], "test", 40, agreement=False, estimate=estimates.append)
    # the first task on its first batch; then the first in full beside the second on its first batch
    assert [dict(zip(e.headlines()["task"], e.headlines()["examples"])) for e in estimates] == [
        {"qa_choice": 16}, {"qa_choice": 40, "prose": 16}]
    first = estimates[0].headlines().iloc[0]
    assert first.task == "qa_choice" and first.examples == 16
    assert first.pruned_low <= first.pruned <= first.pruned_high
    assert final.headlines()["examples"].tolist() == [40, 40]
    again = []
    bench.compare(plan, ["qa_choice", "prose"], "test", 40, agreement=False, estimate=again.append)
    assert again == []  # cached: nothing to estimate


def test_an_interrupt_stops_an_evaluation_between_decoding_steps_and_caches_nothing(mm):
    class Stop(Exception):
        pass

    ev = harness.Evaluator(mm, batch_size=64)
    calls = []

    def interrupt():
        calls.append(1)
        if len(calls) == 3:
            raise Stop

    with pytest.raises(Stop):
        ev.evaluate("qa", None, "test", 20, agreement=False, interrupt=interrupt)
    assert len(calls) == 3  # inside the single generation batch (20 examples, batch 64): between decoding steps
    assert not ev.cached("qa", None, "test", 20)
    assert ev.evaluate("qa", None, "test", 20, agreement=False).n_examples == 20  # no interrupt left behind
    assert len(calls) == 3
