//! Tensor arithmetic behind distrpc's builtin functions (`aten::add`, `aten::matmul`, ...).
//!
//! Elementwise operations broadcast like torch (and numpy). Both operands must have the same
//! dtype: distrpc does not promote types, it says which dtypes it got.
//!
//! A result is refused, with an error, when it would have more than [`max_elements`]
//! elements (a `[1, N]` + `[N, 1]` broadcast asks for N², from two small arguments) or when
//! its memory cannot be had: a caller's numbers never abort the worker.

use std::cell::Cell;
use std::ops::{Add, Div, Mul, Neg, Sub};
use std::sync::atomic::{AtomicUsize, Ordering};

use bytemuck::Zeroable;
use ndarray::{ArrayD, ArrayView1, ArrayView2, ArrayViewD, Ix1, Ix2, IxDyn};

use crate::tensor::{DType, Element, Tensor, TensorError};

fn op_err(op: &'static str, reason: impl Into<String>) -> TensorError {
    TensorError::Op {
        op,
        reason: reason.into(),
    }
}

/// The default of [`max_elements`]: 2^28 elements (1 GiB of `float32`).
pub const DEFAULT_MAX_ELEMENTS: usize = 1 << 28;

static MAX_ELEMENTS: AtomicUsize = AtomicUsize::new(DEFAULT_MAX_ELEMENTS);

/// The most elements a result of these operations may have, in this process.
pub fn max_elements() -> usize {
    MAX_ELEMENTS.load(Ordering::Relaxed)
}

/// Sets [`max_elements`] for this process (distrpc's `RpcOptions::max_builtin_elements`).
///
/// ```
/// use distrpc_wire::{DType, ops};
/// let before = ops::max_elements();
/// ops::set_max_elements(100);
/// assert!(ops::ones(vec![10, 11], DType::F32).is_err());
/// assert!(ops::ones(vec![10, 10], DType::F32).is_ok());
/// ops::set_max_elements(before);
/// ```
pub fn set_max_elements(n: usize) {
    MAX_ELEMENTS.store(n, Ordering::Relaxed);
}

/// The number of elements of a result of `shape`, if it is allowed.
fn elements(op: &'static str, shape: &[usize]) -> Result<usize, TensorError> {
    let limit = max_elements();
    match shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) {
        Some(n) if n <= limit => Ok(n),
        _ => Err(op_err(
            op,
            format!("a result of shape {shape:?} has more than the limit of {limit} elements"),
        )),
    }
}

/// `n` copies of `value`, or an error if the memory cannot be had.
fn filled<T: Clone>(op: &'static str, n: usize, value: T) -> Result<Vec<T>, TensorError> {
    let mut v = Vec::new();
    v.try_reserve_exact(n)
        .map_err(|e| op_err(op, format!("cannot allocate {n} elements: {e}")))?;
    v.resize(n, value);
    Ok(v)
}

fn same_dtype(op: &'static str, a: &Tensor, b: &Tensor) -> Result<DType, TensorError> {
    if a.dtype() == b.dtype() {
        Ok(a.dtype())
    } else {
        Err(op_err(
            op,
            format!("dtypes differ: {} and {}", a.dtype(), b.dtype()),
        ))
    }
}

/// Runs `$body` with `$t` bound to the Rust element type of `$dtype` (f32, f64, i64, i32).
macro_rules! numeric {
    ($op:expr, $dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $t = f32;
                $body
            }
            DType::F64 => {
                type $t = f64;
                $body
            }
            DType::I64 => {
                type $t = i64;
                $body
            }
            DType::I32 => {
                type $t = i32;
                $body
            }
            other => Err(op_err($op, format!("dtype {other} is not supported"))),
        }
    };
}

fn broadcast<T, F>(op: &'static str, a: &Tensor, b: &Tensor, f: F) -> Result<Tensor, TensorError>
where
    T: Element,
    F: Fn(T, T) -> T,
{
    let (va, vb) = (a.view::<T>()?, b.view::<T>()?);
    let shape = broadcast_shape(a.shape(), b.shape()).ok_or_else(|| {
        op_err(
            op,
            format!(
                "shapes {:?} and {:?} do not broadcast",
                a.shape(),
                b.shape()
            ),
        )
    })?;
    let n = elements(op, &shape)?;
    let (Some(va), Some(vb)) = (va.broadcast(shape.clone()), vb.broadcast(shape.clone())) else {
        return Err(op_err(op, "broadcast failed"));
    };
    let mut out = ArrayD::<T>::from_shape_vec(IxDyn(&shape), filled(op, n, T::zeroed())?)
        .map_err(|e| op_err(op, e.to_string()))?;
    ndarray::Zip::from(&mut out)
        .and(&va)
        .and(&vb)
        .for_each(|o, &x, &y| *o = f(x, y));
    Ok(Tensor::from(out))
}

fn broadcast_shape(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let n = a.len().max(b.len());
    let dim = |s: &[usize], i: usize| {
        if i < n - s.len() {
            1
        } else {
            s[i - (n - s.len())]
        }
    };
    (0..n)
        .map(|i| match (dim(a, i), dim(b, i)) {
            (x, y) if x == y => Some(x),
            (1, y) => Some(y),
            (x, 1) => Some(x),
            _ => None,
        })
        .collect()
}

/// `a + b`, broadcasting.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor, TensorError> {
    numeric!("add", same_dtype("add", a, b)?, T => broadcast::<T, _>("add", a, b, |x, y| x + y))
}

/// `a - b`, broadcasting.
pub fn sub(a: &Tensor, b: &Tensor) -> Result<Tensor, TensorError> {
    numeric!("sub", same_dtype("sub", a, b)?, T => broadcast::<T, _>("sub", a, b, |x, y| x - y))
}

/// `a * b`, broadcasting.
pub fn mul(a: &Tensor, b: &Tensor) -> Result<Tensor, TensorError> {
    numeric!("mul", same_dtype("mul", a, b)?, T => broadcast::<T, _>("mul", a, b, |x, y| x * y))
}

/// `a / b`, broadcasting. Like torch, dividing integer tensors is true division and gives
/// `float32`.
pub fn div(a: &Tensor, b: &Tensor) -> Result<Tensor, TensorError> {
    match same_dtype("div", a, b)? {
        DType::F32 => broadcast::<f32, _>("div", a, b, |x, y| x / y),
        DType::F64 => broadcast::<f64, _>("div", a, b, |x, y| x / y),
        DType::I64 => div(
            &cast::<i64, f32>(a, |x| x as f32)?,
            &cast::<i64, f32>(b, |x| x as f32)?,
        ),
        DType::I32 => div(
            &cast::<i32, f32>(a, |x| x as f32)?,
            &cast::<i32, f32>(b, |x| x as f32)?,
        ),
        other => Err(op_err("div", format!("dtype {other} is not supported"))),
    }
}

fn cast<S: Element, T: Element>(t: &Tensor, f: impl Fn(S) -> T) -> Result<Tensor, TensorError> {
    let values = t.as_slice::<S>()?.iter().map(|&x| f(x)).collect();
    Tensor::from_vec(t.shape().to_vec(), values)
}

/// `-a`.
pub fn neg(a: &Tensor) -> Result<Tensor, TensorError> {
    numeric!("neg", a.dtype(), T => cast::<T, T>(a, |x| T::zeroed() - x))
}

/// Sum of all elements, as a 0-dimensional tensor of the same dtype.
pub fn sum(a: &Tensor) -> Result<Tensor, TensorError> {
    numeric!("sum", a.dtype(), T => {
        let s = a.as_slice::<T>()?.iter().fold(T::zeroed(), |acc, &x| acc + x);
        Ok(Tensor::scalar(s))
    })
}

/// Matrix product of 1-D and 2-D tensors, with torch's rules: vector·vector is a scalar,
/// matrix×vector and vector×matrix are vectors, matrix×matrix is a matrix.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor, TensorError> {
    numeric!("matmul", same_dtype("matmul", a, b)?, T => matmul_typed::<T>(a, b))
}

fn matmul_typed<T>(a: &Tensor, b: &Tensor) -> Result<Tensor, TensorError>
where
    T: Element + ndarray::LinalgScalar,
{
    let mismatch = || {
        op_err(
            "matmul",
            format!(
                "shapes {:?} and {:?} cannot be multiplied",
                a.shape(),
                b.shape()
            ),
        )
    };
    let (va, vb) = (a.view::<T>()?, b.view::<T>()?);
    let inner_ok = match (a.shape(), b.shape()) {
        ([k], [k2]) | ([_, k], [k2]) | ([k], [k2, _]) | ([_, k], [k2, _]) => k == k2,
        _ => false,
    };
    if !inner_ok {
        return Err(mismatch());
    }
    let rows = if a.shape().len() == 2 {
        a.shape()[0]
    } else {
        1
    };
    let cols = if b.shape().len() == 2 {
        b.shape()[1]
    } else {
        1
    };
    elements("matmul", &[rows, cols])?;
    fn as1<'a, T>(v: ArrayViewD<'a, T>) -> Option<ArrayView1<'a, T>> {
        v.into_dimensionality::<Ix1>().ok()
    }
    fn as2<'a, T>(v: ArrayViewD<'a, T>) -> Option<ArrayView2<'a, T>> {
        v.into_dimensionality::<Ix2>().ok()
    }
    Ok(match (a.shape().len(), b.shape().len()) {
        (1, 1) => Tensor::scalar(
            as1(va)
                .ok_or_else(mismatch)?
                .dot(&as1(vb).ok_or_else(mismatch)?),
        ),
        (2, 1) => Tensor::from(
            as2(va)
                .ok_or_else(mismatch)?
                .dot(&as1(vb).ok_or_else(mismatch)?),
        ),
        (1, 2) => Tensor::from(
            as1(va)
                .ok_or_else(mismatch)?
                .dot(&as2(vb).ok_or_else(mismatch)?),
        ),
        _ => Tensor::from(
            as2(va)
                .ok_or_else(mismatch)?
                .dot(&as2(vb).ok_or_else(mismatch)?),
        ),
    })
}

/// A tensor of `shape` filled with `value`.
fn full<T: crate::tensor::Element>(
    op: &'static str,
    shape: Vec<usize>,
    value: T,
) -> Result<Tensor, TensorError> {
    let n = elements(op, &shape)?;
    Tensor::from_vec(shape, filled(op, n, value)?)
}

/// A tensor of `shape` filled with ones.
pub fn ones(shape: Vec<usize>, dtype: DType) -> Result<Tensor, TensorError> {
    match dtype {
        DType::F32 => full("ones", shape, 1f32),
        DType::F64 => full("ones", shape, 1f64),
        DType::I64 => full("ones", shape, 1i64),
        DType::I32 => full("ones", shape, 1i32),
        DType::U8 => full("ones", shape, 1u8),
    }
}

/// A tensor of `shape` filled with zeros.
pub fn zeros(shape: Vec<usize>, dtype: DType) -> Result<Tensor, TensorError> {
    match dtype {
        DType::F32 => full("zeros", shape, 0f32),
        DType::F64 => full("zeros", shape, 0f64),
        DType::I64 => full("zeros", shape, 0i64),
        DType::I32 => full("zeros", shape, 0i32),
        DType::U8 => full("zeros", shape, 0u8),
    }
}

thread_local! {
    static RNG: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::thread::current().id()) | 1
}

/// splitmix64: small, fast and good enough for test data and weight initialisation.
fn next_u64() -> u64 {
    RNG.with(|s| {
        let mut z = s.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        s.set(z);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}

/// A tensor of `shape` with values uniform in `[0, 1)`. Like torch's `rand`, only floating
/// dtypes are accepted.
pub fn rand(shape: Vec<usize>, dtype: DType) -> Result<Tensor, TensorError> {
    let unit = || (next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    match dtype {
        DType::F32 | DType::F64 => {}
        other => return Err(op_err("rand", format!("{other} is not a floating dtype"))),
    }
    let n = elements("rand", &shape)?;
    match dtype {
        DType::F32 => {
            let mut v = filled("rand", n, 0f32)?;
            v.iter_mut().for_each(|x| *x = unit() as f32);
            Tensor::from_vec(shape, v)
        }
        _ => {
            let mut v = filled("rand", n, 0f64)?;
            v.iter_mut().for_each(|x| *x = unit());
            Tensor::from_vec(shape, v)
        }
    }
}

macro_rules! operator {
    ($trait:ident, $method:ident, $f:ident) => {
        impl $trait<&Tensor> for &Tensor {
            type Output = Tensor;
            /// # Panics
            /// If the dtypes differ or the shapes do not broadcast; use the function in
            /// [`crate::ops`] to get an error instead.
            fn $method(self, rhs: &Tensor) -> Tensor {
                match $f(self, rhs) {
                    Ok(t) => t,
                    Err(e) => panic!("{e}"),
                }
            }
        }
    };
}
operator!(Add, add, add);
operator!(Sub, sub, sub);
operator!(Mul, mul, mul);
operator!(Div, div, div);

impl Neg for &Tensor {
    type Output = Tensor;
    /// # Panics
    /// If the dtype is not numeric.
    fn neg(self) -> Tensor {
        match neg(self) {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32s(v: &[f32]) -> Tensor {
        Tensor::from_slice(v)
    }

    #[test]
    fn elementwise_ops_broadcast() {
        let m = Tensor::from_vec(vec![2, 2], vec![1.0f32, 2.0, 3.0, 4.0]).unwrap();
        let row = f32s(&[10.0, 20.0]);
        assert_eq!(
            add(&m, &row).unwrap().as_slice::<f32>().unwrap(),
            &[11., 22., 13., 24.]
        );
        assert_eq!((&m - &m).as_slice::<f32>().unwrap(), &[0.0; 4]);
        assert_eq!(
            mul(&m, &Tensor::scalar(2f32))
                .unwrap()
                .as_slice::<f32>()
                .unwrap(),
            &[2., 4., 6., 8.]
        );
        let q = div(
            &Tensor::from_slice(&[3i64, 1]),
            &Tensor::from_slice(&[2i64, 4]),
        )
        .unwrap();
        assert_eq!(q.as_slice::<f32>().unwrap(), &[1.5, 0.25]);
        assert_eq!(
            neg(&Tensor::from_slice(&[1i64, -2]))
                .unwrap()
                .as_slice::<i64>()
                .unwrap(),
            &[-1, 2]
        );
    }

    #[test]
    fn mismatches_are_errors() {
        assert!(add(&f32s(&[1.0]), &Tensor::from_slice(&[1.0f64])).is_err());
        assert!(add(&f32s(&[1.0, 2.0, 3.0]), &f32s(&[1.0, 2.0])).is_err());
        assert!(matmul(&f32s(&[1.0, 2.0]), &f32s(&[1.0])).is_err());
        assert!(rand(vec![2], DType::I64).is_err());
    }

    #[test]
    fn matmul_follows_torch_shapes() {
        let a = Tensor::from_vec(vec![2, 3], vec![1i64, 2, 3, 4, 5, 6]).unwrap();
        let b = Tensor::from_vec(vec![3, 1], vec![1i64, 1, 1]).unwrap();
        let c = matmul(&a, &b).unwrap();
        assert_eq!(c.shape(), &[2, 1]);
        assert_eq!(c.as_slice::<i64>().unwrap(), &[6, 15]);
        let v = Tensor::from_slice(&[1.0f64, 2.0, 3.0]);
        assert_eq!(matmul(&v, &v).unwrap().as_slice::<f64>().unwrap(), &[14.0]);
        assert_eq!(
            matmul(&a, &Tensor::from_slice(&[1i64, 0, 0]))
                .unwrap()
                .shape(),
            &[2]
        );
    }

    #[test]
    fn constructors() {
        assert_eq!(
            sum(&ones(vec![3, 4], DType::F64).unwrap())
                .unwrap()
                .as_slice::<f64>()
                .unwrap(),
            &[12.0]
        );
        assert_eq!(
            zeros(vec![2], DType::I32)
                .unwrap()
                .as_slice::<i32>()
                .unwrap(),
            &[0, 0]
        );
        let r = rand(vec![1000], DType::F32).unwrap();
        assert!(
            r.as_slice::<f32>()
                .unwrap()
                .iter()
                .all(|&x| (0.0..1.0).contains(&x))
        );
    }

    /// Shapes past the limit, and sizes no memory holds, are errors — never an abort:
    /// `ones`/`zeros`/`rand` of a huge shape (or one whose product overflows) and a `[1, N]` +
    /// `[N, 1]` broadcast.
    #[test]
    fn results_past_the_limit_are_errors() {
        let huge = vec![1usize << 20, 1 << 20];
        for r in [
            ones(huge.clone(), DType::F32),
            zeros(huge.clone(), DType::I64),
            rand(huge.clone(), DType::F64),
            ones(vec![usize::MAX, 2], DType::U8),
        ] {
            let e = r.unwrap_err().to_string();
            assert!(e.contains("more than the limit"), "{e}");
        }
        let n = 1usize << 16;
        let row = Tensor::from_vec(vec![1, n], vec![1f32; n]).unwrap();
        let col = Tensor::from_vec(vec![n, 1], vec![1f32; n]).unwrap();
        let e = add(&row, &col).unwrap_err().to_string();
        assert!(e.contains("[65536, 65536]"), "{e}");
        let e = matmul(&col, &row).unwrap_err().to_string();
        assert!(e.contains("more than the limit"), "{e}");
        let e = filled("ones", usize::MAX / 2, 0u8).unwrap_err().to_string();
        assert!(e.contains("cannot allocate"), "{e}");
    }
}
