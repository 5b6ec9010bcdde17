//! Length-delimited framing: a 4-byte big-endian body length followed by a protobuf body.
//!
//! The length is checked against a hard maximum *before* any buffer for the body is allocated, so a peer cannot make
//! either side reserve memory by announcing a huge frame. An incomplete frame is not an error (`Ok(None)`).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;

/// Hard upper bound on a frame body, in bytes, for both directions. Envelope limits are configured below it.
pub const MAX_FRAME_LEN: usize = 256 * 1024;

/// Size of the length prefix.
pub const PREFIX_LEN: usize = 4;

/// Why a frame could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The announced (or encoded) body length exceeds the maximum.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge {
        /// The length announced by the prefix or needed by the message.
        len: usize,
        /// The maximum in force.
        max: usize,
    },
    /// The body is not a valid protobuf message of the expected type.
    #[error("malformed frame: {0}")]
    Malformed(#[from] prost::DecodeError),
}

/// Reads the body length from a length prefix and checks it against `max`.
pub fn body_len(prefix: [u8; PREFIX_LEN], max: usize) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(len)
}

/// Checks whether `buf` starts with a complete frame: `Ok(Some(body_len))` if it does, `Ok(None)` if more bytes are
/// needed, an error if the announced length exceeds `max`.
pub fn check(buf: &[u8], max: usize) -> Result<Option<usize>, FrameError> {
    let Some(prefix) = buf.get(..PREFIX_LEN) else {
        return Ok(None);
    };
    let mut p = [0u8; PREFIX_LEN];
    p.copy_from_slice(prefix);
    let len = body_len(p, max)?;
    Ok((buf.len() - PREFIX_LEN >= len).then_some(len))
}

/// Decodes one frame from the front of `buf`, consuming it; `Ok(None)` if the frame is not complete yet.
pub fn decode<M: Message + Default>(buf: &mut BytesMut, max: usize) -> Result<Option<M>, FrameError> {
    let Some(len) = check(buf, max)? else {
        return Ok(None);
    };
    buf.advance(PREFIX_LEN);
    let body = buf.split_to(len);
    Ok(Some(M::decode(body)?))
}

/// Decodes a frame body (without its prefix).
pub fn decode_body<M: Message + Default>(body: &[u8]) -> Result<M, FrameError> {
    Ok(M::decode(body)?)
}

/// Appends the framed encoding of `msg` to `out`.
pub fn encode_into<M: Message>(msg: &M, out: &mut BytesMut) -> Result<(), FrameError> {
    let len = msg.encoded_len();
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge { len, max: MAX_FRAME_LEN });
    }
    out.reserve(PREFIX_LEN + len);
    // `len` fits in u32: it is at most MAX_FRAME_LEN.
    out.put_u32(len as u32);
    msg.encode(out).map_err(|_| FrameError::TooLarge { len, max: MAX_FRAME_LEN })?;
    Ok(())
}

/// Returns the framed encoding of `msg`.
pub fn encode<M: Message>(msg: &M) -> Result<Bytes, FrameError> {
    let mut out = BytesMut::new();
    encode_into(msg, &mut out)?;
    Ok(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{ClientFrame, Lookup, client_frame::Body};

    fn lookup(phone: &str) -> ClientFrame {
        ClientFrame { body: Some(Body::Lookup(Lookup { phone: phone.into() })) }
    }

    #[test]
    fn round_trip_and_incremental() {
        let bytes = encode(&lookup("+33612345678")).expect("small frame encodes");
        let mut buf = BytesMut::new();
        for (i, b) in bytes.iter().enumerate() {
            assert!(decode::<ClientFrame>(&mut buf, MAX_FRAME_LEN).expect("valid").is_none(), "at byte {i}");
            buf.put_u8(*b);
        }
        let frame = decode::<ClientFrame>(&mut buf, MAX_FRAME_LEN).expect("valid").expect("complete");
        assert_eq!(frame, lookup("+33612345678"));
        assert!(buf.is_empty());
    }

    #[test]
    fn oversized_prefix_rejected_before_body_arrives() {
        let mut buf = BytesMut::new();
        buf.put_u32((MAX_FRAME_LEN + 1) as u32);
        match decode::<ClientFrame>(&mut buf, MAX_FRAME_LEN) {
            Err(FrameError::TooLarge { len, max }) => assert_eq!((len, max), (MAX_FRAME_LEN + 1, MAX_FRAME_LEN)),
            other => panic!("expected TooLarge, got {other:?}"),
        }
        assert!(matches!(body_len(u32::MAX.to_be_bytes(), 10), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn garbage_body_is_malformed_not_panic() {
        let mut buf = BytesMut::new();
        buf.put_u32(3);
        buf.put_slice(&[0xff, 0xff, 0xff]);
        assert!(matches!(decode::<ClientFrame>(&mut buf, MAX_FRAME_LEN), Err(FrameError::Malformed(_))));
    }

    #[test]
    fn encode_refuses_oversized_message() {
        let frame = ClientFrame {
            body: Some(Body::Send(crate::wire::Send {
                recipient: Bytes::from_static(&[0; 16]),
                envelope: Bytes::from(vec![0u8; MAX_FRAME_LEN]),
            })),
        };
        assert!(matches!(encode(&frame), Err(FrameError::TooLarge { .. })));
    }
}
