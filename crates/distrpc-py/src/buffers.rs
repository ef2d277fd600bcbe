//! Buffers crossing between Python and Rust without a copy: an array's memory lent to a tensor
//! that is written to the socket from it ([`Lent`]), and a received tensor's memory held for
//! Python's view of it ([`Held`], also as a DLPack capsule: [`crate::dlpack`]).

use bytes::Bytes;
use distrpc::{DType, Tensor};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

/// Memory a Python object owns (an array's buffer, taken out of band by the pickler), lent to
/// a tensor without a copy: the tensor's bytes are written to the socket from it.
pub(crate) struct Lent {
    pub(crate) addr: usize,
    pub(crate) len: usize,
    /// Keeps the memory alive; released (under the interpreter lock) when the tensor goes.
    pub(crate) _owner: Py<PyAny>,
}

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: the Python side hands `(address, length, owner)` of a contiguous buffer of
        // `owner` (distrpc._internal, from the array's interface); `owner` keeps it alive for as
        // long as this `Lent` lives. Python code may still write to it meanwhile, as it may to
        // a tensor torch is sending.
        unsafe { std::slice::from_raw_parts(self.addr as *const u8, self.len) }
    }
}

/// A buffer the pickler took out of band, as Python lends it: `(address, length, owner)`.
pub(crate) type Loan = (usize, usize, Py<PyAny>);

/// Tensors of the buffers `(address, length, owner)` the pickler took out of band.
pub(crate) fn lent(buffers: Vec<Loan>) -> PyResult<Vec<Tensor>> {
    buffers
        .into_iter()
        .map(|(addr, len, owner)| {
            let bytes = Bytes::from_owner(Lent {
                addr,
                len,
                _owner: owner,
            });
            Tensor::from_bytes(DType::U8, vec![len], bytes)
                .map_err(|e| PyValueError::new_err(e.to_string()))
        })
        .collect()
}

/// Keeps a received tensor's memory (a slice of the receive buffer) alive while Python views it.
#[pyclass(frozen)]
pub(crate) struct Held {
    tensor: Tensor,
}

#[pymethods]
impl Held {
    /// The memory as a DLPack capsule of a C-contiguous CPU tensor of the plain dtype `index`
    /// (`distrpc._internal._PLAIN_DTYPES`) and `shape`, for `torch.from_dlpack`: the tensor
    /// keeps the memory, without a copy. A shape and dtype that do not fill it exactly are an
    /// error.
    fn dlpack(&self, py: Python<'_>, index: usize, shape: Vec<i64>) -> PyResult<Py<PyAny>> {
        crate::dlpack::capsule(py, self.tensor.clone(), index, shape)
    }
}

/// Received tensors for Python: `(address, length, owner)` each, viewed without a copy by
/// distrpc._internal.
pub(crate) fn held(
    py: Python<'_>,
    tensors: Vec<Tensor>,
) -> PyResult<Vec<(usize, usize, Py<Held>)>> {
    tensors
        .into_iter()
        .map(|t| {
            let (addr, len) = (t.data().as_ptr() as usize, t.data().len());
            Ok((addr, len, Py::new(py, Held { tensor: t })?))
        })
        .collect()
}

/// A pickled result as Python gets it: the pickle and its out-of-band buffers.
pub(crate) type Pickled = (Py<PyBytes>, Vec<(usize, usize, Py<Held>)>);
