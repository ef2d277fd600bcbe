//! Python objects ↔ MessagePack, as Rust functions encode their arguments and results (serde
//! with `rmp-serde`, structs as maps): calls by name between Python and Rust workers.
//!
//! | Python | MessagePack | Rust |
//! |---|---|---|
//! | `None`, `bool`, `int`, `float`, `str` | nil, bool, int, float64, str | `()`/`Option`, `bool`, integers, `f64`, `String` |
//! | `bytes`, `bytearray` | bin | `serde_bytes::ByteBuf` |
//! | `list`, `tuple` (arrive as `list`) | array | `Vec<T>`, tuples (the arguments are one) |
//! | `dict` | map | `HashMap`/`BTreeMap`, structs |
//! | `numpy.ndarray`, CPU `torch.Tensor` (arrive as `numpy.ndarray`) | ext `T` + index; the bytes in the frame's tensor table | `Tensor` |
//!
//! Arrays are not copied: an outgoing one is lent to its tensor, an incoming one is a view of
//! the receive buffer (as pickled calls do, see `distrpc._internal`). Decoding reads what a peer
//! sent, so it is bounded: nesting depth, declared lengths checked against the bytes present,
//! every tensor index checked against the table.

use bytes::Bytes;
use distrpc::{DType, TENSOR_EXT, Tensor};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{
    PyBool, PyByteArray, PyBytes, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple,
};

use crate::buffers::{Lent, held};

/// How deep values may nest, either way (a peer's payload must not exhaust the stack).
const MAX_DEPTH: usize = 128;

/// The wire type of a numpy dtype name.
fn dtype(name: &str) -> PyResult<DType> {
    Ok(match name {
        "float32" => DType::F32,
        "float64" => DType::F64,
        "int32" => DType::I32,
        "int64" => DType::I64,
        "uint8" => DType::U8,
        other => {
            return Err(PyTypeError::new_err(format!(
                "an array of {other} cannot be sent by name: distrpc tensors are float32, \
                 float64, int32, int64 or uint8"
            )));
        }
    })
}

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "float32",
        DType::F64 => "float64",
        DType::I32 => "int32",
        DType::I64 => "int64",
        DType::U8 => "uint8",
    }
}

/// `distrpc._internal.typed_buffer` (an array's `(address, length, owner, dtype, shape)`, a
/// numpy scalar's Python number, or `None`) and `distrpc._internal.array` (a received
/// tensor's numpy array), looked up once.
static TYPED_BUFFER: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static ARRAY: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// Encodes `obj` (the arguments, or a result), its arrays into a tensor table.
pub(crate) fn encode(obj: &Bound<'_, PyAny>) -> PyResult<(Vec<u8>, Vec<Tensor>)> {
    let mut encoder = Encoder {
        out: Vec::with_capacity(64),
        tensors: Vec::new(),
        typed_buffer: TYPED_BUFFER.import(obj.py(), "distrpc._internal", "typed_buffer")?,
    };
    encoder.value(obj, 0)?;
    Ok((encoder.out, encoder.tensors))
}

struct Encoder<'a, 'py> {
    out: Vec<u8>,
    tensors: Vec<Tensor>,
    /// [`TYPED_BUFFER`].
    typed_buffer: &'a Bound<'py, PyAny>,
}

// Writing to a Vec cannot fail: rmp's `Result`s are `Ok` here.
impl Encoder<'_, '_> {
    fn value(&mut self, obj: &Bound<'_, PyAny>, depth: usize) -> PyResult<()> {
        if depth > MAX_DEPTH {
            return Err(PyValueError::new_err(format!(
                "a value nested deeper than {MAX_DEPTH} levels cannot be sent by name"
            )));
        }
        let out = &mut self.out;
        if obj.is_none() {
            rmp::encode::write_nil(out).ok();
        } else if let Ok(b) = obj.cast::<PyBool>() {
            rmp::encode::write_bool(out, b.is_true()).ok();
        } else if obj.is_instance_of::<PyInt>() {
            if let Ok(i) = obj.extract::<i64>() {
                rmp::encode::write_sint(out, i).ok();
            } else if let Ok(u) = obj.extract::<u64>() {
                rmp::encode::write_uint(out, u).ok();
            } else {
                return Err(PyValueError::new_err(format!(
                    "the integer {obj} does not fit in 64 bits"
                )));
            }
        } else if let Ok(f) = obj.cast::<PyFloat>() {
            rmp::encode::write_f64(out, f.value()).ok();
        } else if let Ok(s) = obj.cast::<PyString>() {
            rmp::encode::write_str(out, &s.to_cow()?).ok();
        } else if let Ok(b) = obj.cast::<PyBytes>() {
            rmp::encode::write_bin(out, b.as_bytes()).ok();
        } else if let Ok(b) = obj.cast::<PyByteArray>() {
            rmp::encode::write_bin(out, &b.to_vec()).ok();
        } else if let Ok(list) = obj.cast::<PyList>() {
            rmp::encode::write_array_len(out, len32(list.len())?).ok();
            for item in list.iter() {
                self.value(&item, depth + 1)?;
            }
        } else if let Ok(tuple) = obj.cast::<PyTuple>() {
            rmp::encode::write_array_len(out, len32(tuple.len())?).ok();
            for item in tuple.iter() {
                self.value(&item, depth + 1)?;
            }
        } else if let Ok(dict) = obj.cast::<PyDict>() {
            rmp::encode::write_map_len(out, len32(dict.len())?).ok();
            for (k, v) in dict.iter() {
                self.value(&k, depth + 1)?;
                self.value(&v, depth + 1)?;
            }
        } else {
            self.array(obj, depth)?;
        }
        Ok(())
    }

    /// An array or tensor: into the table, its index in the payload. (A numpy scalar is
    /// written as the Python number it stands for.)
    fn array(&mut self, obj: &Bound<'_, PyAny>, depth: usize) -> PyResult<()> {
        let parts = self.typed_buffer.call1((obj,))?;
        if !parts.is_none() && !parts.is_instance_of::<PyTuple>() {
            return self.value(&parts, depth + 1);
        }
        if parts.is_none() {
            return Err(PyTypeError::new_err(format!(
                "a {} cannot be sent by name: calls by name carry None, bool, int, float, str, \
                 bytes, lists, tuples, dicts and arrays (pass a Python function to send \
                 anything picklable)",
                obj.get_type().name()?
            )));
        }
        let (addr, len, owner, dtype_str, shape): (usize, usize, Py<PyAny>, String, Vec<usize>) =
            parts.extract()?;
        let bytes = Bytes::from_owner(Lent {
            addr,
            len,
            _owner: owner,
        });
        let tensor = Tensor::from_bytes(dtype(&dtype_str)?, shape, bytes)
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        let index = u32::try_from(self.tensors.len())
            .map_err(|_| PyValueError::new_err("too many arrays in one call"))?;
        self.tensors.push(tensor);
        rmp::encode::write_ext_meta(&mut self.out, 4, TENSOR_EXT).ok();
        self.out.extend_from_slice(&index.to_le_bytes());
        Ok(())
    }
}

fn len32(len: usize) -> PyResult<u32> {
    u32::try_from(len).map_err(|_| PyValueError::new_err(format!("{len} items are too many")))
}

/// Decodes a payload a peer sent, its tensors becoming numpy arrays over the receive buffer.
pub(crate) fn decode<'py>(
    py: Python<'py>,
    payload: &[u8],
    tensors: Vec<Tensor>,
) -> PyResult<Bound<'py, PyAny>> {
    let mut decoder = Decoder {
        py,
        input: payload,
        tensors: tensors.into_iter().map(Some).collect(),
    };
    let value = decoder.value(0)?;
    if !decoder.input.is_empty() {
        return Err(malformed(format!(
            "{} bytes after the value",
            decoder.input.len()
        )));
    }
    Ok(value)
}

fn malformed(what: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(format!("malformed MessagePack: {what}"))
}

struct Decoder<'a, 'py> {
    py: Python<'py>,
    input: &'a [u8],
    /// The frame's tensors; each can be taken once.
    tensors: Vec<Option<Tensor>>,
}

impl<'py> Decoder<'_, 'py> {
    fn take(&mut self, n: usize) -> PyResult<&[u8]> {
        if self.input.len() < n {
            return Err(malformed(format!(
                "{n} bytes declared, {} left",
                self.input.len()
            )));
        }
        let (head, rest) = self.input.split_at(n);
        self.input = rest;
        Ok(head)
    }

    fn be<const N: usize>(&mut self) -> PyResult<[u8; N]> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    /// A declared length of `size` bytes, big-endian.
    fn len(&mut self, size: usize) -> PyResult<usize> {
        Ok(match size {
            1 => self.be::<1>()?[0] as usize,
            2 => u16::from_be_bytes(self.be()?) as usize,
            _ => u32::from_be_bytes(self.be()?) as usize,
        })
    }

    fn value(&mut self, depth: usize) -> PyResult<Bound<'py, PyAny>> {
        use rmp::Marker as M;
        if depth > MAX_DEPTH {
            return Err(malformed(format!("nested deeper than {MAX_DEPTH} levels")));
        }
        let py = self.py;
        let marker = M::from_u8(self.be::<1>()?[0]);
        Ok(match marker {
            M::Null => py.None().into_bound(py),
            M::True => PyBool::new(py, true).to_owned().into_any(),
            M::False => PyBool::new(py, false).to_owned().into_any(),
            M::FixPos(n) => n.into_pyobject(py)?.into_any(),
            M::FixNeg(n) => n.into_pyobject(py)?.into_any(),
            M::U8 => self.be::<1>()?[0].into_pyobject(py)?.into_any(),
            M::U16 => u16::from_be_bytes(self.be()?).into_pyobject(py)?.into_any(),
            M::U32 => u32::from_be_bytes(self.be()?).into_pyobject(py)?.into_any(),
            M::U64 => u64::from_be_bytes(self.be()?).into_pyobject(py)?.into_any(),
            M::I8 => i8::from_be_bytes(self.be()?).into_pyobject(py)?.into_any(),
            M::I16 => i16::from_be_bytes(self.be()?).into_pyobject(py)?.into_any(),
            M::I32 => i32::from_be_bytes(self.be()?).into_pyobject(py)?.into_any(),
            M::I64 => i64::from_be_bytes(self.be()?).into_pyobject(py)?.into_any(),
            M::F32 => f64::from(f32::from_be_bytes(self.be()?))
                .into_pyobject(py)?
                .into_any(),
            M::F64 => f64::from_be_bytes(self.be()?).into_pyobject(py)?.into_any(),
            M::FixStr(n) => self.str(n as usize)?,
            M::Str8 => self.sized(1, Self::str)?,
            M::Str16 => self.sized(2, Self::str)?,
            M::Str32 => self.sized(4, Self::str)?,
            M::Bin8 => self.sized(1, Self::bin)?,
            M::Bin16 => self.sized(2, Self::bin)?,
            M::Bin32 => self.sized(4, Self::bin)?,
            M::FixArray(n) => self.array(n as usize, depth)?,
            M::Array16 => self.sized(2, |d, n| d.array(n, depth))?,
            M::Array32 => self.sized(4, |d, n| d.array(n, depth))?,
            M::FixMap(n) => self.map(n as usize, depth)?,
            M::Map16 => self.sized(2, |d, n| d.map(n, depth))?,
            M::Map32 => self.sized(4, |d, n| d.map(n, depth))?,
            M::FixExt1 => self.ext(1)?,
            M::FixExt2 => self.ext(2)?,
            M::FixExt4 => self.ext(4)?,
            M::FixExt8 => self.ext(8)?,
            M::FixExt16 => self.ext(16)?,
            M::Ext8 => self.sized(1, Self::ext)?,
            M::Ext16 => self.sized(2, Self::ext)?,
            M::Ext32 => self.sized(4, Self::ext)?,
            M::Reserved => return Err(malformed("the reserved marker 0xc1")),
        })
    }

    /// Reads a length of `size` bytes, then what `read` makes of that many.
    fn sized(
        &mut self,
        size: usize,
        read: impl FnOnce(&mut Self, usize) -> PyResult<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let n = self.len(size)?;
        read(self, n)
    }

    fn str(&mut self, n: usize) -> PyResult<Bound<'py, PyAny>> {
        let py = self.py;
        let text = std::str::from_utf8(self.take(n)?).map_err(malformed)?;
        Ok(PyString::new(py, text).into_any())
    }

    fn bin(&mut self, n: usize) -> PyResult<Bound<'py, PyAny>> {
        let py = self.py;
        Ok(PyBytes::new(py, self.take(n)?).into_any())
    }

    fn array(&mut self, n: usize, depth: usize) -> PyResult<Bound<'py, PyAny>> {
        // Not allocated by the declared length: every item takes at least a byte, so a length
        // past what arrived fails as soon as the bytes run out.
        let list = PyList::empty(self.py);
        for _ in 0..n {
            list.append(self.value(depth + 1)?)?;
        }
        Ok(list.into_any())
    }

    fn map(&mut self, n: usize, depth: usize) -> PyResult<Bound<'py, PyAny>> {
        let dict = PyDict::new(self.py);
        for _ in 0..n {
            let key = self.value(depth + 1)?;
            let value = self.value(depth + 1)?;
            dict.set_item(key, value)?;
        }
        Ok(dict.into_any())
    }

    /// An extension value of `n` bytes: only tensor references are known.
    fn ext(&mut self, n: usize) -> PyResult<Bound<'py, PyAny>> {
        let kind = i8::from_be_bytes(self.be()?);
        let data = self.take(n)?;
        let index: [u8; 4] = match (kind, data.try_into()) {
            (TENSOR_EXT, Ok(index)) => index,
            (TENSOR_EXT, Err(_)) => {
                return Err(malformed(format!("a tensor reference of {n} bytes")));
            }
            (other, _) => return Err(malformed(format!("unknown extension type {other}"))),
        };
        let index = u32::from_le_bytes(index) as usize;
        let tensor = self
            .tensors
            .get_mut(index)
            .and_then(Option::take)
            .ok_or_else(|| {
                malformed(format!(
                    "tensor {index} is missing or used twice ({} in the frame)",
                    self.tensors.len()
                ))
            })?;
        let py = self.py;
        let (dtype, shape) = (dtype_name(tensor.dtype()), tensor.shape().to_vec());
        let array = ARRAY.import(py, "distrpc._internal", "array")?;
        let (addr, len, owner) = held(py, vec![tensor])?.remove(0);
        array.call1((addr, len, owner, dtype, shape))
    }
}
