"""TLS for joulegate's listeners, from PEM files that may be replaced while the process runs.

One set of files (a certificate chain, its key, and optionally a client CA: then every client must present a
certificate that CA signed — mutual TLS) serves the gateway's gRPC and HTTP listeners and the meter's report port.
Certificates are rotated by replacing the files (cert-manager rewrites a Secret's files in place): gRPC asks for the
configuration at every handshake and gets the new one once the files' stamps change; the HTTP listener's SSLContext
loads the new chain on the next check. A pair that does not load (a key from another certificate, a half-written
file) is refused and the previous one kept, so a botched rotation never takes the listener down.
"""

from __future__ import annotations

import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog

from common.errors import ConfigError

log = structlog.get_logger(__name__)

Stamp = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class TlsFiles:
    cert_path: Path
    key_path: Path
    client_ca_path: Path | None = None

    @property
    def paths(self) -> tuple[Path, ...]:
        return (self.cert_path, self.key_path) + ((self.client_ca_path,) if self.client_ca_path else ())

    def stamp(self) -> Stamp:
        """What changes when a file is replaced or rewritten (modification time and size of each)."""
        out = []
        for p in self.paths:
            st = p.stat()
            out.append((st.st_mtime_ns, st.st_size))
        return tuple(out)

    def check(self) -> None:
        """Load the pair and the CA as a TLS server would; ConfigError naming the file that is wrong."""
        for p in self.paths:
            if not p.is_file():
                raise ConfigError(f"TLS: {p} is not a readable file")
        try:
            server_context(self)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ConfigError(f"TLS: {self.cert_path} / {self.key_path}: {exc}") from None

    def read(self) -> tuple[bytes, bytes, bytes | None]:
        ca = self.client_ca_path.read_bytes() if self.client_ca_path else None
        return self.cert_path.read_bytes(), self.key_path.read_bytes(), ca


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """A TLS server context (TLS 1.2 or later) over ``files``; client certificates required when a CA is given."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(files.cert_path, files.key_path)
    if files.client_ca_path:
        ctx.load_verify_locations(cafile=files.client_ca_path)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def grpc_server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """Server credentials that pick up new files at the next handshake after they change."""
    files.check()
    lock = threading.Lock()
    state = {"stamp": files.stamp()}

    def configuration() -> grpc.ServerCertificateConfiguration:
        cert, key, ca = files.read()
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        try:
            with lock:
                stamp = files.stamp()
                if stamp == state["stamp"]:
                    return None
                files.check()
                config = configuration()
                state["stamp"] = stamp
        except (ConfigError, OSError) as exc:
            log.warning("tls_reload_refused", listener="grpc", error=str(exc))
            return None
        log.info("tls_reloaded", listener="grpc", cert=str(files.cert_path))
        return config

    return grpc.dynamic_ssl_server_credentials(
        configuration(), fetch, require_client_authentication=files.client_ca_path is not None
    )


class ReloadingContext:
    """An SSLContext for an asyncio server whose certificates are swapped, not edited, when the files change.

    The listener's context hands every new connection the newest context (``sni_callback`` runs at each handshake,
    with or without a server name), so a reload builds a fresh context off the event loop and replaces one
    reference: no handshake ever sees a context half way through loading (OpenSSL's contexts are not safe to change
    while in use). Connections already open keep theirs.
    """

    def __init__(self, files: TlsFiles) -> None:
        files.check()
        self.files = files
        self._current = server_context(files)
        self._stamp = files.stamp()
        self.context = server_context(files)
        self.context.sni_callback = self._newest

    def _newest(self, ssl_object: ssl.SSLObject, _server_name: str | None, _context: ssl.SSLContext) -> None:
        ssl_object.context = self._current

    def maybe_reload(self) -> bool:
        try:
            stamp = self.files.stamp()
            if stamp == self._stamp:
                return False
            self.files.check()
            fresh = server_context(self.files)
        except (ConfigError, OSError, ssl.SSLError) as exc:
            log.warning("tls_reload_refused", listener="http", error=str(exc))
            return False
        self._current, self._stamp = fresh, stamp
        log.info("tls_reloaded", listener="http", cert=str(self.files.cert_path))
        return True
