"""Shared, session-scoped fixtures of the suite, and its markers.

- ``tiny_models``: tiny random models of every family, each built (and saved as a checkpoint) once per
  session; every call hands out a fresh copy, so a test may change its model freely.
- ``write_task``: the one task-folder writer (``tests.tiny_models.write_task``) bound to the test's
  ``tmp_path``.
- ``dashboard_home``: a ``$MOESCOPE_HOME`` holding the sample model's routing profile of the sample tasks,
  recorded once per session; ``dashboard_home_copy`` gives each test its own copy of it.

Markers (registered in pyproject.toml): ``numeric`` (results that depend on floating-point rounding; CI
runs them again with OMP_NUM_THREADS=1), ``slow`` (about 10 s or more here) and ``browser`` (drives
Chromium). ``make test`` runs everything; ``pytest -m "not slow and not browser"`` is the quick loop.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import pytest

# The dashboard scores the settings next to the user's in the background (core.workbench look-ahead). In the
# suite that would only compete for the CPU with the test itself; tests/test_look_ahead.py covers it directly.
os.environ.setdefault("MOESCOPE_LOOK_AHEAD", "0")

from .tiny_models import build, build_layout, char_tokenizer, write_task as _write_task

ROOT = Path(__file__).resolve().parents[1]


class TinyModels:
    """Tiny models built once per session and handed out as copies.

    ``model(type, **overrides)``: a fresh ``deepcopy`` of the model ``tiny_models.build(type, **overrides)``
    builds (same seed, so the same weights as building it anew). ``layout(name)``: the same for
    ``build_layout``. ``checkpoint(type, **overrides)``: a directory with that model and the character
    tokenizer, saved once; tests read it and never write into it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._models: dict[tuple, object] = {}
        self._checkpoints: dict[tuple, Path] = {}

    @staticmethod
    def _key(name: str, overrides: dict) -> tuple:
        return (name, tuple(sorted((k, repr(v)) for k, v in overrides.items())))

    def model(self, model_type: str = "mixtral", **overrides):
        key = self._key(model_type, overrides)
        if key not in self._models:
            self._models[key] = build(model_type, **overrides)
        return copy.deepcopy(self._models[key])

    def layout(self, name: str):
        key = self._key("layout:" + name, {})
        if key not in self._models:
            self._models[key] = build_layout(name)
        return copy.deepcopy(self._models[key])

    def checkpoint(self, model_type: str = "mixtral", **overrides) -> Path:
        key = self._key(model_type, overrides)
        if key not in self._checkpoints:
            path = self.root / f"{model_type}-{len(self._checkpoints)}"
            self.model(model_type, **overrides).save_pretrained(path)
            char_tokenizer().save_pretrained(path)
            self._checkpoints[key] = path
        return self._checkpoints[key]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> TinyModels:
    return TinyModels(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture()
def write_task(tmp_path):
    """``write_task(name, rows, splits=("test",), **spec)``: a task folder ``tmp_path/name`` (see
    ``tests.tiny_models.write_task``)."""
    def write(name: str, rows, splits=("test",), **spec) -> Path:
        return _write_task(tmp_path / name, rows, splits=splits, **{"name": name, **spec})
    return write


@pytest.fixture(scope="session")
def dashboard_home(tmp_path_factory) -> Path:
    """A $MOESCOPE_HOME where the dashboard has recorded the sample model's routing profile of the sample
    tasks (what its first visit does), recorded once per session by the app itself. Read-only: tests take a
    copy (``dashboard_home_copy``)."""
    from streamlit.testing.v1 import AppTest

    home = tmp_path_factory.mktemp("dashboard-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOESCOPE_HOME", str(home))
        at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=600)
        at.run()
        at.switch_page("views/profile.py").run()
        assert not at.exception, at.exception
    profiles = list((home / "dashboard" / "profiles").glob("*-sample-tasks.parquet"))
    assert len(profiles) == 1, f"the dashboard did not record the sample profile under {home}"
    return home


@pytest.fixture()
def dashboard_home_copy(dashboard_home, tmp_path) -> Path:
    """This test's own $MOESCOPE_HOME: a copy of ``dashboard_home`` (the sample profile already recorded)."""
    home = tmp_path / "home"
    shutil.copytree(dashboard_home, home)
    return home
