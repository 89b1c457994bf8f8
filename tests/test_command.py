"""command.serve, the loop both command lines run in their main thread: it ends on a
readiness answer whatever that answer is, and never waits for good on a helper."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from gforward import command
from tests.support import bug

RESCUE = 10.0  # seconds before a stuck serve() is ended with SIGTERM (then it returns 0)


class _Service:
    """What serve() needs of a service: a close(), which takes a moment to drain."""

    def __init__(self) -> None:
        self.closed = False
        self.draining = threading.Event()
        self.drained = False

    def close(self, drain: float = 0.0) -> None:
        if drain > 0:
            self.draining.set()
            time.sleep(0.2)
            self.drained = True
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


def serve(ready: Callable[[_Service], str | None], drain: float = 0.0,
          service: _Service | None = None) -> tuple[int, _Service]:
    service = service or _Service()
    status = command.serve(lambda: service, lambda _: None, drain=drain,  # type: ignore
                           ready=ready)
    return status, service


@pytest.mark.usefixtures("rescue")
def test_a_readiness_problem_ends_it_with_1(capsys: pytest.CaptureFixture[str]) -> None:
    status, service = serve(lambda _: "not ready: the guest said no")
    assert (status, service.closed) == (1, True)
    assert capsys.readouterr().err == "not ready: the guest said no\n"


@pytest.mark.usefixtures("rescue")
def test_a_readiness_check_that_fails_ends_it_with_1(capsys: pytest.CaptureFixture[str]) -> None:
    status, service = serve(bug("a bug"))
    assert (status, service.closed) == (1, True)
    err = capsys.readouterr().err
    assert "Traceback" in err
    assert err.endswith("RuntimeError: a bug\n"
                        "cannot tell whether it is ready: RuntimeError('a bug')\n")


@pytest.mark.usefixtures("rescue")
def test_a_signal_drains_even_while_readiness_is_checked(
        capsys: pytest.CaptureFixture[str]) -> None:
    """SIGTERM with --drain and --wait-ready: the draining close makes the check say "not
    ready"; that is no reason to cut the drain or to exit 1."""
    service = _Service()
    main = threading.get_ident()

    def ready(_: _Service) -> str | None:
        signal.pthread_kill(main, signal.SIGTERM)
        service.draining.wait(RESCUE)
        return "not ready within 30 s"

    status, _ = serve(ready, drain=5.0, service=service)
    assert (status, service.drained) == (0, True)
    assert "not ready" not in capsys.readouterr().err
