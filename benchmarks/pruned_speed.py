"""What does pruning buy? Physically pruned (4 of 8 experts) vs full model, and masked vs unpruned, in one run.

Measures weight bytes, peak device memory during prefill (GPU), prefill and decode throughput at top-2 and
top-1, and the cost of evaluating through masking instead of a pruned checkpoint. Compare with EEP's
published 1.11x (4 of 8 experts, top-2) and 1.41x (4 of 8, top-1) on Mixtral 8x7B (2 x A100).

    python benchmarks/pruned_speed.py [--gpu] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from bench_models import build, sync
from core.export import build_pruned_model
from core.masking import masked
from core.plan import Plan


def timed(fn, reps: int, gpu: bool) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(reps):
        sync(gpu)
        t0 = time.perf_counter()
        fn()
        sync(gpu)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    if args.gpu and not torch.cuda.is_available():
        sys.exit("--gpu needs a CUDA device")
    mm = build(args.gpu)
    device = next(mm.model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, mm.config.vocab_size, (args.batch, args.length), generator=gen).to(device)
    half = {i: [0, 2, 5, 7] for i in mm.layer_indices}
    variants = {
        "full_top2": None,
        "full_top1": Plan(layers={}, top_k=1),
        "pruned4_top2": Plan(layers=half),
        "pruned4_top1": Plan(layers=half, top_k=1),
    }
    result: dict[str, object] = {"device": torch.cuda.get_device_name() if args.gpu else "cpu",
                                 "threads": torch.get_num_threads(), "batch": args.batch, "length": args.length,
                                 "new_tokens": args.new_tokens, "reps": args.reps}
    with torch.inference_mode():
        for name, plan in variants.items():
            model = mm.model if plan is None else build_pruned_model(mm, plan, device=device)

            def prefill(model=model):
                model(input_ids=prompt)

            def generate(n: int, model=model):
                model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                               max_new_tokens=n, min_new_tokens=n, pad_token_id=0)

            if args.gpu:  # peak as if this model were alone on the device (the full one stays resident)
                torch.cuda.synchronize()
                resident = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            t_prefill = timed(prefill, args.reps, args.gpu)
            peak = torch.cuda.max_memory_allocated() - resident + weight_bytes(model) if args.gpu else None
            # decode time = generating N tokens minus generating 1 (both include the same prefill)
            t_one = timed(lambda: generate(1), args.reps, args.gpu)
            t_many = timed(lambda: generate(args.new_tokens), args.reps, args.gpu)
            result[name] = {
                "weight_bytes": weight_bytes(model),
                "peak_prefill_bytes": peak,
                "prefill_tok_s": args.batch * args.length / t_prefill,
                "decode_tok_s": args.batch * (args.new_tokens - 1) / (t_many - t_one),
            }
            if plan is not None:
                del model
                if args.gpu:
                    torch.cuda.empty_cache()

        def plain_forward():
            mm.model(input_ids=prompt)

        def enter_and_leave():
            with masked(mm, variants["pruned4_top2"]):
                pass

        t_plain = timed(plain_forward, args.reps, args.gpu)
        with masked(mm, variants["pruned4_top2"]):  # a plan is applied once per evaluation, not per forward
            t_masked = timed(plain_forward, args.reps, args.gpu)
        t_apply = timed(enter_and_leave, args.reps, args.gpu)
    full = result["full_top2"]
    for name in ("full_top1", "pruned4_top2", "pruned4_top1"):
        r = result[name]
        r["weight_ratio"] = r["weight_bytes"] / full["weight_bytes"]
        r["prefill_speedup"] = r["prefill_tok_s"] / full["prefill_tok_s"]
        r["decode_speedup"] = r["decode_tok_s"] / full["decode_tok_s"]
    result["masked_vs_unpruned_prefill_time"] = t_masked / t_plain
    result["mask_apply_and_undo_s"] = t_apply
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
