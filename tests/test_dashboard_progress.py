"""Slow dashboard steps show what they are doing and about how long is left, and the bar goes away when the
step ends (a sweep's bar used to stay frozen near 95%)."""

from __future__ import annotations

from dashboard import state


class FakeBar:
    def __init__(self, log: list, fraction: float, text: str) -> None:
        self.log = log
        log.append(("progress", fraction, text))

    def progress(self, fraction: float, text: str) -> None:
        self.log.append(("progress", fraction, text))

    def empty(self) -> None:
        self.log.append(("empty",))


class FakeStreamlit:
    def __init__(self) -> None:
        self.log: list = []

    def progress(self, fraction: float, text: str) -> FakeBar:
        return FakeBar(self.log, fraction, text)


def test_progress_says_what_and_how_long_is_left(monkeypatch):
    clock = iter([100.0, 100.5, 110.0, 130.0])
    monkeypatch.setattr(state.time, "perf_counter", lambda: next(clock))
    where = FakeStreamlit()
    with state.Progress(where) as bar:
        bar.steps("Scoring: qa", 1, 10)  # after 0.5 s: no estimate yet
        bar.steps("Scoring: qa", 5, 10)  # after 10 s, half done: about 10 s left
        bar.fraction("Calibrating REAP: REAP saliency", 0.75)  # after 30 s: about 10 s left
    texts = [entry[2] for entry in where.log if entry[0] == "progress"]
    assert texts[0] == "Scoring: qa (10%)"
    assert texts[1] == "Scoring: qa (50%), about 10 s left"
    assert texts[2] == "Calibrating REAP: REAP saliency (75%), about 10 s left"
    assert where.log[-1] == ("empty",)  # gone when the step ends, never frozen


def test_progress_shows_nothing_for_a_step_that_reports_nothing():
    where = FakeStreamlit()
    with state.Progress(where):
        pass
    assert where.log == []


def test_long_estimates_read_in_minutes():
    assert state.progress_text("Sweep", 0.1, 60.0) == "Sweep (10%), about 9 min left"
