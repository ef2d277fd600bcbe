"""How Python calls travel, as torch's ``internal.py`` sends them: a ``PythonUDF`` (function,
args, kwargs) pickled, and a callee exception pickled as a ``RemoteException`` that the caller
raises as the original type, its message prefixed with the worker it came from."""

from __future__ import annotations

import io
import pickle
import traceback
from typing import Any, Callable, NamedTuple


class PythonUDF(NamedTuple):
    """A user function call, pickled by reference like any picklable callable."""

    func: Callable[..., Any]
    args: tuple
    kwargs: dict


class RemoteException(NamedTuple):
    """An exception raised by a function on another worker (torch's ``RemoteException``)."""

    msg: str
    exception_type: type


class _InternalRPCPickler:
    """torch's ``_InternalRPCPickler``: pickles calls and results with protocol 5."""

    def serialize(self, obj: Any) -> bytes:
        buffer = io.BytesIO()
        pickle.Pickler(buffer, protocol=5).dump(obj)
        return buffer.getvalue()

    def deserialize(self, data: bytes) -> Any:
        return pickle.loads(data)


_internal_rpc_pickler = _InternalRPCPickler()


def serialize(obj: Any) -> bytes:
    """Pickles ``obj`` for the wire."""
    return _internal_rpc_pickler.serialize(obj)


def deserialize(data: bytes) -> Any:
    """Unpickles what :func:`serialize` made."""
    return _internal_rpc_pickler.deserialize(data)


def _handle_exception(result: Any) -> Any:
    """Raises a ``RemoteException`` as its original type (``RuntimeError`` if that type
    cannot be built from a message), or returns ``result``."""
    if isinstance(result, RemoteException):
        try:
            exc = result.exception_type(result.msg)
        except BaseException as e:  # noqa: BLE001 - any failure to rebuild it
            raise RuntimeError(
                f"Failed to create original exception type. Error msg was {e}"
                f" Original exception on remote side was {result.msg}"
            ) from None
        raise exc
    return result


def run_udf(payload: bytes, worker_info: Any) -> bytes:
    """Runs a pickled call on this worker and pickles its result, or the exception it
    raised, prefixed as torch prefixes it."""
    try:
        udf = deserialize(payload)
        if not isinstance(udf, PythonUDF):
            raise TypeError(f"expected a PythonUDF, got {type(udf).__name__}")
        result: Any = udf.func(*udf.args, **udf.kwargs)
    except Exception as e:
        except_str = f"On {worker_info}:\n{e!r}\n{traceback.format_exc()}"
        result = RemoteException(except_str, type(e))
    try:
        return serialize(result)
    except Exception as e:  # an unpicklable result
        except_str = f"On {worker_info}:\n{e!r}\n{traceback.format_exc()}"
        return serialize(RemoteException(except_str, type(e)))
