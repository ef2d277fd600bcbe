"""The pickler of calls: its fast path for plain calls writes the same bytes as the full one,
and a call travels as a plain ``(func, args, kwargs)`` tuple."""

from __future__ import annotations

import operator

import pytest
from distrpc import _internal


def _plain_function(a, b=None):
    return a


@pytest.mark.parametrize(
    "obj",
    [
        None,
        3,
        "text",
        _internal.PythonUDF(_plain_function, (1, "a", None, 2.5, b"x", True), {"b": 2}),
        _internal.PythonUDF(operator.add, (1, 2), {}),
        _internal.PythonUDF(len, ([1, 2],), {}),  # a list: the full pickler
    ],
)
def test_the_fast_path_writes_what_the_full_pickler_writes(obj):
    fast = _internal.serialize(obj)
    full = _internal._internal_rpc_pickler.serialize(_internal._wire(obj))
    assert fast == full
    expected = tuple(obj) if isinstance(obj, tuple) else obj  # a call arrives as a tuple
    assert _internal.deserialize(*fast) == expected


def test_only_plain_calls_take_the_fast_path():
    assert _internal._plain(_internal.PythonUDF(_plain_function, (1,), {}))
    assert not _internal._plain(_internal.PythonUDF(_plain_function, ([1],), {}))
    assert not _internal._plain(_internal.PythonUDF(_plain_function, (), {"b": {}}))
    assert not _internal._plain(_internal.PythonUDF(operator.methodcaller("x"), (), {}))
