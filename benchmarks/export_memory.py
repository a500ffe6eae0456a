"""Export memory and speed: streaming export against today's in-memory path and against ``cp -r``.

Builds a synthetic Mixtral-shaped checkpoint (random bf16 weights, per-expert tensors as the hub stores them,
shards of ``--shard-mb``) in a temporary folder, exports it at 4 of 8 experts in child processes, and prints
the peak RSS growth of each child (VmHWM at the end minus VmRSS after imports) against the largest source
shard and the checkpoint size, and the wall time against a plain ``cp -r`` of the checkpoint in the same run.
Targets (issue 14): streaming growth <= 2 x largest shard + 300 MB; streaming time <= 2 x ``cp -r``.
The temporary folder is removed at the end.

    python benchmarks/export_memory.py [--layers 10 --hidden 1024 --ffn 3584 --shard-mb 200] [--json out.json]

Run it with MoEScope installed (``pip install -e .``; ``make setup`` does it). It needs about 3 x the checkpoint
in free memory (for the in-memory path) and 3 x on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KEEP = [0, 2, 5, 7]


def build_checkpoint(folder: Path, layers: int, hidden: int, ffn: int, shard_mb: int, vocab: int) -> None:
    """A Mixtral checkpoint with random bf16 weights, written tensor by tensor (never a whole model in memory)."""
    import torch
    from transformers import MixtralConfig

    from core.checkpoint_conversion import to_checkpoint_names
    from core.checkpoint_writer import ShardedWriter, TensorSpec
    from core.streaming_export import meta_model

    config = MixtralConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                           num_attention_heads=hidden // 128, num_key_value_heads=max(1, hidden // 512),
                           num_local_experts=8, num_experts_per_tok=2, tie_word_embeddings=False)
    model = meta_model(config, torch.bfloat16)
    names = to_checkpoint_names(model, model.state_dict())
    specs = [TensorSpec(name, tuple(t.shape), torch.bfloat16) for name, t in names.items()]
    folder.mkdir(parents=True)
    config.dtype = "bfloat16"
    config.architectures = ["MixtralForCausalLM"]
    config.save_pretrained(folder)
    writer = ShardedWriter(folder, specs, shard_mb * 10**6)
    gen = torch.Generator().manual_seed(0)
    for spec in specs:
        scale = 1.0 if "layernorm" in spec.name or spec.name.endswith("norm.weight") else 0.02
        writer.add(spec.name, (torch.randn(spec.shape, generator=gen) * scale).to(torch.bfloat16))
    writer.close()
    writer.finish(sum(torch.Size(s.shape).numel() for s in specs))


def child(mode: str, source: str, out: str) -> None:
    """One export in this process; prints its peak RSS growth (MB) and seconds as JSON."""
    from transformers.models.mixtral import modeling_mixtral  # noqa: F401 - code, not data: loaded before measuring

    from core.export import export_pruned
    from core.model import load_model
    from core.plan import Plan
    from core.streaming_export import export_checkpoint

    start_rss = _status("VmRSS")
    start = time.perf_counter()
    layers = json.loads(Path(source, "config.json").read_text())["num_hidden_layers"]
    plan = Plan(layers={i: KEEP for i in range(layers)})
    if mode == "streaming":
        export_checkpoint(source, plan, out, max_shard_size="200MB")
    else:  # today's CLI path: load the model, build the pruned model, save_pretrained
        export_pruned(load_model(source), plan, out, streaming=False)
    seconds = time.perf_counter() - start
    print(json.dumps({"growth_mb": (_status("VmHWM") - start_rss) / 1024, "seconds": seconds}))


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def run_child(mode: str, source: Path, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run([sys.executable, __file__, "--child", mode, str(source), str(out)], env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=3584)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shard-mb", type=int, default=200)
    parser.add_argument("--skip-in-memory", action="store_true", help="measure the streaming export only")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    with tempfile.TemporaryDirectory(prefix="moescope-export-bench-") as tmp:
        source = Path(tmp) / "source"
        build_checkpoint(source, args.layers, args.hidden, args.ffn, args.shard_mb, args.vocab)
        shards = sorted(source.glob("*.safetensors"))
        checkpoint_mb = sum(p.stat().st_size for p in shards) / 1e6
        largest_mb = max(p.stat().st_size for p in shards) / 1e6
        start = time.perf_counter()
        subprocess.run(["cp", "-r", str(source), str(Path(tmp) / "copy")], check=True)
        cp_seconds = time.perf_counter() - start
        shutil.rmtree(Path(tmp) / "copy")
        results = {"checkpoint_mb": checkpoint_mb, "largest_shard_mb": largest_mb, "shards": len(shards),
                   "cp_seconds": cp_seconds, "load_average": os.getloadavg()[0]}
        results["streaming"] = run_child("streaming", source, Path(tmp) / "streamed")
        shutil.rmtree(Path(tmp) / "streamed")
        if not args.skip_in_memory:
            results["in_memory"] = run_child("in-memory", source, Path(tmp) / "in-memory")
    _report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def _report(r: dict) -> None:
    target = 2 * r["largest_shard_mb"] + 300
    print(f"checkpoint {r['checkpoint_mb']:.0f} MB in {r['shards']} shards, largest {r['largest_shard_mb']:.0f} MB; "
          f"cp -r {r['cp_seconds']:.1f} s; load average {r['load_average']:.2f}")
    print("| export | peak RSS growth | / largest shard | / checkpoint | wall time | / cp -r |")
    print("|---|---|---|---|---|---|")
    for name in ("streaming", "in_memory"):
        if name in r:
            m = r[name]
            print(f"| {name.replace('_', '-')} | {m['growth_mb']:.0f} MB | {m['growth_mb'] / r['largest_shard_mb']:.2f}x "
                  f"| {m['growth_mb'] / r['checkpoint_mb']:.2f}x | {m['seconds']:.1f} s "
                  f"| {m['seconds'] / r['cp_seconds']:.2f}x |")
    s = r["streaming"]
    print(f"streaming growth target <= 2 x largest shard + 300 MB = {target:.0f} MB: "
          f"{'met' if s['growth_mb'] <= target else 'NOT met'}; time target <= 2 x cp -r: "
          f"{'met' if s['seconds'] <= 2 * r['cp_seconds'] else 'NOT met'}")
    if "in_memory" in r:
        ratio = r["in_memory"]["growth_mb"] / r["checkpoint_mb"]
        print(f"in-memory growth {ratio:.2f} x checkpoint (expected above 1.5x)")


if __name__ == "__main__":
    main()
