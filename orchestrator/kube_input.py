"""What ``moeplan submit`` and ``status`` take from outside before the Kubernetes client sees it: the
kubeconfig file (bounded, UTF-8, YAML without aliases, the shape the client indexes), the API server's
address, object names, the API server's answers (bounded, strict JSON, a JSON object), and the integers of
manifests read from a folder (``manifests --validate`` and ``submit``: within int64). Each
problem is one ``InputError`` line naming the file, field or request and the value.

The official client trusts its kubeconfig: a list where a mapping belongs, a 100,000-deep document or a
YAML alias bomb gives a ``TypeError``, a ``RecursionError`` after seconds, or unbounded memory. And it
trusts the server: a body that is not JSON, or an ``Infinity`` in it, reaches our code as a string or
a float. Both are checked here first.
"""

from __future__ import annotations

import os
import re
import stat
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from moeplan.orchestrator.errors import InputError
from moeplan.simulator.spec.json_input import JsonInputError, parse_json

MAX_KUBECONFIG_BYTES = 4 * 2**20  # kubeconfigs with embedded certificates are kilobytes
MAX_ANSWER_BYTES = 64 * 2**20  # a pod list of a 2,048-GPU job is a few megabytes
READ_CHUNK_BYTES = 2**16
# RFC 1123: a RayJob's or JobSet's name is a DNS subdomain, a namespace a DNS label.
NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
NAMESPACE_RE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
SECTIONS = {"clusters": "cluster", "contexts": "context", "users": "user"}


def check_name(value: str, option: str, pattern: re.Pattern[str] = NAME_RE) -> str:
    """``value`` if it is a Kubernetes object name (or namespace, with ``NAMESPACE_RE``)."""
    if not pattern.fullmatch(value):
        limit = 63 if pattern is NAMESPACE_RE else 253
        raise InputError(f"{option} {value!r:.80}: not a Kubernetes name (lower-case letters, digits and '-', "
                         f"at most {limit} characters)")
    return value


def default_kubeconfig_paths() -> list[Path]:
    """Where the client looks without ``--kubeconfig``: every file in ``$KUBECONFIG``, else ~/.kube/config."""
    env = os.environ.get("KUBECONFIG")
    return [Path(p).expanduser() for p in env.split(os.pathsep) if p] if env else [Path("~/.kube/config").expanduser()]


def check_kubeconfig(path: Path, option: str) -> None:
    """``path`` is a kubeconfig the client can read without crashing or running away; a missing file is
    left to the client (it reports it), anything else unusable is one ``InputError``."""
    where = f"{option} {path}"
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{where}: not a regular file")
        if st.st_size > MAX_KUBECONFIG_BYTES:
            raise InputError(f"{where}: {st.st_size} bytes; a kubeconfig is at most {MAX_KUBECONFIG_BYTES}")
        text = path.read_bytes().decode("utf-8-sig")
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as exc:
        raise InputError(f"{where}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{where}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})") from None
    _check_shape(_load_yaml(text, where), where)


def _load_yaml(text: str, where: str) -> Any:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        # an alias repeats a node without copying it: a few lines can stand for 10**9 nodes
        if any(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text, Loader=loader)):
            raise InputError(f"{where}: holds a YAML alias (*name); a kubeconfig needs none")
        return yaml.load(text, Loader=loader)
    except yaml.YAMLError as exc:
        raise InputError(f"{where}: not YAML ({' '.join(str(exc).split())[:200]})") from None
    except RecursionError:
        raise InputError(f"{where}: nested too deeply to be a kubeconfig") from None


def _check_shape(doc: Any, where: str) -> None:
    """The fields the client indexes have the types it assumes."""
    if doc is None:
        return  # empty: the client says so
    if not isinstance(doc, dict):
        raise InputError(f"{where}: a kubeconfig is a mapping, not a {type(doc).__name__}")
    if not isinstance(doc.get("current-context", ""), str | None):
        raise InputError(f"{where}: current-context={doc['current-context']!r:.60} must be a name")
    for section, key in SECTIONS.items():
        entries = doc.get(section)
        if entries is None:
            continue
        if not isinstance(entries, list):
            raise InputError(f"{where}: {section} must be a list, not {type(entries).__name__}")
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                raise InputError(f"{where}: {section}[{i}]={entry!r:.60} must be a mapping with a name")
            if not isinstance(entry.get(key) or {}, dict):
                raise InputError(f"{where}: {section}[{i}].{key}={entry[key]!r:.60} must be a mapping")


def check_server(host: str, where: str) -> str:
    """``host`` (the context's cluster ``server``) if it is an http(s) URL with a host name."""
    try:
        url = urlsplit(host)
        ok = url.scheme in ("http", "https") and bool(url.hostname) and (url.port is None or url.port > 0)
    except ValueError:
        ok = False
    if not ok:
        raise InputError(f"{where}: cluster server={host!r:.100} is not an https:// (or http://) URL with a host")
    return host


def read_answer(response: Any, what: str, deadline: float) -> dict[str, Any]:
    """The JSON object a 2xx ``response`` (urllib3, body not read yet) holds: at most ``MAX_ANSWER_BYTES``,
    read before ``deadline`` (``time.monotonic``), strict JSON; ``InputError`` naming ``what`` otherwise."""
    chunks, size = [], 0
    try:
        while chunk := response.read(READ_CHUNK_BYTES):
            size += len(chunk)
            if size > MAX_ANSWER_BYTES:
                raise InputError(f"{what}: the API server's answer exceeds {MAX_ANSWER_BYTES} bytes")
            if time.monotonic() > deadline:
                raise InputError(f"{what}: the API server's answer did not arrive within the request timeout")
            chunks.append(chunk)
    finally:
        response.close()  # a connection left half-read is never reused
    try:
        answer = parse_json(b"".join(chunks), f"{what}: the API server's answer")
    except JsonInputError as exc:
        raise InputError(str(exc)) from None
    if not isinstance(answer, dict):
        raise InputError(f"{what}: the API server answered a {type(answer).__name__}, not an object")
    return answer


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # Kubernetes' integers (Go's int64); CEL's int overflows past them


def _check_integers(source: Path, doc: Any) -> None:
    """One line for the first integer of ``doc`` outside int64 (the API server refuses it; the CEL layer raised)."""
    stack: list[tuple[str, Any]] = [("", doc)]
    while stack:  # no recursion: a document may nest thousands deep
        where, value = stack.pop()
        if isinstance(value, dict):
            stack += [(f"{where}.{k}" if where else str(k), v) for k, v in reversed(value.items())]
        elif isinstance(value, list):
            stack += [(f"{where}[{i}]", v) for i, v in reversed(list(enumerate(value)))]
        elif isinstance(value, int) and not INT64_MIN <= value <= INT64_MAX:
            shown = str(value) if value.bit_length() <= 256 else f"an integer of {value.bit_length()} bits"
            raise InputError(f"{source}: {where[:200] or 'the document'}={shown}: outside Kubernetes' 64-bit "
                             f"integers ({INT64_MIN}..{INT64_MAX})")


def check_manifest_integers(folder: Path, docs: list[tuple[str, Any]]) -> None:
    """``manifests --validate`` and ``submit``: every integer of the documents read from ``folder`` fits int64."""
    for source, doc in docs:
        _check_integers(folder / source, doc)
