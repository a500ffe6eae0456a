"""What every page shares: the loaded model and its workbench (cached once per server), the active
profile and its aggregates (cached by file), the user's choices (session state), and error display.

Pages call these and render; every computation is a call into ``core``.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

import streamlit as st

from core.atomic import atomic_write_text, remove_stale_temporaries, temporary_name
from core.errors import user_message
from core.model import MoEModel, load_model
from core.plan import Plan, validate_plan
from core.profiling import profile_texts
from core.routing_profile import Profile
from core.tasks import get_task_spec, list_sample_tasks, task_texts
from core.workbench import Workbench

REPO = Path(__file__).resolve().parents[1]
SAMPLE_MODEL = REPO / "sample_data" / "model"


def home() -> Path:
    """Where the dashboard writes (profiles, search states, default exports): $MOESCOPE_HOME/dashboard or runs/."""
    return Path(os.environ.get("MOESCOPE_HOME", REPO / "runs")) / "dashboard"

AUTO_PROFILE_MAX_PARAMS = 200_000_000  # profile the sample tasks unasked only for models this small
AUTO_PROFILE = {"split": "validation", "limit": 100}


# ----- errors ---------------------------------------------------------------------------------------
@contextmanager
def shown_errors(what: str) -> Iterator[None]:
    """Show a failure as a message on the page instead of a traceback; the rest of the page keeps working.
    Streamlit's own rerun/stop signals are BaseExceptions and pass through."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - an unexpected failure must not take the app down
        show_error(what, exc)


_MARKDOWN = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~$:])")


def plain(text: str) -> str:
    """``text`` escaped so that Streamlit's Markdown shows it as written (paths, ``*``, ``<tags>``)."""
    return _MARKDOWN.sub(r"\\\1", text)


def code(text: object) -> str:
    """``text`` as an inline code span: shown as written, and never turned into a link (paths with ``@``)."""
    return "`" + str(text).replace("`", "'") + "`"


def error_text(what: str, exc: BaseException, uploads: dict[str, str] | None = None,
               controls: dict[str, str] | None = None) -> str:
    """The CLI's one sentence for ``exc`` (``core.errors.user_message``) in the page's words: the user's
    uploaded file instead of the temporary copy (``uploads``: temporary path -> the user's file name), and
    the page's control instead of a command-line flag (``controls``: flag -> the control's label)."""
    message = user_message(exc)
    if message is None:
        message = f"unexpected {type(exc).__name__}: {exc}"
    for temporary, name in (uploads or {}).items():
        message = message.replace(temporary, name)
    for flag, control in (controls or {}).items():
        message = re.sub(rf"pass {re.escape(flag)}\b", f'tick "{control}"', message)
        message = re.sub(rf"{re.escape(flag)}\b", f'"{control}"', message)
    return f"{what}: {message}"


def show_error(what: str, exc: BaseException, uploads: dict[str, str] | None = None,
               controls: dict[str, str] | None = None) -> None:
    """:func:`error_text` shown expanded, as plain text (never Markdown)."""
    st.error(plain(error_text(what, exc, uploads, controls)))


# ----- progress ---------------------------------------------------------------------------------------
def progress_text(what: str, fraction: float, elapsed: float) -> str:
    """``what`` with its percentage and, once a second has passed, an estimate of the time left."""
    text = f"{what} ({fraction:.0%})"
    if elapsed >= 1.0 and 0.02 <= fraction < 1.0:
        left = elapsed / fraction * (1.0 - fraction)
        text += f", about {left:.0f} s left" if left < 90 else f", about {left / 60:.0f} min left"
    return text


class Progress:
    """A progress bar that says what is being done and how long is left; shows itself only for steps that
    report progress, and removes itself when done (used as a context manager)."""

    def __init__(self, container: Any = None) -> None:
        self._container = container or st
        self._bar = None
        self._start = time.perf_counter()

    def fraction(self, what: str, fraction: float) -> None:
        fraction = min(max(float(fraction), 0.0), 1.0)
        text = progress_text(what, fraction, time.perf_counter() - self._start)
        if self._bar is None:
            self._bar = self._container.progress(fraction, text=text)
        else:
            self._bar.progress(fraction, text=text)

    def steps(self, what: str, done: int, total: int) -> None:
        self.fraction(what, done / total if total else 1.0)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.empty()


# ----- stopping a step that runs in this script run ---------------------------------------------------
def _mark_stopped(key: str) -> None:
    st.session_state[f"stopped_{key}"] = True


def stopped(key: str) -> bool:
    """Whether the user pressed the Stop button of step ``key`` (see :func:`stoppable`); cleared by
    :func:`clear_stopped`."""
    return bool(st.session_state.get(f"stopped_{key}"))


def clear_stopped(key: str) -> None:
    st.session_state.pop(f"stopped_{key}", None)


@contextmanager
def stoppable(key: str, label: str = "Stop", container: Any = None, help: str | None = None) -> Iterator[None]:
    """A Stop button shown while the step in the ``with`` block runs. Pressing it makes Streamlit rerun the
    page (or fragment), which interrupts this run at the step's next progress update; :func:`stopped` is true
    in that rerun, so the page says so instead of starting the step again. The button goes when the step ends.
    Streamlit's own interruption is used rather than a thread of our own: the step's locks and temporary files
    are released by the same ``with`` blocks that release them on any error."""
    slot = (container or st).empty()
    slot.button(label, key=f"stop_button_{key}", on_click=_mark_stopped, args=(key,), help=help)
    try:
        yield
    finally:
        slot.empty()


# ----- uploads ---------------------------------------------------------------------------------------
def new_upload_folder() -> Path:
    """A fresh folder for an uploaded file under ``home()/uploads``. Its name carries this server's PID
    (``core.atomic.temporary_name``), so uploads of a dashboard that has stopped are removed here, by the next one."""
    root = home() / "uploads"
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(root)
    folder = temporary_name(root / "profile")
    folder.mkdir()
    return folder


def drop_upload_folder(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def keep_upload_folder(folder: Path) -> None:
    """Make ``folder`` this session's upload; the session's previous upload folder is removed now."""
    previous = st.session_state.get("profile_upload_folder")
    st.session_state["profile_upload_folder"] = str(folder)
    if previous and previous != str(folder):
        drop_upload_folder(Path(previous))


# ----- model ----------------------------------------------------------------------------------------
def model_settings() -> dict[str, Any]:
    source = os.environ.get("MOESCOPE_MODEL") or str(SAMPLE_MODEL)  # `make run MODEL=...` sets it
    return st.session_state.setdefault("model_settings", {"source": source, "dtype": "auto",
                                                          "device": "cpu", "trust_remote_code": False})


@st.cache_resource(max_entries=2, show_spinner="Loading the model and reading its router weights (once per server)…",
                   show_time=True)
def _workbench(source: str, dtype: str, device: str, trust_remote_code: bool) -> Workbench:
    """One loaded model (and its plan and result caches) per server, shared by every session."""
    mm = load_model(source, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    # MOESCOPE_LOOK_AHEAD=0 turns off scoring the neighbouring settings in the background (the test suite does)
    return Workbench(mm, state_dir=home() / "searches", look_ahead=os.environ.get("MOESCOPE_LOOK_AHEAD", "1") != "0")


def load(settings: dict[str, Any]) -> MoEModel:
    return _workbench(settings["source"], settings["dtype"], settings["device"], settings["trust_remote_code"]).mm


def current_model() -> MoEModel | None:
    """The model chosen on the Model page (the sample model by default), or None with a message shown."""
    settings = model_settings()
    try:
        return load(settings)
    except Exception as exc:  # noqa: BLE001 - shown as one sentence, the app keeps running
        show_error(f"Could not load {settings['source']} (choose another model on the Model page)", exc)
        return None


def workbench() -> Workbench:
    s = model_settings()
    return _workbench(s["source"], s["dtype"], s["device"], s["trust_remote_code"])


@st.cache_resource(show_spinner=False)
def _path_lock(path: str) -> threading.Lock:
    """One lock per profile path across sessions, so two sessions never record the same file at once."""
    return threading.Lock()


# ----- tasks ----------------------------------------------------------------------------------------
def task_choices() -> list[str]:
    """The bundled sample tasks plus any task specs the user added on the Model page."""
    return list_sample_tasks() + st.session_state.setdefault("extra_tasks", [])


def task_label(task: str) -> str:
    return get_task_spec(task).name


@st.cache_data(show_spinner=False, max_entries=64)
def texts_of(task: str, split: str, limit: int | None) -> list[str]:
    return task_texts(task, split, limit)


# ----- plans kept across reloads ----------------------------------------------------------------------
def plans_folder(mm: MoEModel) -> Path:
    return home() / "plans" / mm.weights_digest()[:16]


def remember_plan(mm: MoEModel, plan: Plan) -> None:
    """Make ``plan`` this session's plan and keep it on disk (by digest, with a pointer to the latest), so a
    reload of the browser finds it again."""
    st.session_state["plan"] = plan
    if st.session_state.get("plan_saved") == plan.digest():
        return
    try:
        folder = plans_folder(mm)
        saved = plan.save(folder / f"{plan.digest()}.json")
        atomic_write_text(folder / "latest", saved.name + "\n")
        st.session_state["plan_saved"] = plan.digest()
    except OSError:  # a read-only home: the plan still lives for this session
        pass


def current_plan(mm: MoEModel) -> Plan | None:
    """This session's plan; after a reload, the latest plan made on this model (restored from disk)."""
    plan = st.session_state.get("plan")
    if plan is not None:
        return plan
    pointer = plans_folder(mm) / "latest"
    if not pointer.is_file():
        return None
    try:
        plan = Plan.load(pointer.parent / pointer.read_text().strip())
        validate_plan(plan, mm.routing_spec())
    except Exception:  # noqa: BLE001 - a stale or damaged file: start without a plan, as before
        return None
    st.session_state["plan"] = plan
    st.session_state["plan_saved"] = plan.digest()
    st.session_state["plan_restored"] = True
    return plan


# ----- profile --------------------------------------------------------------------------------------
def default_profile_path(mm: MoEModel) -> Path:
    return home() / "profiles" / f"{mm.weights_digest()[:16]}-sample-tasks.parquet"


def record_profile(mm: MoEModel, tasks: list[str], split: str, limit: int | None, out: Path,
                   progress: Callable[[int, int, float], None] | None = None) -> Path:
    """Profile ``tasks`` (texts of one split) into ``out`` and make it the active profile."""
    texts = {task_label(t): texts_of(t, split, limit) for t in tasks}
    path = profile_texts(mm, texts, out, batch_size=16, progress=progress or False)
    st.session_state["profile_path"] = str(path)
    return path


def active_profile(mm: MoEModel, auto: bool = True) -> Profile | None:
    """The profile chosen on the Profile page, else this model's default profile of the sample tasks
    (recorded now, with a progress bar, when the model is small enough and ``auto``), else None."""
    chosen = st.session_state.get("profile_path")
    try:
        if chosen:
            profile = open_profile(chosen)
            profile.meta.require_model(mm.weights_digest(), mm.source)
        else:
            path = default_profile_path(mm)
            with _path_lock(str(path)):
                if not path.exists():
                    if not auto or mm.info().total_params > AUTO_PROFILE_MAX_PARAMS:
                        st.info("No routing profile yet: record one on the **Profile** page.")
                        return None
                    if stopped("auto_profile"):
                        st.info("Recording the routing profile of the sample tasks was stopped. Record one on the "
                                "**Profile** page, or record the sample tasks now.")
                        st.button("Record the sample tasks now", key="auto_profile_again", on_click=clear_stopped,
                                  args=("auto_profile",))
                        return None
                    bar = st.progress(0.0, text="Recording routing on the sample tasks (first visit only)…")
                    with stoppable("auto_profile", "Stop recording", help="Nothing is kept of a stopped recording."):
                        record_profile(mm, list_sample_tasks(), AUTO_PROFILE["split"], AUTO_PROFILE["limit"], path,
                                       lambda done, total, rate: bar.progress(
                                           done / total, text=f"Profiling: {done:,}/{total:,} tokens, "
                                           f"{rate:,.0f} tokens/s"
                                           + (f", about {(total - done) / rate:.0f} s left" if rate > 0 else "")))
                    bar.empty()
            st.session_state["profile_path"] = str(path)
            profile = open_profile(str(path))
    except Exception as exc:  # noqa: BLE001 - shown as one sentence, the app keeps running
        st.session_state.pop("profile_path", None)  # fall back to the default profile next time
        show_error("Profile", exc)
        return None
    if profile.meta.plan_digest:
        st.warning(f"This profile was recorded under pruning plan {profile.meta.plan_digest[:12]}: it shows the "
                   f"pruned model's routing, so experts the plan removed receive no tokens.")
    return profile


def model_and_profile() -> tuple[MoEModel, Profile]:
    """For pages that show a profile: the model and its active profile, or stop the page with a message."""
    mm = current_model()
    profile = active_profile(mm) if mm is not None else None
    if profile is None:
        st.stop()
    if not profile.meta.rows:
        st.info("This profile holds no routing rows; record one on the Profile page.")
        st.stop()
    return mm, profile


def open_profile(path: str) -> Profile:
    return Profile(path)


@st.cache_data(show_spinner=False, max_entries=512)
def _aggregate(name: str, _function: Callable[..., Any], path: str, mtime: float, *args: Any) -> Any:
    return _function(Profile(path), *args)  # cached by ``name``: Streamlit does not hash functions


def aggregated(profile: Profile, function: Callable[..., Any], *args: Any) -> Any:
    """``function(profile, *args)`` (a ``core.aggregate`` function), cached by the function and the profile
    file (path and modification time)."""
    name = f"{function.__module__}.{function.__qualname__}"
    return _aggregate(name, function, str(profile.path), profile.path.stat().st_mtime, *args)
