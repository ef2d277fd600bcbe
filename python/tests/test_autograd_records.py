"""distrpc._autograd's bookkeeping, in one process: contexts joined from messages are bounded
and a released one does not come back."""

from __future__ import annotations

import pytest
from distrpc import _autograd, _internal


@pytest.fixture
def ctx():
    """A context made here, released after the test."""
    made = _autograd.new_context()
    yield made
    _autograd.release(made.id)


def test_contexts_joined_from_peers_are_bounded(monkeypatch):
    monkeypatch.setattr(_autograd, "MAX_CONTEXTS", len(_autograd._contexts) + 3)
    joined = [_autograd.join((7 << _autograd.ID_BITS) | i, 7) for i in range(3)]
    try:
        _autograd.join((7 << _autograd.ID_BITS) | 3, 7)
    except RuntimeError as e:
        assert "is refused" in str(e) and "worker 7" in str(e)
    else:
        raise AssertionError("a context past the limit was joined")
    for ctx in joined:
        assert _autograd.release(ctx.id) is ctx


def test_a_released_context_is_not_brought_back_by_a_late_message():
    context_id = (9 << _autograd.ID_BITS) | 1
    ctx = _autograd.join(context_id, 9)
    assert _autograd.context(context_id) is ctx and ctx.registered
    assert _autograd.release(context_id) is ctx
    late = _autograd.join(context_id, 9)
    assert not late.registered
    assert _autograd.context(context_id) is None
    assert _autograd.release(context_id) is None  # idempotent


def _f(*args):
    return args


def test_a_call_in_a_context_carries_its_id_and_records_no_message_without_grad(ctx):
    torch = pytest.importorskip("torch")
    udf = _internal.PythonUDF(_f, (1, torch.ones(2)), {})
    with _autograd.running(ctx):
        payload, buffers = _internal.serialize(udf, 3)
    assert not ctx.sends, "a message without tensors that require grad was recorded"
    assert ctx.workers() == {3}
    call = _internal.deserialize(payload, buffers, 3)
    assert call[0] is _f and call[1][0] == 1 and call[3] == ctx.id
    # Outside a context, the same call is three elements and pickles the same otherwise.
    plain, _ = _internal.serialize(udf, 3)
    assert len(_internal.deserialize(plain, buffers, 3)) == 3
    run, joined = _internal._unwire(call, 3)
    assert joined is ctx and len(run) == 3


def test_a_tensor_that_requires_grad_carries_its_context_message_and_index(ctx):
    torch = pytest.importorskip("torch")
    x, y = torch.ones(2, requires_grad=True), torch.zeros(3)
    with _autograd.running(ctx):
        payload, buffers = _internal.serialize(_internal.PythonUDF(_f, (y, x, x), {}), 3)
    ((message, sent),) = ctx.sends.items()
    assert len(sent) == 1 and sent[0] is x  # once: the pickle refers to it again
    call = _internal.deserialize(payload, buffers, 3)
    _, (y2, x2, x3), _, context_id = call
    assert context_id == ctx.id and not y2.requires_grad and x3 is x2
    assert x2.requires_grad and x2.grad_fn.edge == (ctx, 3, message, 0, None)
    assert not ctx.routes  # nothing it received was sent on


def test_a_received_tensor_sent_on_untouched_carries_where_it_came_from(ctx):
    torch = pytest.importorskip("torch")
    x = torch.ones(2, requires_grad=True)
    with _autograd.running(ctx):
        first = _internal.serialize(_internal.PythonUDF(_f, (x,), {}), 3)
    (message,) = ctx.sends
    _, (x2,), _, _ = _internal.deserialize(*first, 3)  # as worker 3 received it
    with _autograd.running(ctx):
        on = _internal.serialize(_internal.PythonUDF(_f, (x2, x2 * 2), {}), 5)
    assert ctx.routes
    _, (x3, doubled), _, _ = _internal.deserialize(*on, 4)  # as worker 5 from worker 4
    # Its gradient goes to worker 0's message directly; the product's to worker 4.
    assert x3.grad_fn.edge.destination() == (3, message, 0)
    assert doubled.grad_fn.edge.via is None and doubled.grad_fn.edge.sender == 4
    # A malformed origin is refused, not followed.
    with pytest.raises(ValueError, match="malformed origin"):
        _autograd.received(torch.ones(1), (ctx.id, 1, 0, ("w", 1, 0)), 4)


def test_a_result_that_requires_grad_goes_as_a_plain_tensor_with_its_context_and_message(ctx):
    torch = pytest.importorskip("torch")
    leaf = torch.ones(2, 3, requires_grad=True)
    result = leaf * 2
    with _autograd.running(ctx):
        payload, buffers = _internal.serialize(result, 3)
    ((message, sent),) = ctx.sends.items()
    assert sent == [result] and ctx.workers() == {3}
    assert payload.startswith(_internal._WITH_GRAD)
    # After the two ids, the very pickle of the same tensor without grad.
    plain, _ = _internal.serialize(result.detach(), 3)
    assert payload[17:] == plain
    for _ in range(2):  # unpickled, then known by its bytes
        got = _internal.deserialize(payload, buffers, 3)
        assert torch.equal(got, result.detach()) and got.requires_grad
        assert got.grad_fn.edge == (ctx, 3, message, 0, None)
    # A tensor that is no plain one but for its grad goes through the pickler, as before.
    odd = (leaf * 2).t()  # not contiguous
    with _autograd.running(ctx):
        payload, buffers = _internal.serialize(odd, 3)
    assert not payload.startswith(_internal._WITH_GRAD)
    got = _internal.deserialize(payload, buffers, 3)
    assert torch.equal(got, odd.detach()) and got.grad_fn.edge.index == 0


def test_a_release_pickles_as_its_call_would_without_being_remembered():
    from distrpc.autograd import _engine

    # A call made once (each context's release is) is not remembered among the plain calls,
    # so it never pushes out the program's own; made again, it is.
    context_id = (3 << _autograd.ID_BITS) | 12
    before = dict(_internal._plain_pickles)
    udf = _internal.PythonUDF(_engine._release_context, (context_id, 3), {})
    payload = _internal.serialize(udf, 3)[0]
    assert _internal._plain_pickles == before, "a release was remembered among plain calls"
    assert payload == _internal.serialize(udf, 3)[0]
    assert len(_internal._plain_pickles) == len(before) + 1, "made twice, it is remembered"
    func, args, kwargs = _internal.deserialize(payload, [], 3)
    assert func is _engine._release_context and args == (context_id, 3) and kwargs == {}


def test_routed_weights_add_up_exactly():
    from distrpc.autograd._engine import _less

    owed = (2, 1)  # two passes given out; one split in three, the other in two
    for num, den in [(1, 3), (1, 2), (1, 3), (1, 3), (1, 2)]:
        assert owed[0] > 0
        owed = _less(owed, num, den)
    assert owed == (0, 1)
