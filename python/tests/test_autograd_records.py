"""distrpc._autograd's bookkeeping, in one process: contexts joined from messages are bounded
and a released one does not come back."""

from __future__ import annotations

from distrpc import _autograd


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
