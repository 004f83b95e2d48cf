"""What ``test_fuzz.py`` feeds the commands: hostile values for every option, mutated JSON documents
(configs, plans, load records, calibrations, placements) and bad paths, as hypothesis strategies.

Values are drawn so that an accepted input stays small (tiny models, one or two nodes, short
sequences): a run that does work finishes in about a second, and a value beyond a bound is far beyond
it (2**40 and up), so each example takes well under the fuzz test's time limit.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from moeplan.simulator.spec.inputs import PlanInputs

# Text that is not a usable number, or is one only in Python's eyes.
GARBAGE = (
    "nan", "NaN", "-nan", "inf", "-inf", "Infinity", "1e309", "-1e309", "1e99999", "1e-30", "0", "-0", "-1", "1.5",
    "1.2.3", ".", "", " ", "abc", "0x10", "1_000", "١٢", "²", "9" * 400, "true", "null", "[1]", "{}",
    "-9223372036854775809", "18446744073709551616", "99999999999999999999999", "1e18", "\x00", "[/b]", "\n",
    "\x1b[2J",
)
HUGE_INTS = st.one_of(st.integers(2**40, 2**80), st.integers(-(2**80), -1))
garbage = st.one_of(st.sampled_from(GARBAGE), st.text(max_size=12))


@contextlib.contextmanager
def gc_paused():
    """Python's cyclic garbage collector off while a command is timed: a full collection of the test process's heap
    (what the worker's earlier tests left) is not the command's work. Refusals timed at 0.03 s alone took 2.6 and
    3.3 s in clean-clone CI runs late in the suite (2026-12-07), against a 2 s limit."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def mostly(valid: st.SearchStrategy[Any], *bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``valid`` about four times in five, else one of ``bad`` (so that most examples get past the
    first option and reach the code behind it)."""
    return st.integers(0, 9).flatmap(lambda i: valid if i < 8 else bad[i % len(bad)])


def int_text(lo: int, hi: int) -> st.SearchStrategy[str]:
    """An integer option's text: mostly ``lo..hi``, else huge, negative or not an integer at all."""
    return mostly(st.integers(lo, hi).map(str), HUGE_INTS.map(str), garbage)


def float_text(lo: float, hi: float) -> st.SearchStrategy[str]:
    """A float option's text: mostly ``lo..hi``, else NaN, infinities, extremes or garbage."""
    return mostly(st.floats(lo, hi).map(repr), st.floats(allow_nan=True, allow_infinity=True).map(repr), garbage)


def choice(*values: str) -> st.SearchStrategy[str]:
    return mostly(st.sampled_from(values), garbage)


COUNTS = ("14.8T", "1T", "1e12", "5M", "469B", "2.788M", "1.2.3", ".", "1e400", "0", "1e-30", "-1", "1e999", "12 K")
count_text = mostly(st.sampled_from(COUNTS[:6]), st.sampled_from(COUNTS[6:]), garbage)

# JSON values a mutation puts in place of a field.
DEEP = json.loads("[" * 40 + "]" * 40)
JSON_VALUES = (None, True, False, 0, -1, 1, 2, 3, 7, 2**31, 2**63 - 1, -(2**63), 1e308, -1e308, 0.5, 1e-300, -0.0, "",
               "x", "[/b]", "yarn", "1f1b", [], {}, [1, 2], {"a": 1}, DEEP, "\x00", "é" * 50, "\x1b]0;t\x07\x1b[2J")
# Each draw a fresh copy: an edit that adds a key into a drawn {} must not change JSON_VALUES for later examples
# (hypothesis then sees different data from the same choices: FlakyStrategyDefinition, seen in the long profile)
json_value = st.one_of(st.sampled_from(JSON_VALUES).map(copy.deepcopy), st.integers(),
                       st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8))
# Text that replaces a value in the document's text: not strict JSON, or not JSON at all.
RAW_VALUES = ("NaN", "Infinity", "-Infinity", "1e999", "1" * 30, "[" * 5000, "tru", "'x'", "0x1F", "\"\\ud800\"")


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value in ``doc`` (dict keys and list indices), the root excluded."""
    out = []
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in items:
        out.append((*prefix, key))
        out += _paths(value, (*prefix, key))
    return out


def _get(doc: Any, path: tuple) -> Any:
    for key in path:
        doc = doc[key]
    return doc


def _set(doc: Any, path: tuple, value: Any) -> None:
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


def _delete(doc: Any, path: tuple) -> None:
    node = doc
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]


def _resign(doc: Any) -> None:
    """Give an edited plan the hash of its (still valid) inputs, as a careful forger would."""
    with contextlib.suppress(Exception):  # inputs no longer valid: the hash check or validation refuses them
        doc["inputs_sha256"] = PlanInputs.model_validate(doc["inputs"]).sha256()


@st.composite
def mutated_document(draw: st.DrawFn, doc: Any, plan: bool = False) -> bytes:
    """``doc`` as file bytes after one to three edits: a value replaced, a key deleted or added, a list cut
    short, the text spliced with non-JSON, truncated, re-encoded, or replaced by binary noise."""
    doc = json.loads(json.dumps(doc))
    kind = draw(st.sampled_from(["value", "value", "value", "delete", "add", "shrink", "raw", "truncate", "encoding",
                                 "binary", "as-is", "as-is", "as-is"]))
    if kind == "shrink":  # a list cut to one of its items, or emptied: tables and layers that lack what is needed
        lists = [p for p in _paths(doc) if isinstance(_get(doc, p), list) and len(_get(doc, p)) > 1]
        if lists:
            path = lists[draw(st.integers(0, len(lists) - 1))]
            items = _get(doc, path)
            _set(doc, path, draw(st.sampled_from([[], items[:1], items[-1:], items[::2]])))
    if kind in ("value", "delete", "add"):
        for _ in range(draw(st.integers(1, 3))):
            paths = _paths(doc)
            if plan:  # mostly outside the schedule's thousands of actions
                outside = [p for p in paths if p[0] != "schedule"]
                paths = outside if draw(st.integers(0, 4)) else paths
            if not paths:
                break
            path = paths[draw(st.integers(0, len(paths) - 1))]
            if kind == "value":
                _set(doc, path, draw(json_value))
            elif kind == "delete":
                _delete(doc, path)
            else:
                parent = doc
                for key in path[:-1]:
                    parent = parent[key]
                if isinstance(parent, dict):
                    parent[draw(st.sampled_from(["extra", "[/x]", "name", "rope_scaling", "dp"]))] = draw(json_value)
        if plan and draw(st.booleans()):
            _resign(doc)
    text = json.dumps(doc, indent=1)
    if kind == "raw":
        at = draw(st.integers(0, len(text)))
        cut = text.find(",", at)
        text = text[:at] + draw(st.sampled_from(RAW_VALUES)) + (text[cut:] if cut >= 0 else "")
    if kind == "truncate":
        text = text[: draw(st.integers(0, len(text)))]
    if kind == "encoding":
        return text.encode(draw(st.sampled_from(["utf-16", "latin-1", "utf-8-sig", "utf-32"])), errors="replace") + (
            "é".encode("latin-1"))
    if kind == "binary":
        return draw(st.binary(max_size=64))
    return text.encode()


def write_input(folder: Path, name: str, data: bytes) -> str:
    path = folder / name
    path.write_bytes(data)
    return str(path)


@st.composite
def out_path(draw: st.DrawFn, folder: Path, suffix: str = "") -> str:
    """Where a command is told to write: a fresh path mostly, else a file in the way, a path under a file,
    a name too long, a device, a place that cannot be made, the current folder, or an empty path."""
    (folder / "taken").write_text("mine\n")
    # 2,000 folders deep: pathlib's recursive mkdir ran out of stack; /sys: refused only after the work (2026-12-06)
    return draw(mostly(st.sampled_from([f"{folder}/out{suffix}", f"out{suffix}"]), st.sampled_from([
        f"{folder}/out{suffix}", f"{folder}/out{suffix}", f"{folder}/new/deeper/out{suffix}", f"{folder}/taken",
        f"{folder}/taken/under{suffix}", f"{folder}/{'x' * 300}{suffix}", "/dev/null", "/proc/moeplan-fuzz/out",
        f"{folder}/out\x00{suffix}", f"{folder}", f"out{suffix}", f"{folder}/{'d/' * 2000}out{suffix}",
        f"/sys/kernel/moeplan-fuzz{suffix}", "",
    ])))


def flags(draw: st.DrawFn, options: dict[str, Any], most: int) -> list[str]:
    """Up to ``most`` of ``options``, each ``--name value`` (a strategy's value, or a function's that writes
    a file and returns its path; None: a bare flag)."""
    names = draw(st.lists(st.sampled_from(sorted(options)), max_size=most, unique=True))
    args: list[str] = []
    for name in names:
        option = options[name]
        value = draw(option) if isinstance(option, st.SearchStrategy) else option()
        args += [name] if value is None else [name, value]
    return args
