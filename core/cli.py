"""``moescope``: a thin command line over the core engine. Errors print one line and exit 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import MoEScopeError
from .io import refuse_existing


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="local model directory or hub id")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"],
                   help="'auto' spreads the model over the available devices (accelerate device_map)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run Python code shipped with the checkpoint (off by default)")
    p.add_argument("--experts-implementation", choices=["grouped_mm", "eager", "batched_mm"],
                   help="how experts are computed (default grouped_mm; never batched_mm on CPU)")
    p.add_argument("--offload-folder", help="with --device auto: offload what fits nowhere else to this folder")


def _load(args: argparse.Namespace):
    from .model import load_model

    return load_model(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code,
                      experts_implementation=args.experts_implementation, offload_folder=args.offload_folder)


def cmd_info(args: argparse.Namespace) -> None:
    info = _load(args).info()
    if args.json:
        print(json.dumps(info.to_dict(), indent=2))
        return
    for key, value in info.to_dict().items():
        print(f"{key:>15}: {value}")


def cmd_profile(args: argparse.Namespace) -> None:
    from .plan import Plan
    from .profiling import Sharding, profile_texts, read_task_texts

    tasks = dict(read_task_texts(t, args.text_field) for t in args.task)
    if args.limit:
        tasks = {k: v[:args.limit] for k, v in tasks.items()}
    sharding = Sharding.from_env(args.batches_per_shard)
    if sharding.world > 1 and "MASTER_ADDR" in os.environ:
        import torch.distributed as dist

        if not dist.is_initialized():  # torchrun / accelerate launch: gloo is enough for barriers
            dist.init_process_group("gloo")
    mm = _load(args)
    plan = Plan.load(args.plan) if args.plan else None
    out = profile_texts(mm, tasks, args.out, batch_size=args.batch_size, max_length=args.max_length,
                        max_new_tokens=args.max_new_tokens, with_probs=args.probs, plan=plan,
                        progress=sharding.rank == 0, sharding=sharding)
    if out.suffix == ".parquet":
        if sharding.rank == 0:
            print(f"wrote {out} and {out.with_suffix('.json').name}")
    else:
        print(f"process {sharding.rank} of {sharding.world} wrote its shards to {out}; when all are done run "
              f"`moescope merge-profiles {out}/shard-*.parquet --out {args.out}`")


def cmd_export(args: argparse.Namespace) -> None:
    from .export import directory_bytes, export_pruned
    from .plan import Plan

    plan = Plan.load(args.plan)
    refuse_existing(Path(args.out), args.overwrite)
    mm = _load(args)
    out = export_pruned(mm, plan, args.out, overwrite=args.overwrite, progress=lambda m: print(f"... {m}"))
    print(f"exported to {out} ({directory_bytes(out) / 1e6:.1f} MB)")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from tqdm.auto import tqdm

    from .evaluation import Evaluator
    from .plan import Plan
    from .tasks import get_task_spec

    specs = [get_task_spec(t) for t in args.task]  # fail on a bad task before loading the model
    plan = Plan.load(args.plan) if args.plan else None
    evaluator = Evaluator(_load(args), batch_size=args.batch_size)
    results = []
    for spec in specs:
        bar = tqdm(desc=spec.name, unit="batch", disable=args.json)

        def progress(stage: str, done: int, total: int, bar=bar) -> None:
            bar.total = total
            bar.set_postfix_str(stage)
            bar.n = done
            bar.refresh()

        result = evaluator.evaluate(spec, plan=plan, split=args.split, limit=args.limit or None, progress=progress)
        bar.close()
        results.append(result)
        if not args.json:
            shown = ", ".join(f"{k} {v:.2f}" for k, v in {**result.metrics, **result.agreement}.items())
            print(f"{spec.name} [{args.split}, {result.n_examples} examples]: {shown} "
                  f"({result.cost['tokens_per_s']:.0f} tokens/s)")
    if args.json:
        print(json.dumps([{k: v for k, v in r.to_dict().items() if k != "predictions"} for r in results], indent=2))


def _parse_params(items: list[str]) -> dict:
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise MoEScopeError(f"--param {item!r} must look like name=value.")
        try:
            params[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            params[key.replace("-", "_")] = value
    return params


def cmd_prune(args: argparse.Namespace) -> None:
    from tqdm.auto import tqdm

    from .methods import Calibration, Target, make_method

    params = _parse_params(args.param)
    if args.seed is not None:
        params["seed"] = args.seed
    if args.state:
        params["state_path"] = args.state
    try:
        method = make_method(args.method, **params)
    except TypeError as exc:
        raise MoEScopeError(f"Bad --param for {args.method}: {exc}.") from None
    target = Target(keep=args.keep, ratio=None if args.keep else args.ratio, top_k=args.top_k)
    calibration = Calibration.of(args.task, split=args.split, limit=args.limit or None)
    refuse_existing(Path(args.out), args.overwrite)
    mm = _load(args)
    bar = tqdm(total=1000, desc=args.method, bar_format="{l_bar}{bar}| {elapsed} {postfix}")

    def progress(message: str, fraction: float) -> None:
        bar.n = int(1000 * fraction)
        bar.set_postfix_str(message)

    plan = method.plan(mm, calibration, target, progress=progress)
    bar.close()
    plan.save(args.out)
    kept = {k: len(v) for k, v in plan.layers.items()}
    print(f"wrote {args.out}: {args.method} keeps {sorted(set(kept.values())) or 'all'} experts per layer, "
          f"top-k {plan.top_k or mm.top_k}, {plan.extra.get('forward_passes', 0)} forward passes, "
          f"{plan.extra.get('wall_time_s', 0):.1f} s")


def cmd_sweep(args: argparse.Namespace) -> None:
    from .sweep import run_sweep, save_table

    def split(text: str) -> list[str]:
        return [t for t in text.split(",") if t]

    ratios = [float(r) for r in split(args.ratios)]
    refuse_existing(Path(args.out), args.overwrite)
    mm = _load(args)
    table = run_sweep(mm, split(args.methods), ratios, split(args.tasks),
                      calibration_tasks=split(args.calibration_tasks) or None, top_k=args.top_k,
                      seeds=[int(s) for s in split(args.seeds)], limit=args.limit or None,
                      calibration_limit=args.calibration_limit or None,
                      progress=lambda what, done, total: print(f"[{done}/{total}] {what}", flush=True))
    save_table(table, args.out)
    print(f"wrote {args.out} ({len(table)} rows)")


def cmd_train_sample(args: argparse.Namespace) -> None:
    from . import sample_training  # imported before torch: it sets OpenMP's passive waiting

    sample_training.main(args.options)


def cmd_merge_profiles(args: argparse.Namespace) -> None:
    from .profile import merge_profiles

    out = merge_profiles(args.profiles, args.out)
    print(f"wrote {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moescope", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="summarise a MoE model: family, MoE layers, experts, parameters")
    _model_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("profile", help="record every token's routing into a Parquet profile")
    _model_args(p)
    p.add_argument("--task", action="append", required=True, metavar="[NAME=]FILE",
                   help=".txt (one text per line) or .jsonl with a text field; repeat for several tasks")
    p.add_argument("--text-field", default="text")
    p.add_argument("--out", required=True, help="profile path ending in .parquet (sidecar .json beside it)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--max-new-tokens", type=int, default=0, help="also generate and record decode steps")
    p.add_argument("--limit", type=int, default=0, help="at most this many texts per task")
    p.add_argument("--probs", action="store_true", help="also store full router probabilities")
    p.add_argument("--plan", help="record under a pruning plan (masked experts)")
    p.add_argument("--batches-per-shard", type=int, default=16,
                   help="shard size in batches when the work is split (torchrun, Slurm array) or resumed")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("export", help="write a physically pruned checkpoint from a plan")
    _model_args(p)
    p.add_argument("--plan", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("evaluate", help="score tasks, optionally under a pruning plan, against the full model")
    _model_args(p)
    p.add_argument("--task", action="append", required=True,
                   help="a sample task name (qa, arithmetic, code, prose, qa_choice) or a task.json; repeatable")
    p.add_argument("--plan", help="evaluate with this plan's experts masked")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=0, help="at most this many examples")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("prune", help="make a pruning plan with one method")
    _model_args(p)
    p.add_argument("--method", required=True, help="random, frequency, soft_activation, reap, naee, "
                                                   "dynamic_skip, top_k, eep")
    p.add_argument("--ratio", type=float, default=0.5, help="fraction of experts removed per layer (default 0.5)")
    p.add_argument("--keep", type=int, help="experts kept per layer (instead of --ratio)")
    p.add_argument("--top-k", type=int, help="route each token to this many experts")
    p.add_argument("--task", required=True, help="calibration task: a sample task name or a task.json")
    p.add_argument("--split", default="calibration")
    p.add_argument("--limit", type=int, default=0, help="at most this many calibration examples")
    p.add_argument("--seed", type=int)
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="method parameter, e.g. --param generations=20 (repeatable)")
    p.add_argument("--state", help="EEP: save the search here each generation and resume from it")
    p.add_argument("--out", required=True, help="plan JSON to write")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("sweep", help="methods x ratios x tasks -> a CSV/Parquet table of metrics, size, speed")
    _model_args(p)
    p.add_argument("--methods", default="random,frequency,soft_activation,eep", help="comma-separated")
    p.add_argument("--ratios", default="0.25,0.5,0.75", help="fractions of experts removed, comma-separated")
    p.add_argument("--tasks", required=True, help="evaluation tasks, comma-separated")
    p.add_argument("--calibration-tasks", default="",
                   help="calibrate on these (each plan evaluated on every task); default: each task on itself")
    p.add_argument("--top-k", type=int)
    p.add_argument("--seeds", default="0", help="seeds for random and EEP, comma-separated")
    p.add_argument("--limit", type=int, default=0, help="at most this many test examples per task")
    p.add_argument("--calibration-limit", type=int, default=0)
    p.add_argument("--out", required=True, help="table to write (.csv or .parquet)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("train-sample", help="train the bundled sample MoE model on CPU (about 45 minutes)",
                       description="Options are passed on: --out DIR --minutes M --max-steps N --seed S "
                                   "--no-eval --quiet (see python -m core.sample_training --help).")
    p.set_defaults(func=cmd_train_sample, options=[])

    p = sub.add_parser("merge-profiles", help="combine profiles of disjoint shards into one")
    p.add_argument("profiles", nargs="+")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_merge_profiles)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.func is cmd_train_sample:  # its options belong to core.sample_training
        args.options = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args.func(args)
    except MoEScopeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
