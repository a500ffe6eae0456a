"""EEP stopped and resumed: cancellation belongs to a run, not to the saved search, so a resumed search
ends exactly where an uninterrupted one with the same seed ends."""

from __future__ import annotations

import pytest

from core.methods import Target, make_method
from core.methods.eep import SearchState, evolve

from .test_eep import overlap
from .test_methods import lm_task, with_dead_experts


@pytest.mark.parametrize("stop_after", [5, 20, 31])  # inside the first generation, inside later ones
def test_stop_then_resume_equals_an_uninterrupted_run(tmp_path, stop_after):
    """Cancellation belongs to a run, not to the saved search: a run stopped mid-generation resumes (even
    from a state file that recorded ``cancelled``) and ends exactly where an uninterrupted run ends."""
    whole = evolve(overlap, 3, 8, 4, generations=6, seed=5)
    path = tmp_path / "state.json"
    calls = []

    def fit(genome):
        calls.append(genome)
        return overlap(genome)

    stopped = evolve(fit, 3, 8, 4, generations=6, seed=5, on_generation=lambda s: s.save(path),
                     should_stop=lambda: len(calls) >= stop_after)
    assert stopped.cancelled and stopped.best[1] == max(overlap(g) for g in calls)
    saved = SearchState.load(path)
    assert not saved.cancelled
    resumed = evolve(overlap, 3, 8, 4, generations=6, seed=5, state=saved)
    assert not resumed.cancelled
    assert resumed.curve == whole.curve and resumed.best == whole.best
    assert resumed.evaluations == whole.evaluations and resumed.generation == whole.generation


def test_a_state_file_that_recorded_cancelled_still_resumes(tmp_path):
    path = tmp_path / "state.json"
    evolve(overlap, 3, 8, 4, generations=2, seed=1, on_generation=lambda s: s.save(path))
    old = SearchState.load(path)
    old.cancelled = True  # as written before the fix
    old.save(path)
    resumed = evolve(overlap, 3, 8, 4, generations=4, seed=1, state=SearchState.load(path))
    assert resumed.generation == 4 and not resumed.cancelled


def test_eep_stopped_then_resumed_gives_the_uninterrupted_plan(tmp_path):
    mm = with_dead_experts()
    task = lm_task(tmp_path)
    settings = {"population": 4, "offspring": 4, "generations": 3, "merge_generations": 3, "seed": 2}
    whole = make_method("eep", **settings).plan(mm, task, Target(keep=5))
    path = tmp_path / "eep.json"
    calls = iter(range(10_000))
    stopped = make_method("eep", state_path=str(path), should_stop=lambda: next(calls) >= 9, **settings).plan(
        mm, task, Target(keep=5))
    assert stopped.extra["cancelled"]
    resumed = make_method("eep", state_path=str(path), **settings).plan(mm, task, Target(keep=5))
    assert not resumed.extra["cancelled"]
    assert resumed.layers == whole.layers
    assert resumed.extra["fitness"] == whole.extra["fitness"]
    assert resumed.extra["evaluations"] == whole.extra["evaluations"]
