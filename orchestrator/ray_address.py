"""``moeplan launch --address``: is a Ray cluster there? Asked in at most ``timeout_s`` before Ray is.

Ray itself waits minutes where nothing answers, and about 20 s, a warning a second, where something
answers that is not Ray (a web server, a proxy). Ray's GCS and its client server (``ray://``) are gRPC
servers, which speak HTTP/2 without TLS: a client opens with HTTP/2's connection preface and the server's
first frame is then a SETTINGS frame (RFC 9113, section 3.4). So: connect, send the preface and an empty
SETTINGS frame, and read nine bytes, the header of the server's first frame. Anything else (HTTP/1.1's
``HTTP/1.1 400``, silence, a closed connection) is one line. With ``RAY_USE_TLS`` on, the handshake is
TLS's and only the TCP connection is tried.
"""

from __future__ import annotations

import os
import socket
import time

from moeplan.orchestrator.errors import InputError

ADDRESS_TIMEOUT_S = 1.5  # connection and first frame together: a refusal within 2 s of the command's start
MAX_ADDRESS_TIMEOUT_S = 60.0
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # RFC 9113, section 3.4
EMPTY_SETTINGS = bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # length 0, type SETTINGS (4), no flags, stream 0
FRAME_HEADER_BYTES = 9
SETTINGS_TYPE = 4


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``ray://HOST:PORT`` (an IPv6 host in brackets) -> (host, port); ``InputError`` else."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise InputError(f"--address {address!r:.200} must be auto, HOST:PORT or ray://HOST:PORT")
    return host.strip("[]"), int(port)


def _first_frame(sock: socket.socket, deadline: float) -> bytes:
    """The header of the server's first frame (fewer bytes if it closed or ``deadline`` passed)."""
    head = b""
    while len(head) < FRAME_HEADER_BYTES:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock.settimeout(left)
        try:
            chunk = sock.recv(FRAME_HEADER_BYTES - len(head))
        except TimeoutError:
            break
        if not chunk:
            break
        head += chunk
    return head


def _tls() -> bool:
    return os.environ.get("RAY_USE_TLS", "0").strip().lower() in ("1", "true")


def check_address(address: str | None, timeout_s: float = ADDRESS_TIMEOUT_S) -> None:
    """``InputError`` unless a gRPC (HTTP/2) server answers at ``address`` within ``timeout_s``. None (a
    local cluster) and ``auto`` (Ray resolves it) pass unasked."""
    if address is None or address == "auto":
        return
    host, port = split_address(address)
    if not 0 < timeout_s <= MAX_ADDRESS_TIMEOUT_S:  # NaN fails this too
        raise InputError(f"--address-timeout-s {timeout_s}: must be above 0 and at most {MAX_ADDRESS_TIMEOUT_S:g}")
    where = f"--address {address!r:.200}"
    deadline = time.monotonic() + timeout_s
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            if _tls():
                return
            sock.settimeout(max(1e-3, deadline - time.monotonic()))
            sock.sendall(HTTP2_PREFACE + EMPTY_SETTINGS)
            head = _first_frame(sock, deadline)
    except (OSError, UnicodeError, ValueError) as exc:
        why = getattr(exc, "strerror", None) or type(exc).__name__
        raise InputError(f"{where}: nothing answers at {host[:100]}:{port} ({why}; waited at most {timeout_s:g} s)"
                         ) from None
    if len(head) < FRAME_HEADER_BYTES:
        said = f"it sent {head!r:.60} and then nothing" if head else "it answered nothing"
        raise InputError(f"{where}: not a Ray cluster (Ray's GCS speaks gRPC; {said} within {timeout_s:g} s)")
    if head[3] != SETTINGS_TYPE or int.from_bytes(head[5:9], "big") & 0x7FFFFFFF:
        raise InputError(f"{where}: not a Ray cluster (Ray's GCS speaks gRPC, HTTP/2; it answered {head!r:.60})")
