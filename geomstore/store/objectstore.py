"""Object storage for a store's data files: S3 settings -> a DuckDB secret.

A store's data path may be an ``s3://bucket/prefix/`` URL (AWS S3, MinIO, Ceph, GCS
through its S3 endpoint, any S3-compatible server). Credentials and the endpoint come the
standard way, never from geomstore's own files:

- keys: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` (and ``AWS_SESSION_TOKEN``), else
  the profile ``AWS_PROFILE`` (default ``default``) of ``~/.aws/credentials``
  (``AWS_SHARED_CREDENTIALS_FILE``); no keys at all means anonymous access;
- region: ``AWS_REGION``, ``AWS_DEFAULT_REGION``, the profile's ``region`` in
  ``~/.aws/config`` (``AWS_CONFIG_FILE``), else ``us-east-1``;
- endpoint (MinIO-style servers): ``GEOMSTORE_S3_ENDPOINT``, ``AWS_ENDPOINT_URL_S3``,
  ``AWS_ENDPOINT_URL`` or the profile's ``endpoint_url``; ``http://`` turns TLS off, and a
  custom endpoint uses path-style URLs (``GEOMSTORE_S3_URL_STYLE=vhost`` to change).

They become a temporary DuckDB secret on each connection (in memory, never persisted):
the keys are not written into the store's catalog, its data files, logs or error messages.
"""

from __future__ import annotations

import configparser
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import duckdb

from geomstore.errors import DataPathError

__all__ = ["S3Settings", "configure", "is_url", "normalize_data_path"]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
# the secret's name on every connection (CREATE OR REPLACE keeps one per connection)
SECRET_NAME = "geomstore_s3"


def is_url(path: str | os.PathLike[str]) -> bool:
    """Whether a data path is a URL (``s3://...``) rather than a local directory.

    >>> is_url("s3://bucket/prefix/"), is_url("/data/store")
    (True, False)
    """
    return bool(_SCHEME.match(str(path)))


def normalize_data_path(path: str | os.PathLike[str]) -> str:
    """A data path as DuckLake records it: an absolute directory or an S3 URL, with a ``/``.

    Raises :class:`DataPathError` for schemes other than ``s3://``, a missing or invalid
    bucket name, or credentials written into the URL.

    >>> normalize_data_path("s3://my-bucket/runs/a")
    's3://my-bucket/runs/a/'
    >>> normalize_data_path("gs://b/p")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    geomstore.errors.DataPathError: data path gs://b/p: only s3:// URLs ...
    """
    text = str(path)
    m = _SCHEME.match(text)
    if m is None:
        return str(Path(text).expanduser().resolve()).rstrip("/") + "/"
    scheme = m.group(1).lower()
    if scheme not in ("s3", "s3a", "s3n"):
        raise DataPathError(
            f"data path {text}: only s3:// URLs are supported (S3, MinIO, or GCS through "
            "its S3 endpoint with GEOMSTORE_S3_ENDPOINT=https://storage.googleapis.com); "
            "or give a local directory."
        )
    rest = text[m.end() :]
    bucket = rest.split("/", 1)[0]
    if "@" in bucket or ":" in bucket:
        raise DataPathError(
            "the data path holds credentials or a port; give s3://bucket/prefix/ and put "
            "keys in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, the endpoint in "
            "GEOMSTORE_S3_ENDPOINT."
        )
    if not _BUCKET.match(bucket):
        raise DataPathError(
            f"data path {text}: {bucket!r} is not a valid bucket name (3-63 lower-case "
            "letters, digits, dots or dashes); give s3://bucket/prefix/."
        )
    if "'" in rest or "\\" in rest:
        raise DataPathError(f"data path {text}: quotes and backslashes are not allowed.")
    return f"s3://{rest.rstrip('/')}/"


@dataclass(frozen=True)
class S3Settings:
    """Where and as whom to reach S3; the keys never appear in ``repr``.

    Examples
    --------
    >>> s = S3Settings.from_env({"AWS_ACCESS_KEY_ID": "AKIA1", "AWS_SECRET_ACCESS_KEY": "sEcReT",
    ...                          "GEOMSTORE_S3_ENDPOINT": "http://127.0.0.1:9000"})
    >>> s.endpoint, s.use_ssl, s.url_style, s.region
    ('127.0.0.1:9000', False, 'path', 'us-east-1')
    >>> "sEcReT" in repr(s) or "AKIA1" in repr(s)
    False
    """

    key_id: str | None = field(default=None, repr=False)
    secret: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    region: str = "us-east-1"
    endpoint: str | None = None
    use_ssl: bool = True
    url_style: Literal["path", "vhost"] = "vhost"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> S3Settings:
        """Read the settings from AWS environment variables, then the AWS profile files."""
        env = os.environ if env is None else env
        profile_name = env.get("AWS_PROFILE") or env.get("AWS_DEFAULT_PROFILE") or "default"
        creds = _ini(
            env.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"), profile_name, False
        )
        conf = _ini(env.get("AWS_CONFIG_FILE", "~/.aws/config"), profile_name, True)
        key_id = env.get("AWS_ACCESS_KEY_ID")
        if key_id:
            secret = env.get("AWS_SECRET_ACCESS_KEY")
            token = env.get("AWS_SESSION_TOKEN")
        else:
            key_id = creds.get("aws_access_key_id") or conf.get("aws_access_key_id")
            secret = creds.get("aws_secret_access_key") or conf.get("aws_secret_access_key")
            token = creds.get("aws_session_token") or conf.get("aws_session_token")
        if key_id and not secret:
            raise DataPathError(
                "an S3 access key id is set but no secret key: set AWS_SECRET_ACCESS_KEY "
                "(or aws_secret_access_key in the AWS profile)."
            )
        region = (
            env.get("AWS_REGION")
            or env.get("AWS_DEFAULT_REGION")
            or conf.get("region")
            or "us-east-1"
        )
        raw = (
            env.get("GEOMSTORE_S3_ENDPOINT")
            or env.get("AWS_ENDPOINT_URL_S3")
            or env.get("AWS_ENDPOINT_URL")
            or conf.get("endpoint_url")
        )
        endpoint, use_ssl = _endpoint(raw) if raw else (None, True)
        style = env.get("GEOMSTORE_S3_URL_STYLE") or ("path" if endpoint else "vhost")
        if style not in ("path", "vhost"):
            raise DataPathError(
                f"GEOMSTORE_S3_URL_STYLE={style!r} is not one of 'path', 'vhost'; unset it or "
                "pick one."
            )
        return cls(
            key_id=key_id or None,
            secret=secret or None,
            session_token=token or None,
            region=region,
            endpoint=endpoint,
            use_ssl=use_ssl,
            url_style="path" if style == "path" else "vhost",
        )

    def secret_sql(self, scope: str) -> str:
        """The ``CREATE SECRET`` statement (holds the keys: never log or show it)."""
        opts = [
            "TYPE s3",
            f"REGION {_quote(self.region)}",
            f"USE_SSL {'true' if self.use_ssl else 'false'}",
            f"URL_STYLE '{self.url_style}'",
            f"SCOPE {_quote(scope)}",
        ]
        if self.key_id:
            opts += [f"KEY_ID {_quote(self.key_id)}", f"SECRET {_quote(self.secret or '')}"]
        if self.session_token:
            opts.append(f"SESSION_TOKEN {_quote(self.session_token)}")
        if self.endpoint:
            opts.append(f"ENDPOINT {_quote(self.endpoint)}")
        return f"CREATE OR REPLACE TEMPORARY SECRET {SECRET_NAME} ({', '.join(opts)})"


def _ini(path: str, profile: str, config: bool) -> dict[str, str]:
    """One profile's keys from an AWS ini file ({} when the file or profile is absent)."""
    p = Path(path).expanduser()
    if not p.is_file():
        return {}
    parser = configparser.RawConfigParser()
    try:
        parser.read(p)
    except configparser.Error as exc:  # the file's text may hold keys: name only the file
        raise DataPathError(
            f"cannot parse the AWS file {p} ({type(exc).__name__}); fix it or unset AWS_PROFILE."
        ) from None
    section = profile if not config or profile == "default" else f"profile {profile}"
    return dict(parser.items(section)) if parser.has_section(section) else {}


def _endpoint(raw: str) -> tuple[str, bool]:
    """``http://host:port/`` -> ('host:port', False); a bare host keeps TLS on."""
    m = re.match(r"^(https?)://([^/@\s']+)/?$", raw.strip())
    if m:
        return m.group(2), m.group(1) == "https"
    if re.match(r"^[^/@\s':]+(:\d+)?$", raw.strip()):
        return raw.strip(), True
    raise DataPathError(
        f"the S3 endpoint {raw!r} is not a URL like http://127.0.0.1:9000 or "
        "https://s3.example.com; fix GEOMSTORE_S3_ENDPOINT / AWS_ENDPOINT_URL."
    )


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def configure(
    con: duckdb.DuckDBPyConnection, data_path: str, settings: S3Settings | None = None
) -> None:
    """Load httpfs and give ``con`` a temporary S3 secret scoped to the data path's bucket.

    Settings default to :meth:`S3Settings.from_env`. A failure never shows the statement
    (it holds the keys).
    """
    from geomstore.store.connection import load_optional

    url = normalize_data_path(data_path)
    load_optional(con, "httpfs")
    # httpfs copies AWS_* variables into settings that any SQL could read back
    # (current_setting, duckdb_settings): blank them, the secret below is what is used
    for name in ("s3_access_key_id", "s3_secret_access_key", "s3_session_token"):
        con.execute(f"SET GLOBAL {name} = ''")  # GLOBAL: every cursor, not this session
    s = settings if settings is not None else S3Settings.from_env()
    bucket = url.split("/", 3)[2]
    try:
        con.execute(s.secret_sql(f"s3://{bucket}"))
    except duckdb.Error as exc:
        raise DataPathError(
            f"cannot create the S3 secret for {url} ({type(exc).__name__}); check the AWS "
            "settings (region, endpoint) in the environment."
        ) from None
