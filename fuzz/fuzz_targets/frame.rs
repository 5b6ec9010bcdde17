//! The length-delimited framing of `relay_proto::frame` over arbitrary bytes, for each message type read off the
//! network (by the relay: `ClientFrame`, `ExportRequest`; by the client and the exporter: `ServerFrame`,
//! `ExportResponse`).
//!
//! Checks: `body_len` and `check` agree with the prefix and never let a length above the maximum through; decoding a
//! buffer frame by frame never panics and always makes progress; every decoded message re-encodes and decodes to an
//! equal message; and feeding the same bytes in small chunks (as a stream delivers them) yields exactly the same
//! messages and the same error as decoding the whole buffer at once.
#![no_main]

use std::fmt::Debug;

use bytes::{BufMut, BytesMut};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use relay_proto::frame::{self, FrameError, MAX_FRAME_LEN, PREFIX_LEN};
use relay_proto::wire::{ClientFrame, ExportRequest, ExportResponse, ServerFrame};

/// What decoding one frame gave: a message, an error (by kind), or "need more bytes".
#[derive(Debug, PartialEq)]
enum Step<M> {
    Message(M),
    TooLarge { len: usize, max: usize },
    Malformed,
}

fn step<M>(r: Result<Option<M>, FrameError>) -> Option<Step<M>> {
    match r {
        Ok(Some(m)) => Some(Step::Message(m)),
        Ok(None) => None,
        Err(FrameError::TooLarge { len, max }) => Some(Step::TooLarge { len, max }),
        Err(FrameError::Malformed(_)) => Some(Step::Malformed),
        Err(e) => panic!("unexpected frame error {e:?}"),
    }
}

/// Decodes frames from `buf` until one is incomplete or fails (a failed frame ends the stream, as in the relay).
fn decode_all<M: Message + Default + PartialEq + Debug>(
    buf: &mut BytesMut,
    max: usize,
    out: &mut Vec<Step<M>>,
) -> bool {
    loop {
        let before = buf.len();
        let Some(s) = step(frame::decode::<M>(buf, max)) else {
            return true;
        };
        let failed = !matches!(s, Step::Message(_));
        if let Step::Message(m) = &s {
            assert!(buf.len() + PREFIX_LEN <= before, "a decoded frame consumes its prefix at least");
            round_trip(m);
        }
        out.push(s);
        if failed {
            return false;
        }
    }
}

fn round_trip<M: Message + Default + PartialEq + Debug>(m: &M) {
    // Re-encoding may be longer than what was read (e.g. a negative enum value sent as a 5-byte varint is written
    // back as 10 bytes), so only a message within the maximum must encode.
    let len = m.encoded_len();
    match frame::encode(m) {
        Ok(bytes) => {
            assert!(len <= MAX_FRAME_LEN);
            assert_eq!(bytes.len(), PREFIX_LEN + len);
            let mut again = BytesMut::from(&bytes[..]);
            let decoded = frame::decode::<M>(&mut again, MAX_FRAME_LEN).expect("re-encoded frame decodes");
            assert_eq!(decoded.as_ref(), Some(m), "round trip changed the message");
            assert!(again.is_empty());
            assert_eq!(frame::decode_body::<M>(&bytes[PREFIX_LEN..]).ok().as_ref(), Some(m));
        }
        Err(FrameError::TooLarge { len: l, .. }) => assert!(l == len && len > MAX_FRAME_LEN),
        Err(e) => panic!("encoding a decoded message failed: {e:?}"),
    }
}

fn run<M: Message + Default + PartialEq + Debug>(data: &[u8], max: usize, chunk: usize) {
    let mut whole_buf = BytesMut::from(data);
    let mut whole = Vec::new();
    decode_all::<M>(&mut whole_buf, max, &mut whole);

    // The same bytes arriving `chunk` bytes at a time.
    let mut buf = BytesMut::new();
    let mut streamed = Vec::new();
    for piece in data.chunks(chunk) {
        buf.put_slice(piece);
        if !decode_all::<M>(&mut buf, max, &mut streamed) {
            break;
        }
    }
    assert_eq!(whole, streamed, "chunked decoding differs from whole-buffer decoding");
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, data)) = data.split_first() else {
        return;
    };

    // The prefix checks, with the real maximum and with a tiny one.
    if let Some(prefix) = data.get(..PREFIX_LEN) {
        let announced = u32::from_be_bytes(prefix.try_into().expect("4 bytes")) as usize;
        for max in [MAX_FRAME_LEN, usize::from(selector)] {
            match frame::body_len(prefix.try_into().expect("4 bytes"), max) {
                Ok(len) => assert!(len == announced && len <= max),
                Err(FrameError::TooLarge { len, max: m }) => assert!(len == announced && m == max && len > max),
                Err(e) => panic!("body_len: {e:?}"),
            }
            match frame::check(data, max) {
                Ok(Some(len)) => assert!(len == announced && len <= max && data.len() >= PREFIX_LEN + len),
                Ok(None) => assert!(announced <= max && data.len() < PREFIX_LEN + announced),
                Err(FrameError::TooLarge { len, .. }) => assert!(len == announced && len > max),
                Err(e) => panic!("check: {e:?}"),
            }
        }
    } else {
        assert!(matches!(frame::check(data, MAX_FRAME_LEN), Ok(None)));
    }

    let max = if selector & 0x80 != 0 { usize::from(selector & 0x7f) } else { MAX_FRAME_LEN };
    let chunk = usize::from((selector >> 2) & 0x1f) + 1;
    match selector & 3 {
        0 => run::<ClientFrame>(data, max, chunk),
        1 => run::<ExportRequest>(data, max, chunk),
        2 => run::<ServerFrame>(data, max, chunk),
        _ => run::<ExportResponse>(data, max, chunk),
    }
});
