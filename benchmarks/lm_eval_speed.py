"""lm-eval in-process on the masked sample model against the lm_eval CLI on the exported checkpoint, same run.

The bundled multiple-choice YAML task (sample_data/lm_eval/moescope_qa_choice.yaml), one plan that drops half the
experts of every layer. Timed: the whole lm-eval run on each side (task loading, requests, scoring). The CLI is
timed twice: its own total_evaluation_time_seconds (simple_evaluate, which there includes loading the model and
indexing lm-eval's task registry) and the whole process. To isolate masking's cost, the export is also scored
in-process with the same call as the masked model.
Target: in-process masked within 1.2x of the CLI's evaluation time (we add masking, nothing else).

    OMP_NUM_THREADS=1 HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/lm_eval_speed.py --limit 200
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TASK = "moescope_qa_choice"
INCLUDE = ROOT / "sample_data" / "lm_eval"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--batch-size", default="8")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    batch = args.batch_size if args.batch_size == "auto" else int(args.batch_size)

    from core.evaluation.lm_eval_bridge import LmEvalRunner
    from core.export import export_pruned
    from core.model import load_model
    from core.plan import Plan

    mm = load_model(str(ROOT / "sample_data" / "model"))
    n = mm.n_experts
    plan = Plan(layers={i: sorted({(i + j) % n for j in range(n // 2)}) for i in mm.layer_indices})
    runner = LmEvalRunner(mm, include=[INCLUDE], batch_size=batch)
    with tempfile.TemporaryDirectory() as tmp:
        export = export_pruned(mm, plan, Path(tmp) / "pruned")
        pruned = LmEvalRunner(load_model(str(export)), include=[INCLUDE], batch_size=batch)
        inproc, exported, cli_total, cli_eval, accs = [], [], [], [], {}
        for repeat in range(args.repeats):
            runner._results = type(runner._results)(runner._results.size)  # no cache: time the run itself
            start = time.perf_counter()
            [result] = runner.evaluate(TASK, plan=plan, limit=args.limit)
            inproc.append(time.perf_counter() - start)
            accs["in-process masked"] = result.metrics["acc"]
            pruned._results = type(pruned._results)(pruned._results.size)
            start = time.perf_counter()
            [result] = pruned.evaluate(TASK, limit=args.limit)
            exported.append(time.perf_counter() - start)
            accs["in-process export"] = result.metrics["acc"]
            out = Path(tmp) / f"cli{repeat}"
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                            f"pretrained={export}", "--include_path", ".", "--tasks", TASK, "--limit",
                            str(args.limit), "--batch_size", str(args.batch_size), "--output_path", str(out)],
                           cwd=INCLUDE, env=os.environ, check=True, capture_output=True, text=True)
            cli_total.append(time.perf_counter() - start)
            [results_file] = out.rglob("results_*.json")
            report = json.loads(results_file.read_text())
            accs["CLI on export"] = report["results"][TASK]["acc,none"]
            cli_eval.append(float(report["total_evaluation_time_seconds"]))
    best = min(inproc), min(cli_eval), min(cli_total), min(exported)
    print(f"{TASK}, {args.limit} docs, batch size {args.batch_size}, best of {args.repeats}:")
    print(f"  in-process masked:            {best[0]:.2f} s   acc {accs['in-process masked']:.4f}")
    print(f"  in-process on the export:     {best[3]:.2f} s   acc {accs['in-process export']:.4f}")
    print(f"  lm_eval CLI, evaluation time: {best[1]:.2f} s   acc {accs['CLI on export']:.4f}")
    print(f"  lm_eval CLI, whole process:   {best[2]:.2f} s")
    print(f"  ratio masked / export, both in-process (masking's cost): {best[0] / best[3]:.2f}x")
    print(f"  ratio in-process / CLI evaluation: {best[0] / best[1]:.2f}x (target <= 1.2x)")
    print(f"  ratio in-process / CLI process:    {best[0] / best[2]:.2f}x")


if __name__ == "__main__":
    main()
