"""The pickler of calls: its fast path for plain calls writes the same bytes as the full one,
and a call travels as a plain ``(func, args, kwargs)`` tuple."""

from __future__ import annotations

import operator
import pickle

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
    full = _internal._internal_rpc_pickler.serialize(_internal._wire(obj, None))
    assert fast == full
    expected = tuple(obj) if isinstance(obj, tuple) else obj  # a call arrives as a tuple
    assert _internal.deserialize(*fast) == expected


def test_only_plain_calls_take_the_fast_path():
    assert _internal._plain(_internal.PythonUDF(_plain_function, (1,), {}))
    assert not _internal._plain(_internal.PythonUDF(_plain_function, ([1],), {}))
    assert not _internal._plain(_internal.PythonUDF(_plain_function, (), {"b": {}}))
    assert not _internal._plain(_internal.PythonUDF(operator.methodcaller("x"), (), {}))


def _tensors(torch):
    base = torch.arange(24, dtype=torch.float32)
    return [
        torch.ones(4),
        base.reshape(2, 3, 4),
        torch.zeros(0, 3),  # no bytes
        torch.tensor(7, dtype=torch.int64),  # no dimensions
        torch.tensor([True, False]),
        torch.arange(6, dtype=torch.bfloat16),
        torch.arange(5, dtype=torch.uint8)[1:],  # an offset into its storage
        torch.randn(3, 2, dtype=torch.complex64),
        base.reshape(4, 6).t(),  # not contiguous: the general path
        torch.randn(3, dtype=torch.complex64).conj(),  # a conjugate view: the general path
        torch.randn(3, requires_grad=True),  # requires grad: the general path
        torch.nn.Parameter(torch.ones(2)),
    ]


@pytest.mark.parametrize("index", range(12))
def test_tensors_travel_out_of_band_and_come_back_equal(index):
    torch = pytest.importorskip("torch")
    tensor = _tensors(torch)[index]
    data, buffers = _internal.serialize(_internal.PythonUDF(_plain_function, (tensor,), {}))
    assert len(buffers) == 1  # the tensor's bytes are not in the pickle
    func, (back,), _ = _internal.deserialize(data, buffers)
    assert func is _plain_function
    assert type(back) is type(tensor)
    assert back.dtype == tensor.dtype and back.shape == tensor.shape
    assert back.requires_grad == tensor.requires_grad
    assert torch.equal(back.detach(), tensor.detach().resolve_conj())
    address, length, _ = buffers[0]
    if length:  # rebuilt over the received buffer (here the sender's own memory)
        assert back.data_ptr() == address


def test_a_plain_tensor_lends_its_own_memory():
    torch = pytest.importorskip("torch")
    tensor = torch.arange(10, dtype=torch.int32)[2:]
    _, [(address, length, owner)] = _internal.serialize(tensor)
    assert (address, length) == (tensor.data_ptr(), 32)
    assert owner is tensor  # keeps the memory alive while Rust holds it


@pytest.mark.parametrize("index", range(12))
def test_a_tensor_alone_travels_as_the_pickler_sends_it_and_comes_back_equal(index):
    torch = pytest.importorskip("torch")
    tensor = _tensors(torch)[index]
    first = _internal.serialize(tensor)
    again = _internal.serialize(tensor)  # a plain tensor's pickle remembered: no pickler
    assert again[0] == first[0] == _internal._internal_rpc_pickler.serialize(tensor)[0]
    assert [b[1] for b in again[1]] == [b[1] for b in first[1]]
    plain = _internal._plain_code(tensor, _internal._torch) is not None
    if plain:  # lent from its own memory
        assert again[1][0][:2] == (tensor.data_ptr(), tensor.nbytes)
    for _ in range(2):  # the second time a plain tensor's pickle is known to the receiver
        back = _internal.deserialize(*again)
        assert type(back) is type(tensor) and back.requires_grad == tensor.requires_grad
        assert back.dtype == tensor.dtype and back.shape == tensor.shape
        assert torch.equal(back.detach(), tensor.detach().resolve_conj())
    assert (again[0] in _internal._shaped_messages) == plain


def test_only_pickles_checked_as_a_plain_tensor_alone_skip_the_unpickler():
    torch = pytest.importorskip("torch")
    # One buffer and a tensor back, but not a plain tensor's own pickle: never remembered.
    for obj in (torch.ones(2, requires_grad=True), torch.ones(4)[::2], [torch.ones(2)]):
        data, buffers = _internal.serialize(obj)
        assert len(buffers) == 1
        _internal.deserialize(data, buffers)
        assert data not in _internal._shaped_messages


def _on_tensors(*tensors):
    return "first"


def test_a_call_on_tensors_alone_travels_as_the_pickler_sends_it(monkeypatch):
    torch = pytest.importorskip("torch")
    x, y = torch.ones(2, 3), torch.arange(4, dtype=torch.int64)
    udf = _internal.PythonUDF(_on_tensors, (x, y), {})
    first, again = _internal.serialize(udf), _internal.serialize(udf)
    assert again[0] == first[0] == _internal._internal_rpc_pickler.serialize(tuple(udf))[0]
    assert [b[:2] for b in again[1]] == [(x.data_ptr(), 24), (y.data_ptr(), 32)]
    for _ in range(2):  # the second time known to the receiver
        func, (x2, y2), kwargs = _internal.deserialize(*again)
        assert func is _on_tensors and kwargs == {}
        assert torch.equal(x2, x) and torch.equal(y2, y) and y2.dtype == torch.int64
    assert again[0] in _internal._shaped_messages
    # The function is looked up by its name each time, as unpickling it does.
    monkeypatch.setattr(__import__(__name__), "_on_tensors", lambda *t: "second")
    func, _, _ = _internal.deserialize(*again)
    assert func() == "second"


def test_a_result_shaped_like_a_call_comes_back_as_it_was():
    torch = pytest.importorskip("torch")
    value = (_on_tensors, (torch.ones(2),), 0)  # not a call: its third element is no dict
    data, buffers = _internal.serialize(value)
    for _ in range(3):
        assert _internal.deserialize(data, buffers)[2] == 0
    assert data not in _internal._shaped_messages


def test_a_call_on_tensors_of_a_function_no_longer_found_by_its_name_fails(monkeypatch):
    torch = pytest.importorskip("torch")
    udf = _internal.PythonUDF(_on_tensors, (torch.ones(3),), {})
    _internal.serialize(udf)  # remembered
    monkeypatch.setattr(__import__(__name__), "_on_tensors", lambda *t: None)
    with pytest.raises(pickle.PicklingError):
        _internal.serialize(udf)


def test_calls_that_are_not_on_plain_tensors_alone_take_the_pickler():
    torch = pytest.importorskip("torch")
    x = torch.ones(2)
    for udf in (
        _internal.PythonUDF(_on_tensors, (x, x), {}),  # one tensor twice
        _internal.PythonUDF(_on_tensors, (x, 1), {}),
        _internal.PythonUDF(_on_tensors, (x,), {"y": x}),
        _internal.PythonUDF(_on_tensors, (torch.ones(2, requires_grad=True),), {}),
        _internal.PythonUDF(operator.add, (x, torch.ones(2)), {}),  # not a Python function
    ):
        data, buffers = _internal.serialize(udf)
        func, args, kwargs = _internal.deserialize(data, buffers)
        assert (
            func is udf.func and len(args) == len(udf.args) and kwargs.keys() == udf.kwargs.keys()
        )
        assert data not in _internal._shaped_messages


def test_a_plain_call_received_twice_is_rebuilt_without_unpickling(monkeypatch):
    for args, kwargs in [((1, "a"), {"b": 2.5}), ((1.0, "a"), {"b": 2.5}), ((True, "a"), {})]:
        data, buffers = _internal.serialize(_internal.PythonUDF(_plain_function, args, kwargs))
        assert buffers == []
        got = [_internal.deserialize(data) for _ in range(3)]
        assert data in _internal._plain_messages  # checked the second time, used the third
        for func, back, back_kwargs in got:
            assert func is _plain_function and back == args and back_kwargs == kwargs
            assert [type(a) for a in back] == [type(a) for a in args]  # 1, 1.0, True apart
        got[2][2]["mutated"] = True  # each call gets its own keyword dict
        assert _internal.deserialize(data)[2] == kwargs
    # The function is looked up by its name each time, as unpickling it does.
    monkeypatch.setattr(__import__(__name__), "_plain_function", lambda *a, **k: "second")
    assert _internal.deserialize(data)[0]() == "second"


def test_a_plain_call_made_again_is_sent_as_pickle_sends_it(monkeypatch):
    calls = [((1,), {}), ((True,), {}), ((1.0,), {}), ((-0.0,), {}), (("a", b"b", None), {})]
    calls.append(((2,), {"k": 1}))
    for args, kwargs in calls:
        udf = _internal.PythonUDF(_plain_function, args, kwargs)
        for _ in range(2):  # the second time from what the first remembered, if it did
            data, _ = _internal.serialize(udf)
            assert data == pickle.dumps(tuple(udf), protocol=5)
    # A function no longer found by its name fails as pickling it does, remembered or not.
    udf = _internal.PythonUDF(_plain_function, (), {})
    _internal.serialize(udf)
    monkeypatch.setattr(__import__(__name__), "_plain_function", lambda: None)
    with pytest.raises(pickle.PicklingError):
        _internal.serialize(udf)


def test_plain_calls_whose_arguments_change_are_never_checked():
    datas = [
        _internal.serialize(_internal.PythonUDF(_plain_function, (i,), {}))[0] for i in range(50)
    ]
    for data in datas:
        _internal.deserialize(data)
    assert not any(data in _internal._plain_messages for data in datas)


def test_a_call_given_its_arguments_as_a_list_is_sent_as_one():
    data, buffers = _internal.serialize(_internal.PythonUDF(_plain_function, [1, 2], {}))
    assert _internal.deserialize(data, buffers) == (_plain_function, [1, 2], {})
    assert _internal.remembered_call(_plain_function, [1, 2]) is None


def test_a_call_made_again_is_remembered_only_where_serialize_would_send_those_bytes(
    monkeypatch,
):
    from distrpc import _autograd
    from distrpc.rpc import api

    args = (7, "remembered")
    assert _internal.remembered_call(_plain_function, args) is None  # not made yet
    data, _ = _internal.serialize(_internal.PythonUDF(_plain_function, args, {}))
    assert _internal.remembered_call(_plain_function, args) is None  # made once
    data, _ = _internal.serialize(_internal.PythonUDF(_plain_function, args, {}))
    assert _internal.remembered_call(_plain_function, args) == (data, [])
    assert _internal.remembered_call(_plain_function, (7.0, "remembered")) is None  # 7 == 7.0
    assert _internal.remembered_call(_plain_function, ([7],)) is None  # cannot be hashed
    assert _internal.remembered_call(operator.add, (1, 2)) is None  # not a Python function
    ctx = _autograd.new_context()
    try:
        with _autograd.running(ctx):  # a call in a context carries its id, before the call
            sent = _internal.serialize(_internal.PythonUDF(_plain_function, args, {}), 3)
            assert _internal.remembered_call(_plain_function, args, 3) == sent
        assert sent[0].startswith(_internal._IN_CONTEXT) and sent[0].endswith(data)
        assert _internal.deserialize(*sent, 3) == (_plain_function, args, {}, ctx.id)
        assert ctx.workers() == {3}
    finally:
        _autograd.release(ctx.id)
    pickler = _internal._InternalRPCPickler()
    pickler._register_reducer(_Point, lambda p: (_Point, (p.x, p.y)))
    with api._use_rpc_pickler(pickler):
        assert _internal.remembered_call(_plain_function, args) is None
    monkeypatch.setattr(__import__(__name__), "_plain_function", lambda *a: None)
    assert _internal.remembered_call(_plain_function, args) is None  # no longer its name


def test_small_results_received_twice_are_known_by_their_bytes():
    for value in (None, 3, True, 3.0, -0.0, "text", b"bytes"):
        data, buffers = _internal.serialize(value)
        assert data == pickle.dumps(value, protocol=5) and buffers == []
        got = [_internal.reply_value(data, buffers, 1) for _ in range(3)]
        assert data in _internal._plain_messages
        assert all(type(g) is type(value) and repr(g) == repr(value) for g in got)
    big = b"x" * (_internal._ATOM_PICKLE_LIMIT + 1)
    data, buffers = _internal.serialize(big)
    assert [_internal.reply_value(data, buffers, 1) for _ in range(3)] == [big] * 3
    assert data not in _internal._plain_messages


def _raises():
    raise KeyError("from the remembered call")


def _run_async():
    return None


_run_async._wrapped_async_rpc_function = _run_async  # as @async_execution marks it


def test_a_plain_call_received_before_runs_as_run_udf_runs_it(monkeypatch):
    data, _ = _internal.serialize(_internal.PythonUDF(_raises, (), {}))
    assert _internal.run_remembered(data, [], "worker") is None  # never received
    _internal.deserialize(data)
    _internal.deserialize(data)  # the second time: checked and remembered
    failure, ctx = _internal.run_remembered(data, [], "worker")
    assert ctx is None
    assert failure.exception_type is KeyError
    assert failure.msg.startswith("On worker:\nKeyError('from the remembered call')")
    data, _ = _internal.serialize(_internal.PythonUDF(_plain_function, (5,), {"b": 6}))
    for _ in range(2):
        _internal.deserialize(data)
    assert _internal.run_remembered(data, [], "worker") == (5, None)
    monkeypatch.setattr(__import__(__name__), "_plain_function", lambda a, b: a + b)
    assert _internal.run_remembered(data, [], "worker") == (11, None)  # found by its name again
    # An @async_execution function answers later, from its future: run_udf runs it.
    data, _ = _internal.serialize(_internal.PythonUDF(_run_async, (), {}))
    for _ in range(2):
        _internal.deserialize(data)
    assert data in _internal._plain_messages
    assert _internal.run_remembered(data, [], "worker") is None


def test_calls_on_tensors_and_tensors_alone_made_again_are_sent_as_the_pickler_sends_them():
    torch = pytest.importorskip("torch")
    x, y = torch.arange(6.0).view(2, 3), torch.ones(4, dtype=torch.int64)
    made = _internal.serialize(_internal.PythonUDF(_on_tensors, (x, y), {}))
    again = _internal.remembered_call(_on_tensors, (x + 1, y))
    assert again is not None and again[0] == made[0] and len(again[1]) == 2
    assert _internal.remembered_call(_on_tensors, (x, x)) is None  # one tensor twice
    assert _internal.remembered_call(_on_tensors, (y, x)) is None  # other shapes
    assert _internal.remembered_call(_on_tensors, (x.t(), y)) is None  # not contiguous
    assert _internal.remembered_call(_on_tensors, (x.requires_grad_(), y)) is None
    # A tensor alone, the second time from what the first remembered.
    z = torch.full((3, 2), 7, dtype=torch.int32)
    first, second = _internal.serialize(z), _internal.serialize(z.clone())
    assert first[0] == second[0] == _internal._internal_rpc_pickler.serialize(z)[0]
    for _ in range(2):
        back = _internal.reply_value(*second, 1)
        assert torch.equal(back, z) and back.dtype == z.dtype
    assert second[0] in _internal._shaped_messages


def _context_here():
    from distrpc import _autograd

    return _autograd.current().id


def test_a_call_made_again_in_a_context_runs_in_it_as_run_udf_runs_it():
    from distrpc import _autograd

    ctx = _autograd.new_context()
    try:
        with _autograd.running(ctx):
            data, _ = _internal.serialize(_internal.PythonUDF(_context_here, (), {}), 3)
        for _ in range(2):  # the call as made outside a context is checked and remembered
            assert _internal.deserialize(data, [], 3) == (_context_here, (), {}, ctx.id)
        assert _internal.run_remembered(data, [], "worker") is None  # in a context: from a peer
        assert _internal.run_remembered(data, [], "worker", 3) == (ctx.id, ctx)
    finally:
        _autograd.release(ctx.id)


def test_a_call_on_tensors_received_before_runs_over_the_received_buffers():
    torch = pytest.importorskip("torch")
    x = torch.arange(4, dtype=torch.float64)
    data, buffers = _internal.serialize(_internal.PythonUDF(_plain_function, (x,), {}))
    assert _internal.run_remembered(data, list(buffers), "worker") is None  # never received
    _internal.deserialize(data, buffers)  # checked: remembered
    received = list(buffers)
    back, _ = _internal.run_remembered(data, received, "worker")
    assert torch.equal(back, x) and back.data_ptr() == x.data_ptr()  # over the buffer itself
    assert received == []  # the tensors keep the buffers from here
    assert _internal.run_remembered(data, [], "worker") is None  # another count of buffers


def test_the_pickler_is_left_as_new_after_a_failure():
    torch = pytest.importorskip("torch")
    with pytest.raises(Exception, match="pickle"):
        _internal.serialize(_internal.PythonUDF(_plain_function, (torch.ones(1), lambda: 0), {}))
    data, buffers = _internal.serialize(torch.ones(3))
    assert len(buffers) == 1
    assert torch.equal(_internal.deserialize(data, buffers), torch.ones(3))


class _Point:
    def __init__(self, x, y):
        self.x, self.y = x, y


def _rebuild_point(x, y):
    point = _Point(x, y)
    point.rebuilt = True
    return point


def test_registered_reducers_pickle_the_programs_classes():
    from distrpc.rpc import api

    pickler = _internal._InternalRPCPickler()
    pickler._register_reducer(_Point, lambda p: (_rebuild_point, (p.x, p.y)))
    pickler._register_reducer(_Point, lambda p: (_Point, (0, 0)))  # the first one stays
    with api._use_rpc_pickler(pickler):
        assert _internal._default_pickler is pickler
        data, buffers = _internal.serialize(
            _internal.PythonUDF(_plain_function, (_Point(1, 2),), {})
        )
        _, (point,), _ = _internal.deserialize(data, buffers)
    assert _internal._default_pickler is _internal._internal_rpc_pickler
    assert (point.x, point.y, point.rebuilt) == (1, 2, True)
    # The default pickler does not use them.
    data, buffers = _internal.serialize(_Point(3, 4))
    assert not hasattr(_internal.deserialize(data, buffers), "rebuilt")
