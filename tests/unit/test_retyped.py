"""A changed regular file that becomes something else (a whiteout, a fifo) or goes while the
checkpoint copies it again is source churn; one that is still a regular file is not."""

from __future__ import annotations

import os
from pathlib import Path

from rampiped.commands import CommandResult, source_churn_only
from rampiped.writeback.journal import retyped_left_out

TAIL = "rsync error: some files/attrs were not transferred (see previous errors) (code 23)"


def result(*names: str) -> CommandResult:
    lines = [f"could not make way for new device file: {n}" for n in names]
    return CommandResult(23, "", "\n".join([*lines, TAIL]))


def test_a_file_that_became_something_else_or_went_is_churn(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "n18")
    (tmp_path / "sub").mkdir()
    res = result("n18", "sub", "gone")
    assert not source_churn_only(res)
    assert source_churn_only(retyped_left_out(res, str(tmp_path)))


def test_a_file_still_regular_is_a_failure(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "n18")
    (tmp_path / "plain").write_text("x")
    res = result("n18", "plain")
    left = retyped_left_out(res, str(tmp_path))
    assert not source_churn_only(left)
    assert "could not make way for new device file: plain" in left.stderr
    assert "n18" not in left.stderr


def test_the_main_pass_too_a_file_made_a_directory_meanwhile_is_churn(tmp_path: Path) -> None:
    """The pass that writes a generation can meet it as well ("new regular file")."""
    (tmp_path / "n36").mkdir()
    res = CommandResult(23, "", f"could not make way for new regular file: n36\n{TAIL}")
    assert source_churn_only(retyped_left_out(res, str(tmp_path)))
