"""What each ``moescope`` command does: load what it needs, check its output, call the engine, print one line.

``core.cli`` parses the command line and turns errors into one line; this module holds the commands.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import MoEScopeError
from .outputs import check_output, output_lock


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
    from .checkpoint_files import has_safetensors
    from .export import directory_bytes, export_pruned
    from .model import DTYPES
    from .plan import Plan

    plan = Plan.load(args.plan)
    check_output(args.out, "export", args.overwrite, sources=[args.model])  # before the model loads
    progress = lambda m: print(f"... {m}")  # noqa: E731
    # A local safetensors checkpoint is exported shard by shard without loading it; a probs-mapped merging plan
    # needs the loaded model to fit its routers, and remote code needs the model's own classes.
    streams = has_safetensors(args.model) and not args.trust_remote_code and not (plan.merge and plan.mapping == "probs")
    if streams:
        from .streaming_export import export_checkpoint

        _warn_plan_source(plan, argparse.Namespace(source=args.model), args.plan)
        dtype = None if args.dtype == "auto" else DTYPES[args.dtype]
        out = export_checkpoint(args.model, plan, args.out, overwrite=args.overwrite, progress=progress,
                                max_shard_size=args.max_shard_size, dtype=dtype)
    else:
        mm = _load(args)
        _warn_plan_source(plan, mm, args.plan)
        out = export_pruned(mm, plan, args.out, overwrite=args.overwrite, progress=progress,
                            max_shard_size=args.max_shard_size, min_router_agreement=args.min_router_agreement)
    print(f"exported to {out} ({directory_bytes(out) / 1e6:.1f} MB)")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from tqdm.auto import tqdm

    from .evaluation import Evaluator
    from .plan import Plan
    from .tasks import get_task_spec

    if not args.task and not args.lm_eval:
        raise MoEScopeError("give at least one --task or --lm-eval TASKS to evaluate.")
    specs = [get_task_spec(t) for t in args.task]  # fail on a bad task before loading the model
    if args.lm_eval:
        from .evaluation.lm_eval_bridge import LmEvalRunner, require_lm_eval, run_lm_eval

        require_lm_eval()  # without the extra: one line, before the model loads
    plan = Plan.load(args.plan) if args.plan else None
    mm = _load(args)
    if plan is not None:
        _warn_plan_source(plan, mm, args.plan)
    runner = None
    if args.lm_eval:  # unknown lm-eval tasks fail before anything runs
        runner = LmEvalRunner(mm, include=args.lm_eval_include, batch_size=args.batch_size or "auto")
        runner.check_tasks(args.lm_eval)
    batch_size = args.batch_size if isinstance(args.batch_size, int) else 32
    evaluator = Evaluator(mm, batch_size=batch_size)
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
    if runner is not None:
        lm_results = run_lm_eval(mm, args.lm_eval, plan=plan, limit=args.limit or None,
                                 num_fewshot=args.num_fewshot, runner=runner)
        results.extend(lm_results)
        if not args.json:
            for result in lm_results:
                shown = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items())
                print(f"{result.task} [{result.split}, {result.n_examples} examples]: {shown} "
                      f"({result.seconds:.1f} s)")
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
                          lm_eval_include=args.lm_eval_include, num_fewshot=args.num_fewshot,
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
    from .profile_merge import merge_profiles

    out = merge_profiles(args.profiles, args.out, overwrite=args.overwrite)
    print(f"wrote {out}")


def cmd_report(args: argparse.Namespace) -> None:
    from dashboard.report import report_html  # the HTML and figures are the dashboard's; core stays below it

    from .atomic import atomic_write_text
    from .report import build_report_data

    inputs = [args.profile, *args.plan, *([args.results] if args.results else [])]
    for path in inputs:
        if not Path(path).is_file():
            raise MoEScopeError(f"No file at {path}.")
    out = check_output(args.out, "report", args.overwrite, sources=inputs, source_label="input")
    with output_lock(out):
        data = build_report_data(args.profile, args.plan, args.results, out=args.out)
        atomic_write_text(out, report_html(data))
    print(f"wrote {args.out} ({out.stat().st_size / 1024:.0f} KB)")


def cmd_compare(args: argparse.Namespace) -> None:
    """Print the per-layer divergence of B's routing from A's; with --out, also write the usage differences,
    the divergence and (given the plan B was recorded under) the re-routing flows as CSV files in one folder,
    written as a whole so an interrupted run leaves the earlier folder untouched."""
    from .atomic import atomic_directory
    from .outputs import COMPARE_MARKER
    from .plan import Plan
    from .profile_compare import compare_usage, divergence_of, reroute_flows
    from .routing_profile import Profile

    inputs = [args.a, args.b, *([args.plan] if args.plan else [])]
    for path in inputs:
        if not Path(path).is_file():
            raise MoEScopeError(f"No file at {path}.")
    out = None
    if args.out:  # refused before anything is read, so a bad folder costs nothing
        out = check_output(args.out, "compare", args.overwrite, sources=inputs, source_label="input")
    a, b = Profile(args.a), Profile(args.b)
    cells = compare_usage(a, b, args.task)
    divergence = divergence_of(cells)
    flows = reroute_flows(a, b, Plan.load(args.plan), task=args.task) if args.plan else None
    print(divergence.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if out is None:
        return
    with output_lock(out), atomic_directory(out) as folder:
        cells.to_csv(folder / "usage_diff.csv", index=False)
        divergence.to_csv(folder / "divergence.csv", index=False)
        if flows is not None:
            flows.to_csv(folder / "flows.csv", index=False)
        marker = {"format": "moescope-compare", "a": str(Path(args.a).absolute()), "b": str(Path(args.b).absolute()),
                  "task": args.task, "plan": str(Path(args.plan).absolute()) if args.plan else None}
        (folder / COMPARE_MARKER).write_text(json.dumps(marker, indent=1), encoding="utf-8")
    print(f"wrote {args.out} ({', '.join(sorted(p.name for p in out.iterdir() if p.suffix == '.csv'))})")


def dashboard_command(model: str | None, port: int, address: str = "127.0.0.1") -> list[str]:
    """The Streamlit command line: address, port, upload limit and look explicit, so no config file in the
    current directory decides them (``.streamlit/config.toml`` holds the same settings for ``streamlit run``)."""
    app = Path(__file__).resolve().parent.parent / "dashboard" / "app.py"
    return [sys.executable, "-m", "streamlit", "run", str(app), "--server.address", address,
            "--server.port", str(port), "--server.headless", "true", "--server.maxUploadSize", str(UPLOAD_LIMIT_MB),
            "--browser.gatherUsageStats", "false", "--client.toolbarMode", "viewer", "--theme.base", "light"]


UPLOAD_LIMIT_MB = 50  # plans and sweep tables; profiles are loaded by path


def cmd_dashboard(args: argparse.Namespace) -> None:
    env = dict(os.environ)
    if args.model:
        env["MOESCOPE_MODEL"] = args.model
    command = dashboard_command(args.model, args.port)
    print(f"MoEScope dashboard at http://{command[command.index('--server.address') + 1]}:{args.port} "
          f"(this machine only; Ctrl+C stops it)", flush=True)
    # Streamlit replaces this process (no child left behind): Ctrl+C and a TERM sent to `moescope dashboard`
    # reach the server itself, which stops; a child started with subprocess.run outlived a terminated parent.
    os.execvpe(command[0], command, env)
