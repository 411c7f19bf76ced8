"""Which monitor failures mean "fanotify is refused here" (the daemon runs on without adaptive
pinning) and which are about one path (logged, the rest goes on); the stand-in monitor."""

from __future__ import annotations

import errno

import pytest

from rampiped.monitor import Batch, DisabledMonitor, MonitorError, fanotify_refused

INIT = "cannot start the fanotify monitor: fanotify_init: {}"
MARK = "cannot watch /srv: fanotify_mark: {}"


@pytest.mark.parametrize("err", [errno.EPERM, errno.EACCES, errno.ENOSYS, errno.EINVAL])
def test_init_refusals(err: int) -> None:
    assert fanotify_refused(MonitorError(INIT.format("x"), err))


@pytest.mark.parametrize("err", [errno.EPERM, errno.EACCES, errno.ENOSYS])
def test_mark_refusals(err: int) -> None:
    assert fanotify_refused(MonitorError(MARK.format("x"), err))
    handles = "cannot start the fanotify monitor: open_by_handle_at: x"
    assert fanotify_refused(MonitorError(handles, err))


@pytest.mark.parametrize(
    "exc",
    [
        MonitorError(INIT.format("Too many open files"), errno.EMFILE),
        MonitorError(MARK.format("Invalid argument"), errno.EINVAL),  # can be one path's
        MonitorError(MARK.format("Operation not supported"), errno.EOPNOTSUPP),  # overlayfs
        MonitorError(MARK.format("No space left on device"), errno.ENOSPC),
        MonitorError("cannot watch /srv: No such file or directory", errno.EPERM),
        MonitorError(INIT.format("x")),
        PermissionError(errno.EPERM, "fanotify_init: Operation not permitted"),
    ],
)
def test_not_refusals(exc: BaseException) -> None:
    assert not fanotify_refused(exc)


def test_message_stays_the_text() -> None:
    exc = MonitorError(INIT.format("Operation not permitted"), errno.EPERM)
    assert str(exc) == INIT.format("Operation not permitted")
    assert exc.errno == errno.EPERM


def test_disabled_monitor() -> None:
    m = DisabledMonitor("fanotify_init: Operation not permitted")
    assert not m.available
    m.start()
    m.ignore_pid(1)
    m.unignore_pid(1)
    assert m.drain() == Batch()
    assert set(m.stats().values()) == {0}
    assert m.watched() == []
    with pytest.raises(MonitorError, match="cannot watch /srv: fanotify_init: Operation not"):
        m.add_filesystem("/srv")
    m.stop()
