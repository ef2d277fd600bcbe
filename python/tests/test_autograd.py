"""Distributed autograd and the distributed optimizer, against torch itself: the same training
program on ``torch.distributed`` and on distrpc gives the gradients and parameters of the same
model trained in one process."""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import time

import pytest
from _workers import join, wait_until

torch = pytest.importorskip("torch")

#: (rpc module, autograd module, optim module) of each implementation.
IMPLS = {
    "distrpc": ("distrpc.rpc", "distrpc.autograd", "distrpc.optim"),
    "torch": ("torch.distributed.rpc", "torch.distributed.autograd", "torch.distributed.optim"),
}


def _modules(impl):
    return [importlib.import_module(name) for name in IMPLS[impl]]


def _initial(seed=0):
    """The model's starting parameters: two linear layers and a head."""
    g = torch.Generator().manual_seed(seed)
    return {
        "l1": (torch.randn(8, 4, generator=g), torch.randn(8, generator=g)),
        "l2": (torch.randn(6, 8, generator=g), torch.randn(6, generator=g)),
        "head": (torch.randn(1, 6, generator=g), torch.randn(1, generator=g)),
    }


def _linear(weight, bias):
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return layer


def _batches(steps=5):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(3, 4, generator=g), torch.randn(3, 1, generator=g)) for _ in range(steps)]


def _forward(l1, l2, head, x, y):
    h = torch.relu(l1(x))
    h = torch.tanh(l2(h))
    return ((head(h) - y) ** 2).mean()


def _reference(optimizer, steps=5, **kwargs):
    """The same model trained in one process: first gradients, then parameters after steps."""
    init = _initial()
    layers = [_linear(*init[k]) for k in ("l1", "l2", "head")]
    opt = optimizer([p for layer in layers for p in layer.parameters()], **kwargs)
    first = None
    for x, y in _batches(steps):
        opt.zero_grad()
        _forward(*layers, x, y).backward()
        if first is None:
            first = [p.grad.clone() for layer in layers for p in layer.parameters()]
        opt.step()
    return first, [p.detach().clone() for layer in layers for p in layer.parameters()]


def _param_rrefs(impl, layer_rref):
    rpc = _modules(impl)[0]
    return [rpc.RRef(p) for p in layer_rref.local_value().parameters()]


def _owner_params(layer_rref):
    return [p.detach().clone() for p in layer_rref.local_value().parameters()]


def _context_count(impl):
    return int(_modules(impl)[0]._get_debug_info()["num_autograd_contexts"])


def _live_contexts():
    """distrpc's context objects still alive here, whether registered or not."""
    import gc

    from distrpc import _autograd

    gc.collect()
    return sum(isinstance(o, _autograd.Context) for o in gc.get_objects())


def _gradients_of(impl, context_id, layer_rref):
    grads = _modules(impl)[1].get_gradients(context_id)
    return [grads[p].clone() for p in layer_rref.local_value().parameters()]


def _split_model(rank, world_size, init_method, results, impl, optimizer_name):
    """worker0 trains a model whose first layer lives on worker1 (used through rpc_sync
    proxies) and second on worker2 (through remote proxies and to_here); its head is local."""
    rpc, dist_autograd, dist_optim = _modules(impl)
    join(rpc, rank, world_size, init_method, rpc_timeout=30)
    out = None
    if rank == 0:
        init = _initial()
        l1 = rpc.remote("worker1", _linear, args=init["l1"])
        l2 = rpc.remote("worker2", _linear, args=init["l2"])
        head = _linear(*init["head"])
        params = (
            rpc.rpc_sync("worker1", _param_rrefs, args=(impl, l1))
            + rpc.rpc_sync("worker2", _param_rrefs, args=(impl, l2))
            + [rpc.RRef(p) for p in head.parameters()]
        )
        optimizer = getattr(torch.optim, optimizer_name)
        kwargs = {"lr": 0.05} if optimizer_name == "SGD" else {"lr": 0.01}
        opt = dist_optim.DistributedOptimizer(optimizer, params, **kwargs)
        first = None
        for x, y in _batches():
            with dist_autograd.context() as context_id:
                h = torch.relu(l1.rpc_sync().forward(x))
                h = torch.tanh(l2.remote().forward(h).to_here())
                loss = ((head(h) - y) ** 2).mean()
                dist_autograd.backward(context_id, [loss])
                if first is None:
                    first = (
                        rpc.rpc_sync("worker1", _gradients_of, args=(impl, context_id, l1))
                        + rpc.rpc_sync("worker2", _gradients_of, args=(impl, context_id, l2))
                        + [dist_autograd.get_gradients(context_id)[p] for p in head.parameters()]
                    )
                opt.step(context_id)
        del h, loss  # the last step's graph (it holds that step's context)
        final = (
            rpc.rpc_sync("worker1", _owner_params, args=(l1,))
            + rpc.rpc_sync("worker2", _owner_params, args=(l2,))
            + [p.detach().clone() for p in head.parameters()]
        )
        # Lists: tensors would cross the results queue through shared memory.
        out = {"first": [t.tolist() for t in first], "final": [t.tolist() for t in final]}
        if impl == "distrpc":
            out["released"] = all(
                wait_until(lambda w=w: rpc.rpc_sync(w, _context_count, args=(impl,)) == 0)
                for w in ("worker0", "worker1", "worker2")
            )
            # Released contexts are gone, not only unregistered: a stage's context and the
            # graph behind what it sent hold each other (freed by dropping what it sent).
            out["freed"] = all(
                wait_until(lambda w=w: rpc.rpc_sync(w, _live_contexts) == 0)
                for w in ("worker0", "worker1", "worker2")
            )
    rpc.shutdown()
    results.put((rank, out))


# (SGD and Adam have functional forms, which both DistributedOptimizers step; NAdam has none.)
@pytest.mark.parametrize("optimizer_name", ["SGD", "Adam", "NAdam"])
@pytest.mark.parametrize("impl", ["distrpc", "torch"])
def test_a_model_split_over_three_workers_trains_as_in_one_process(run_group, impl, optimizer_name):
    out = run_group(functools.partial(_split_model, impl=impl, optimizer_name=optimizer_name), 3)[0]
    kwargs = {"lr": 0.05} if optimizer_name == "SGD" else {"lr": 0.01}
    first, final = _reference(getattr(torch.optim, optimizer_name), **kwargs)
    assert len(out["first"]) == len(first) == 6
    for got, want in zip(out["first"], first):
        assert torch.allclose(torch.tensor(got), want, atol=1e-6), (got, want)
    for got, want in zip(out["final"], final):
        assert torch.allclose(torch.tensor(got), want, atol=1e-5), (got, want)
    if impl == "distrpc":
        assert out["released"]
        assert out["freed"]


class _Held:
    """A reference to a local value, as a ``_LocalOptimizer`` reads its parameters."""

    def __init__(self, value):
        self.value = value

    def local_value(self):
        return self.value


def test_local_optimizers_step_torch_functional_forms_where_it_has_them():
    from distrpc.optim.optimizer import _LocalOptimizer

    params = [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))]
    sgd = _LocalOptimizer(torch.optim.SGD, [_Held(p) for p in params], lr=0.5)
    nadam = _LocalOptimizer(torch.optim.NAdam, [_Held(p) for p in params], lr=0.5)
    assert sgd.functional and type(sgd.optim).__name__ == "_FunctionalSGD"
    assert not nadam.functional and isinstance(nadam.optim, torch.optim.NAdam)
    # A step with a gradient for the first parameter alone leaves the second as it was.
    sgd.optim.step([torch.full((2,), 2.0), None])
    assert params[0].tolist() == [0.0, 0.0] and params[1].tolist() == [1.0, 1.0, 1.0]


def _double_on_worker0(impl, x):
    """On worker2: back to worker0 for the product, so the tensor hops once more."""
    return _modules(impl)[0].rpc_sync("worker0", torch.mul, args=(x, 2))


def _hop(impl, x):
    """On worker1: through worker2 (and worker0) and back, plus a local use."""
    y = _modules(impl)[0].rpc_sync("worker2", _double_on_worker0, args=(impl, x * 3))
    return y + x


def _hops(rank, world_size, init_method, results, impl):
    rpc, dist_autograd, _ = _modules(impl)
    join(rpc, rank, world_size, init_method, rpc_timeout=30)
    out = None
    if rank == 0:
        x = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
        with dist_autograd.context() as context_id:
            r = rpc.rpc_sync("worker1", _hop, args=(impl, x))  # 6x + x
            dist_autograd.backward(context_id, [(r * r).sum()])
            out = {"value": r.tolist(), "grad": dist_autograd.get_gradients(context_id)[x].tolist()}
            out["grad_untouched"] = x.grad is None
    rpc.shutdown()
    results.put((rank, out))


@pytest.mark.parametrize("impl", ["distrpc", "torch"])
def test_gradients_cross_several_hops(run_group, impl):
    out = run_group(functools.partial(_hops, impl=impl), 3)[0]
    x = torch.tensor([1.0, -2.0, 0.5])
    assert out["value"] == (7 * x).tolist()
    assert torch.allclose(torch.tensor(out["grad"]), 98 * x)
    assert out["grad_untouched"]


#: The parameter server's parameter (on worker0).
_PS: dict = {}


def _ps_forward(x):
    return _PS["w"] * x


def _ps_gradient(context_id):
    import distrpc.autograd as dist_autograd

    return dist_autograd.get_gradients(context_id)[_PS["w"]].tolist()


def _two_trainers(rank, world_size, init_method, results):
    import distrpc.autograd as dist_autograd
    import distrpc.rpc as rpc

    if rank == 0:
        _PS["w"] = torch.ones(3, requires_grad=True)
    join(rpc, rank, world_size, init_method, rpc_timeout=30)
    rpc.api._barrier(["worker0", "worker1", "worker2"])  # the parameter exists
    out = None
    if rank > 0:
        mixed = []
        # worker2 profiles its calls: a profiled call carries its context too.
        profiling = torch.autograd.profiler_legacy.profile() if rank == 2 else None
        with profiling or contextlib.nullcontext():
            for i in range(20):
                x = torch.full((3,), float(rank * 100 + i))
                with dist_autograd.context() as context_id:
                    loss = rpc.rpc_sync("worker0", _ps_forward, args=(x,)).sum()
                    dist_autograd.backward(context_id, [loss])
                    got = rpc.rpc_sync("worker0", _ps_gradient, args=(context_id,))
                    if got != x.tolist():
                        mixed.append((x.tolist(), got))
        keys = [] if profiling is None else [e.name for e in profiling.function_events]
        out = mixed, any(k.startswith("rpc_sync#") and "_ps_forward" in k for k in keys)
    rpc.shutdown()
    results.put((rank, out))


def test_two_trainers_sharing_a_parameter_server_keep_their_gradients_apart(run_group):
    out = run_group(_two_trainers, 3)
    assert out[1] == ([], False) and out[2] == ([], True)


class _DieInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        os._exit(3)


def _doomed(x):
    return _DieInBackward.apply(x) * 2


def _killed(rank, world_size, init_method, results):
    import distrpc.autograd as dist_autograd
    import distrpc.rpc as rpc

    join(rpc, rank, world_size, init_method, rpc_timeout=60)
    rpc.api._barrier(["worker0", "worker1", "worker2"])
    out = None
    if rank == 0:
        x = torch.ones(4, requires_grad=True)
        started = time.monotonic()
        with dist_autograd.context() as context_id:
            a = rpc.rpc_sync("worker2", torch.mul, args=(x, 3))
            b = rpc.rpc_sync("worker1", _doomed, args=(x,))
            try:
                dist_autograd.backward(context_id, [(a + b).sum()])
                out = {"error": None}
            except RuntimeError as e:
                out = {"error": str(e), "took": time.monotonic() - started}
        out["released"] = wait_until(
            lambda: (
                rpc.rpc_sync("worker2", _context_count, args=("distrpc",)) == 0
                and _context_count("distrpc") == 0
            )
        )
    if rank != 1:
        rpc.api._barrier(["worker0", "worker2"])
        results.put((rank, out))
        rpc.shutdown(graceful=False)
    else:
        time.sleep(60)  # its backward ends this process; bounded if it never comes


def test_a_worker_killed_during_backward_fails_it_naming_the_worker(run_group):
    out = run_group(_killed, 3, exit_codes={1: 3})[0]
    assert out["error"] is not None and "worker1" in out["error"], out
    assert out["took"] < 20, f"backward failed only after {out['took']:.1f} s"
    assert out["released"]


def _squared_sum(x):
    return (x * x).sum()


def _failing_backward(x):
    return _FailInBackward.apply(x)


class _FailInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise ValueError("no gradient here")


def _passes(impl):
    return int(_modules(impl)[0]._get_debug_info()["num_current_backward_passes"])


def _api(rank, world_size, init_method, results):
    """RRef.backward, retain_graph, and what bad input gets."""
    import distrpc.autograd as dist_autograd
    import distrpc.rpc as rpc

    join(rpc, rank, world_size, init_method, rpc_timeout=30)
    out = None
    if rank == 0:
        out = {}
        x = torch.tensor([1.0, 2.0], requires_grad=True)
        with dist_autograd.context() as context_id:
            out["id_has_rank"] = context_id >> 48 == 0
            # A loss that lives on worker1, reached through its reference.
            loss = rpc.remote("worker1", _squared_sum, args=(x,))
            loss.backward(context_id)
            out["rref_backward"] = dist_autograd.get_gradients(context_id)[x].tolist()
            # retain_graph: a second pass through the same graph adds to the first.
            y = rpc.rpc_sync("worker1", torch.mul, args=(x, 3)).sum()
            dist_autograd.backward(context_id, [y], retain_graph=True)
            dist_autograd.backward(context_id, [y])
            out["retained"] = dist_autograd.get_gradients(context_id)[x].tolist()
            out["passes_after"] = _passes("distrpc")
            try:
                with dist_autograd.context():
                    pass
            except RuntimeError as e:
                out["nested"] = str(e)
            try:
                dist_autograd.backward(
                    context_id, [rpc.rpc_sync("worker1", torch.mul, args=(x, 2))]
                )
            except RuntimeError as e:
                out["not_scalar"] = str(e)
            try:
                failing = rpc.rpc_sync("worker1", _failing_backward, args=(x,)).sum()
                dist_autograd.backward(context_id, [failing])
            except Exception as e:  # noqa: BLE001 - its type is checked
                out["remote_failure"] = (type(e).__name__, str(e))
        try:
            dist_autograd.get_gradients(context_id)
        except RuntimeError as e:
            out["released"] = str(e)
        # The owner's own reference, outside any context: a local backward into .grad.
        z = torch.tensor([3.0], requires_grad=True)
        rpc.RRef((z * 2).sum()).backward()
        out["local_rref_backward"] = z.grad.tolist()
        out["contexts"] = wait_until(
            lambda: (
                rpc.rpc_sync("worker1", _context_count, args=("distrpc",)) == 0
                and _context_count("distrpc") == 0
            )
        )
    rpc.shutdown()
    results.put((rank, out))


def test_rref_backward_retain_graph_and_errors(run_group):
    out = run_group(_api, 2)[0]
    assert out["id_has_rank"]
    assert out["rref_backward"] == [2.0, 4.0]
    assert out["retained"] == [2.0 + 6.0, 4.0 + 6.0]
    assert out["passes_after"] == 0
    assert out["nested"] == "Already have an autograd context id for this thread."
    assert "is not a scalar" in out["not_scalar"]
    kind, message = out["remote_failure"]
    assert kind == "ValueError" and "worker1" in message and "no gradient here" in message
    assert out["released"].startswith("Could not find autograd context with id")
    assert out["local_rref_backward"] == [2.0]
    assert out["contexts"]


class _Raising(torch.nn.Module):
    """Its backward raises, or ends the process (``die``)."""

    def __init__(self, die):
        super().__init__()
        self.die = die

    def forward(self, x):
        return (_DieInBackward if self.die else _FailInBackward).apply(x)


def _chain_stage(weight, bias, mode=None):
    layer = _linear(weight, bias)
    return layer if mode is None else torch.nn.Sequential(layer, _Raising(mode == "die"))


def _chain_reference():
    init = _initial()
    layers = [_linear(*init[k]) for k in ("l1", "l2", "head")]
    x, y = _batches(1)[0]
    h = x
    for layer in layers:
        h = layer(h)
    ((h - y) ** 2).mean().backward()
    return [p.grad.tolist() for layer in layers for p in layer.parameters()]


def _chain(rank, world_size, init_method, results, impl, mode):
    """worker0 drives a chain of stages on workers 1-3, each stage's output passed to the next
    untouched (so distrpc's stages send gradients to each other directly); in ``die`` and
    ``fail`` modes worker2's backward ends its process or raises."""
    rpc, dist_autograd, _ = _modules(impl)
    join(rpc, rank, world_size, init_method, rpc_timeout=60)
    out = None
    if rank == 0:
        init = _initial()
        stages = [
            rpc.remote(f"worker{r}", _chain_stage, args=(*init[k], mode if r == 2 else None))
            for r, k in ((1, "l1"), (2, "l2"), (3, "head"))
        ]
        x, y = _batches(1)[0]
        started = time.monotonic()
        with dist_autograd.context() as context_id:
            h = x
            for stage in stages:
                h = stage.rpc_sync().forward(h)
            try:
                dist_autograd.backward(context_id, [((h - y) ** 2).mean()])
                grads = []
                for r, stage in zip((1, 2, 3), stages):
                    grads += rpc.rpc_sync(
                        f"worker{r}", _gradients_of, args=(impl, context_id, stage)
                    )
                out = {"grads": [g.tolist() for g in grads]}
                if impl == "distrpc":
                    from distrpc import _autograd

                    out["routed"] = _autograd.context(context_id).routes
            except Exception as e:  # noqa: BLE001 - its type is checked
                out = {"error": (type(e).__name__, str(e)), "took": time.monotonic() - started}
        if impl == "distrpc":
            alive = [w for w in ("worker1", "worker2", "worker3") if w != "worker2" or not mode]
            out["released"] = wait_until(
                lambda: (
                    _context_count(impl) == 0
                    and all(rpc.rpc_sync(w, _context_count, args=(impl,)) == 0 for w in alive)
                )
            )
    if mode == "die":
        if rank != 2:
            rpc.api._barrier(["worker0", "worker1", "worker3"])
            results.put((rank, out))
            rpc.shutdown(graceful=False)
        else:
            time.sleep(60)  # its backward ends this process; bounded if it never comes
        return
    rpc.shutdown()
    results.put((rank, out))


@pytest.mark.parametrize("impl", ["distrpc", "torch"])
def test_a_chain_of_stages_passes_gradients_stage_to_stage(run_group, impl):
    out = run_group(functools.partial(_chain, impl=impl, mode=None), 4)[0]
    want = _chain_reference()
    assert len(out["grads"]) == len(want)
    for got, expected in zip(out["grads"], want):
        assert torch.allclose(torch.tensor(got), torch.tensor(expected), atol=1e-6)
    if impl == "distrpc":
        assert out["routed"] and out["released"]


def test_a_stage_failing_in_a_chain_fails_backward_naming_it(run_group):
    out = run_group(functools.partial(_chain, impl="distrpc", mode="fail"), 4)[0]
    kind, message = out["error"]
    assert kind == "ValueError" and "worker2" in message and "no gradient here" in message
    assert out["released"]


def test_a_stage_killed_in_a_chain_fails_backward_naming_it(run_group):
    out = run_group(functools.partial(_chain, impl="distrpc", mode="die"), 4, exit_codes={2: 3})[0]
    kind, message = out["error"]
    assert kind == "RuntimeError" and "worker2" in message, out
    assert out["took"] < 20, f"backward failed only after {out['took']:.1f} s"
    assert out["released"]
