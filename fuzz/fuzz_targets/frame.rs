//! Request and response frames and every message body of protocol version 1: the first bytes a
//! node or client decodes from a peer.
//!
//! Checked on every input: no decoder panics; a length prefix that passes `check_length_prefix`
//! is within the limit and always splits into a header and body; a frame that splits re-encodes
//! to the same bytes; a body that decodes as a message re-encodes to the same bytes (the encoders
//! are the reference, so decoding accepts exactly one encoding of each message).
//!
//! `#![forbid(unsafe_code)]` is absent on purpose: `fuzz_target!` expands to a `no_mangle`
//! entry point, which that lint counts as unsafe.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use quiver_proto::codec::Reader;
use quiver_proto::frame::{FRAME_HEADER_BYTES, FRAME_LENGTH_BYTES, check_length_prefix};
use quiver_proto::messages::{
    ApiVersionsRequest, ApiVersionsResponse, CreateTopicsRequest, CreateTopicsResponse,
    DeleteTopicsRequest, DeleteTopicsResponse, DescribeTopicsRequest, DescribeTopicsResponse,
    FetchRequest, FetchResponse, ListOffsetsRequest, ListOffsetsResponse, ListTopicsRequest,
    ListTopicsResponse, Message, MetadataRequest, MetadataResponse, ProduceRequest,
    ProduceResponse, TransportProbeRequest, TransportProbeResponse,
};
use quiver_proto::{RequestHeader, ResponseHeader};

/// Limits a length prefix is checked against: nothing fits, only an empty body fits, a typical
/// node, no limit.
const LIMITS_BYTES: [usize; 4] = [
    0,
    FRAME_HEADER_BYTES - FRAME_LENGTH_BYTES,
    1 << 20,
    usize::MAX,
];

fuzz_target!(|data: &[u8]| {
    let input = Bytes::copy_from_slice(data);

    // The node's path: check the prefix, read that many bytes, split header from body.
    if let Some(prefix) = data.first_chunk::<FRAME_LENGTH_BYTES>() {
        for limit in LIMITS_BYTES {
            let Ok(length) = check_length_prefix(*prefix, limit) else {
                continue;
            };
            assert!(
                length <= limit,
                "{length} bytes accepted under a {limit}-byte limit"
            );
            assert!(length >= FRAME_HEADER_BYTES - FRAME_LENGTH_BYTES);
            let rest = input.slice(FRAME_LENGTH_BYTES..);
            if rest.len() >= length {
                let (_, body) = RequestHeader::decode_after_prefix(rest.slice(..length))
                    .expect("a checked prefix followed by enough bytes splits");
                assert_eq!(body.len(), length + FRAME_LENGTH_BYTES - FRAME_HEADER_BYTES);
            }
        }
    }

    // Whole frames, as the client reads responses.
    if let Ok((header, body)) = RequestHeader::decode(input.clone()) {
        assert_eq!(
            header.encode(&body),
            input,
            "request frame re-encodes differently"
        );
        requests(&body);
    }
    if let Ok((header, body)) = ResponseHeader::decode(input.clone()) {
        assert_eq!(
            header.encode(&body),
            input,
            "response frame re-encodes differently"
        );
        responses(&body);
        // The body of an error response is one string.
        let _ = Reader::new(body).string("message");
    }

    // The bodies straight from the input too, so short inputs reach every decoder.
    requests(&input);
    responses(&input);
});

fn requests(body: &Bytes) {
    roundtrip::<ApiVersionsRequest>(body);
    roundtrip::<MetadataRequest>(body);
    roundtrip::<CreateTopicsRequest>(body);
    roundtrip::<DeleteTopicsRequest>(body);
    roundtrip::<ListTopicsRequest>(body);
    roundtrip::<DescribeTopicsRequest>(body);
    roundtrip::<ProduceRequest>(body);
    roundtrip::<FetchRequest>(body);
    roundtrip::<ListOffsetsRequest>(body);
    roundtrip::<TransportProbeRequest>(body);
}

fn responses(body: &Bytes) {
    roundtrip::<ApiVersionsResponse>(body);
    roundtrip::<MetadataResponse>(body);
    roundtrip::<CreateTopicsResponse>(body);
    roundtrip::<DeleteTopicsResponse>(body);
    roundtrip::<ListTopicsResponse>(body);
    roundtrip::<DescribeTopicsResponse>(body);
    roundtrip::<ProduceResponse>(body);
    roundtrip::<FetchResponse>(body);
    roundtrip::<ListOffsetsResponse>(body);
    roundtrip::<TransportProbeResponse>(body);
}

/// Decodes `body` as `M`; when that succeeds, the encoder must give back the same bytes.
fn roundtrip<M: Message + std::fmt::Debug>(body: &Bytes) {
    if let Ok(message) = M::from_bytes(body.clone()) {
        assert_eq!(
            message.to_bytes(),
            *body,
            "{:?} body re-encodes differently: {message:?}",
            M::API
        );
    }
}
