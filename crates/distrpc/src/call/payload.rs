//! The payload of a call: a head (the function's name, length-prefixed) and the encoded
//! arguments, after an optional prefix that the layer sending it owns (a remote reference's
//! ids, for `remote()` and method calls).
//!
//! ```text
//!  [prefix: 12-byte ids, as the message kind and flags say] [u16 name length] [name] [args]
//! ```

use bytes::Bytes;
use distrpc_wire::Tensor;

use crate::error::Error;

/// Appends the call head (the function name, length-prefixed) to `out`.
fn put_call_head(out: &mut Vec<u8>, function: &str) -> Result<(), Error> {
    let len = u16::try_from(function.len()).map_err(|_| {
        Error::InvalidArgument(format!(
            "function name of {} bytes is too long",
            function.len()
        ))
    })?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(function.as_bytes());
    Ok(())
}

/// Encodes a call payload in one pass: `prefix`, the call head, then the arguments (whose
/// tensors `encode_args` returns, for the frame's table). The inverse of [`parse_call_head`]
/// after the prefix.
pub(crate) fn encode_call<E: std::fmt::Display>(
    prefix: &[u8],
    function: &str,
    encode_args: impl FnOnce(&mut Vec<u8>) -> Result<Vec<Tensor>, E>,
) -> Result<(Vec<u8>, Vec<Tensor>), Error> {
    let mut payload = Vec::with_capacity(64 + prefix.len() + function.len());
    payload.extend_from_slice(prefix);
    put_call_head(&mut payload, function)?;
    let tensors = encode_args(&mut payload).map_err(|e| Error::Encode {
        function: function.to_string(),
        what: "arguments",
        message: e.to_string(),
    })?;
    Ok((payload, tensors))
}

/// Splits a call head from its arguments: the function's name (checked to be UTF-8) and the
/// encoded arguments. `None` if malformed.
pub(crate) fn parse_call_head(payload: &Bytes) -> Option<(Bytes, Bytes)> {
    let (len, rest) = payload.split_first_chunk::<2>()?;
    let len = u16::from_le_bytes(*len) as usize;
    std::str::from_utf8(rest.get(..len)?).ok()?;
    Some((payload.slice(2..2 + len), payload.slice(2 + len..)))
}

/// A name [`parse_call_head`] checked.
pub(crate) fn name_str(name: &[u8]) -> &str {
    std::str::from_utf8(name).unwrap_or("<invalid>")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_head_round_trips_after_its_prefix() {
        let (payload, tensors) = encode_call(&[7; 12], "m::f", |out| {
            out.extend_from_slice(b"args");
            Ok::<_, String>(Vec::new())
        })
        .unwrap();
        assert!(tensors.is_empty());
        let payload = Bytes::from(payload).slice(12..);
        let (name, args) = parse_call_head(&payload).unwrap();
        assert_eq!((&name[..], &args[..]), (&b"m::f"[..], &b"args"[..]));
        assert!(parse_call_head(&Bytes::from_static(&[9, 0, b'a'])).is_none());
    }
}
