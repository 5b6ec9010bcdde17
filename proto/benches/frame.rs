//! Frame codec throughput: encoding and decoding `Send` frames of typical and large envelope sizes.

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use relay_proto::frame::{self, MAX_FRAME_LEN};
use relay_proto::wire::{ClientFrame, Send, client_frame::Body};

fn send_frame(size: usize) -> ClientFrame {
    ClientFrame {
        body: Some(Body::Send(Send {
            recipient: Bytes::from_static(&[7; 16]),
            envelope: Bytes::from(vec![0xa5; size]),
        })),
    }
}

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame");
    for size in [256usize, 16 * 1024] {
        let msg = send_frame(size);
        let encoded = frame::encode(&msg).expect("fits in a frame");
        group.throughput(Throughput::Bytes(encoded.len() as u64));
        group.bench_with_input(BenchmarkId::new("encode", size), &msg, |b, msg| {
            let mut out = BytesMut::with_capacity(encoded.len());
            b.iter(|| {
                out.clear();
                frame::encode_into(black_box(msg), &mut out).expect("fits in a frame");
            })
        });
        group.bench_with_input(BenchmarkId::new("decode", size), &encoded, |b, encoded| {
            b.iter(|| {
                let mut buf = BytesMut::from(&encoded[..]);
                let decoded: ClientFrame = frame::decode(&mut buf, MAX_FRAME_LEN).expect("valid").expect("complete");
                black_box(decoded)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
