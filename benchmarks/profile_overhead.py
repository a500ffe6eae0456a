"""How much does recording every router decision cost? Profiled vs plain forward time, in one run.

CPU (default): a tiny Mixtral (4 layers, 8 experts, top-2, hidden 160), batch 4 x 256 tokens.
``--gpu``: a Mixtral-shaped model (hidden 4096, FFN 14336, 8 experts, 4 layers, bf16, random weights).

Plain and profiled passes alternate in a seeded random order so drift and order effects hit both alike; the
profiled time includes writing the Parquet profile (row-group flushes and the final close). Prints a
JSON line with the ratio and the profile's bytes per (token, layer) row.

    python benchmarks/profile_overhead.py [--gpu] [--reps 30]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_models import build, sync

from core.profile_writer import ProfileWriter
from core.recorder import RouterRecorder
from core.routing_profile import ProfileMeta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    args = parser.parse_args()
    if args.gpu and not torch.cuda.is_available():
        sys.exit("--gpu needs a CUDA device")
    mm = build(args.gpu)
    device = next(mm.model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    # distinct inputs per repetition, so the profile's compression is not flattered by repeated rows
    inputs = [torch.randint(0, mm.config.vocab_size, (args.batch, args.length), generator=gen).to(device)
              for _ in range(args.reps + 1)]
    mask = torch.ones_like(inputs[0])
    meta = ProfileMeta(model=mm.source, weights_digest="", family=mm.adapter.family, layers=mm.layer_indices,
                       n_experts=mm.n_experts, top_k=mm.top_k)
    plain, profiled = [], []
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        path = Path(tmp) / "bench.parquet"
        writer = ProfileWriter(path, meta)
        with RouterRecorder(mm, writer) as rec:
            for _ in range(3):  # warm-up of both paths; one-time costs (first flush) are paid here
                mm.model(input_ids=inputs[-1], attention_mask=mask)
                with rec.batch("warm-up", range(args.batch)):
                    mm.model(input_ids=inputs[-1], attention_mask=mask)
            writer.flush()
            writer._drain()
            order = random.Random(0)
            for rep in range(args.reps):
                input_ids = inputs[rep]
                # random order per repetition: whichever pass runs second is systematically slower here
                for mode in order.sample(["plain", "profiled"], 2):
                    sync(args.gpu)
                    t0 = time.perf_counter()
                    if mode == "plain":
                        mm.model(input_ids=input_ids, attention_mask=mask)
                    else:
                        with rec.batch("bench", range(rep * args.batch, (rep + 1) * args.batch)):
                            mm.model(input_ids=input_ids, attention_mask=mask)
                    sync(args.gpu)
                    (plain if mode == "plain" else profiled).append(time.perf_counter() - t0)
        t3 = time.perf_counter()
        writer.close()
        close_s = time.perf_counter() - t3
        rows = writer.meta.rows
        size = path.stat().st_size
    total_plain, total_profiled = sum(plain), sum(profiled) + close_s
    result = {
        "device": torch.cuda.get_device_name() if args.gpu else "cpu",
        "threads": torch.get_num_threads(),
        "batch": args.batch, "length": args.length, "reps": args.reps,
        "plain_median_s": statistics.median(plain),
        "profiled_median_s": statistics.median(profiled),
        "ratio_median": statistics.median(profiled) / statistics.median(plain),
        "ratio_total_incl_close": total_profiled / total_plain,
        "rows": rows,
        "profile_bytes_per_row": size / rows,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
