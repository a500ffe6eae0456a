"""``moescope``: a thin command line over the core engine. Errors print one line and exit 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import MoEScopeError, user_message
from .outputs import check_output, output_lock


# ----- argument types: a bad value is refused by argparse with one line, before anything runs -------------
def _integer(low: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is too small; {what}")
        return value
    return parse


POSITIVE = _integer(1, "give 1 or more")
NON_NEGATIVE = _integer(0, "give 0 or more")


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{value} is outside [0, 1); give the fraction of experts to remove")
    return value


def _list_of(parse, what: str):
    def parse_list(text: str) -> list:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"give at least one {what}, comma-separated")
        values = []
        for item in items:
            try:
                values.append(parse(item))
            except argparse.ArgumentTypeError as exc:
                raise argparse.ArgumentTypeError(f"{what} {exc}") from None
        return values
    return parse_list


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


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
    check_output(args.out, "profile", args.overwrite, sources=[args.model])  # before the model loads
    sharding = Sharding.from_env(args.batches_per_shard)
    if sharding.world > 1 and "MASTER_ADDR" in os.environ:
        import torch.distributed as dist

        if not dist.is_initialized():  # torchrun / accelerate launch: gloo is enough for barriers
            dist.init_process_group("gloo")
    plan = Plan.load(args.plan) if args.plan else None  # a bad plan fails before the model loads
    mm = _load(args)
    if plan is not None:
        _warn_plan_source(plan, mm, args.plan)
    out = profile_texts(mm, tasks, args.out, batch_size=args.batch_size, max_length=args.max_length,
                        max_new_tokens=args.max_new_tokens, with_probs=args.probs, plan=plan,
                        progress=sharding.rank == 0, sharding=sharding, overwrite=args.overwrite,
                        keep_shards=args.keep_shards)
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
    check_output(args.out, "export", args.overwrite, sources=[args.model])  # before the model loads
    mm = _load(args)
    _warn_plan_source(plan, mm, args.plan)
    out = export_pruned(mm, plan, args.out, overwrite=args.overwrite, progress=lambda m: print(f"... {m}"))
    print(f"exported to {out} ({directory_bytes(out) / 1e6:.1f} MB)")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from tqdm.auto import tqdm

    from .evaluation import Evaluator
    from .plan import Plan
    from .tasks import get_task_spec

    specs = [get_task_spec(t) for t in args.task]  # fail on a bad task before loading the model
    plan = Plan.load(args.plan) if args.plan else None
    mm = _load(args)
    if plan is not None:
        _warn_plan_source(plan, mm, args.plan)
    evaluator = Evaluator(mm, batch_size=args.batch_size)
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


def _parse_params(items: list[str], method: str) -> dict:
    """``--param name=value`` items, checked against the method's own parameters and their types."""
    import dataclasses

    from .methods import METHODS

    fields = {f.name: f for f in dataclasses.fields(METHODS[method])} if method in METHODS else {}
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.replace("-", "_")
        if not sep:
            raise MoEScopeError(f"--param {item!r} must look like name=value.")
        if fields and (key not in fields or key in ("name", "should_stop")):
            known = ", ".join(n for n in fields if n not in ("name", "should_stop"))
            raise MoEScopeError(f"Bad --param for {method}: it has no parameter {key!r}; its parameters are "
                                f"{known}.")
        try:
            parsed = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            parsed = value
        default = fields[key].default if key in fields else None
        if isinstance(default, bool):
            ok = isinstance(parsed, bool)
        elif isinstance(default, int):
            ok = isinstance(parsed, int) and not isinstance(parsed, bool) and parsed >= 0
        elif isinstance(default, float):
            ok = isinstance(parsed, (int, float)) and not isinstance(parsed, bool) and parsed >= 0
        else:
            ok = parsed is None or isinstance(parsed, (str, int, float))
        if not ok:
            kind = type(default).__name__ if default is not None else "a plain value"
            raise MoEScopeError(f"Bad --param for {method}: {key}={value} is not valid; {key} takes {kind}"
                                f"{' (0 or more)' if isinstance(default, (int, float)) and not isinstance(default, bool) else ''}.")
        params[key] = float(parsed) if isinstance(default, float) else parsed
    return params


def _warn_plan_source(plan, mm, path: str) -> None:
    """A plan made on another model may still fit this one: warn (export records the real source)."""
    from .plan import plan_source_warning

    warning = plan_source_warning(plan, mm.source, path)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)


def cmd_prune(args: argparse.Namespace) -> None:
    from tqdm.auto import tqdm

    from .methods import Calibration, Target, make_method

    params = _parse_params(args.param, args.method)
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
    check_output(args.out, "plan", args.overwrite, sources=[args.model])
    with output_lock(args.out):  # one writer per output, for the whole (possibly long) search
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

    if Path(args.out).suffix not in (".csv", ".parquet"):
        raise MoEScopeError(f"{args.out} must end in .csv or .parquet.")
    check_output(args.out, "table", args.overwrite, sources=[args.model])
    with output_lock(args.out):
        mm = _load(args)
        table = run_sweep(mm, args.methods, args.ratios, args.tasks,
                          calibration_tasks=args.calibration_tasks or None, top_k=args.top_k,
                          seeds=args.seeds, limit=args.limit or None,
                          calibration_limit=args.calibration_limit or None,
                          progress=lambda what, done, total: print(f"[{done}/{total}] {what}", flush=True))
        save_table(table, args.out)
    print(f"wrote {args.out} ({len(table)} rows)")


def cmd_train_sample(args: argparse.Namespace) -> None:
    import subprocess

    script = Path(__file__).resolve().parents[1] / "sample_data" / "train_sample_model.py"
    if not script.exists():
        raise MoEScopeError("train-sample runs sample_data/train_sample_model.py of a MoEScope repository checkout, "
                            "which this installation lacks: clone the repository and run it there.")
    status = subprocess.call([sys.executable, str(script), *args.options])  # a fresh process: torch not yet loaded
    if status:
        raise SystemExit(status)


def cmd_merge_profiles(args: argparse.Namespace) -> None:
    from .profile import merge_profiles

    out = merge_profiles(args.profiles, args.out, overwrite=args.overwrite)
    print(f"wrote {out}")


def dashboard_command(model: str | None, port: int, address: str = "127.0.0.1") -> list[str]:
    """The Streamlit command line: address, port, upload limit and look explicit, so no config file in the
    current directory decides them (``.streamlit/config.toml`` holds the same settings for ``streamlit run``)."""
    app = Path(__file__).resolve().parent.parent / "dashboard" / "app.py"
    return [sys.executable, "-m", "streamlit", "run", str(app), "--server.address", address,
            "--server.port", str(port), "--server.headless", "true", "--server.maxUploadSize", str(UPLOAD_LIMIT_MB),
            "--browser.gatherUsageStats", "false", "--client.toolbarMode", "viewer", "--theme.base", "light"]


UPLOAD_LIMIT_MB = 50  # plans and sweep tables; profiles are loaded by path


def cmd_dashboard(args: argparse.Namespace) -> None:
    import subprocess

    env = dict(os.environ)
    if args.model:
        env["MOESCOPE_MODEL"] = args.model
    command = dashboard_command(args.model, args.port)
    print(f"MoEScope dashboard at http://{command[command.index('--server.address') + 1]}:{args.port} "
          f"(this machine only; Ctrl+C stops it)", flush=True)
    try:
        subprocess.run(command, env=env, check=False)
    except KeyboardInterrupt:
        pass


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad argument reported in one line (exit 2) like every other error."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moescope", description=__doc__,
                                     epilog="Add --debug anywhere to see the traceback of an unexpected error.")
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
    p.add_argument("--batch-size", type=POSITIVE, default=8)
    p.add_argument("--max-length", type=POSITIVE, default=512)
    p.add_argument("--max-new-tokens", type=NON_NEGATIVE, default=0, help="also generate and record decode steps")
    p.add_argument("--limit", type=NON_NEGATIVE, default=0, help="at most this many texts per task")
    p.add_argument("--probs", action="store_true", help="also store full router probabilities")
    p.add_argument("--plan", help="record under a pruning plan (masked experts)")
    p.add_argument("--batches-per-shard", type=POSITIVE, default=16,
                   help="shard size in batches when the work is split (torchrun, Slurm array) or resumed")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier MoEScope profile at --out")
    p.add_argument("--keep-shards", action="store_true",
                   help="keep OUT.parts/ (the per-shard files) after they are merged into --out")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("export", help="write a physically pruned checkpoint from a plan")
    _model_args(p)
    p.add_argument("--plan", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier MoEScope export at --out")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("evaluate", help="score tasks, optionally under a pruning plan, against the full model")
    _model_args(p)
    p.add_argument("--task", action="append", required=True,
                   help="a sample task name (qa, arithmetic, code, prose, qa_choice) or a task.json; repeatable")
    p.add_argument("--plan", help="evaluate with this plan's experts masked")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=NON_NEGATIVE, default=0, help="at most this many examples (0: all)")
    p.add_argument("--batch-size", type=POSITIVE, default=32)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("prune", help="make a pruning plan with one method")
    _model_args(p)
    p.add_argument("--method", required=True, help="random, frequency, soft_activation, reap, naee, "
                                                   "dynamic_skip, top_k, eep")
    p.add_argument("--ratio", type=_ratio, default=0.5, help="fraction of experts removed per layer (default 0.5)")
    p.add_argument("--keep", type=POSITIVE, help="experts kept per layer (instead of --ratio)")
    p.add_argument("--top-k", type=POSITIVE, help="route each token to this many experts")
    p.add_argument("--task", required=True, help="calibration task: a sample task name or a task.json")
    p.add_argument("--split", default="calibration")
    p.add_argument("--limit", type=NON_NEGATIVE, default=0, help="at most this many calibration examples")
    p.add_argument("--seed", type=NON_NEGATIVE)
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="method parameter, e.g. --param generations=20 (repeatable)")
    p.add_argument("--state", help="EEP: save the search here each generation and resume from it")
    p.add_argument("--out", required=True, help="plan JSON to write")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier MoEScope plan at --out")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("sweep", help="methods x ratios x tasks -> a CSV/Parquet table of metrics, size, speed")
    _model_args(p)
    p.add_argument("--methods", type=_list_of(str, "method"), default="random,frequency,soft_activation,eep",
                   help="comma-separated")
    p.add_argument("--ratios", type=_list_of(_ratio, "ratio"), default="0.25,0.5,0.75",
                   help="fractions of experts removed, comma-separated")
    p.add_argument("--tasks", type=_list_of(str, "task"), required=True, help="evaluation tasks, comma-separated")
    p.add_argument("--calibration-tasks", type=_names, default="",
                   help="calibrate on these (each plan evaluated on every task); default: each task on itself")
    p.add_argument("--top-k", type=POSITIVE)
    p.add_argument("--seeds", type=_list_of(NON_NEGATIVE, "seed"), default="0",
                   help="seeds for random and EEP, comma-separated")
    p.add_argument("--limit", type=NON_NEGATIVE, default=0, help="at most this many test examples per task")
    p.add_argument("--calibration-limit", type=NON_NEGATIVE, default=0)
    p.add_argument("--out", required=True, help="table to write (.csv or .parquet)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier MoEScope sweep table at --out")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("train-sample", help="train the bundled sample MoE model on CPU (about 45 minutes)",
                       description="Options are passed on: --out DIR --minutes M --max-steps N --seed S "
                                   "--no-eval --quiet (see python sample_data/train_sample_model.py --help).")
    p.set_defaults(func=cmd_train_sample, options=[])

    p = sub.add_parser("merge-profiles", help="combine profiles of disjoint shards into one")
    p.add_argument("profiles", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier MoEScope profile at --out")
    p.set_defaults(func=cmd_merge_profiles)

    p = sub.add_parser("dashboard", help="open the dashboard at http://127.0.0.1:PORT (this machine only)")
    p.add_argument("model", nargs="?", help="model directory or hub id (default: the bundled sample model)")
    p.add_argument("--port", type=_integer(1, "give a port from 1 to 65535"), default=8501)
    p.set_defaults(func=cmd_dashboard)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Bad input of any kind prints one ``error:`` line and returns 2; an unexpected error
    prints one line too (``--debug``, anywhere on the command line, shows its traceback) and returns 1."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.func is cmd_train_sample:  # its options belong to sample_data/train_sample_model.py
        args.options = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line; --debug shows the traceback
        if debug:
            raise
        message = user_message(exc)
        if message is None:
            first = str(exc).splitlines()[0] if str(exc) else ""
            print(f"error: unexpected {type(exc).__name__}: {first[:300]} (run with --debug for the traceback)",
                  file=sys.stderr)
            return 1
        print(f"error: {' '.join(message.split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
