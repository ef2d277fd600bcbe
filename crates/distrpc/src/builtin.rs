//! Builtin tensor functions, registered on every worker under torch's `aten::` names.
//!
//! ```no_run
//! # fn demo(rpc: &distrpc::Rpc) -> Result<(), distrpc::Error> {
//! use distrpc::{DType, Tensor, builtin};
//!
//! let a = rpc.rpc_sync("worker1", builtin::ones, (vec![2, 2], DType::F32))?;
//! let b = rpc.rpc_sync("worker1", builtin::add, (a.clone(), a))?;
//! assert_eq!(b.as_slice::<f32>()?, &[2.0; 4]);
//! # Ok(()) }
//! ```

use distrpc_wire::ops;

use crate::tensor::{DType, Tensor, TensorError};

/// `aten::add`: `a + b`, broadcasting.
#[crate::function(name = "aten::add")]
pub fn add(a: Tensor, b: Tensor) -> Result<Tensor, TensorError> {
    ops::add(&a, &b)
}

/// `aten::sub`: `a - b`, broadcasting.
#[crate::function(name = "aten::sub")]
pub fn sub(a: Tensor, b: Tensor) -> Result<Tensor, TensorError> {
    ops::sub(&a, &b)
}

/// `aten::mul`: `a * b`, broadcasting.
#[crate::function(name = "aten::mul")]
pub fn mul(a: Tensor, b: Tensor) -> Result<Tensor, TensorError> {
    ops::mul(&a, &b)
}

/// `aten::div`: `a / b`, broadcasting (true division: integers give `float32`).
#[crate::function(name = "aten::div")]
pub fn div(a: Tensor, b: Tensor) -> Result<Tensor, TensorError> {
    ops::div(&a, &b)
}

/// `aten::matmul`: matrix product of 1-D and 2-D tensors.
#[crate::function(name = "aten::matmul")]
pub fn matmul(a: Tensor, b: Tensor) -> Result<Tensor, TensorError> {
    ops::matmul(&a, &b)
}

/// `aten::sum`: the sum of all elements, as a 0-dimensional tensor.
#[crate::function(name = "aten::sum")]
pub fn sum(a: Tensor) -> Result<Tensor, TensorError> {
    ops::sum(&a)
}

/// `aten::neg`: `-a`.
#[crate::function(name = "aten::neg")]
pub fn neg(a: Tensor) -> Result<Tensor, TensorError> {
    ops::neg(&a)
}

/// `aten::ones`: a tensor of the given shape and dtype filled with ones.
#[crate::function(name = "aten::ones")]
pub fn ones(shape: Vec<usize>, dtype: DType) -> Result<Tensor, TensorError> {
    ops::ones(shape, dtype)
}

/// `aten::zeros`: a tensor of the given shape and dtype filled with zeros.
#[crate::function(name = "aten::zeros")]
pub fn zeros(shape: Vec<usize>, dtype: DType) -> Result<Tensor, TensorError> {
    ops::zeros(shape, dtype)
}

/// `aten::rand`: uniform values in `[0, 1)` (floating dtypes only, like torch).
#[crate::function(name = "aten::rand")]
pub fn rand(shape: Vec<usize>, dtype: DType) -> Result<Tensor, TensorError> {
    ops::rand(shape, dtype)
}
