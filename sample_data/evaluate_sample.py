"""Measure the sample model as its model card (``sample_data/model/README.md``) reports it, with MoEScope's engine.

    python sample_data/evaluate_sample.py [--model sample_data/model] [--split test] [--json out.json]

Run it as a file with MoEScope installed (``pip install -e .``); ``generate_tasks.py`` is imported from this
folder. Each task is scored by the evaluation harness (``core.evaluation.Evaluator``) beside a trivial baseline:
the most frequent validation answer for qa/arithmetic, chance for qa_choice, an add-one unigram fitted on the
training text for code/prose; qa exact match is also given per question kind. Routing specialisation comes
from a routing profile of the split (``core.profiling``: each example's prompt and reference answer after
bos) read with ``core.aggregate``: the Jensen-Shannon divergence in bits between tasks per MoE layer, the
experts with under 1% of all top-k slots, and the counts per task, layer and expert.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported: see train_sample_model.py

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import generate_tasks  # noqa: E402 - this folder's script, importable because this file runs as a script

from core import aggregate, metrics  # noqa: E402
from core.atomic import atomic_write_text  # noqa: E402
from core.evaluation import Evaluator  # noqa: E402
from core.model import MoEModel, load_model  # noqa: E402
from core.profiling import profile_texts  # noqa: E402
from core.routing_profile import Profile  # noqa: E402
from core.tasks import TaskSpec, get_task_spec, load_task, render_example, task_texts  # noqa: E402

TASKS = ("qa", "arithmetic", "qa_choice", "code", "prose")  # in the model card's order
RARE_SHARE = 0.01  # experts below this share of a layer's top-k slots (all tasks together) are "rarely used"


def references(spec: TaskSpec, split: str) -> list[list[str]]:
    return [render_example(spec, example, i).references for i, example in enumerate(load_task(spec, split))]


def generation_extras(spec: TaskSpec, split: str, predictions: list[str]) -> dict[str, Any]:
    """Exact match per question kind (where the data has a ``kind`` column), the first predictions, and the
    score of always answering the most frequent validation answer."""
    refs = references(spec, split)
    out: dict[str, Any] = {"examples": [{"pred": p, "refs": r} for p, r in zip(predictions[:5], refs)]}
    data = load_task(spec, split)
    if "kind" in data.column_names:
        by_kind: dict[str, list[float]] = {}
        for prediction, ref, kind in zip(predictions, refs, data["kind"]):
            by_kind.setdefault(kind, []).append(metrics.squad_exact_match(prediction, ref))
        out["exact_match_by_kind"] = {k: f"{int(sum(v))}/{len(v)}" for k, v in sorted(by_kind.items())}
    common = Counter(r[0] for r in references(spec, "validation")).most_common(1)[0][0]
    match = metrics.squad_exact_match if spec.metric == "squad" else metrics.exact_match
    out["baseline_most_frequent_em"] = 100 * metrics.mean(match(common, r) for r in refs)
    return out


def unigram_nll(tokenizer, train_texts: list[str], test_texts: list[str]) -> float:
    """Mean NLL (nats/token) of the test tokens under an add-one unigram fitted on the training text."""
    def ids(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]

    counts = Counter(t for row in ids(train_texts) for t in row)
    vocabulary, total = len(tokenizer), sum(counts.values())
    test = [t for row in ids(test_texts) for t in row]
    return -sum(math.log((counts[t] + 1) / (total + vocabulary)) for t in test) / len(test)


def task_report(evaluator: Evaluator, name: str, split: str) -> dict[str, Any]:
    """One task's harness metrics with the model card's baseline (and per-kind figures) beside them."""
    spec = get_task_spec(name)
    result = evaluator.evaluate(spec, split=split)
    report: dict[str, Any] = {"metric": spec.metric, "n": result.n_examples, **result.metrics}
    if spec.metric in ("squad", "exact_match"):
        report.update(generation_extras(spec, split, result.predictions))
    elif spec.metric == "multiple_choice":
        options = [len(render_example(spec, example, i).options) for i, example in enumerate(load_task(spec, split))]
        report["baseline_chance"] = 100 * metrics.mean(1 / n for n in options)
    else:
        texts = [render_example(spec, example, i).text for i, example in enumerate(load_task(spec, split))]
        report["baseline_unigram_nll"] = unigram_nll(evaluator.mm.tokenizer, generate_tasks.training_texts(name), texts)
    return report


def routing(mm: MoEModel, split: str, tasks: tuple[str, ...] = TASKS) -> dict[str, Any]:
    """Expert counts per task and layer from a routing profile of the split, the pairwise JSD per layer and the
    rarely used experts."""
    bos = mm.tokenizer.bos_token
    texts = {name: [bos + text for text in task_texts(name, split)] for name in tasks}
    with tempfile.TemporaryDirectory() as folder:
        profile = Profile(profile_texts(mm, texts, Path(folder) / "routing.parquet", batch_size=16, progress=False))
        usage = aggregate.expert_usage(profile)
    counts = {(task, layer): group.sort_values("expert")["count"].to_numpy()
              for (task, layer), group in usage.groupby(["task", "layer"])}
    layers = sorted(usage.layer.unique().tolist())
    jsd = [{f"{a}/{b}": round(aggregate.js_divergence_bits(counts[a, layer], counts[b, layer]), 3)
            for i, a in enumerate(tasks) for b in tasks[i + 1:]} for layer in layers]
    rare = []
    for layer in layers:
        slots = sum(counts[task, layer] for task in tasks)
        rare.append([int(e) for e in (slots / slots.sum() < RARE_SHARE).nonzero()[0]])
    return {"jsd_bits": jsd, "rarely_used_experts": rare,
            "expert_usage": {task: [counts[task, layer].tolist() for layer in layers] for task in tasks}}


def measure(model: str | Path, split: str = "test") -> dict[str, Any]:
    """Everything the model card reports for the checkpoint at ``model`` on one split."""
    start = time.time()
    mm = load_model(model)
    evaluator = Evaluator(mm)
    scores = {name: task_report(evaluator, name, split) for name in TASKS}
    return {"split": split, "scores": scores, "routing": routing(mm, split), "seconds": round(time.time() - start, 1)}


def show(report: dict[str, Any]) -> None:
    """Print the model card's tables."""
    print(f"## {report['split']} split ({report['seconds']} s)")
    print("| task | metric | model | trivial baseline |\n|---|---|---|---|")
    for name, r in report["scores"].items():
        if r["metric"] == "squad":
            print(f"| {name} | EM / F1 (%) | {r['exact_match']:.1f} / {r['f1']:.1f} | "
                  f"{r['baseline_most_frequent_em']:.1f} EM (most frequent answer) |")
        elif r["metric"] == "exact_match":
            print(f"| {name} | EM (%) | {r['exact_match']:.1f} | {r['baseline_most_frequent_em']:.1f} (most frequent answer) |")
        elif r["metric"] == "multiple_choice":
            print(f"| {name} | accuracy (%) | {r['accuracy']:.1f} (per-token normalised: {r['accuracy_norm']:.1f}) | "
                  f"{r['baseline_chance']:.1f} (chance) |")
        else:
            print(f"| {name} | NLL nats/token (ppl) | {r['nll']:.3f} ({r['perplexity']:.1f}) | "
                  f"{r['baseline_unigram_nll']:.3f} (unigram) |")
    for name, r in report["scores"].items():
        if "exact_match_by_kind" in r:
            print(f"{name} EM by question kind: {r['exact_match_by_kind']}")
    rep = report["routing"]
    pairs = list(rep["jsd_bits"][0])
    print("\n| layer | " + " | ".join(pairs) + f" | rarely used experts (<{RARE_SHARE:.0%} of top-k slots) |")
    print("|---" * (len(pairs) + 2) + "|")
    for layer, row in enumerate(rep["jsd_bits"]):
        print(f"| {layer} | " + " | ".join(f"{row[p]:.3f}" for p in pairs) + f" | {rep['rarely_used_experts'][layer] or '-'} |")


def write(report: dict[str, Any], path: str | Path) -> None:
    atomic_write_text(Path(path), json.dumps(report, indent=2) + "\n")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(Path(__file__).resolve().parent / "model"))
    ap.add_argument("--split", default="test")
    ap.add_argument("--json", help="also write the report here")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(int(os.environ.get("MOESCOPE_THREADS", "2")))
    report = measure(a.model, a.split)
    show(report)
    if a.json:
        write(report, a.json)
    return report


if __name__ == "__main__":
    main()
