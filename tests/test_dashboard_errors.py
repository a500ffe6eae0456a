"""The dashboard shows the CLI's one sentence for an error, as plain text, naming the user's file."""

from __future__ import annotations

import errno

from core.errors import MoEScopeError
from dashboard import state


def shown(monkeypatch, exc, uploads=None) -> str:
    seen: list[str] = []
    monkeypatch.setattr(state.st, "error", seen.append)
    state.show_error("Could not load the profile", exc, uploads=uploads)
    assert len(seen) == 1
    return seen[0]


def test_markdown_in_a_message_is_shown_as_written(monkeypatch):
    text = shown(monkeypatch, MoEScopeError("ProfileMeta.__init__() got *bad* <input> [x](y) `z`"))
    for raw in ("__init__", "*bad*", "<input>", "[x](y)", "`z`"):
        assert raw not in text  # each is escaped, so Markdown cannot turn it into bold, a link or HTML
    assert text.replace("\\", "") == "Could not load the profile: ProfileMeta.__init__() got *bad* <input> [x](y) `z`"


def test_a_temporary_upload_path_is_replaced_by_the_users_file_name(monkeypatch):
    temporary = "/srv/home/dashboard/uploads/.profile.moescope-1-abcd1234@host.tmp/mine.json"
    text = shown(monkeypatch, MoEScopeError(f"{temporary} is not a MoEScope profile sidecar."),
                 uploads={temporary: "the uploaded mine.json"})
    assert "moescope-1-abcd1234" not in text and "the uploaded mine" in text.replace("\\", "")


def test_every_error_family_gets_the_clis_sentence(monkeypatch):
    text = shown(monkeypatch, OSError(errno.ENOSPC, "No space left on device", "/data/out"))
    assert "No space left on the device" in text.replace("\\", "")
    text = shown(monkeypatch, UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"))
    assert "not UTF-8" in text.replace("\\", "")
    assert "unexpected KeyError" in shown(monkeypatch, KeyError("x")).replace("\\", "")


def test_a_cli_flag_becomes_the_pages_control(monkeypatch):
    seen: list[str] = []
    monkeypatch.setattr(state.st, "error", seen.append)
    exc = MoEScopeError("/tmp/out already exists; choose another directory or pass --overwrite.")
    state.show_error("Export failed", exc, controls={"--overwrite": "Replace an earlier export at this path"})
    text = seen[0].replace("\\", "")
    assert "--overwrite" not in text
    assert 'tick "Replace an earlier export at this path"' in text
    exc = MoEScopeError("/x is the source model; --overwrite never replaces it, so choose a new directory.")
    text = state.error_text("Export failed", exc, controls={"--overwrite": "Replace"})
    assert '"Replace" never replaces it' in text
