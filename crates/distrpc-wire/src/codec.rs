//! Serde encoding of call arguments and results, with tensors moved into a side table.
//!
//! This is torch's RPC pickler (`_thread_local_tensor_tables`, `_tensor_reducer`): while
//! [`encode`] runs, serializing a [`Tensor`] pushes it into the message's tensor table and writes
//! only its index, as a MessagePack extension value of type [`TENSOR_EXT`] holding the index as a
//! little-endian `u32`. [`decode`] resolves those indices against the tensors that arrived beside
//! the payload. Outside [`encode`]/[`decode`] a tensor serializes inline (dtype, shape, bytes).
//!
//! The payload format is MessagePack with structs written as maps, so that a Python peer can
//! read it without the Rust types.

use std::cell::RefCell;

use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::tensor::{DType, Tensor};

/// MessagePack extension type code of a tensor reference.
pub const TENSOR_EXT: i8 = 0x54; // 'T'

/// Why a value could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// Serialization failed.
    #[error("encode: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    /// The payload does not decode as the expected type.
    #[error("decode: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
}

thread_local! {
    /// The tensor table of the message being encoded on this thread, if any.
    static ENCODE_TABLE: RefCell<Option<Vec<Tensor>>> = const { RefCell::new(None) };
    /// The tensors of the message being decoded on this thread, if any.
    static DECODE_TABLE: RefCell<Option<Vec<Tensor>>> = const { RefCell::new(None) };
}

/// Restores a thread-local table to what it held before, even if serde panics.
struct Restore<'a> {
    slot: &'static std::thread::LocalKey<RefCell<Option<Vec<Tensor>>>>,
    previous: Option<Option<Vec<Tensor>>>,
    taken: &'a mut Option<Vec<Tensor>>,
}

impl Drop for Restore<'_> {
    fn drop(&mut self) {
        let previous = self.previous.take().unwrap_or_default();
        *self.taken = self.slot.with(|s| s.replace(previous));
    }
}

fn with_table<R>(
    slot: &'static std::thread::LocalKey<RefCell<Option<Vec<Tensor>>>>,
    table: Option<Vec<Tensor>>,
    taken: &mut Option<Vec<Tensor>>,
    f: impl FnOnce() -> R,
) -> R {
    let previous = slot.with(|s| s.replace(table));
    let _restore = Restore {
        slot,
        previous: Some(previous),
        taken,
    };
    f()
}

/// Encodes `value` into `out` and returns the tensors it refers to, in table order.
///
/// ```
/// use distrpc_wire::{Tensor, decode, encode};
///
/// let args = (Tensor::from_slice(&[1.0f32, 2.0]), "label".to_string());
/// let mut payload = Vec::new();
/// let tensors = encode(&args, &mut payload).unwrap();
/// assert_eq!(tensors.len(), 1); // the tensor went to the side table
/// let back: (Tensor, String) = decode(&payload, tensors).unwrap();
/// assert_eq!(back, args);
/// ```
pub fn encode<T: Serialize + ?Sized>(
    value: &T,
    out: &mut Vec<u8>,
) -> Result<Vec<Tensor>, CodecError> {
    let mut taken = None;
    let result = with_table(&ENCODE_TABLE, Some(Vec::new()), &mut taken, || {
        value.serialize(&mut rmp_serde::Serializer::new(&mut *out).with_struct_map())
    });
    result?;
    Ok(taken.unwrap_or_default())
}

/// Encodes `value` with every tensor inline, even inside an RPC encode.
pub fn encode_inline<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::new();
    let mut taken = None;
    let result = with_table(&ENCODE_TABLE, None, &mut taken, || {
        value.serialize(&mut rmp_serde::Serializer::new(&mut out).with_struct_map())
    });
    result?;
    Ok(out)
}

/// Decodes a value from `payload`, resolving tensor references against `tensors`.
pub fn decode<T: DeserializeOwned>(payload: &[u8], tensors: Vec<Tensor>) -> Result<T, CodecError> {
    let mut taken = None;
    with_table(&DECODE_TABLE, Some(tensors), &mut taken, || {
        Ok(rmp_serde::from_slice(payload)?)
    })
}

/// Decodes a value whose tensors are inline (see [`encode_inline`]).
pub fn decode_inline<T: DeserializeOwned>(payload: &[u8]) -> Result<T, CodecError> {
    let mut taken = None;
    with_table(&DECODE_TABLE, None, &mut taken, || {
        Ok(rmp_serde::from_slice(payload)?)
    })
}

/// Pushes `tensor` into the current encode's table and returns its index, or `None` when no
/// RPC encode is running on this thread.
pub(crate) fn push_tensor(tensor: &Tensor) -> Option<u32> {
    ENCODE_TABLE.with(|t| {
        let mut t = t.borrow_mut();
        let table = t.as_mut()?;
        let index = u32::try_from(table.len()).ok()?;
        table.push(tensor.clone());
        Some(index)
    })
}

/// Whether a decode with a tensor table is running on this thread.
pub(crate) fn decoding_with_table() -> bool {
    DECODE_TABLE.with(|t| t.borrow().is_some())
}

/// The tensor at `index` of the current decode's table.
pub(crate) fn take_tensor(index: u32) -> Result<Tensor, String> {
    DECODE_TABLE.with(|t| {
        let t = t.borrow();
        let table = t.as_ref().ok_or("no tensor table")?;
        table.get(index as usize).cloned().ok_or_else(|| {
            format!(
                "tensor index {index} out of range (message has {} tensors)",
                table.len()
            )
        })
    })
}

#[derive(Serialize, Deserialize)]
#[serde(rename = "_ExtStruct")]
struct Ext((i8, serde_bytes::ByteBuf));

pub(crate) fn serialize_tensor_ref<S: Serializer>(index: u32, s: S) -> Result<S::Ok, S::Error> {
    Ext((
        TENSOR_EXT,
        serde_bytes::ByteBuf::from(index.to_le_bytes().to_vec()),
    ))
    .serialize(s)
}

pub(crate) fn deserialize_tensor_ref<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let Ext((tag, bytes)) = Ext::deserialize(d)?;
    if tag != TENSOR_EXT {
        return Err(D::Error::custom(format!(
            "expected a tensor reference (ext type {TENSOR_EXT}), found ext type {tag}"
        )));
    }
    let bytes: [u8; 4] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| D::Error::custom("tensor reference of the wrong length"))?;
    Ok(u32::from_le_bytes(bytes))
}

// How a tensor serializes lives here, with the table it goes to: the tensor type itself knows
// nothing of encoding.

/// How a tensor is written when it is serialized outside an RPC message (no tensor table).
#[derive(Serialize, Deserialize)]
struct InlineTensor {
    dtype: DType,
    shape: Vec<usize>,
    #[serde(with = "serde_bytes")]
    data: Vec<u8>,
}

impl Serialize for Tensor {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match push_tensor(self) {
            Some(index) => serialize_tensor_ref(index, serializer),
            None => InlineTensor {
                dtype: self.dtype(),
                shape: self.shape().to_vec(),
                data: self.data().to_vec(),
            }
            .serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for Tensor {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if decoding_with_table() {
            let index = deserialize_tensor_ref(deserializer)?;
            take_tensor(index).map_err(D::Error::custom)
        } else {
            let t = InlineTensor::deserialize(deserializer)?;
            Tensor::from_bytes(t.dtype, t.shape, bytes::Bytes::from(t.data))
                .map_err(D::Error::custom)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct Batch {
        inputs: Vec<Tensor>,
        labels: BTreeMap<String, Tensor>,
        step: u64,
    }

    #[test]
    fn nested_tensors_go_to_the_table() {
        let batch = Batch {
            inputs: vec![Tensor::from_slice(&[1i64, 2]), Tensor::scalar(3.5f64)],
            labels: [("y".to_string(), Tensor::from_slice(&[0u8; 5]))].into(),
            step: 9,
        };
        let mut payload = Vec::new();
        let tensors = encode(&batch, &mut payload).unwrap();
        assert_eq!(tensors.len(), 3);
        assert!(
            payload.len() < 64,
            "tensor bytes must not be in the payload"
        );
        let back: Batch = decode(&payload, tensors).unwrap();
        assert_eq!(back, batch);
    }

    #[test]
    fn inline_encoding_round_trips_outside_rpc() {
        let t = Tensor::from_slice(&[1.0f32, -2.0]);
        let bytes = encode_inline(&t).unwrap();
        let back: Tensor = decode_inline(&bytes).unwrap();
        assert_eq!(back, t);
    }

    #[test]
    fn bad_tensor_index_is_an_error_not_a_panic() {
        let mut payload = Vec::new();
        let tensors = encode(&Tensor::scalar(1i32), &mut payload).unwrap();
        assert_eq!(tensors.len(), 1);
        let err = decode::<Tensor>(&payload, Vec::new()).unwrap_err();
        assert!(err.to_string().contains("out of range"), "{err}");
    }

    #[test]
    fn wrong_types_are_an_error() {
        let mut payload = Vec::new();
        let tensors = encode(&("a", 1u8), &mut payload).unwrap();
        assert!(decode::<(u64, u64)>(&payload, tensors).is_err());
    }
}
