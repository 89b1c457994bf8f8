"""Reading the bearer token from a file, for both command lines."""

from __future__ import annotations

import os


def read_token_file(path: str) -> str:
    """The token stored in `path` (`~` expanded, whitespace stripped).

    Raises ValueError, naming the file but never quoting its content, when it
    cannot be read or holds nothing: an empty token would silently mean "no auth".
    """
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as exc:
        raise ValueError(f"cannot read token file {path!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ValueError(f"token file {path!r} is not UTF-8 text") from None
    if not token:
        raise ValueError(f"token file {path!r} is empty")
    return token
