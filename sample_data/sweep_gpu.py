"""Probe sweep on a GPU: QA format variants for the same step count, scored on regenerated validation."""
import json, os, sys, time, tempfile, multiprocessing as mp
from pathlib import Path
sys.path.insert(0, os.getcwd())

class FakeDS(list):
    @property
    def column_names(self): return list(self[0].keys())
    def __getitem__(self, k):
        if isinstance(k, str): return [r[k] for r in self]
        return list.__getitem__(self, k)

def run(name, v, out):
    import core.tasks as T
    from core import sample_training as st
    gen = st.load_generator()
    if v.get("qfirst"):
        gen.QA_TEMPLATE = "Question: {question}\nContext: {context}\nAnswer:"
    gen.SINGLE_TEMPLATES = v.get("single", False)
    tmp = Path(tempfile.mkdtemp()); gen.write_tasks(tmp)
    specs = json.load(open(tmp / "qa" / "task.json"))
    specs["prompt_template"] = gen.QA_TEMPLATE; json.dump(specs, open(tmp / "qa" / "task.json", "w"))
    s2 = json.load(open(tmp / "qa_choice" / "task.json")); s2["prompt_template"] = gen.QA_TEMPLATE
    json.dump(s2, open(tmp / "qa_choice" / "task.json", "w"))
    T.SAMPLE_TASKS_DIR = tmp
    def load_task(spec, split="test"):
        spec = T.get_task_spec(spec)
        return FakeDS(json.loads(l) for l in open(spec.base_dir / spec.data_files[split]))
    T.load_task = load_task
    cfg = st.TrainConfig(minutes=1000, **v["cfg"])
    t = time.time()
    model, tok, stats = st.train_model(cfg, device=os.environ.get("DEV", "cuda"), progress=False)
    stats.pop("loss_history")
    res = st.evaluate_model(model, tok, "validation", baselines=False, tasks=("qa", "arithmetic", "qa_choice"))
    r = {"name": name, "v": v, "stats": stats, "val": res, "secs": time.time() - t}
    json.dump(r, open(f"{out}/{name}.json", "w"), indent=1, default=str)
    print(name, res["qa"]["exact_match"], res["qa"]["exact_match_by_kind"], res["arithmetic"]["exact_match"], res["qa_choice"]["accuracy"], stats["final_loss_ema"], round(r["secs"]), flush=True)
    print(res["qa"]["examples"][:3], flush=True)

MIX5 = {"qa": 0.50, "arithmetic": 0.20, "code": 0.18, "prose": 0.12}
MIX6 = {"qa": 0.60, "arithmetic": 0.15, "code": 0.15, "prose": 0.10}
VARIANTS = {
    "Q1": {"qfirst": True, "cfg": {"mixture": MIX5}},
    "Q2": {"qfirst": True, "single": True, "cfg": {"mixture": MIX5}},
    "Q3": {"qfirst": True, "cfg": {"mixture": MIX6}},
    "Q4": {"cfg": {"mixture": MIX5}},
    "Q5": {"single": True, "cfg": {"mixture": MIX6}},
}
if __name__ == "__main__":
    out = os.environ.get("OUT", "/tmp/sweep"); os.makedirs(out, exist_ok=True)
    steps = int(sys.argv[1]); names = sys.argv[2].split(",") if len(sys.argv) > 2 else list(VARIANTS)
    ctx = mp.get_context("spawn"); ps = []
    for n in names:
        v = json.loads(json.dumps(VARIANTS[n])); v["cfg"].setdefault("max_steps", steps)
        p = ctx.Process(target=run, args=(n, v, out)); p.start(); ps.append(p)
    for p in ps: p.join()
