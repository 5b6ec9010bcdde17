#!/usr/bin/env python3
"""Writes a few valid encodings into fuzz/seeds/TARGET/ as starting points for the fuzzers (standard library only).

Run from anywhere: `python3 fuzz/seeds.py`, then `cargo +nightly fuzz run TARGET fuzz/corpus/TARGET fuzz/seeds/TARGET`
(or copy them into the corpus). The encodings follow proto/protos/relay.proto and the canonical consent statement
and export leaf encodings of relay_proto::consent and relay_proto::merkle; the notice hashes are computed from the
notice texts in proto/src/consent.rs.
"""

import hashlib
import os
import re
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# --- protobuf -------------------------------------------------------------------------------------------------------

def varint(n):
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def vfield(num, value):
    return varint(num << 3) + varint(value)


def lfield(num, payload):
    if isinstance(payload, str):
        payload = payload.encode()
    return varint(num << 3 | 2) + varint(len(payload)) + payload


def framed(*bodies):
    return b"".join(struct.pack(">I", len(b)) + b for b in bodies)


# --- consent statements ---------------------------------------------------------------------------------------------

PURPOSES = ["security", "analytics", "advertising", "business_messaging"]


def notice_texts():
    src = open(os.path.join(ROOT, "proto", "src", "consent.rs"), encoding="utf-8").read()
    texts = {}
    for variant, name in zip(["Security", "Analytics", "Advertising", "BusinessMessaging"], PURPOSES):
        m = re.search(r"Purpose::%s => \{\s*\"((?:[^\"\\]|\\.)*)\"" % variant, src, re.S)
        # A Rust string continuation: backslash, newline, then the next line's leading whitespace is skipped.
        texts[name] = re.sub(r"\\\n\s*", "", m.group(1))
    return texts


def notice_hash(purpose, text, version=1):
    return hashlib.sha256(b"consent-relay notice v1" + purpose.encode() + struct.pack(">I", version)
                          + text.encode()).digest()


def statement(account, affiliate, purpose, grant, nhash, seq, time_ms, expires_ms=0):
    return (bytes([1]) + account + bytes([len(affiliate)]) + affiliate.encode() + bytes([PURPOSES.index(purpose)])
            + bytes([1 if grant else 2]) + nhash + struct.pack(">QQQ", seq, time_ms, expires_ms))


# --- export leaves --------------------------------------------------------------------------------------------------

def export_leaf(export_id, affiliate, purpose, fields, payload_hash, consent_hash, time_ms):
    def s(x):
        return struct.pack(">H", len(x.encode())) + x.encode()
    return (bytes([1]) + export_id + s(affiliate) + s(purpose) + bytes([len(fields)]) + b"".join(s(f) for f in fields)
            + payload_hash + consent_hash + struct.pack(">Q", time_ms))


def write(target, name, data):
    d = os.path.join(HERE, "seeds", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def main():
    texts = notice_texts()
    account = bytes(range(16))
    key = bytes([7] * 32)
    sig = bytes([9] * 64)
    adv = notice_hash("advertising", texts["advertising"])
    grant = statement(account, "adsco", "advertising", True, adv, 1, 1_700_000_000_000, 1_800_000_000_000)
    withdraw = statement(account, "shieldco", "security", False, bytes(32), 2, 1_700_000_100_000)
    device = lfield(1, "Pixel 9") + lfield(2, "Android 16") + lfield(3, "1.4.2")

    # ClientFrame bodies (field numbers from relay.proto).
    client = {
        "register": lfield(1, vfield(1, 1) + lfield(2, key) + lfield(3, bytes([8] * 32)) + lfield(4, "+33612345678")
                           + lfield(5, device) + lfield(6, sig) + lfield(7, "123456") + lfield(8, "2468")
                           + lfield(9, sig)),
        "auth": lfield(2, vfield(1, 1) + lfield(2, account) + lfield(3, sig)),
        "lookup": lfield(3, lfield(1, "+14155550123")),
        "send": lfield(4, lfield(1, account) + lfield(2, b"ciphertext")),
        "subscribe": lfield(5, b""),
        "ack": lfield(6, lfield(1, varint(1) + varint(300) + varint(70000))),
        "upload_prekeys": lfield(7, lfield(1, vfield(1, 1) + lfield(2, key) + lfield(3, sig))
                                 + lfield(2, vfield(1, 2) + lfield(2, key))
                                 + lfield(3, vfield(1, 3) + lfield(2, bytes(1184)) + lfield(3, sig))),
        "fetch_bundle": lfield(8, lfield(1, account)),
        "set_access_key": lfield(9, lfield(1, bytes(32))),
        "sealed_send": lfield(10, lfield(1, account) + lfield(2, b"ciphertext") + lfield(3, bytes(16))),
        "put_consent_grant": lfield(11, lfield(1, grant) + lfield(2, sig)),
        "put_consent_withdraw": lfield(11, lfield(1, withdraw) + lfield(2, sig)),
        "list_consent": lfield(12, b""),
        "request_code": lfield(14, lfield(1, "+33612345678")),
        "set_registration_lock": lfield(15, lfield(1, "2468")),
        "get_sender_certificate": lfield(20, b""),
    }
    export = {
        "consent_changes": lfield(1, vfield(1, 42)),
        "begin_export": lfield(2, lfield(1, account) + lfield(2, "adsco") + lfield(3, "advertising")
                               + lfield(4, hashlib.sha256(grant).digest())),
        "end_export": lfield(3, lfield(1, account) + lfield(2, "adsco") + lfield(3, "advertising") + vfield(4, 7)),
    }
    server = {
        "error": lfield(15, vfield(1, 19) + lfield(2, "consent rejected")),
        "deliver": lfield(5, vfield(1, 12) + vfield(2, 1_700_000_000_000) + lfield(3, b"ciphertext")),
    }
    change = (vfield(1, 1) + lfield(2, account) + lfield(3, key) + lfield(4, grant) + lfield(5, sig)
              + vfield(6, 1_700_000_000_001) + lfield(7, lfield(1, "+33612345678") + lfield(2, device)))
    export_resp = {"changes": lfield(1, lfield(1, change) + vfield(2, 1))}

    for name, body in client.items():
        write("client_frame", name, body)
    for name, body in export.items():
        write("client_frame", "export_" + name, body)

    # frame: selector byte (low 2 bits: message type; bits 2-6: chunk size - 1; bit 7: tiny maximum), then frames.
    write("frame", "client_lookup", bytes([0]) + framed(client["lookup"]))
    two = framed(client["register"], client["put_consent_grant"])
    write("frame", "client_two_frames_chunked", bytes([0 | 3 << 2]) + two)
    write("frame", "client_partial", bytes([0]) + framed(client["send"])[:-3])
    write("frame", "export_begin", bytes([1]) + framed(export["begin_export"], export["end_export"]))
    write("frame", "server_error", bytes([2 | 7 << 2]) + framed(server["error"], server["deliver"]))
    write("frame", "export_response_changes", bytes([3]) + framed(export_resp["changes"]))
    write("frame", "too_large_tiny_max", bytes([0x80 | 0x10]) + framed(client["register"]))

    # consent: time (8) ‖ key (32) ‖ signature (64) ‖ statement; shorter inputs are a bare statement.
    write("consent", "grant", grant)
    write("consent", "withdraw", withdraw)
    prefix = struct.pack(">Q", 1_750_000_000_000) + key + sig
    write("consent", "grant_with_key", prefix + grant)
    write("consent", "withdraw_with_key", prefix + withdraw)
    for purpose in PURPOSES:
        s = statement(account, "affiliate-with-a-long-name_0123", purpose, True,
                      notice_hash(purpose, texts[purpose]), 5, 1_000, 0)
        write("consent", "grant_" + purpose, prefix + s)

    # merkle: consumed by arbitrary::Unstructured; an export leaf in the middle gives the decoder a valid shape.
    leaf = export_leaf(bytes([0x42] * 16), "affiliate-7", "fraud-prevention", ["phone_number", "device_model"],
                       bytes([0x11] * 32), bytes([0x22] * 32), 1_700_000_000_123)
    write("merkle", "sizes_small", struct.pack("<QQQQ", 3, 10, 4, 9) + bytes(96) + bytes([2]) + bytes(64) + leaf)
    write("merkle", "sizes_huge", struct.pack("<QQQQ", (1 << 63) + 5, (1 << 64) - 1, (1 << 40) + 1, (1 << 62) + 3)
          + bytes(range(96)) + bytes([8]) + bytes(range(256)) + leaf)
    write("merkle", "leaf", leaf)

    for name, text in {
        "status_204": b"HTTP/1.1 204 No Content\r\n",
        "status_503_more": b"HTTP/1.0 503 Busy\r\nRetry-After: 5\r\n\r\n",
        "status_no_reason": b"HTTP/1.1 200\r\n",
        "url_port_query": b"http://127.0.0.1:9000/hooks?x=1",
        "url_v6": b"http://[::1]:8080/a",
        "url_no_path": b"http://example.com",
    }.items():
        write("http_response", name, text)

    write("affiliates", "example", open(os.path.join(ROOT, "server", "affiliates.example.toml"), "rb").read())
    write("affiliates", "minimal", b'[[affiliate]]\nid = "a"\nname = "A"\ncountry = "FR"\n'
          b'endpoint = "https://a.example/h"\nsecret = "whsec_MDEyMzQ1Njc4OWFiY2RlZg=="\n')


if __name__ == "__main__":
    main()
