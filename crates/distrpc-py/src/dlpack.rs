//! Received tensors handed to torch as DLPack capsules (`torch.from_dlpack`): the tensor is
//! made over the receive buffer with its dtype and shape at once — no `ctypes` view, no
//! `frombuffer` then `view` — and the buffer lives until torch frees the tensor (the capsule's
//! deleter drops it, without the interpreter lock).
//!
//! The structures are DLPack's (`dlpack.h`, the unversioned ABI every torch since 1.10 takes).

use std::ffi::{CStr, c_void};

use distrpc::Tensor;
use pyo3::exceptions::PyValueError;
use pyo3::ffi;
use pyo3::prelude::*;

#[repr(C)]
struct DLDevice {
    device_type: i32,
    device_id: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct DLDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

#[repr(C)]
struct DLTensor {
    data: *mut c_void,
    device: DLDevice,
    ndim: i32,
    dtype: DLDataType,
    shape: *mut i64,
    strides: *mut i64,
    byte_offset: u64,
}

#[repr(C)]
struct DLManagedTensor {
    dl_tensor: DLTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

/// A managed tensor and what it points into: its shape and strides, and the received memory.
/// `repr(C)` with the DLPack structure first, so a pointer to one is a pointer to the other.
#[repr(C)]
struct Managed {
    managed: DLManagedTensor,
    shape: Vec<i64>,
    strides: Vec<i64>,
    _memory: Tensor,
}

const CPU: i32 = 1;
const NAME: &CStr = c"dltensor";

/// The DLPack dtype of distrpc's plain dtype index (`distrpc._internal._PLAIN_DTYPES`).
fn dtype(index: usize) -> Option<DLDataType> {
    const INT: u8 = 0;
    const UINT: u8 = 1;
    const FLOAT: u8 = 2;
    const BFLOAT: u8 = 4;
    const COMPLEX: u8 = 5;
    const BOOL: u8 = 6;
    let (code, bits) = match index {
        0 => (FLOAT, 32),
        1 => (FLOAT, 64),
        2 => (FLOAT, 16),
        3 => (BFLOAT, 16),
        4 => (INT, 64),
        5 => (INT, 32),
        6 => (INT, 16),
        7 => (INT, 8),
        8 => (UINT, 8),
        9 => (BOOL, 8),
        10 => (COMPLEX, 64),
        11 => (COMPLEX, 128),
        _ => return None,
    };
    Some(DLDataType {
        code,
        bits,
        lanes: 1,
    })
}

unsafe extern "C" fn delete(tensor: *mut DLManagedTensor) {
    // SAFETY: `tensor` is the first field of a `Managed` leaked by `capsule` (repr(C)), and
    // DLPack calls the deleter once.
    drop(unsafe { Box::from_raw(tensor.cast::<Managed>()) });
}

unsafe extern "C" fn drop_unused(capsule: *mut ffi::PyObject) {
    // A consumer renames the capsule "used_dltensor" and calls the deleter itself; one never
    // consumed still holds the tensor.
    // SAFETY: called by Python with the capsule being destroyed; the name is checked first.
    unsafe {
        if ffi::PyCapsule_IsValid(capsule, NAME.as_ptr()) == 1 {
            let tensor =
                ffi::PyCapsule_GetPointer(capsule, NAME.as_ptr()).cast::<DLManagedTensor>();
            delete(tensor);
        }
    }
}

/// A DLPack capsule of `memory` (a received buffer) as a C-contiguous CPU tensor of the plain
/// dtype `index` and `shape`; its bytes must be exactly what they describe.
pub(crate) fn capsule(
    py: Python<'_>,
    memory: Tensor,
    index: usize,
    shape: Vec<i64>,
) -> PyResult<Py<PyAny>> {
    let dtype = dtype(index).ok_or_else(|| PyValueError::new_err(format!("no dtype {index}")))?;
    let elements = shape.iter().try_fold(1u64, |n, &d| {
        u64::try_from(d).ok().and_then(|d| n.checked_mul(d))
    });
    let bytes = elements.and_then(|n| n.checked_mul(u64::from(dtype.bits / 8)));
    if bytes != Some(memory.data().len() as u64) {
        return Err(PyValueError::new_err(format!(
            "a buffer of {} bytes is no tensor of shape {shape:?} and dtype {index}",
            memory.data().len()
        )));
    }
    let mut strides = vec![1i64; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1].max(1);
    }
    let mut managed = Box::new(Managed {
        managed: DLManagedTensor {
            dl_tensor: DLTensor {
                data: memory.data().as_ptr().cast_mut().cast(),
                device: DLDevice {
                    device_type: CPU,
                    device_id: 0,
                },
                ndim: i32::try_from(shape.len())
                    .map_err(|_| PyValueError::new_err("too many dimensions"))?,
                dtype,
                shape: std::ptr::null_mut(),
                strides: std::ptr::null_mut(),
                byte_offset: 0,
            },
            manager_ctx: std::ptr::null_mut(),
            deleter: Some(delete),
        },
        shape,
        strides,
        _memory: memory,
    });
    // The vectors' buffers do not move when the box does.
    managed.managed.dl_tensor.shape = managed.shape.as_mut_ptr();
    managed.managed.dl_tensor.strides = managed.strides.as_mut_ptr();
    let raw = Box::into_raw(managed);
    // SAFETY: `raw` stays valid until `delete` (by the consumer, or by `drop_unused`); the
    // name is a static C string.
    unsafe {
        (*raw).managed.manager_ctx = raw.cast();
        let capsule = ffi::PyCapsule_New(raw.cast(), NAME.as_ptr(), Some(drop_unused));
        if capsule.is_null() {
            delete(raw.cast());
            return Err(PyErr::fetch(py));
        }
        Ok(Bound::from_owned_ptr(py, capsule).unbind())
    }
}
