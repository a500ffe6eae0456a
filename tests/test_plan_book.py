"""core.plan_book: the user's names and pins for saved plans (kept across instances, written atomically, safe
for concurrent writers, one sentence for a plan that does not exist) and the tables comparing pinned plans."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import threading

import pandas as pd
import pytest

from core import atomic
from core.errors import MoEScopeError
from core.plan import Plan
from core.plan_book import (
    MAX_NAME,
    MAX_PINNED,
    PlanBook,
    distinct_labels,
    kept_experts_table,
    overlap_table,
    plan_summary,
    task_scores,
)

N_EXPERTS, TOP_K = 8, 2


def save(folder, layers: dict[int, list[int]], method: str = "frequency", mtime: float | None = None) -> str:
    """Save a plan the way the dashboard does (``<folder>/<digest>.json``); returns its digest."""
    plan = Plan(layers=layers, extra={"method": method})
    path = plan.save(folder / f"{plan.digest()}.json")
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return plan.digest()


@pytest.fixture()
def folder(tmp_path):
    return tmp_path / "plans" / "0123456789abcdef"


def test_names_and_pins_persist_across_instances(folder):
    a = save(folder, {0: [0, 1, 2, 3], 1: [4, 5, 6, 7]}, mtime=1_000)
    b = save(folder, {0: [0, 1], 1: [4, 5]}, method="reap", mtime=2_000)
    (folder / "latest").write_text(f"{b}.json\n")  # the dashboard's pointer: not a plan

    book = PlanBook(folder, "weights")
    assert book.rename(a, "  Half   the experts ") == "Half the experts"  # one line, spaces collapsed
    book.pin(b)
    book.pin(a)

    again = PlanBook(folder)  # another session, or the page after a reload
    saved = again.plans()
    assert [s.digest for s in saved] == [b, a]  # most recently saved first
    assert saved[1].name == "Half the experts" and saved[1].label(N_EXPERTS, TOP_K) == "Half the experts"
    assert saved[0].name is None and saved[0].label(N_EXPERTS, TOP_K).startswith("reap: 2 of 8 experts kept")
    assert again.pinned() == [b, a]  # in the order pinned
    assert plan_summary(saved[0], N_EXPERTS, TOP_K)["experts_kept"] == 2
    assert json.loads((folder / "book.json").read_text())["weights_digest"] == "weights"

    again.rename(a, "")  # empty: back to the plan in words
    again.pin(b, False)
    book_now = PlanBook(folder)
    assert book_now.name(a) is None and book_now.pinned() == [a]
    assert PlanBook(folder).plans()[1].label(N_EXPERTS, TOP_K).startswith("frequency: 4 of 8 experts kept")


def test_bad_names_unknown_plans_and_too_many_pins_are_one_sentence(folder):
    digests = [save(folder, {0: list(range(keep))}) for keep in range(2, 2 + MAX_PINNED + 1)]
    book = PlanBook(folder)
    book.rename(digests[0], "Small")
    checks = [
        (lambda: book.rename(digests[1], "Small"), "already named"),
        (lambda: book.rename(digests[1], "x" * (MAX_NAME + 1)), f"at most {MAX_NAME} characters"),
        (lambda: book.rename(digests[1], "Full model"), "column of the comparison"),
        (lambda: book.rename("feedfacefeedface", "Mine"), "No plan 'feedfacefeedface' is saved"),
        (lambda: book.pin("../../etc/passwd"), "is saved for this model"),
    ]
    for call, words in checks:
        with pytest.raises(MoEScopeError, match=words) as caught:
            call()
        assert "\n" not in str(caught.value)
    for digest in digests[:MAX_PINNED]:
        book.pin(digest)
    with pytest.raises(MoEScopeError, match=f"{MAX_PINNED} plans are pinned already"):
        book.pin(digests[-1])
    assert book.pinned() == digests[:MAX_PINNED] and PlanBook(folder).name(digests[1]) is None

    (folder / "book.json").write_text("{not json")
    with pytest.raises(MoEScopeError, match="is not a MoEScope plan book; move it away"):
        PlanBook(folder).plans()


def test_plans_leaves_out_files_that_are_not_plans_of_the_model(folder):
    kept = save(folder, {0: [0, 1]})
    (folder / ("f" * 16 + ".json")).write_text('{"format": "something else"}')  # a damaged plan file
    (folder / "notes.json").write_text("{}")
    assert [s.digest for s in PlanBook(folder).plans()] == [kept]
    assert PlanBook(folder / "missing").plans() == []


def test_a_failed_write_keeps_the_previous_book(folder, monkeypatch):
    digest = save(folder, {0: [0, 1]})
    book = PlanBook(folder)
    book.rename(digest, "Before")
    before = (folder / "book.json").read_bytes()

    def crash(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(atomic.os, "replace", crash)
    with pytest.raises(OSError):
        book.rename(digest, "After")
    monkeypatch.undo()
    assert (folder / "book.json").read_bytes() == before  # never half a file, never the new one
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]  # and no temporary left behind
    assert PlanBook(folder).name(digest) == "Before"


def test_a_second_writer_waits_and_neither_loses_the_other(folder, monkeypatch):
    """Writer A has read the book and is about to write it when writer B starts: B must wait for A's lock and
    then read A's entry, or A's write (made from what it read) would erase B's entry."""
    a = save(folder, {0: [0, 1]})
    b = save(folder, {0: [2, 3]})
    read = PlanBook._read
    state = {"started": False}
    second = threading.Thread(target=lambda: PlanBook(folder).rename(b, "From B"))

    def read_then_let_b_in(self):
        entries = read(self)
        if not state["started"]:
            state["started"] = True
            second.start()
            second.join(timeout=1.0)  # without the lock B finishes here, before A writes
        return entries
    monkeypatch.setattr(PlanBook, "_read", read_then_let_b_in)
    PlanBook(folder).rename(a, "From A")
    second.join()
    monkeypatch.undo()
    assert PlanBook(folder).names() == {a: "From A", b: "From B"}


def _rename_many(folder, digests):
    book = PlanBook(folder)
    for i, digest in enumerate(digests):
        book.rename(digest, f"plan {digest}")
        if i % 2 == 0:
            book.pin(digest)
            book.pin(digest, False)


def test_writers_in_several_processes_keep_every_entry(folder):
    digests = [save(folder, {0: [e, (e + 1) % 8], 1: [e]}) for e in range(8)] + \
              [save(folder, {0: [e, (e + 2) % 8], 1: [e]}) for e in range(8)]
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_rename_many, args=(folder, digests[i::4])) for i in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    assert PlanBook(folder).names() == {d: f"plan {d}" for d in digests}


def test_kept_experts_and_overlap_tables():
    plans = {"Half": Plan(layers={0: [0, 1, 2, 3], 1: [4, 5, 6, 7]}),
             "Quarter": Plan(layers={0: [0, 1], 1: [0, 4]}),
             "Top-k only": Plan(layers={}, top_k=1)}
    table = kept_experts_table(plans, N_EXPERTS, [0, 1, 2])
    assert list(table.columns) == ["Layer", "Half", "Quarter", "Top-k only", "Kept by every plan", "Kept by only some"]
    first = table.iloc[0]
    assert first["Half"] == "4: 0, 1, 2, 3" and first["Quarter"] == "2: 0, 1" and first["Top-k only"].startswith("8: ")
    assert first["Kept by every plan"] == "2: 0, 1" and first["Kept by only some"] == "6: 2, 3, 4, 5, 6, 7"
    assert table.iloc[1]["Kept by every plan"] == "1: 4"
    assert table.iloc[2]["Kept by only some"] == "0"  # a layer no plan prunes: every plan keeps all 8

    overlap = overlap_table(plans, N_EXPERTS, [0, 1, 2])
    # Half vs Quarter: layer 0 shares 2 of 4, layer 1 shares 1 of 5, layer 2 all 8 of 8
    assert overlap.loc["Half", "Quarter"] == pytest.approx((2 / 4 + 1 / 5 + 1) / 3)
    assert overlap.loc["Quarter", "Half"] == overlap.loc["Half", "Quarter"] and overlap.loc["Half", "Half"] == 1.0
    assert distinct_labels(["A", "A", "Task", "A (2)"]) == ["A", "A (2)", "Task (2)", "A (2) (2)"]


def test_task_scores_compare_every_plan_on_the_same_examples():
    def row(task, digest, examples, **metrics):
        return {"eval_task": task, "split": "test", "examples": examples, "plan_digest": digest,
                **{f"metric_{k}": v for k, v in metrics.items()}}
    table = pd.DataFrame([
        row("qa", None, 25, exact_match=50.0), row("qa", "a", 25, exact_match=40.0),
        row("qa", None, 50, exact_match=52.0), row("qa", "a", 50, exact_match=44.0),
        row("qa", "b", 50, exact_match=46.0), row("qa", "b", 25, exact_match=99.0),
        row("qa", None, 100, exact_match=51.0), row("qa", "a", 100, exact_match=1.0),
        row("prose", None, 25, nll=3.0), row("prose", "a", 25, nll=4.0), row("prose", "b", 25, nll=3.5),
    ])
    scores = task_scores(table, {"A": "a", "B": "b"}, ["qa", "prose", "arithmetic"], "test", limit=50)
    qa = scores[scores["task"] == "qa"].set_index("plan")
    assert (qa["examples"] == 50).all() and (qa["full"] == 52.0).all()  # the most examples up to the limit
    assert qa.loc["A", "score"] == 44.0 and qa.loc["B", "change"] == pytest.approx(-6.0)
    assert qa["best"].tolist() == [False, True] and (qa["better"] == "higher").all()
    prose = scores[scores["task"] == "prose"].set_index("plan")
    assert prose["metric"].iloc[0] == "nll" and prose["best"].tolist() == [False, True]  # lower is better
    arithmetic = scores[scores["task"] == "arithmetic"]
    assert arithmetic["examples"].isna().all() and arithmetic["score"].isna().all()  # never scored
    assert not arithmetic["best"].any()

    everything = task_scores(table, {"A": "a", "B": "b"}, ["qa"], "test", limit=None).set_index("plan")
    assert everything.loc["A", "score"] == 1.0 and math.isnan(everything.loc["B", "score"])  # B not yet on 100
    assert task_scores(pd.DataFrame(), {"A": "a"}, ["qa"])["score"].isna().all()
