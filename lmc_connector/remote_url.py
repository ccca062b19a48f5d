"""`remote_url`: where the shared store is, parsed and checked at start-up (no torch, no redis).

    redis://[[user]:password@]host[:port][/db]          one Redis server (valkey:// too)
    rediss://...                                          the same over TLS (valkeys:// too)
    redis-cluster://[[user]:password@]host:port[,host:port...]   Redis Cluster (any nodes)
    rediss-cluster://...                                  Redis Cluster over TLS

TLS options ride as query parameters: `ssl_ca_certs=PATH`, `ssl_certfile=PATH`,
`ssl_keyfile=PATH`, `ssl_cert_reqs=required|optional|none`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote

DEFAULT_PORT = 6379
#: scheme -> (cluster, tls)
SCHEMES: dict[str, tuple[bool, bool]] = {
    "redis": (False, False),
    "valkey": (False, False),
    "rediss": (False, True),
    "valkeys": (False, True),
    "redis-cluster": (True, False),
    "rediss-cluster": (True, True),
}
TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")
CERT_REQS = ("required", "optional", "none")
EXAMPLES = "redis://localhost:6379, rediss://:password@host:6380/0, redis-cluster://h1:7000,h2:7001"


class RemoteUrlError(ValueError):
    """`remote_url` cannot be used; the message shows the accepted forms."""


@dataclass(frozen=True, slots=True)
class StoreAddress:
    """A parsed `remote_url`: which servers, how to authenticate, whether over TLS."""

    nodes: tuple[tuple[str, int], ...]
    cluster: bool = False
    tls: bool = False
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls_options: tuple[tuple[str, str], ...] = ()

    def redacted(self) -> str:
        """The address for logs and errors: never the password."""
        scheme = ("rediss" if self.tls else "redis") + ("-cluster" if self.cluster else "")
        auth = "***@" if self.password is not None else ""
        hosts = ",".join(f"{host}:{port}" for host, port in self.nodes)
        db = f"/{self.db}" if self.db else ""
        return f"{scheme}://{auth}{hosts}{db}"


def _fail(url: str, why: str) -> RemoteUrlError:
    """The error for `url`, which never shows its credentials: with any, the quoted pieces of
    `why` are hidden too (a password's unencoded '?' or '/' moves its tail elsewhere)."""
    if "@" in url:
        shown = url.split("@")[-1]
        why = re.sub(r"'[^']*'", "'...'", why) + (
            "; in a password, write ? / # @ as %3F %2F %23 %40"
        )
    else:
        shown = url
    return RemoteUrlError(f"remote_url '...{shown}': {why} (accepted forms: {EXAMPLES})")


def _node(url: str, text: str) -> tuple[str, int]:
    host, colon, port_text = text.rpartition(":") if "]" not in text[-1:] else ("", "", "")
    if not colon:
        host, port_text = text, str(DEFAULT_PORT)
    host = host.strip("[]")
    if not host:
        raise _fail(url, f"'{text}' names no host")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise _fail(url, f"'{port_text}' is not a TCP port (1..65535)")
    return host, int(port_text)


def _credentials(auth: str) -> tuple[str | None, str | None]:
    if not auth:
        return None, None
    user, colon, password = auth.partition(":")
    if not colon:  # redis://password@host is how some clients write a bare password
        return None, unquote(user)
    return (unquote(user) or None), unquote(password)


def _tls_options(url: str, query: str, tls: bool) -> tuple[tuple[str, str], ...]:
    options = parse_qsl(query, keep_blank_values=True, strict_parsing=False)
    for name, value in options:
        if name not in TLS_OPTIONS:
            raise _fail(url, f"unknown option '{name}'; known: {', '.join(TLS_OPTIONS)}")
        if not tls:
            raise _fail(url, f"'{name}' is a TLS option: use rediss:// (or rediss-cluster://)")
        if name == "ssl_cert_reqs" and value not in CERT_REQS:
            raise _fail(url, f"ssl_cert_reqs={value!r}; use one of {', '.join(CERT_REQS)}")
    return tuple(options)


def parse_remote_url(url: str) -> StoreAddress:
    """Parse `remote_url`; RemoteUrlError says what is wrong and shows the accepted forms."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in SCHEMES:
        raise _fail(url, f"unknown scheme '{scheme}'; use one of {', '.join(SCHEMES)}")
    cluster, tls = SCHEMES[scheme.lower()]
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    auth, _, hosts = netloc.rpartition("@")
    username, password = _credentials(auth)
    if not hosts:
        raise _fail(url, "no host")
    nodes = tuple(_node(url, h) for h in hosts.split(","))
    if len(nodes) > 1 and not cluster:
        raise _fail(url, "several hosts need redis-cluster:// (or rediss-cluster://)")
    db_text = path.strip("/")
    if db_text and (not db_text.isdigit() or cluster):
        why = "Redis Cluster has only database 0" if cluster else f"'{db_text}' is not a db number"
        raise _fail(url, why)
    return StoreAddress(
        nodes=nodes,
        cluster=cluster,
        tls=tls,
        db=int(db_text or 0),
        username=username,
        password=password,
        tls_options=_tls_options(url, query, tls),
    )
