"""command.serve, the loop both command lines run in their main thread: it ends on a
readiness answer whatever that answer is, and never waits for good on a helper."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator

import pytest

from gforward import command

RESCUE = 10.0  # seconds before a stuck serve() is ended with SIGTERM (then it returns 0)


class _Service:
    """What serve() needs of a service: a close()."""

    def __init__(self) -> None:
        self.closed = False

    def close(self, drain: float = 0.0) -> None:
        self.closed = True


@pytest.fixture
def rescue() -> Iterator[None]:
    """Sends SIGTERM to this (the main) thread if serve() is still running after RESCUE s,
    so that a serve() that would never return fails the test instead of hanging it."""
    done = threading.Event()
    main = threading.get_ident()

    def watch() -> None:
        if not done.wait(RESCUE):
            signal.pthread_kill(main, signal.SIGTERM)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    yield
    done.set()
    watcher.join()


def serve(ready: Callable[[_Service], str | None]) -> tuple[int, _Service]:
    service = _Service()
    status = command.serve(lambda: service, lambda _: None, ready=ready)  # type: ignore[arg-type]
    return status, service


@pytest.mark.usefixtures("rescue")
def test_a_readiness_problem_ends_it_with_1(capsys: pytest.CaptureFixture[str]) -> None:
    status, service = serve(lambda _: "not ready: the guest said no")
    assert (status, service.closed) == (1, True)
    assert capsys.readouterr().err == "not ready: the guest said no\n"


@pytest.mark.usefixtures("rescue")
def test_a_readiness_check_that_fails_ends_it_with_1(capsys: pytest.CaptureFixture[str]) -> None:
    def broken(_: _Service) -> str | None:
        raise RuntimeError("a bug")

    status, service = serve(broken)
    assert (status, service.closed) == (1, True)
    err = capsys.readouterr().err
    assert "Traceback" in err
    assert err.endswith("RuntimeError: a bug\n"
                        "cannot tell whether it is ready: RuntimeError('a bug')\n")
