"""Who may use the control channels that can leave the host: CURVE keys from one shared secret.

Every socket of a channel that can cross hosts (the monitor, the command
channel, the peer channel) is made by one `ChannelSecurity`, built once per
process from its settings and handed to every channel: `listen` binds a
server socket, `dial` connects a client.

* With a secret (the controller's `--secret-file`, the workers'
  `control_secret_file`), ZeroMQ's CURVE authenticates and encrypts every
  connection. The server and client key pairs are derived from the secret;
  a ZAP handler on the context of each server socket refuses any client
  whose long-term key is not the derived one, i.e. anyone without the secret.
* Without one, nothing is encrypted and `listen` refuses any address but
  loopback (or a node-local `ipc://` path) unless `insecure` is set, in
  which case it warns at every bind.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import stat
import threading
import weakref
from pathlib import Path

import zmq
from zmq.utils import z85

from lmc_connector.config import CacheConfig, ConfigError
from lmc_connector.control.wire.sockets import new_socket
from lmc_connector.throttle import Throttle

logger = logging.getLogger(__name__)

#: Shortest secret accepted (bytes, surrounding whitespace stripped).
MIN_SECRET_BYTES = 16
#: Where libzmq asks a context's ZAP handler (RFC 27).
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"lmc"
#: Milliseconds between two looks at the stop flag of a ZAP handler.
ZAP_POLL_MS = 200
#: Seconds between two warnings about refused connections.
REFUSED_LOG_EVERY_S = 10.0
#: How to make a secret, for error messages.
MAKE_SECRET = "e.g. `openssl rand -hex 32 > lmc.secret; chmod 600 lmc.secret`"
FIX_INSECURE = (
    "give both sides one shared secret (lmc-controller --secret-file PATH, workers' "
    "control_secret_file: PATH), or accept an unauthenticated channel on a trusted network "
    "explicitly (lmc-controller --insecure, workers' control_insecure: true)"
)


class SecretError(ValueError):
    """The secret file cannot be used; the message names the file and the fix."""


class InsecureBindError(ValueError):
    """A socket would listen beyond loopback without a secret; the message says how to fix it."""


def read_secret(path: str | Path) -> bytes:
    """The secret in `path` (whitespace around it stripped); SecretError when unusable."""
    path = Path(path)
    try:
        data = path.read_bytes().strip()
        mode = path.stat().st_mode
    except OSError as e:
        raise SecretError(f"cannot read the secret file {path}: {e.strerror}") from e
    if len(data) < MIN_SECRET_BYTES:
        raise SecretError(
            f"the secret file {path} holds {len(data)} bytes; at least {MIN_SECRET_BYTES} "
            f"are needed ({MAKE_SECRET})"
        )
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning(
            "the secret file %s can be read by other users (mode %o): chmod 600 it",
            path,
            stat.S_IMODE(mode),
        )
    return data


def _keypair(secret: bytes, role: bytes) -> tuple[bytes, bytes]:
    """(public, secret) Z85 CURVE keys for `role`, derived from the shared secret."""
    seed = hashlib.blake2b(secret, digest_size=32, person=b"lmc-curve-" + role).digest()
    secret_key = z85.encode(seed)
    return zmq.curve_public(secret_key), secret_key


def is_local(url: str) -> bool:
    """Whether a bind address is reachable from this host only."""
    scheme, _, rest = url.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    host = rest.rsplit(":", 1)[0].strip("[]")
    if host in ("*", ""):
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class _ZapHandler:
    """Answers the ZAP requests of one context's server sockets, on its own thread.

    Owns a REP socket bound to the context's ZAP endpoint. Only CURVE clients
    whose long-term public key is `client_key` pass. The thread ends when the
    context terminates (its socket then fails with ETERM).
    """

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], security: ChannelSecurity) -> None:
        self.security = security
        self._context = weakref.ref(context)
        self._sock = new_socket(context, zmq.REP)
        self._sock.bind(ZAP_ENDPOINT)
        self._thread = threading.Thread(target=self._run, name="lmc-zap", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sock = self._sock
        try:
            while True:
                if sock.poll(ZAP_POLL_MS):
                    sock.send_multipart(self.security.answer_zap(sock.recv_multipart()))
        except zmq.ZMQError:
            pass  # the context terminated (ETERM) or was destroyed: nothing left to guard
        finally:
            sock.close(linger=0)
            context = self._context()
            with _zap_lock:
                if context is not None and _zap_handlers.get(context) is self:
                    del _zap_handlers[context]


_zap_lock = threading.Lock()
_zap_handlers: weakref.WeakKeyDictionary[zmq.Context[zmq.Socket[bytes]], _ZapHandler] = (
    weakref.WeakKeyDictionary()
)


class ChannelSecurity:
    """How the sockets of the channels that can leave the host are secured (immutable).

    Built once per process (controller settings, worker config) and passed to
    every channel; `refused` counts connections its ZAP handlers refused.
    Any thread may use it.
    """

    def __init__(
        self, secret: bytes | None = None, *, insecure: bool = False, source: str = ""
    ) -> None:
        self.insecure = insecure
        self.source = source
        self._refused = 0
        self._refused_log = Throttle(REFUSED_LOG_EVERY_S)
        self._lock = threading.Lock()
        self.fingerprint = ""
        if secret is not None:
            self._server_public, self._server_secret = _keypair(secret, b"server")
            self._client_public, self._client_secret = _keypair(secret, b"client")
            self._client_raw = z85.decode(self._client_public)
            digest = hashlib.blake2b(secret, digest_size=4, person=b"lmc-secret-id")
            self.fingerprint = digest.hexdigest()

    @classmethod
    def from_file(cls, path: str | Path | None, *, insecure: bool = False) -> ChannelSecurity:
        """Security from a secret file, or none when `path` is None (SecretError if unusable)."""
        if path is None:
            return cls(insecure=insecure)
        return cls(read_secret(path), insecure=insecure, source=str(path))

    @property
    def enabled(self) -> bool:
        return bool(self.fingerprint)

    @property
    def refused(self) -> int:
        """Connections refused so far for not holding the secret."""
        return self._refused

    def describe(self) -> str:
        """One phrase for start-up logs (the fingerprint lets operators compare secrets)."""
        if self.enabled:
            return f"CURVE with secret {self.fingerprint} from {self.source}"
        if self.insecure:
            return "NO authentication (insecure)"
        return "no secret: loopback only"

    def check_bind(self, url: str) -> None:
        """Raise InsecureBindError if listening on `url` would expose a plaintext channel."""
        if self.enabled or is_local(url):
            return
        if not self.insecure:
            raise InsecureBindError(
                f"refusing to listen on {url} without a secret: anyone who reaches that port "
                f"could drive the cache. To fix it, {FIX_INSECURE}"
            )
        logger.warning(
            "listening on %s WITHOUT authentication or encryption (insecure): anyone who "
            "reaches this port can register workers, forge reports and run commands",
            url,
        )

    def listen(
        self,
        context: zmq.Context[zmq.Socket[bytes]],
        kind: int,
        url: str,
        rcvhwm: int | None = None,
    ) -> zmq.Socket[bytes]:
        """A server socket of `kind` bound to `url` (InsecureBindError, or zmq.ZMQError)."""
        self.check_bind(url)
        sock = new_socket(context, kind)
        try:
            if rcvhwm is not None:
                sock.setsockopt(zmq.RCVHWM, rcvhwm)
            if self.enabled:
                self._guard(context)
                sock.curve_server = True
                sock.curve_secretkey = self._server_secret
                sock.curve_publickey = self._server_public
                sock.zap_domain = ZAP_DOMAIN
                sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
            sock.bind(url)
        except zmq.ZMQError:
            sock.close(linger=0)  # an open socket would make Context.term() wait forever
            raise
        return sock

    def client_socket(
        self, context: zmq.Context[zmq.Socket[bytes]], kind: int
    ) -> zmq.Socket[bytes]:
        """A client socket of `kind`, not connected yet (for a caller that must set something
        up first, e.g. a socket monitor); `dial` otherwise."""
        sock = new_socket(context, kind)
        if self.enabled:
            sock.curve_secretkey = self._client_secret
            sock.curve_publickey = self._client_public
            sock.curve_serverkey = self._server_public
        return sock

    def dial(
        self, context: zmq.Context[zmq.Socket[bytes]], kind: int, url: str
    ) -> zmq.Socket[bytes]:
        """A client socket of `kind` connecting to `url` (zmq.ZMQError if it cannot)."""
        sock = self.client_socket(context, kind)
        try:
            sock.connect(url)
        except zmq.ZMQError:
            sock.close(linger=0)
            raise
        return sock

    def answer_zap(self, request: list[bytes]) -> list[bytes]:
        """The ZAP reply to one request (RFC 27 frames); called on a ZAP handler's thread."""
        version, request_id = [*request, b"", b""][:2]
        mechanism = request[5] if len(request) > 5 else b""
        credentials = request[6] if len(request) > 6 else b""
        if version == b"1.0" and mechanism == b"CURVE" and credentials == self._client_raw:
            return [version, request_id, b"200", b"OK", b"lmc", b""]
        address = request[3].decode(errors="replace") if len(request) > 3 else "?"
        with self._lock:
            self._refused += 1
            refused = self._refused
        if self._refused_log.ready():
            logger.warning(
                "refused a connection from %s: it does not hold the control secret %s "
                "(%d refused so far)",
                address,
                self.fingerprint,
                refused,
            )
        return [b"1.0", request_id, b"400", b"not holding the control secret", b"", b""]

    def _guard(self, context: zmq.Context[zmq.Socket[bytes]]) -> None:
        """Start the ZAP handler of `context` unless it runs (before any server socket binds)."""
        with _zap_lock:
            handler = _zap_handlers.get(context)
            if handler is None:
                _zap_handlers[context] = _ZapHandler(context, self)
            elif handler.security._client_raw != self._client_raw:
                raise ValueError("one ZMQ context serves channels of two different secrets")


def worker_security(config: CacheConfig) -> ChannelSecurity:
    """The security of a vLLM process's channels that can leave the host (command, monitor,
    peer), from `control_secret_file` and `control_insecure`; ConfigError if unusable.

    Build it once per process and pass it to every channel.
    """
    try:
        return ChannelSecurity.from_file(
            config.control_secret_file, insecure=config.control_insecure
        )
    except SecretError as e:
        raise ConfigError(f"control_secret_file: {e}") from e
