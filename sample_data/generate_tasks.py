"""Deterministic generator for MoEScope's sample tasks (and the sample model's training text).

Run ``python sample_data/generate_tasks.py`` (optionally ``--out DIR``) to rewrite
``sample_data/tasks/<task>/{calibration,validation,test}.jsonl`` and ``task.json``.
Every random choice comes from ``random.Random(<string seed>)``, so two runs give byte-identical
files. The held-out splits use the seed stream ``"eval/..."``; the training text for the sample model
(``training_documents``) uses ``"train/<seed>/..."`` and drops any example whose prompt also occurs in
a held-out split. ``code`` and ``prose`` are split by source file of the Python standard library
shipped with the running interpreter (Python Software Foundation License), so their files depend on
the Python version, which ``task.json`` records.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import inspect
import json
import os
import random
import sys
import sysconfig
from pathlib import Path
from typing import Iterator

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "tasks"
SPLIT_SIZES = {"calibration": 128, "validation": 200, "test": 200}
SPLITS = ("calibration", "validation", "test")

# --------------------------------------------------------------------------------------------
# Invented world for the reading-comprehension tasks
# --------------------------------------------------------------------------------------------
FIRST_NAMES = [
    "Alma", "Bruno", "Clara", "Dmitri", "Edith", "Farid", "Greta", "Hugo", "Ines", "Jonas",
    "Kira", "Lukas", "Mara", "Nils", "Olga", "Pavel", "Quinn", "Rosa", "Soren", "Tilda",
    "Umar", "Vera", "Wendel", "Xenia", "Yusuf", "Zora", "Anton", "Beatrix", "Cyril", "Dagny",
    "Emil", "Freya", "Gustav", "Hedda", "Ivo", "Janne", "Karl", "Lena", "Milo", "Nadia",
]
_CITY_A = ["Bar", "Cor", "Dal", "Eld", "Fen", "Gal", "Hol", "Isk", "Jor", "Kel", "Lun", "Mar",
           "Nor", "Orl", "Pel", "Quar", "Ros", "Sal", "Tor", "Ulm", "Val", "Wes", "Yar", "Zel"]
_CITY_B = ["ford", "vik", "heim", "mouth", "by", "stad", "wick", "ton", "dale", "burg", "mere",
           "haven", "field", "gard", "ness", "port"]
_PET_A = ["Pip", "Bo", "Mo", "Lu", "Fi", "Ko", "Ru", "Ta", "Ni", "Zu", "Wo", "Da", "Pe", "Su"]
_PET_B = ["ko", "bo", "li", "ra", "nu", "pa", "zi", "mo", "ty", "do", "fin", "bel", "rik", ""]
JOBS = ["baker", "pilot", "teacher", "carpenter", "nurse", "librarian", "fisher", "gardener",
        "painter", "tailor", "chemist", "plumber", "surveyor", "potter", "miller", "glassblower",
        "clockmaker", "beekeeper", "cartographer", "blacksmith"]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "grey", "teal", "amber",
           "crimson", "violet", "indigo"]
ANIMALS = ["dog", "cat", "parrot", "goat", "rabbit", "tortoise", "horse", "hamster", "ferret"]
THINGS = ["sheep", "bicycles", "books", "chairs", "lamps", "boats", "hens", "clocks", "kites",
          "violins", "barrels", "maps"]


def _city(rng: random.Random) -> str:
    return rng.choice(_CITY_A) + rng.choice(_CITY_B)


def _pet(rng: random.Random) -> str:
    return rng.choice(_PET_A) + rng.choice(_PET_B)


# fact kind -> (sentence templates, question templates); {p} person, {a} answer, {x} extra slot.
FACTS: dict[str, tuple[list[str], list[str]]] = {
    "birthplace": (["{p} was born in {a}.", "{p} was born in the town of {a}."],
                   ["Where was {p} born?", "In which town was {p} born?"]),
    "birth_year": (["{p} was born in the year {a}.", "The year {p} was born was {a}."],
                   ["In which year was {p} born?", "When was {p} born?"]),
    "job": (["{p} works as a {a}.", "By trade, {p} is a {a}."],
            ["What is {p}'s job?", "What does {p} do for a living?"]),
    "moved_to": (["In {x}, {p} moved to {a}.", "{p} moved to {a} in {x}."],
                 ["Where did {p} move in {x}?", "To which town did {p} move?"]),
    "colour": (["{p}'s favourite colour is {a}.", "{p} likes the colour {a} best."],
               ["What is {p}'s favourite colour?", "Which colour does {p} like best?"]),
    "pet": (["{p} has a {x} called {a}.", "{p} owns a {x} named {a}."],
            ["What is the name of {p}'s {x}?", "What is {p}'s {x} called?"]),
    "count": (["{p} keeps {a} {x}.", "{p} owns exactly {a} {x}."],
              ["How many {x} does {p} keep?", "How many {x} does {p} own?"]),
}
FACT_KINDS = list(FACTS)
SINGLE_TEMPLATES = True  # one wording per fact and question: learnable in a CPU budget


def _person_facts(rng: random.Random, used: dict[str, set]) -> dict[str, tuple[str, str]]:
    """Values (answer, extra) for every fact kind, distinct from the other person's values."""

    def pick(kind: str, make) -> str:
        while True:
            v = make(rng)
            if v not in used.setdefault(kind, set()):
                used[kind].add(v)
                return v

    birthplace = pick("place", _city)
    moved = pick("place", _city)
    year = pick("year", lambda r: str(r.randint(1900, 1990)))
    moved_year = pick("year", lambda r: str(int(year) + r.randint(15, 30)))
    animal = rng.choice(ANIMALS)
    thing = rng.choice(THINGS)
    return {
        "birthplace": (birthplace, ""),
        "birth_year": (year, ""),
        "job": (pick("job", lambda r: r.choice(JOBS)), ""),
        "moved_to": (moved, moved_year),
        "colour": (pick("colour", lambda r: r.choice(COLOURS)), ""),
        "pet": (pick("pet", _pet), animal),
        "count": (pick("count", lambda r: str(r.randint(2, 99))), thing),
    }


def _context(rng: random.Random):
    """People, their facts, and a shuffled context of 3-6 sentences about 1-2 of them."""
    n_people = rng.choice([1, 2, 2])
    people = rng.sample(FIRST_NAMES, n_people)
    used: dict[str, set] = {}
    facts = {p: _person_facts(rng, used) for p in people}
    sentences: list[tuple[str, str, str]] = []  # (person, kind, sentence)
    for p in people:
        k = rng.randint(2, 4) if n_people == 2 else rng.randint(3, 5)
        for kind in rng.sample(FACT_KINDS, k):
            ans, extra = facts[p][kind]
            tmpl = FACTS[kind][0][0] if SINGLE_TEMPLATES else rng.choice(FACTS[kind][0])
            sentences.append((p, kind, tmpl.format(p=p, a=ans, x=extra)))
    rng.shuffle(sentences)
    context = " ".join(s for _, _, s in sentences)
    # only facts whose answer string occurs once in the context, so answer_start is unambiguous
    candidates = [(p, k) for p, k, _ in sentences if context.count(facts[p][k][0]) == 1]
    return people, facts, context, candidates


def _question(rng: random.Random, facts, p: str, kind: str) -> str:
    ans, extra = facts[p][kind]
    return (FACTS[kind][1][0] if SINGLE_TEMPLATES else rng.choice(FACTS[kind][1])).format(p=p, x=extra)


def make_story(rng: random.Random) -> dict:
    """A context about 1-2 invented people, one question, its answer span and 3 distractors."""
    people, facts, context, candidates = _context(rng)
    if not candidates:
        return make_story(rng)
    p, kind = rng.choice(candidates)
    ans, extra = facts[p][kind]
    question = _question(rng, facts, p, kind)
    # distractors for multiple choice: same kind, other people first, then fresh values
    pool = [facts[q][kind][0] for q in people if q != p]
    makers = {"birthplace": _city, "moved_to": _city, "job": lambda r: r.choice(JOBS),
              "colour": lambda r: r.choice(COLOURS), "pet": _pet,
              "birth_year": lambda r: str(r.randint(1900, 1990)),
              "count": lambda r: str(r.randint(2, 99))}
    if kind in ("birthplace", "moved_to"):  # the other place in the story is the hardest distractor
        pool += [facts[q][k2][0] for q in people for k2 in ("birthplace", "moved_to")]
    if kind == "birth_year":
        pool += [facts[q]["moved_to"][1] for q in people]
    distractors: list[str] = []
    for v in pool:
        if v != ans and v not in distractors:
            distractors.append(v)
    while len(distractors) < 3:
        v = makers[kind](rng)
        if v != ans and v not in distractors:
            distractors.append(v)
    return {"title": " and ".join(people), "context": context, "question": question,
            "answer": ans, "answer_start": context.index(ans), "kind": kind,
            "distractors": distractors[:3]}


def make_training_story(rng: random.Random, max_questions: int = 4) -> tuple[str, list[tuple[str, str]]]:
    """Training only: one context with 1..max_questions different questions about it, so each
    document carries several answer-lookup signals (the first question matches the eval format)."""
    people, facts, context, candidates = _context(rng)
    if not candidates:
        return make_training_story(rng, max_questions)
    picked = rng.sample(candidates, min(len(candidates), rng.randint(1, max_questions)))
    return context, [(_question(rng, facts, p, k), facts[p][k][0]) for p, k in picked]


# --------------------------------------------------------------------------------------------
# Arithmetic
# --------------------------------------------------------------------------------------------
# Format choice (see sample_data/README.md): operands of 1-3 digits, + or -, the result of a
# subtraction is never negative, and the answer is written least-significant digit first
# ("reversed"), so that each answer digit depends only on digits already seen plus a carry.
ARITH_REVERSED = True


def make_arith(rng: random.Random) -> dict:
    da, db = rng.randint(1, 3), rng.randint(1, 3)
    a = rng.randint(0 if da == 1 else 10 ** (da - 1), 10 ** da - 1)
    b = rng.randint(0 if db == 1 else 10 ** (db - 1), 10 ** db - 1)
    op = rng.choice("+-")
    if op == "-" and b > a:
        a, b = b, a
    value = a + b if op == "+" else a - b
    answer = str(value)[::-1] if ARITH_REVERSED else str(value)
    return {"expression": f"{a}{op}{b}", "answer": answer, "value": value}


# --------------------------------------------------------------------------------------------
# Real text from the standard library
# --------------------------------------------------------------------------------------------
MAX_CHUNK_CHARS = 600


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """Sorted stdlib ``.py`` files, without test suites and site-packages."""
    root = stdlib_dir()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in (
            "site-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3"))
        for f in sorted(filenames):
            if f.endswith(".py"):
                out.append(Path(dirpath) / f)
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def file_split(path: Path) -> str:
    """Assign a whole source file to one split by a stable hash of its relative path."""
    rel = path.relative_to(stdlib_dir()).as_posix()
    h = int(hashlib.md5(rel.encode()).hexdigest(), 16) % 100
    if h < 9:
        return "test"
    if h < 17:
        return "validation"
    if h < 25:
        return "calibration"
    return "train"


def _read(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None
    if not text.isascii():
        return None
    return text


def code_chunks(path: Path) -> list[str]:
    """Consecutive whole lines of a file, cut at blank lines, each at most MAX_CHUNK_CHARS."""
    text = _read(path)
    if text is None:
        return []
    chunks, cur = [], ""
    for block in text.split("\n\n"):
        block = block.strip("\n")
        if not block.strip():
            continue
        if len(block) > MAX_CHUNK_CHARS:
            lines = block.split("\n")
            block = ""
            for ln in lines:
                if len(block) + len(ln) + 1 > MAX_CHUNK_CHARS:
                    break
                block += ln + "\n"
            block = block.rstrip("\n")
            if not block:
                continue
        if cur and len(cur) + 2 + len(block) > MAX_CHUNK_CHARS:
            chunks.append(cur)
            cur = ""
        cur = block if not cur else cur + "\n\n" + block
    if cur:
        chunks.append(cur)
    return [c + "\n" for c in chunks if len(c) >= 120]


def docstrings(path: Path) -> list[str]:
    """English docstrings of a module, its classes and functions (cleaned, at most ~600 chars)."""
    text = _read(path)
    if text is None:
        return []
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if not doc:
                continue
            doc = inspect.cleandoc(doc)
            if len(doc) > MAX_CHUNK_CHARS:
                cut = doc[:MAX_CHUNK_CHARS]
                end = max(cut.rfind(". "), cut.rfind(".\n"))
                doc = cut[: end + 1] if end > 100 else cut.rsplit(" ", 1)[0]
            letters = sum(c.isalpha() or c == " " for c in doc)
            if len(doc) >= 100 and letters / len(doc) > 0.8:
                out.append(doc + "\n")
    return out


def stdlib_texts(kind: str, split: str) -> list[str]:
    """All code chunks (kind='code') or docstrings (kind='prose') of the files in one split."""
    fn = code_chunks if kind == "code" else docstrings
    out: list[str] = []
    for p in stdlib_files():
        if file_split(p) == split:
            out.extend(fn(p))
    return out


# --------------------------------------------------------------------------------------------
# Held-out splits
# --------------------------------------------------------------------------------------------
QA_TEMPLATE = "Context: {context}\nQuestion: {question}\nAnswer:"
ARITH_TEMPLATE = "Compute: {expression}="


def _unique(make, rng: random.Random, n: int, key, seen: set) -> list[dict]:
    out = []
    while len(out) < n:
        ex = make(rng)
        k = key(ex)
        if k in seen:
            continue
        seen.add(k)
        out.append(ex)
    return out


def build_splits() -> dict[str, dict[str, list[dict]]]:
    """task -> split -> examples, all disjoint across splits within a task."""
    tasks: dict[str, dict[str, list[dict]]] = {}

    seen: set = set()
    qa: dict[str, list[dict]] = {}
    for split in SPLITS:
        rng = random.Random(f"eval/qa/{split}")
        stories = _unique(make_story, rng, SPLIT_SIZES[split], lambda s: (s["context"], s["question"]), seen)
        qa[split] = [{"id": f"qa-{split}-{i:04d}", "title": s["title"], "context": s["context"],
                      "question": s["question"],
                      "answers": {"text": [s["answer"]], "answer_start": [s["answer_start"]]},
                      "kind": s["kind"]} for i, s in enumerate(stories)]
    tasks["qa"] = qa

    mc: dict[str, list[dict]] = {}
    for split in SPLITS:
        rng = random.Random(f"eval/qa_choice/{split}")
        stories = _unique(make_story, rng, SPLIT_SIZES[split], lambda s: (s["context"], s["question"]), seen)
        rows = []
        for i, s in enumerate(stories):
            options = [s["answer"]] + s["distractors"]
            rng.shuffle(options)
            rows.append({"id": f"qa_choice-{split}-{i:04d}", "context": s["context"],
                         "question": s["question"], "options": options,
                         "label": options.index(s["answer"]), "kind": s["kind"]})
        mc[split] = rows
    tasks["qa_choice"] = mc

    seen = set()
    ar: dict[str, list[dict]] = {}
    for split in SPLITS:
        rng = random.Random(f"eval/arithmetic/{split}")
        exs = _unique(make_arith, rng, SPLIT_SIZES[split], lambda e: e["expression"], seen)
        ar[split] = [{"id": f"arithmetic-{split}-{i:04d}", **e} for i, e in enumerate(exs)]
    tasks["arithmetic"] = ar

    for kind in ("code", "prose"):
        d: dict[str, list[dict]] = {}
        taken: set[str] = set()  # the same docstring/code can sit in several files: keep splits disjoint
        for split in SPLITS:
            all_texts = set(stdlib_texts(kind, split))
            texts = sorted(all_texts - taken)
            taken |= all_texts
            rng = random.Random(f"eval/{kind}/{split}")
            picked = rng.sample(texts, min(SPLIT_SIZES[split], len(texts)))
            d[split] = [{"id": f"{kind}-{split}-{i:04d}", "text": t} for i, t in enumerate(picked)]
        tasks[kind] = d
    return tasks


def task_specs() -> dict[str, dict]:
    """The task.json written beside each task's files (read by core.tasks.TaskSpec)."""
    files = {s: f"{s}.jsonl" for s in SPLITS}
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    return {
        "qa": {"name": "qa", "description": "Extractive reading comprehension (SQuAD schema) about "
               "invented people, places, dates and quantities.", "data_files": files,
               "prompt_template": QA_TEMPLATE, "answer_field": "answers", "target_prefix": " ",
               "metric": "squad", "stop": "\n", "max_new_tokens": 12},
        "arithmetic": {"name": "arithmetic", "description": "1-3 digit addition and subtraction; "
                       "the answer is written least-significant digit first (e.g. 345+78= -> 324).",
                       "data_files": files, "prompt_template": ARITH_TEMPLATE,
                       "answer_field": "answer", "target_prefix": "", "metric": "exact_match",
                       "stop": "\n", "max_new_tokens": 6},
        "qa_choice": {"name": "qa_choice", "description": "Pick the right answer among 4 options for "
                      "a reading-comprehension question; scored by option log-likelihood.",
                      "data_files": files, "prompt_template": QA_TEMPLATE,
                      "options_field": "options", "answer_field": "label", "target_prefix": " ",
                      "metric": "multiple_choice", "stop": "\n"},
        "code": {"name": "code", "description": "Chunks of Python standard-library source (Python "
                 f"{pyver}, PSF License), split by file; scored by LM loss.", "data_files": files,
                 "text_field": "text", "metric": "lm_loss", "source_python": pyver},
        "prose": {"name": "prose", "description": "English docstrings from the Python standard "
                  f"library (Python {pyver}, PSF License), split by file; scored by LM loss.",
                  "data_files": files, "text_field": "text", "metric": "lm_loss",
                  "source_python": pyver},
    }


def _dump(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)


def write_tasks(out: Path = DEFAULT_OUT) -> list[Path]:
    """Write every task's split files and task.json under ``out``; return the paths written."""
    written = []
    specs = task_specs()
    for task, splits in build_splits().items():
        d = out / task
        d.mkdir(parents=True, exist_ok=True)
        for split, rows in splits.items():
            p = d / f"{split}.jsonl"
            p.write_text("".join(_dump(r) + "\n" for r in rows), encoding="utf-8")
            written.append(p)
        p = d / "task.json"
        p.write_text(json.dumps(specs[task], indent=2) + "\n", encoding="utf-8")
        written.append(p)
    return written


# --------------------------------------------------------------------------------------------
# Training text for the sample model (different seed stream; held-out prompts excluded)
# --------------------------------------------------------------------------------------------
def heldout_keys(tasks_dir: Path = DEFAULT_OUT) -> set[str]:
    """Prompts/contexts of every held-out example, so training text can avoid them."""
    keys: set[str] = set()
    for task in ("qa", "qa_choice", "arithmetic"):
        for split in SPLITS:
            p = tasks_dir / task / f"{split}.jsonl"
            if not p.exists():
                continue
            for line in p.read_text(encoding="utf-8").splitlines():
                r = json.loads(line)
                keys.add(r.get("context") or r["expression"])
    return keys


def training_texts(kind: str) -> list[str]:
    """Code chunks / docstrings of the 'train' files minus any text that also occurs in a held-out file."""
    heldout = {t for split in SPLITS for t in stdlib_texts(kind, split)}
    return [t for t in stdlib_texts(kind, "train") if t not in heldout]


def training_documents(kind: str, seed: int, exclude: set[str]) -> Iterator[list[tuple[str, bool]]]:
    """Endless training documents as segments (text, is_answer); answer segments end with the
    stop "\n" and get the extra loss weight. qa documents ask 1-4 questions about one context.

    Code and prose come only from files of the 'train' split, cycled in a seeded random order.
    """
    rng = random.Random(f"train/{seed}/{kind}")
    if kind == "qa":
        while True:
            context, qas = make_training_story(rng)
            if context in exclude:
                continue
            segs = []
            for i, (q, a) in enumerate(qas):
                if i == 0:
                    segs.append((QA_TEMPLATE.format(context=context, question=q), False))
                else:
                    segs.append((f"Question: {q}\nAnswer:", False))
                segs.append((f" {a}\n", True))
            yield segs
    elif kind == "arithmetic":
        while True:
            e = make_arith(rng)
            if e["expression"] in exclude:
                continue
            yield [(ARITH_TEMPLATE.format(expression=e["expression"]), False), (e["answer"] + "\n", True)]
    elif kind in ("code", "prose"):
        texts = training_texts(kind)
        while True:
            order = list(range(len(texts)))
            rng.shuffle(order)
            for i in order:
                yield [(texts[i], False)]
    else:
        raise ValueError(f"unknown training kind {kind!r}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    args = ap.parse_args(argv)
    for p in write_tasks(args.out):
        print(p)


if __name__ == "__main__":
    main()
