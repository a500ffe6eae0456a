"""Measure the sample model's quality per task and its routing specialisation, with plain transformers.

    python sample_data/evaluate_sample.py [--model sample_data/model] [--split test] [--json out.json]

Prompts and references come from core.tasks.render_example (the same rendering any harness uses):
qa/arithmetic by greedy generation (left padding, cut at the stop string "\n" or eos), qa_choice by
the summed log-likelihood of each option after the prompt, code/prose by mean token NLL given bos.
Routing: per MoE layer, top-2 expert counts over the split's tokens (padding filtered out) and the
pairwise Jensen-Shannon divergence (bits) between tasks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(Path(__file__).resolve().parent / "model"))
    ap.add_argument("--split", default="test")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args(argv)

    import torch
    from transformers import AutoTokenizer, MixtralForCausalLM

    from core.sample_training import evaluate_model, routing_report, routing_usage

    torch.set_num_threads(2)
    t = time.time()
    tok = AutoTokenizer.from_pretrained(a.model)
    model = MixtralForCausalLM.from_pretrained(a.model).eval()
    scores = evaluate_model(model, tok, a.split)
    usage = routing_usage(model, tok, split=a.split)
    rep = routing_report(usage)
    out = {"split": a.split, "scores": scores, "routing": rep, "expert_usage": usage, "seconds": round(time.time() - t, 1)}

    print(f"## {a.split} split ({out['seconds']} s)")
    print("| task | metric | model | trivial baseline |\n|---|---|---|---|")
    for name, r in scores.items():
        if r["metric"] == "squad":
            print(f"| {name} | EM / F1 (%) | {r['exact_match']:.1f} / {r['f1']:.1f} | {r['baseline_most_frequent_em']:.1f} EM (most frequent answer) |")
        elif r["metric"] == "exact_match":
            print(f"| {name} | EM (%) | {r['exact_match']:.1f} | {r['baseline_most_frequent_em']:.1f} (most frequent answer) |")
        elif r["metric"] == "multiple_choice":
            print(f"| {name} | accuracy (%) | {r['accuracy']:.1f} (per-token normalised: {r['accuracy_length_normalised']:.1f}) | {r['baseline_chance']:.1f} (chance) |")
        else:
            print(f"| {name} | NLL nats/token (ppl) | {r['nll']:.3f} ({r['perplexity']:.1f}) | {r['baseline_unigram_nll']:.3f} (unigram) |")
    for name in ("qa", "arithmetic"):
        if "exact_match_by_kind" in scores.get(name, {}):
            print(f"{name} EM by question kind: {scores[name]['exact_match_by_kind']}")
    pairs = list(rep["jsd_bits"][0])
    print("\n| layer | " + " | ".join(pairs) + " | rarely used experts (<1% of top-2 slots) |")
    print("|---" * (len(pairs) + 2) + "|")
    for li, row in enumerate(rep["jsd_bits"]):
        print(f"| {li} | " + " | ".join(f"{row[p]:.3f}" for p in pairs) + f" | {rep['rarely_used_experts'][li] or '-'} |")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
