"""TCP servers on 127.0.0.1 that stand where ``moeplan launch --address`` points: one answering as a gRPC
(HTTP/2) server's first frame does, and ones that are not Ray: HTTP/1.1, silent, closing at once, or
answering an HTTP/2 frame that is not SETTINGS."""

from __future__ import annotations

import socketserver
import threading
import time

from moeplan.orchestrator.ray_address import EMPTY_SETTINGS, HTTP2_PREFACE

GOAWAY = bytes([0, 0, 8, 7, 0, 0, 0, 0, 0]) + bytes(8)  # a frame of another type (7) first: not a server preface
ANSWERS = {
    "grpc": EMPTY_SETTINGS,  # what Ray's GCS answers first (checked against a real one in test_launch.py)
    "http": b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n",
    "goaway": GOAWAY,
    "short": EMPTY_SETTINGS[:4],  # part of a frame, then silence
    "silent": None,
    "close": b"",
}
SILENT_S = 5.0  # how long the silent ones hold the connection: longer than any probe waits


class AddressServer:
    """Answers every connection as ``ANSWERS[kind]`` says (None: never; b"": closes at once)."""

    def __init__(self, kind: str) -> None:
        answer = ANSWERS[kind]

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                if answer == b"":
                    return
                if answer is not None:
                    if kind in ("grpc", "goaway"):  # as a gRPC server, read the client's preface first
                        self.request.settimeout(2.0)
                        self.request.recv(len(HTTP2_PREFACE))
                    self.request.sendall(answer)
                time.sleep(SILENT_S)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

            def handle_error(self, request, client_address) -> None:
                pass

        self.server = Server(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
