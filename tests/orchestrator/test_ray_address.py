"""``moeplan launch --address`` is asked before Ray is (issue 23, left from the last session: an address that
answers but is not Ray cost ~20 s of Ray's retries): a gRPC server's first frame passes; HTTP/1.1, silence, a
closed connection, a frame that is not SETTINGS or a closed port are one line, exit 2, within 2 s, nothing written.
A real Ray GCS passing the probe is tested in ``test_launch.py`` (it has a cluster running)."""

from __future__ import annotations

import time

import pytest
from typer.testing import CliRunner

from moeplan.orchestrator.cli import app
from moeplan.orchestrator.errors import InputError
from moeplan.orchestrator.ray_address import ADDRESS_TIMEOUT_S, check_address
from tests.orchestrator.address_servers import AddressServer


@pytest.fixture(scope="module")
def servers():
    made = {kind: AddressServer(kind) for kind in ("grpc", "http", "goaway", "short", "silent", "close")}
    yield made
    for server in made.values():
        server.close()


def test_a_grpc_server_passes(servers):
    check_address(servers["grpc"].address)
    check_address("ray://" + servers["grpc"].address)
    check_address(None)
    check_address("auto")


@pytest.mark.parametrize(("kind", "expected"), [
    ("http", "not a Ray cluster (Ray's GCS speaks gRPC, HTTP/2; it answered b'HTTP/1.1 ')"),
    ("goaway", "not a Ray cluster (Ray's GCS speaks gRPC, HTTP/2; it answered b'\\x00\\x00\\x08\\x07"),
    ("short", "it sent b'\\x00\\x00\\x00\\x04' and then nothing within 1.5 s"),
    ("silent", "it answered nothing within 1.5 s"),
    ("close", "it answered nothing within 1.5 s"),
])
def test_what_is_not_ray_is_one_line_within_two_seconds(servers, tmp_path, kind, expected):
    start = time.perf_counter()
    result = CliRunner().invoke(app, ["launch", str(tmp_path / "plan.json"), "--address", servers[kind].address])
    seconds = time.perf_counter() - start
    assert result.exit_code == 2 and result.stdout == "", result.output
    (line,) = result.stderr.splitlines()
    assert line == f"moeplan: error: --address '{servers[kind].address}': " + line.split("': ", 1)[1], line
    assert expected in line, line
    assert seconds < 2.0, f"{seconds:.2f} s"
    assert not list(tmp_path.iterdir())


def test_a_closed_port_and_bad_timeouts(tmp_path):
    start = time.perf_counter()
    with pytest.raises(InputError, match=r"nothing answers at 127\.0\.0\.1:1 \(Connection refused; waited at most 1\.5"):
        check_address("127.0.0.1:1")
    assert time.perf_counter() - start < ADDRESS_TIMEOUT_S
    for value in ("0", "-1", "61", "nan", "inf"):
        result = CliRunner().invoke(app, ["launch", str(tmp_path / "p"), "--address", "127.0.0.1:1",
                                          "--address-timeout-s", value])
        assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1, result.output
        assert "--address-timeout-s" in result.stderr, result.stderr


def test_the_timeout_is_the_users(servers):
    start = time.perf_counter()
    with pytest.raises(InputError, match="answered nothing within 0.2 s"):
        check_address(servers["silent"].address, timeout_s=0.2)
    assert time.perf_counter() - start < 1.0
