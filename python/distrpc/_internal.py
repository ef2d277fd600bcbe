"""How Python calls travel, as torch's ``internal.py`` sends them: a ``PythonUDF`` (function,
args, kwargs) pickled, and a callee exception pickled as a ``RemoteException`` that the caller
raises as the original type, its message prefixed with the worker it came from.

Arrays never go into the pickle: pickle protocol 5 hands every contiguous array's buffer to the
pickler out of band, and each becomes a tensor of the frame's tensor table, written to the
socket from the array's own memory. On the receiving side each arrives as a slice of the
64-byte aligned receive buffer, and the array is rebuilt over it: no copy either way.

A buffer crosses into Rust as ``(address, length, owner)``: the owner keeps the memory alive
while Rust holds it; on the way back, ``owner`` is the Rust-side tensor and the view is a
ctypes array over its address that keeps it alive.

Shortcuts keep the common messages cheap, each producing the very bytes the pickler would: a
call of a plain function on atoms goes through ``pickle.dumps``; a plain tensor alone, or a
call of a Python function on plain tensors alone, is pickled once per shape and then
remembered at both ends (``_shaped_pickle``); a call made again is found whole by the caller
(``remembered_call``) and run by the callee without unpickling (``run_remembered``), its
tensors handed to torch over the receive buffer as DLPack capsules (``_received``); a call
made in a distributed autograd context carries the context's id as a fourth element
(``_wire``), its tensors that require grad their own ``(context, message, index)``; a result
that requires grad goes as a plain tensor behind its context's and message's ids
(``_with_grad``).

Example (a call and its result, as the front sends them)::

    payload, buffers = serialize(PythonUDF(torch.add, (x, y), {}), to=1)
    func, args, kwargs = deserialize(payload, buffers, sender=0)   # on worker 1"""

from __future__ import annotations

import copyreg
import ctypes
import functools
import io
import pickle
import sys
import threading
import traceback
import types
from typing import Any, Callable, NamedTuple

from . import _autograd, _profiler
from ._core import Held

#: A buffer as Rust takes it or gives it back: ``(address, length, owner)``.
Buffer = tuple[int, int, Any]


class PythonUDF(NamedTuple):
    """A user function call, pickled by reference like any picklable callable."""

    func: Callable[..., Any]
    args: tuple
    kwargs: dict


class RemoteException(NamedTuple):
    """An exception raised by a function on another worker (torch's ``RemoteException``)."""

    msg: str
    exception_type: type


def _lend(buffer: pickle.PickleBuffer) -> Buffer:
    """An out-of-band buffer as Rust takes it, without a copy."""
    view = buffer.raw()
    if view.nbytes == 0:
        return (0, 0, view)
    base = view.obj
    if isinstance(base, ctypes.Array):  # a tensor's memory (_reduce_tensor)
        return (ctypes.addressof(base), view.nbytes, view)
    import numpy as np  # out-of-band buffers come from arrays, so numpy is there

    if type(base) is np.ndarray:  # contiguous (raw() checked): its data is the buffer
        return (base.__array_interface__["data"][0], view.nbytes, view)

    address = np.frombuffer(view, dtype=np.uint8).__array_interface__["data"][0]
    return (address, view.nbytes, view)


def _view(buffer: Buffer) -> Any:
    """A received buffer as a writable view of the receive buffer, which it keeps alive."""
    address, length, owner = buffer
    if length == 0:
        return bytearray()
    view = (ctypes.c_char * length).from_address(address)
    view._owner = owner  # the ctypes array keeps the Rust tensor (and its memory) alive
    return view


def _rebuild_tensor(
    buffer: Any,
    dtype: str,
    shape: tuple,
    requires_grad: bool,
    grad: tuple | None = None,
    parameter: bool = False,
) -> Any:
    """A torch tensor over ``buffer`` (a view of the receive buffer: no copy). A tensor sent in
    a distributed autograd context has its ``grad`` there, ``(context, message, index)``: it
    is received through the context (:func:`distrpc._autograd.received`). An ``nn.Parameter``
    comes back as one (a leaf, as torch's own pickling makes it)."""
    import torch

    tensor = _tensor_over(buffer, getattr(torch, dtype), shape)
    if parameter:
        return torch.nn.Parameter(tensor, requires_grad=requires_grad)
    if grad is not None:
        return _autograd.received(tensor, grad, _decoding.sender)
    if requires_grad:
        tensor.requires_grad_(True)
    return tensor


def _tensor_bytes(tensor: Any) -> Any:
    """A CPU tensor's memory as bytes to lend without a copy: a ctypes array over it that keeps
    it alive (an empty ``bytearray`` for no bytes), made contiguous first. No torch operator
    runs for a contiguous tensor, so a profile shows none."""
    if not tensor.is_cpu:
        raise RuntimeError(
            f"distrpc sends CPU tensors only, and this one is on {tensor.device}: "
            "move it with .cpu() (device maps are not supported)"
        )
    data = tensor
    if data.is_conj() or data.is_neg():
        data = data.resolve_conj().resolve_neg()
    if not data.is_contiguous():
        data = data.contiguous()
    nbytes = data.nbytes
    if not nbytes:
        return bytearray()
    raw = (ctypes.c_char * nbytes).from_address(data.data_ptr())
    raw._owner = data  # keeps the tensor's memory alive while the bytes are lent
    return raw


def _dtype_name(tensor: Any) -> str:
    """``float32`` for ``torch.float32``: numpy's name too, for the five dtypes they share."""
    return str(tensor.dtype).removeprefix("torch.")


def _reduce_tensor(tensor: Any) -> tuple:
    """A CPU torch tensor's bytes out of band (torch's ``_tensor_reducer``), as an array's are:
    lent from the tensor's own memory; recorded as sent when the message is one of a
    distributed autograd context and the tensor requires grad."""
    import torch

    if tensor.layout != torch.strided or tensor.is_quantized:
        return tensor.__reduce_ex__(5)  # torch's own pickling, in band
    raw = pickle.PickleBuffer(_tensor_bytes(tensor))
    parameter = type(tensor) is torch.nn.Parameter
    grad = None if parameter else _autograd.sent_index(tensor)
    shape = tuple(tensor.shape)
    return (
        _rebuild_tensor,
        (raw, _dtype_name(tensor), shape, tensor.requires_grad, grad, parameter),
    )


def _script_function(module: str, name: str) -> Any:
    """A ``@torch.jit.script`` function, found by name on the callee as any function is."""
    import importlib

    return getattr(importlib.import_module(module), name)


def _rebuild_script_module(data: bytes) -> Any:
    """A ``torch.jit.ScriptModule`` from ``torch.jit.save``'s bytes (seed internal.py's
    ``_script_module_reducer``)."""
    import torch

    return torch.jit.load(io.BytesIO(data))


def _reduce_torch(obj: Any, torch: Any) -> Any:
    """How torch's objects travel: tensors out of band, script functions by name, script
    modules through ``torch.jit.save``/``load``; ``NotImplemented`` for anything else."""
    if isinstance(obj, torch.Tensor):
        return _reduce_tensor(obj)
    if isinstance(obj, torch.jit.ScriptFunction):
        # qualified_name is "__torch__.<module>.<name>" ("__torch__.<name>" for __main__).
        module = ".".join(obj.qualified_name.split(".")[1:-1]) or "__main__"
        return (_script_function, (module, obj.name))
    if isinstance(obj, torch.jit.ScriptModule):
        data = io.BytesIO()
        torch.jit.save(obj, data)
        return (_rebuild_script_module, (data.getvalue(),))
    return NotImplemented


class _Decoding(threading.local):
    """What the thread unpickling a message knows and learns: its sender and the references
    it carried. (Defaults on the class: a missing thread-local attribute costs an exception
    on every read.)"""

    sender: int | None = None
    received: Any = ()


class _Encoding(threading.local):
    """The worker the message being pickled on this thread goes to (``serialize``'s ``to``)
    and the thread's kept pickler."""

    to: int | None = None
    pickler: Any = None


_decoding = _Decoding()
_encoding = _Encoding()


#: The RRef class and how to rebuild one from a fork: set by ``distrpc.rpc.rref`` when it is
#: imported (this module knows nothing of the layers above it).
rref_type: Any = None
rebuild_rref: Callable[[bytes, int], Any] | None = None


def _rebuild_rref(fork: bytes) -> Any:
    """The reference a pickle carried: this worker's own, from the fork the sender made."""
    sender = _decoding.sender
    if sender is None or rebuild_rref is None:
        raise RuntimeError("an RRef can be unpickled only as part of an RPC call or result")
    rref = rebuild_rref(fork, sender)
    _decoding.received.append(rref)
    return rref


#: Values the default pickler's reducers never change: pickled by ``pickle`` alone.
_ATOMS = frozenset({type(None), bool, int, float, str, bytes})
#: Functions pickled by reference, as ``pickle`` does: script functions are not among them.
_PLAIN_FUNCTIONS = frozenset({types.FunctionType, types.BuiltinFunctionType})


#: The dtypes a plain tensor travels with, by their index (numpy's names too, but bfloat16).
_PLAIN_DTYPES = (
    "float32",
    "float64",
    "float16",
    "bfloat16",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint8",
    "bool",
    "complex64",
    "complex128",
)


class _Torch:
    """What the pickler's fast path for plain tensors needs of torch, once torch is imported
    (this module never imports it)."""

    def __init__(self, torch: Any) -> None:
        self.tensor = torch.Tensor
        self.strided = torch.strided
        self.dtypes = tuple(getattr(torch, name) for name in _PLAIN_DTYPES)
        self.codes = {dtype: code for code, dtype in enumerate(self.dtypes)}
        self.frombuffer = torch.frombuffer
        self.empty = torch.empty
        # What torch.from_dlpack calls for a capsule, without its checks for other objects.
        self.from_dlpack = getattr(torch._C, "_from_dlpack", torch.from_dlpack)


#: Set when the first tensor is pickled or unpickled.
_torch: _Torch | None = None


def _torch_of(torch: Any) -> _Torch:
    global _torch
    if _torch is None:
        _torch = _Torch(torch)
    return _torch


def _tensor_over(buffer: Any, dtype: Any, shape: tuple) -> Any:
    """A tensor of ``dtype`` and ``shape`` over ``buffer`` (a view of the receive buffer: no
    copy)."""
    torch = _torch if _torch is not None else _torch_of(sys.modules["torch"])
    if type(buffer) is bytes:  # pickled in band: torch wants writable memory
        buffer = bytearray(buffer)
    if not len(buffer):
        return torch.empty(shape, dtype=dtype)
    tensor = torch.frombuffer(buffer, dtype=dtype)
    return tensor if len(shape) == 1 else tensor.view(shape)


def _received(buffer: Buffer, code: int, shape: tuple) -> Any:
    """A plain tensor of the dtype of index ``code`` and of ``shape`` over a received buffer,
    without a copy: handed to torch through DLPack when Rust holds the buffer (the tensor
    keeps it), else made over a view of it."""
    owner = buffer[2]
    if type(owner) is Held and buffer[1]:
        return _torch.from_dlpack(owner.dlpack(code, shape))
    return _tensor_over(_view(buffer), _torch.dtypes[code], shape)


def _plain_code(tensor: Any, torch: _Torch) -> int | None:
    """A plain tensor's dtype index: a contiguous CPU tensor of a plain dtype that does not
    require grad (and is no conjugate or negative view); ``None`` for any other tensor."""
    code = torch.codes.get(tensor.dtype)
    if (
        code is None
        or tensor.requires_grad
        or tensor.layout is not torch.strided
        or not tensor.is_cpu
        or not tensor.is_contiguous()
        or tensor.is_conj()
        or tensor.is_neg()
    ):
        return None
    return code


def _name_of(func: Any) -> tuple[str, str] | None:
    """``(module, name)`` a function is found by in a remembered message, looked up again at
    each use as unpickling does: a plain name in a loaded module; ``None`` for any other (a
    method, a nested function), which is then always pickled."""
    name = func.__qualname__
    if "." in name or sys.modules.get(func.__module__) is None:
        return None
    return func.__module__, name


def _by_name(module: str, name: str) -> Any:
    """The object ``module.name`` now (``None`` if there is none)."""
    return getattr(sys.modules.get(module), name, None)


def _still_named(func: Any) -> bool:
    """Whether ``func`` is still what its name finds: a remembered pickle of a call refers
    to it by name, and pickling it anew is what says so when it is not."""
    return _by_name(func.__module__, func.__qualname__) is func


#: Two kinds of message pickle to bytes that depend on the shapes of their tensors only (their
#: memory going out of band): a plain tensor alone (a function's result, a reference's value),
#: and a call of a plain function on plain tensors alone (no keyword arguments, each tensor
#: once). Each end remembers those it made or checked — by function and ``(dtype index,
#: shape)`` of each tensor to send, by their bytes to receive — and skips the pickler for
#: them (at most this many of each; then forgotten).
_SHAPED_LIMIT = 1024
_shaped_pickles: dict[tuple, bytes] = {}
_shaped_messages: dict[bytes, tuple] = {}


def _remember(table: dict, key: Any, value: Any) -> None:
    if len(table) >= _SHAPED_LIMIT:
        table.clear()
    table[key] = value


def _seen_before(seen: set, key: Any) -> bool:
    """Whether ``key`` is in ``seen``; if not, it is now (at most ``_SHAPED_LIMIT`` kept): what
    is remembered is what comes twice, so that messages made once each (a context's release,
    a call on a step's number) do not push out those made again and again."""
    if key in seen:
        return True
    if len(seen) >= _SHAPED_LIMIT:
        seen.clear()
    seen.add(key)
    return False


def _shapes(tensors: tuple) -> tuple | None:
    """``(dtype index, shape)`` of each of ``tensors`` if all are plain tensors, distinct;
    ``None`` otherwise."""
    torch = _torch
    if len(tensors) == 1:  # the common case, without the list and the check for repeats
        tensor = tensors[0]
        code = None if type(tensor) is not torch.tensor else _plain_code(tensor, torch)
        return None if code is None else ((code, tensor.shape),)
    shapes = []
    for tensor in tensors:
        if type(tensor) is not torch.tensor:
            return None
        code = _plain_code(tensor, torch)
        if code is None:
            return None
        shapes.append((code, tensor.shape))  # a torch.Size: hashed and compared as a tuple
    if len(set(map(id, tensors))) < len(tensors):
        return None  # one tensor twice: the pickle refers back to it
    return tuple(shapes)


def _shaped_pickle(obj: Any) -> tuple[bytes, list[Buffer]] | None:
    """``obj`` — a tensor, or a call as :func:`_wire` makes it — pickled as the pickler
    pickles it, without the pickler once the same shapes were seen (see above); ``None`` if
    it is neither a plain tensor alone nor a call of a plain function on plain tensors."""
    if type(obj) is not tuple:
        return _shaped(None, (obj,), True)
    if (
        len(obj) != 3
        or type(obj[0]) is not types.FunctionType
        or type(obj[1]) is not tuple
        or not obj[1]
        or type(obj[2]) is not dict
        or obj[2]
    ):
        return None
    return _shaped(obj[0], obj[1], True)


def _shaped(func: Any, tensors: tuple, make: bool) -> tuple[bytes, list[Buffer]] | None:
    """The pickle of ``tensors[0]`` alone (``func`` ``None``) or of a call of ``func`` on
    ``tensors``, and the tensors' memory lent, from what :data:`_shaped_pickles` remembers —
    pickled and remembered first if ``make`` — while ``func`` is still found by its name;
    ``None`` if they are not plain tensors, distinct (or not remembered, without ``make``)."""
    shapes = _shapes(tensors)
    if shapes is None:
        return None
    key = shapes[0] if func is None else (func, shapes)
    data = _shaped_pickles.get(key)
    if data is None:
        if not make:
            return None
        data, buffers = _internal_rpc_pickler.serialize(
            tensors[0] if func is None else (func, tensors, {})
        )
        _remember(_shaped_pickles, key, data)
        return data, buffers
    if func is not None and not _still_named(func):
        return None
    return data, [(t.data_ptr(), t.nbytes, t) for t in tensors]


def _shaped_message(data: bytes, buffers: list[Buffer]) -> Any:
    """What ``data`` unpickles to over ``buffers``, if this worker checked it to be one of the
    messages :func:`_shaped_pickle` makes; ``None`` otherwise. A call's function is looked up
    by name again, as unpickling it would."""
    known = _shaped_messages.get(data)
    if known is None or len(known[1]) != len(buffers):
        return None  # (with another count of buffers, unpickling says what is wrong)
    function, shapes = known
    if function is None:
        ((code, shape),) = shapes
        return _received(buffers[0], code, shape)
    func = _by_name(*function)
    if func is None:
        return None
    args = tuple(_received(b, d, s) for b, (d, s) in zip(buffers, shapes))
    return (func, args, {})


def _check_shaped(data: bytes, value: Any) -> None:
    """Remembers ``data`` as a message :func:`_shaped_pickle` makes if ``value``, what it
    unpickled to, is one and this worker pickles it to these very bytes."""
    made = _shaped_pickle(value)
    if made is None or made[0] != data:
        return
    if type(value) is tuple:
        function, tensors = _name_of(value[0]), value[1]
        if function is None:
            return
    else:
        function, tensors = None, (value,)
    shapes = tuple((_torch.codes[t.dtype], tuple(t.shape)) for t in tensors)
    _remember(_shaped_messages, data, (function, shapes))


#: Plain messages received twice, by their bytes: a call of a plain function on atoms (see
#: :func:`_plain`) as ``(module, name, args, keyword items)`` — the arguments are atoms, shared
#: safely — rebuilt without unpickling, the function looked up by name again; a small atom (a
#: result) as ``(value,)``. And the bytes seen once (a message that changes every time is
#: never checked).
_plain_messages: dict[bytes, tuple] = {}
_seen_once: set[bytes] = set()
#: The longest pickle of an atom remembered (a result's, mostly ``None``).
_ATOM_PICKLE_LIMIT = 64
#: What :func:`_plain_message` returns for bytes it does not know (``None`` is a value).
_UNKNOWN = object()
#: What starts a call made again in a distributed autograd context: then the context's id
#: (8 bytes, little-endian), then the call as pickled outside one (a pickle starts with
#: PROTO, 0x80). The callee runs it as the ``(func, args, kwargs, context_id)`` of ``_wire``.
_IN_CONTEXT = b"\x00"
#: What starts a tensor that requires grad sent alone (a result) in a distributed autograd
#: context: then the context's and the message's ids (8 bytes each, little-endian), then the
#: tensor pickled as a plain one (:func:`_shaped`): the receiver takes it through the context
#: as index 0 of the message, without unpickling what it saw before.
_WITH_GRAD = b"\x01"
#: The most common result, pickled (``pickle.dumps`` makes a pickler for each call).
_PICKLED_NONE = pickle.dumps(None, protocol=5)


#: The sender's side: the pickles of plain calls made lately, by function, the types of the
#: arguments and the arguments (no floats: 0.0 == -0.0, and 1 == 1.0 == True without the
#: types), without keyword arguments; remembered the second time they are made (the first
#: time, their keys are kept in ``_made_once``).
_plain_pickles: dict[Any, bytes] = {}
_made_once: set[Any] = set()


def _plain_call_pickle(call: tuple) -> bytes | None:
    """The pickle of ``call`` — a plain call as :func:`_wire` makes it, its arguments atoms
    (:func:`_plain` said so) — remembered once made twice; ``None`` for a call this does not
    remember (then ``pickle.dumps`` it)."""
    if len(call) != 3:
        return None
    func, args, kwargs = call
    if kwargs or type(func) is not types.FunctionType or type(args) is not tuple:
        return None
    kinds = tuple(map(type, args))
    if float in kinds:
        return None
    key = (func, kinds, args) if args else func
    data = _plain_pickles.get(key)
    if data is None:
        data = pickle.dumps(call, protocol=5)
        if _seen_before(_made_once, key):
            _remember(_plain_pickles, key, data)
    elif not _still_named(func):
        return None
    return data


def remembered_call(func: Any, args: Any, to: int | None = None) -> tuple | None:
    """What :func:`serialize` sends for a call of ``func`` on ``args`` (without keyword
    arguments) to worker ``to`` when this worker made it before and remembered its pickle — a
    call of a plain function on atoms (:func:`_plain_call_pickle`) or on plain tensors of the
    same shapes (:func:`_shaped_pickle`) — and the default pickler is in use: the call made
    again, found without the general path's layers. In a distributed autograd context, the
    context's id goes before it (:data:`_IN_CONTEXT`; such a call has no tensor that requires
    grad: nothing to record). ``None`` otherwise (then :func:`serialize` says)."""
    if (
        type(func) is not types.FunctionType
        or _default_pickler is not _internal_rpc_pickler
        or _internal_rpc_pickler._class_reducer_dict
    ):
        return None
    found = _remembered_call(func, args)
    ctx = _autograd.running_in.context
    if found is None or ctx is None:
        return found
    return _in_context(ctx, to, found)


def _in_context(ctx: Any, to: int | None, made: tuple) -> tuple[bytes, list[Buffer]]:
    """``made``, a call pickled as outside a context, sent to ``to`` in the context ``ctx``
    (:data:`_IN_CONTEXT`)."""
    if to is not None:
        ctx.reached(to)
    return _IN_CONTEXT + ctx.id.to_bytes(8, "little") + made[0], made[1]


def _context_of(data: bytes) -> tuple[int | None, bytes]:
    """The context a call was sent in (``None`` for none) and the call as pickled outside
    one (:func:`_in_context`)."""
    if data[:1] != _IN_CONTEXT:
        return None, data
    return int.from_bytes(data[1:9], "little"), data[9:]


def _remembered_call(func: Any, args: Any) -> tuple | None:
    """:func:`remembered_call` outside a context."""
    if not args:
        key = func
    elif type(args) is not tuple:
        return None
    elif _torch is not None and type(args[0]) is _torch.tensor:
        return _shaped(func, args, False)
    else:
        key = (func, tuple(map(type, args)), args)
    try:
        data = _plain_pickles.get(key)
    except TypeError:  # an argument that cannot be hashed: not a plain call
        return None
    if data is None or not _still_named(func):
        return None
    return data, []


def _plain_message(data: bytes) -> Any:
    """What ``data`` unpickles to, if it is one of :data:`_plain_messages`; :data:`_UNKNOWN`
    otherwise."""
    known = _plain_messages.get(data)
    if known is None:
        return _UNKNOWN
    if len(known) == 1:
        return known[0]
    module, name, args, items = known
    func = _by_name(module, name)
    if func is None:
        return _UNKNOWN
    return (func, args, dict(items) if items else {})


def _check_plain(data: bytes, value: Any) -> None:
    """Remembers ``data`` in :data:`_plain_messages` the second time it comes, if ``value``,
    what it unpickled to, is a call of a plain function on atoms or a small atom, and pickles
    to these very bytes."""
    atom = type(value) in _ATOMS
    if atom:
        if len(data) > _ATOM_PICKLE_LIMIT:
            return
    elif type(value) is not tuple or len(value) != 3:
        return
    if not _seen_before(_seen_once, data):
        return
    if atom:
        if pickle.dumps(value, protocol=5) == data:
            _remember(_plain_messages, data, (value,))
        return
    func, args, kwargs = value
    if type(func) is not types.FunctionType or type(args) is not tuple or type(kwargs) is not dict:
        return
    name = _name_of(func)
    if name is None:
        return
    for arg in (*args, *kwargs.values()):
        if type(arg) not in _ATOMS:
            return
    if pickle.dumps(value, protocol=5) == data:
        _remember(_plain_messages, data, (*name, args, tuple(kwargs.items())))


def _known(data: bytes, buffers: list[Buffer]) -> Any:
    """What ``data`` unpickles to over ``buffers`` if this worker checked it before (a plain
    message or a shaped one); :data:`_UNKNOWN` otherwise."""
    if not buffers:
        return _plain_message(data)
    if _torch is not None:
        value = _shaped_message(data, buffers)
        if value is not None:
            return value
    return _UNKNOWN


def reply_value(data: bytes, buffers: list[Buffer], sender: int | None) -> Any:
    """The value a reply from worker ``sender`` carries; the callee's exception raised as
    its original type (:func:`_handle_exception`). A reply received before (a small atom, a
    plain tensor alone) is known by its bytes."""
    value = _known(data, buffers)
    if value is not _UNKNOWN:
        return value  # (never an exception)
    return _handle_exception(deserialize(data, buffers, sender))


def run_remembered(
    payload: bytes, buffers: list[Buffer], worker_info: Any, sender: int | None = None
) -> tuple | None:
    """Runs ``payload`` from worker ``sender`` if it is a call received before — of a plain
    function on atoms (:data:`_plain_messages`) or on plain tensors (:data:`_shaped_messages`,
    over ``buffers``), made in a distributed autograd context or not (:data:`_IN_CONTEXT`) —
    of a function that is not ``@async_execution``, as :func:`run_udf` would without its
    layers: ``(result, context)``, the result, or the exception it raised as a
    ``RemoteException`` if it raised one, and the context it ran in (``None`` for none: the
    result is pickled in it). ``None`` for any other payload (then :func:`run_udf` runs
    it)."""
    context_id, payload = _context_of(payload)
    if context_id is not None and sender is None:
        return None
    if buffers:
        known = _shaped_messages.get(payload)
        if known is None or known[0] is None or len(known[1]) != len(buffers):
            return None
        (module, name), shapes = known
        args, items = None, None
    else:
        known = _plain_messages.get(payload)
        if known is None or len(known) != 4:
            return None
        module, name, args, items = known
    func = _by_name(module, name)
    if func is None or getattr(func, "_wrapped_async_rpc_function", None) is not None:
        return None
    if args is None:
        args = tuple(_received(b, d, s) for b, (d, s) in zip(buffers, shapes))
        # From here the received buffers live as long as the tensors made of them (as in
        # run_udf).
        buffers.clear()
    if items:
        func = functools.partial(func, **dict(items))
    ctx = None
    try:
        if context_id is None:
            return func(*args), None
        # As run_udf runs a call made in a context: joined, and run in it.
        ctx = _autograd.join(context_id, sender)
        return _autograd.call_in(ctx, func, *args), ctx
    except Exception as e:
        return _failure(e, worker_info), ctx


def _rebuild_plain(buffer: Any, code: int, shape: tuple) -> Any:
    """A plain tensor (see :meth:`_Pickler.plain_tensor`) over ``buffer``, without a copy."""
    if _torch is None:
        import torch

        _torch_of(torch)
    return _tensor_over(buffer, _torch.dtypes[code], shape)


#: What stands in the pickle for a plain tensor's memory: the pickler hands its buffer
#: callback this, and lends the tensor's memory in its place (writable, so not marked
#: read-only on the wire).
_LENT = pickle.PickleBuffer(bytearray())
#: Types reducer_override leaves to pickle at once: functions (the call's, the rebuilding
#: ones) and the buffers the reducers made.
_NOT_REDUCED = frozenset({types.FunctionType, types.BuiltinFunctionType, pickle.PickleBuffer})


class _Pickler(pickle.Pickler):
    """Protocol 5, every buffer out of band; torch tensors reduced as :func:`_reduce_tensor`
    says, when the program uses torch (it is never imported here otherwise); an ``RRef``
    forked (seed's ``_py_rref_reducer``). One per thread, kept: making one costs as much as
    pickling a small call (:meth:`pickle`)."""

    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.lent: list[Buffer] = []
        self.next: Buffer | None = None
        self.busy = False
        super().__init__(self.out, protocol=5, buffer_callback=self.lend)

    def pickle(self, obj: Any) -> tuple[bytes, list[Buffer]]:
        """``obj`` pickled, and the buffers it lent; the pickler is left as new."""
        self.busy = True
        try:
            self.dump(obj)
            return self.out.getvalue(), self.lent
        finally:
            self.clear_memo()
            self.out.seek(0)
            self.out.truncate()
            self.lent, self.next, self.busy = [], None, False

    def lend(self, buffer: pickle.PickleBuffer) -> None:
        """The buffer callback: every buffer goes out of band, lent as Rust takes it."""
        if buffer is _LENT:
            self.lent.append(self.next)
        else:
            self.lent.append(_lend(buffer))

    def plain_tensor(self, tensor: Any, torch: _Torch) -> Any:
        """A contiguous CPU tensor of a plain dtype that does not require grad (the common
        case) travels as its dtype's index and shape, its memory lent as it is; any other as
        :func:`_reduce_tensor` says."""
        code = _plain_code(tensor, torch)
        if code is None:
            return _reduce_tensor(tensor)
        # The tensor keeps its memory alive while Rust holds it.
        self.next = (tensor.data_ptr(), tensor.nbytes, tensor)
        return (_rebuild_plain, (_LENT, code, tuple(tensor.shape)))

    def reducer_override(self, obj: Any) -> Any:
        kind = type(obj)
        if _torch is not None and kind is _torch.tensor:
            return self.plain_tensor(obj, _torch)
        if kind in _NOT_REDUCED:
            return NotImplemented
        torch = sys.modules.get("torch")
        if torch is not None:
            if kind is torch.Tensor:
                return self.plain_tensor(obj, _torch_of(torch))
            reduced = _reduce_torch(obj, torch)
            if reduced is not NotImplemented:
                return reduced
        if rref_type is not None and isinstance(obj, rref_type):
            # The fork is the destination's: its owner takes its delete from that worker only.
            return (_rebuild_rref, (obj._handle.fork(_encoding.to),))
        return NotImplemented


class _InternalRPCPickler:
    """torch's ``_InternalRPCPickler``: pickles calls and results with protocol 5, every
    array's and tensor's buffer out of band (see the module docs). Reducers of the program's
    own classes are registered with :meth:`_register_reducer`.

    Example (a pickler used while the block runs, as torch's tests do)::

        pickler = _InternalRPCPickler()
        pickler._register_reducer(Point, lambda p: (Point, (p.x, p.y)))
        with rpc.api._use_rpc_pickler(pickler):
            rpc.rpc_sync("worker1", draw, args=(Point(1, 2),))
    """

    def __init__(self) -> None:
        self._class_reducer_dict: dict[type, Callable[[Any], Any]] = {}

    def _register_reducer(self, obj_class: type, reducer: Callable[[Any], Any]) -> None:
        """Pickles instances of ``obj_class`` with ``reducer`` (as ``copyreg`` reducers do);
        the first reducer registered for a class stays, as in torch."""
        if obj_class not in self._class_reducer_dict:
            self._class_reducer_dict[obj_class] = reducer

    def serialize(self, obj: Any) -> tuple[bytes, list[Buffer]]:
        if self._class_reducer_dict:
            pickler = _Pickler()
            pickler.dispatch_table = {**copyreg.dispatch_table, **self._class_reducer_dict}
            return pickler.pickle(obj)
        pickler = _encoding.pickler
        if pickler is None:
            pickler = _encoding.pickler = _Pickler()
        elif pickler.busy:  # pickling from inside a reducer
            pickler = _Pickler()
        return pickler.pickle(obj)

    def deserialize(
        self, data: bytes, buffers: list[Buffer] = (), sender: int | None = None
    ) -> Any:
        context_id, data = _context_of(data)
        if context_id is not None:  # a call made in a context (_in_context)
            call = self.deserialize(data, buffers, sender)
            return (*call, context_id) if type(call) is tuple and len(call) == 3 else call
        if data[:1] == _WITH_GRAD:  # a tensor that requires grad, alone (_with_grad)
            grad = (int.from_bytes(data[1:9], "little"), int.from_bytes(data[9:17], "little"), 0)
            tensor = self.deserialize(data[17:], buffers, sender)
            if _torch is None or type(tensor) is not _torch.tensor:
                raise RuntimeError("a message with a gradient's context carried no tensor")
            return _autograd.received(tensor, grad, sender)
        # References inside are forks `sender` made; they are collected for the caller to
        # wait on (a function runs only once the references it received are confirmed).
        _decoding.sender, _decoding.received = sender, []
        value = _known(data, buffers)
        if value is not _UNKNOWN:
            return value
        try:
            value = pickle.loads(data, buffers=map(_view, buffers))
            if self is _internal_rpc_pickler:
                if not buffers:
                    _check_plain(data, value)
                elif _torch is not None:
                    _check_shaped(data, value)
            return value
        except AttributeError as e:
            # A function the callee cannot find (the seed's hint).
            error = AttributeError(
                f"{e} Default RPC pickler does not serialize function code. Ensure that UDFs "
                "are defined on both caller and callee modules."
            )
            error.__cause__ = e
            return error


_internal_rpc_pickler = _InternalRPCPickler()
#: The pickler in use (``rpc.api._use_rpc_pickler`` swaps it for one with custom reducers).
_default_pickler = _internal_rpc_pickler


def _plain(obj: Any) -> bool:
    """Whether ``obj`` pickles the same without distrpc's reducers (no array, tensor,
    reference or script object in it): an atom, or a call of a plain function with atoms."""
    kind = type(obj)
    if kind in _ATOMS:
        return True
    if kind is not PythonUDF or type(obj.func) not in _PLAIN_FUNCTIONS:
        return False
    # Loops, not all() over generators: this runs for every call.
    for arg in obj.args:
        if type(arg) not in _ATOMS:
            return False
    for value in obj.kwargs.values():
        if type(value) not in _ATOMS:
            return False
    return True


def _wire(obj: Any, context_id: int | None) -> Any:
    """What goes on the wire for ``obj``: a ``PythonUDF`` as a plain ``(func, args, kwargs)``
    tuple (pickling the named tuple's class by reference costs more than the rest of a small
    call, both ways), ``(func, args, kwargs, context_id)`` when it is made in a distributed
    autograd context, also inside a profiled call; anything else as it is."""
    kind = type(obj)
    if kind is PythonUDF:
        return tuple(obj) if context_id is None else (*obj, context_id)
    if kind is _profiler.RemoteProfile and context_id is not None:
        return obj._replace(udf=_wire(obj.udf, context_id))
    return obj


def _unwire(udf: Any, sender: int | None) -> tuple:
    """The call :func:`_wire` sent from ``sender``, and the distributed autograd context it was
    made in, joined here (``None`` if it was made in none)."""
    if type(udf) is tuple and len(udf) == 4:
        if sender is None:
            raise RuntimeError("a call made in an autograd context can be run only in an RPC")
        return udf[:3], _autograd.join(udf[3], sender)
    return udf, None


#: The names of the plain functions called lately (at most ``_SHAPED_LIMIT``).
_qualnames: dict[Any, str] = {}


def qualname(func: Callable[..., Any] | str) -> str:
    """The name a call of ``func`` goes by (in errors, metrics and profiles):
    ``module.qualified_name``; a name stays as it is."""
    if type(func) is types.FunctionType:
        name = _qualnames.get(func)
        if name is None:
            name = f"{func.__module__ or '?'}.{func.__qualname__}"
            _remember(_qualnames, func, name)
        return name
    if isinstance(func, str):
        return func
    module = getattr(func, "__module__", None) or "?"
    name = getattr(func, "__qualname__", None)
    return f"{module}.{name if name is not None else repr(func)}"


def serialize(obj: Any, to: int | None = None) -> tuple[bytes, list[Buffer]]:
    """Pickles ``obj`` for the wire (to worker ``to``, the rank references in it are forked
    for): the pickle, and the buffers taken out of band. Fails before anything is sent if
    something in it cannot be pickled. (What the reducers would leave as it is goes through
    ``pickle.dumps`` directly: the same bytes, in half the time.)"""
    ctx = _autograd.running_in.context
    default = (
        _default_pickler is _internal_rpc_pickler and not _internal_rpc_pickler._class_reducer_dict
    )
    if ctx is None:
        kind = type(obj)
        if kind in _ATOMS:  # a result, mostly: no reducer changes an atom
            return (_PICKLED_NONE if obj is None else pickle.dumps(obj, protocol=5)), []
        if _torch is not None and kind is _torch.tensor and default:  # a result, a value
            shaped = _shaped(None, (obj,), True)
            if shaped is not None:
                return shaped
    elif _torch is not None and type(obj) is _torch.tensor and obj.requires_grad and default:
        # A result in a context, made by the model: its pickle is a plain tensor's.
        made = _with_grad(ctx, obj, to)
        if made is not None:
            return made
    plain = default and _plain(obj)
    if ctx is not None and default and type(obj) is PythonUDF:
        # In a distributed autograd context, a call without a tensor that requires grad (of
        # atoms, or of plain tensors alone) goes as outside one, its context's id before it:
        # what remembered_call sends when it is made again.
        made = _call_pickle(tuple(obj), plain)
        if made is not None:
            return _in_context(ctx, to, made)
    if ctx is None:
        obj = _wire(obj, None)
    else:
        # Sent in a distributed autograd context: a call carries it, and the tensors that
        # require grad are recorded as sent (a message without any costs nothing more).
        obj = _wire(obj, ctx.id)
        if to is not None:
            ctx.reached(to)
    if plain:
        return _call_pickle(obj, True)
    if _torch is not None and ctx is None and default:
        shaped = _shaped_pickle(obj)
        if shaped is not None:
            return shaped
    previous, _encoding.to = _encoding.to, to
    recording = None if ctx is None else _autograd.sending(ctx)
    try:
        return _default_pickler.serialize(obj)
    finally:
        _encoding.to = previous
        if ctx is not None:
            _autograd.sent(recording)


def _with_grad(ctx: Any, tensor: Any, to: int | None) -> tuple[bytes, list[Buffer]] | None:
    """``tensor``, which requires grad, sent alone to ``to`` in the context ``ctx`` the short
    way (:data:`_WITH_GRAD`) and recorded as sent; ``None`` if it is no plain tensor but for
    its grad (then the pickler says)."""
    shaped = _shaped(None, (tensor.detach(),), True)
    if shaped is None:
        return None
    if to is not None:
        ctx.reached(to)
    message = _autograd.sent_alone(ctx, tensor)
    ids = ctx.id.to_bytes(8, "little") + message.to_bytes(8, "little")
    return _WITH_GRAD + ids + shaped[0], shaped[1]


def _call_pickle(obj: Any, plain: bool) -> tuple[bytes, list[Buffer]] | None:
    """``obj`` — a plain object (``plain``: :func:`_plain` said so), or a call as :func:`_wire`
    makes it outside a context — pickled by the shortcuts: a plain call from what was
    remembered, a plain object by ``pickle.dumps``, a call of a plain function on plain
    tensors by :func:`_shaped_pickle`; ``None`` for anything else."""
    if plain:
        data = _plain_call_pickle(obj) if type(obj) is tuple else None
        return (data if data is not None else pickle.dumps(obj, protocol=5)), []
    return None if _torch is None else _shaped_pickle(obj)


def deserialize(data: bytes, buffers: list[Buffer] = (), sender: int | None = None) -> Any:
    """Unpickles what :func:`serialize` made on worker ``sender``, arrays over the received
    buffers; a tensor sent in a distributed autograd context joins it."""
    return _default_pickler.deserialize(data, buffers, sender)


def received_rrefs() -> list | tuple:
    """The references the last :func:`deserialize` on this thread received."""
    return _decoding.received


def _handle_exception(result: Any) -> Any:
    """Raises a ``RemoteException`` as its original type, its message prefixed with the type's
    name as torch words it (``ValueError: On WorkerInfo(id=1, name=worker1): ...``); a type that
    cannot be built from a message becomes ``RuntimeError``. Otherwise returns ``result``.
    (torch itself keeps only ``ValueError``, ``TypeError`` and ``RuntimeError`` and raises every
    other type as ``RuntimeError`` with that message; distrpc keeps them all.)"""
    if isinstance(result, RemoteException):
        message = f"{result.exception_type.__name__}: {result.msg}"
        try:
            exc = result.exception_type(message)
        except BaseException as e:  # noqa: BLE001 - any failure to rebuild it
            raise RuntimeError(
                f"Failed to create original exception type. Error msg was {e}"
                f" Original exception on remote side was {message}"
            ) from None
        raise exc
    return result


def _failure(e: BaseException, worker_info: Any) -> RemoteException:
    """``e`` as the caller will raise it, prefixed as torch prefixes it."""
    return RemoteException(f"On {worker_info}:\n{e!r}\n{traceback.format_exc()}", type(e))


def pickled(result: Any, worker_info: Any, to: int | None = None) -> tuple[bytes, list[Buffer]]:
    """``result`` pickled for worker ``to``; if it cannot be, the error it raised, pickled."""
    try:
        return serialize(result, to)
    except Exception as e:  # an unpicklable result
        return serialize(_failure(e, worker_info), to)


def run_udf(
    payload: bytes,
    buffers: list[Buffer],
    worker_info: Any,
    answer: Callable[[Any], None],
    this: Any = None,
    sender: int | None = None,
) -> None:
    """Runs a pickled call on this worker and hands ``answer`` its result, or the exception it
    raised as a ``RemoteException``. For a call on a reference's value, ``this`` is that value,
    passed first. An ``@async_execution`` function returns a future: the answer goes when it
    completes, from whichever thread completes it. A call the caller profiles runs under the
    profiler, and its events go back with the result (:mod:`distrpc._profiler`)."""
    try:
        udf = deserialize(payload, buffers, sender)
        if isinstance(buffers, list):
            # From here the received buffers live only as long as the arrays made of them: a
            # buffer freed before the answer goes is reused for the caller's next frame.
            buffers.clear()
        for rref in received_rrefs():
            if not rref._handle.wait_confirmed(60.0):
                raise RuntimeError(f"{rref} in the arguments was not confirmed by its owner")
        if isinstance(udf, AttributeError):
            raise udf
        profile = udf if type(udf) is _profiler.RemoteProfile else None
        udf, ctx = _unwire(udf if profile is None else profile.udf, sender)
        if ctx is not None:
            # Made in a distributed autograd context: the function runs in it, and its result
            # goes back in it, from whichever thread answers.
            answer = _autograd_answer(ctx, answer)
        if profile is not None:
            # The callee's events go back with the result (or the exception it raised).
            events: list = []
            answer = _profiled_answer(answer, events)
            with _profiler.run_profiled(profile, events):
                done, result = _run(ctx, udf, this, worker_info, answer)
            profile = None
        else:
            done, result = _run(ctx, udf, this, worker_info, answer)
        udf = None  # the arguments go before the answer (see above)
        if not done:
            return
    except Exception as e:
        result = _failure(e, worker_info)
    answer(result)


def _run(ctx: Any, udf: Any, this: Any, worker_info: Any, answer: Callable[[Any], None]) -> tuple:
    """:func:`_invoke`, in the distributed autograd context ``ctx`` if there is one."""
    if ctx is None:
        return _invoke(udf, this, worker_info, answer)
    return _autograd.call_in(ctx, _invoke, udf, this, worker_info, answer)


def _profiled_answer(answer: Callable[[Any], None], events: list) -> Callable[[Any], None]:
    """``answer``, sending the callee's profiled ``events`` with the result."""

    def profiled(value: Any) -> None:
        answer(_profiler.ProfiledResult(value, events))

    return profiled


def _autograd_answer(ctx: Any, answer: Callable[[Any], None]) -> Callable[[Any], None]:
    """``answer``, pickling the result in the autograd context ``ctx``."""

    def in_context(value: Any) -> None:
        _autograd.call_in(ctx, answer, value)

    return in_context


def _invoke(
    udf: Any, this: Any, worker_info: Any, answer: Callable[[Any], None]
) -> tuple[bool, Any]:
    """Runs ``udf``: ``(True, result)``, or ``(False, None)`` when an ``@async_execution``
    function returned a future that will hand ``answer`` its result."""
    # A PythonUDF, or the plain (func, args, kwargs) tuple it travels as.
    if not isinstance(udf, tuple) or len(udf) != 3:
        raise TypeError(f"expected a PythonUDF, got {type(udf).__name__}")
    func, args, kwargs = udf
    if this is not None:
        args = (this, *args)
    result: Any = func(*args, **kwargs)
    if getattr(func, "_wrapped_async_rpc_function", None) is None:
        return True, result

    def when_done(fut: Any) -> None:
        try:
            value = fut.wait()
        except Exception as e:
            value = _failure(e, worker_info)
        answer(value)

    result.add_done_callback(when_done)
    return False, None


def typed_buffer(obj: Any) -> Any:
    """For a call by name (MessagePack, ``distrpc._core``): a numpy array's or CPU torch
    tensor's memory as ``(address, length, owner, dtype name, shape)``, lent without a copy
    (a non-contiguous one is made contiguous first); a numpy scalar's Python number; ``None``
    for anything else."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor) and obj.layout == torch.strided:
        raw = _tensor_bytes(obj)
        address = ctypes.addressof(raw) if len(raw) else 0
        return (address, len(raw), raw, _dtype_name(obj), tuple(obj.shape))
    np = sys.modules.get("numpy")
    if np is None:
        return None
    if isinstance(obj, np.generic):
        return obj.item()
    if not isinstance(obj, np.ndarray):
        return None
    array = np.ascontiguousarray(obj)
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    return (
        array.__array_interface__["data"][0],
        array.nbytes,
        array,
        array.dtype.name,
        array.shape,
    )


def array(address: int, length: int, owner: Any, dtype: str, shape: list) -> Any:
    """A received tensor of a call by name as a numpy array over the receive buffer (no copy)."""
    import numpy as np

    return np.frombuffer(_view((address, length, owner)), dtype=dtype).reshape(shape)
