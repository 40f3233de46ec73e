"""Bearer tokens for ``geomstore serve --token-file`` and the loopback rule.

The token file is plain text, one token per line::

    # comments and blank lines are ignored
    <token> ro   [a name for logs]
    <token> rw   [a name for logs]

``ro`` tokens may read (every GET and the read-only POST queries); ``rw`` tokens may also
submit jobs. A token is at least 16 characters of ``[A-Za-z0-9._~+/=-]``; make one with
``python -c "import secrets; print(secrets.token_urlsafe(32))"``. Keep the file readable
by the server's user only.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from geomstore.errors import GeomstoreError

__all__ = ["Access", "AccessError", "Tokens", "is_loopback", "load_tokens"]

Access = Literal["ro", "rw"]
_TOKEN = re.compile(r"[A-Za-z0-9._~+/=-]{16,}")


class AccessError(GeomstoreError, ValueError):
    """A token file is malformed, or serving would expose the store without tokens."""


@dataclass(frozen=True)
class Tokens:
    """The tokens a server accepts, each with its access (``ro`` or ``rw``) and a name."""

    entries: tuple[tuple[str, Access, str], ...]

    def check(self, header: str | None) -> tuple[Access, str] | None:
        """The access and name of the token in an ``Authorization`` header (None if invalid).

        Examples
        --------
        >>> t = Tokens((("a" * 16, "ro", "nb"),))
        >>> t.check("Bearer " + "a" * 16), t.check("Bearer " + "b" * 16), t.check(None)
        (('ro', 'nb'), None, None)
        """
        if not header:
            return None
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return None
        given_b = given.strip().encode()
        found: tuple[Access, str] | None = None
        for token, access, name in self.entries:  # compare with every token: constant time
            if hmac.compare_digest(token.encode(), given_b):
                found = (access, name)
        return found


def load_tokens(path: str | Path) -> Tokens:
    """Read a token file (see the module docstring for its format)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise AccessError(
            f"cannot read the token file {p}: {exc.strerror}; check the path."
        ) from exc
    entries: list[tuple[str, Access, str]] = []
    for no, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split(None, 2)
        if len(parts) < 2 or parts[1] not in ("ro", "rw"):
            raise AccessError(
                f"token file {p}, line {no}: expected '<token> ro|rw [name]'; "
                "see `geomstore serve --help`."
            )
        if not _TOKEN.fullmatch(parts[0]):
            raise AccessError(
                f"token file {p}, line {no}: a token is at least 16 characters of letters, "
                "digits and ._~+/=-; make one with secrets.token_urlsafe(32)."
            )
        access: Access = "rw" if parts[1] == "rw" else "ro"
        entries.append((parts[0], access, parts[2] if len(parts) > 2 else f"line {no}"))
    if not entries:
        raise AccessError(f"token file {p} holds no tokens; add lines '<token> ro|rw [name]'.")
    return Tokens(tuple(entries))


def is_loopback(host: str) -> bool:
    """Whether ``host`` only listens on this machine (127.0.0.0/8, ::1, localhost).

    Examples
    --------
    >>> is_loopback("127.0.0.1"), is_loopback("localhost"), is_loopback("0.0.0.0")
    (True, True, False)
    """
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
