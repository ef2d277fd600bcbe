//! [`Tensor`]: a dtype, a shape and contiguous storage in [`Bytes`].
//!
//! Storage is always aligned to the dtype, so [`Tensor::as_slice`] and [`Tensor::view`] never copy.
//! A tensor received in a frame is a slice of the receive buffer; a tensor built from a `Vec` or an
//! `ndarray` array owns that allocation; cloning a tensor shares its storage.

use std::fmt;

use bytes::Bytes;
use ndarray::{Array, ArrayViewD, Dimension, IxDyn};
use serde::{Deserialize, Serialize};

/// The element type of a [`Tensor`]. The discriminants are the wire codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u8)]
pub enum DType {
    /// 32-bit float (`torch.float32`).
    F32 = 1,
    /// 64-bit float (`torch.float64`).
    F64 = 2,
    /// 32-bit signed integer (`torch.int32`).
    I32 = 3,
    /// 64-bit signed integer (`torch.int64`).
    I64 = 4,
    /// Unsigned byte (`torch.uint8`).
    U8 = 5,
}

impl DType {
    /// Size of one element in bytes.
    pub const fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F64 | DType::I64 => 8,
            DType::U8 => 1,
        }
    }

    /// The dtype with wire code `code`, if there is one.
    pub const fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => DType::F32,
            2 => DType::F64,
            3 => DType::I32,
            4 => DType::I64,
            5 => DType::U8,
            _ => return None,
        })
    }

    /// Lowercase name, as torch prints it (`float32`, `int64`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F64 => "float64",
            DType::I32 => "int32",
            DType::I64 => "int64",
            DType::U8 => "uint8",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

mod sealed {
    pub trait Sealed {}
}

/// A Rust type that can be the element of a [`Tensor`].
pub trait Element: bytemuck::Pod + Send + Sync + sealed::Sealed {
    /// The dtype for this element type.
    const DTYPE: DType;
}

macro_rules! element {
    ($($t:ty => $d:ident),*) => {$(
        impl sealed::Sealed for $t {}
        impl Element for $t { const DTYPE: DType = DType::$d; }
    )*};
}
element!(f32 => F32, f64 => F64, i32 => I32, i64 => I64, u8 => U8);

/// Why a tensor could not be built or used as asked.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TensorError {
    /// The element type asked for is not the tensor's dtype.
    #[error("tensor has dtype {actual}, not {expected}")]
    DType {
        /// The dtype asked for.
        expected: DType,
        /// The tensor's dtype.
        actual: DType,
    },
    /// The storage length does not match the shape and dtype.
    #[error("shape {shape:?} of {dtype} needs {needed:?} bytes, storage has {actual}")]
    Length {
        /// The shape.
        shape: Vec<usize>,
        /// The dtype.
        dtype: DType,
        /// Bytes the shape needs (`None` if it overflows).
        needed: Option<usize>,
        /// Bytes the storage has.
        actual: usize,
    },
    /// Two tensors cannot be combined.
    #[error("{op}: {reason}")]
    Op {
        /// The operation (`add`, `matmul`, ...).
        op: &'static str,
        /// What was wrong.
        reason: String,
    },
}

/// A dense, contiguous, row-major tensor.
///
/// ```
/// use distrpc_wire::{DType, Tensor};
///
/// let t = Tensor::from_vec(vec![2, 2], vec![1.0f32, 2.0, 3.0, 4.0]).unwrap();
/// assert_eq!(t.dtype(), DType::F32);
/// assert_eq!(t.as_slice::<f32>().unwrap(), &[1.0, 2.0, 3.0, 4.0]);
/// let view = t.view::<f32>().unwrap(); // an ndarray view of the same memory
/// assert_eq!(view[[1, 0]], 3.0);
/// ```
#[derive(Clone, PartialEq)]
pub struct Tensor {
    dtype: DType,
    shape: Vec<usize>,
    data: Bytes,
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tensor({}, {:?}", self.dtype, self.shape)?;
        if self.numel() <= 8 {
            match self.dtype {
                DType::F32 => write!(f, ", {:?}", self.cast::<f32>())?,
                DType::F64 => write!(f, ", {:?}", self.cast::<f64>())?,
                DType::I32 => write!(f, ", {:?}", self.cast::<i32>())?,
                DType::I64 => write!(f, ", {:?}", self.cast::<i64>())?,
                DType::U8 => write!(f, ", {:?}", &self.data[..])?,
            }
        }
        f.write_str(")")
    }
}

/// Bytes needed for `shape` of `dtype`, or `None` on overflow.
pub fn byte_len(dtype: DType, shape: &[usize]) -> Option<usize> {
    shape
        .iter()
        .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
}

/// Owns a `Vec<T>` and shows it as bytes, so that it can back [`Bytes`] without a copy.
struct VecBytes<T>(Vec<T>);

impl<T: Element> AsRef<[u8]> for VecBytes<T> {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(&self.0)
    }
}

impl Tensor {
    /// A tensor from raw storage. Storage that is not aligned to the dtype is copied once into an
    /// aligned allocation (this happens only for tensors decoded inline from a payload).
    pub fn from_bytes(dtype: DType, shape: Vec<usize>, data: Bytes) -> Result<Self, TensorError> {
        let needed = byte_len(dtype, &shape);
        if needed != Some(data.len()) {
            return Err(TensorError::Length {
                shape,
                dtype,
                needed,
                actual: data.len(),
            });
        }
        let data = if (data.as_ptr() as usize).is_multiple_of(dtype.size()) {
            data
        } else {
            let mut buf = crate::aligned::AlignedBuf::zeroed(data.len());
            buf.as_mut_slice().copy_from_slice(&data);
            buf.freeze()
        };
        Ok(Self { dtype, shape, data })
    }

    /// A tensor that takes ownership of `values` (no copy).
    pub fn from_vec<T: Element>(shape: Vec<usize>, values: Vec<T>) -> Result<Self, TensorError> {
        let data = Bytes::from_owner(VecBytes(values));
        Self::from_bytes(T::DTYPE, shape, data)
    }

    /// A 1-D tensor copied from `values`.
    pub fn from_slice<T: Element>(values: &[T]) -> Self {
        Self {
            dtype: T::DTYPE,
            shape: vec![values.len()],
            data: Bytes::from_owner(VecBytes(values.to_vec())),
        }
    }

    /// A 0-dimensional tensor holding `value`.
    pub fn scalar<T: Element>(value: T) -> Self {
        Self {
            dtype: T::DTYPE,
            shape: Vec::new(),
            data: Bytes::from_owner(VecBytes(vec![value])),
        }
    }

    /// A tensor of `shape` filled with `value`.
    pub fn full<T: Element>(shape: Vec<usize>, value: T) -> Result<Self, TensorError> {
        let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let Some(n) = n.filter(|n| n.checked_mul(T::DTYPE.size()).is_some()) else {
            return Err(TensorError::Length {
                shape,
                dtype: T::DTYPE,
                needed: None,
                actual: 0,
            });
        };
        Self::from_vec(shape, vec![value; n])
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The shape (empty for a scalar).
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The storage, shared.
    pub fn data(&self) -> &Bytes {
        &self.data
    }

    /// The elements, without a copy.
    pub fn as_slice<T: Element>(&self) -> Result<&[T], TensorError> {
        if T::DTYPE != self.dtype {
            return Err(TensorError::DType {
                expected: T::DTYPE,
                actual: self.dtype,
            });
        }
        Ok(self.cast())
    }

    fn cast<T: Element>(&self) -> &[T] {
        // Storage is aligned to the dtype and its length matches the shape (checked in
        // `from_bytes`, the only constructor that takes foreign bytes), so this cannot fail.
        bytemuck::try_cast_slice(&self.data).unwrap_or(&[])
    }

    /// An `ndarray` view of the tensor, without a copy.
    pub fn view<T: Element>(&self) -> Result<ArrayViewD<'_, T>, TensorError> {
        let slice = self.as_slice::<T>()?;
        ArrayViewD::from_shape(IxDyn(&self.shape), slice).map_err(|e| TensorError::Op {
            op: "view",
            reason: e.to_string(),
        })
    }

    /// The tensor reshaped (same storage, no copy).
    pub fn reshape(&self, shape: Vec<usize>) -> Result<Self, TensorError> {
        Self::from_bytes(self.dtype, shape, self.data.clone())
    }
}

impl<T: Element, D: Dimension> From<Array<T, D>> for Tensor {
    /// Takes the array's allocation when it is in standard layout; otherwise copies it once into
    /// standard layout.
    fn from(array: Array<T, D>) -> Self {
        let shape = array.shape().to_vec();
        let array = if array.is_standard_layout() {
            array
        } else {
            array.as_standard_layout().into_owned()
        };
        let (mut values, offset) = array.into_raw_vec_and_offset();
        if let Some(offset) = offset.filter(|&o| o > 0) {
            values.drain(..offset);
        }
        values.truncate(shape.iter().product());
        Self {
            dtype: T::DTYPE,
            data: Bytes::from_owner(VecBytes(values)),
            shape,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array2, array};

    #[test]
    fn ndarray_round_trip_shares_the_allocation() {
        let a: Array2<f64> = array![[1.0, 2.0], [3.0, 4.0]];
        let ptr = a.as_ptr() as usize;
        let t = Tensor::from(a);
        assert_eq!(t.data().as_ptr() as usize, ptr, "from(Array) must not copy");
        let v = t.view::<f64>().unwrap();
        assert_eq!(v.as_ptr() as usize, ptr, "view must not copy");
        assert_eq!(v[[1, 1]], 4.0);
    }

    #[test]
    fn transposed_array_is_copied_to_standard_layout() {
        let a: Array2<i64> = array![[1, 2, 3], [4, 5, 6]];
        let t = Tensor::from(a.reversed_axes());
        assert_eq!(t.shape(), &[3, 2]);
        assert_eq!(t.as_slice::<i64>().unwrap(), &[1, 4, 2, 5, 3, 6]);
    }

    #[test]
    fn wrong_dtype_and_length_are_errors() {
        let t = Tensor::from_slice(&[1.0f32, 2.0]);
        assert!(matches!(
            t.as_slice::<f64>(),
            Err(TensorError::DType { .. })
        ));
        let e = Tensor::from_bytes(DType::F32, vec![3], Bytes::from_static(&[0; 8]));
        assert!(matches!(e, Err(TensorError::Length { .. })));
        let huge = Tensor::from_bytes(DType::F64, vec![usize::MAX, 2], Bytes::new());
        assert!(matches!(
            huge,
            Err(TensorError::Length { needed: None, .. })
        ));
    }

    #[test]
    fn misaligned_bytes_are_realigned() {
        let backing = Bytes::from(vec![0u8; 17]);
        let t = Tensor::from_bytes(DType::F64, vec![2], backing.slice(1..)).unwrap();
        assert_eq!(t.as_slice::<f64>().unwrap(), &[0.0, 0.0]);
    }
}
