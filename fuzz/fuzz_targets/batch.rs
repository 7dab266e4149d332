//! Record batches: what a node validates before appending a produce request, and what a client
//! decodes from a fetch response.
//!
//! The first input byte selects fix-ups applied to the rest before decoding: bit 0 sets
//! `batch_length` to the bytes present, bit 1 recomputes the CRC. Without them almost every
//! mutation stops at the CRC check; with them the fuzzer reaches the header checks, the
//! decompressors and the record decoder.
//!
//! Checked on every input: nothing panics; a batch that `validate_batch` accepts parses, has the
//! size and record count it reported, decodes to that many records, and can be rebuilt from
//! those records into a batch that validates and decodes to the same keys, values and headers.
//!
//! `#![forbid(unsafe_code)]` is absent on purpose: `fuzz_target!` expands to a `no_mangle`
//! entry point, which that lint counts as unsafe.
#![no_main]

use libfuzzer_sys::fuzz_target;
use quiver_proto::batch::{
    BATCH_HEADER_BYTES, BATCH_LENGTH_PREFIX_BYTES, BatchBuilder, BatchHeader, BatchLimits,
    BatchView, CRC_START, Compression, RecordBatches, peek_batch_bytes, validate_batch,
};

/// Offset of `batch_length` and of the CRC in the batch header (see `quiver_proto::batch`).
const OFF_BATCH_LENGTH: usize = 8;
const OFF_CRC: usize = 17;

const LIMITS: [BatchLimits; 2] = [
    // A node's defaults.
    BatchLimits {
        record_bytes_max: 4 << 20,
        batch_bytes_max: 64 << 20,
    },
    // Tight limits, so the size checks fire.
    BatchLimits {
        record_bytes_max: 16,
        batch_bytes_max: 256,
    },
];

/// Most batches decoded from one input by the `RecordBatches` loop (each is at least 61 bytes,
/// so this only bounds work on huge inputs).
const BATCHES_MAX: usize = 1024;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut buf = rest.to_vec();
    if mode & 1 != 0 && buf.len() >= BATCH_LENGTH_PREFIX_BYTES {
        let length = (buf.len() - BATCH_LENGTH_PREFIX_BYTES) as u32;
        buf[OFF_BATCH_LENGTH..OFF_BATCH_LENGTH + 4].copy_from_slice(&length.to_le_bytes());
    }
    if mode & 2 != 0 && buf.len() >= BATCH_HEADER_BYTES {
        let end = peek_batch_bytes(&buf).map_or(buf.len(), |n| n.clamp(CRC_START, buf.len()));
        let crc = crc32c::crc32c(&buf[CRC_START..end]);
        buf[OFF_CRC..OFF_CRC + 4].copy_from_slice(&crc.to_le_bytes());
    }

    let _ = BatchHeader::parse(&buf);
    for limits in &LIMITS {
        if let Ok(valid) = validate_batch(&buf, limits) {
            check_valid(&buf, limits, valid.bytes, valid.record_count);
        }
    }

    // A fetch response or a segment: batches back to back, each decoded fully.
    for view in RecordBatches::new(&buf).take(BATCHES_MAX) {
        let Ok(view) = view else { break };
        let _ = view.to_records();
        let _ = view.for_each_record(16, |r| {
            let _ = r.headers().count();
        });
    }
});

fn check_valid(buf: &[u8], limits: &BatchLimits, bytes: usize, record_count: u32) {
    assert_eq!(bytes, buf.len());
    assert!(bytes <= limits.batch_bytes_max);
    let view = BatchView::parse(buf).expect("a validated batch parses");
    assert_eq!(view.as_bytes().len(), buf.len());
    let records = view.to_records().expect("a validated batch decodes");
    assert_eq!(records.len(), record_count as usize);

    // Rebuild from the decoded records; the result must validate and hold the same contents.
    let mut builder = BatchBuilder::new(Compression::None);
    for r in &records {
        let headers: Vec<(&str, Option<&[u8]>)> = r
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_deref()))
            .collect();
        builder.push(r.key.as_deref(), r.value.as_deref(), &headers, r.timestamp);
    }
    let rebuilt = builder.finish();
    let generous = BatchLimits {
        record_bytes_max: usize::MAX,
        batch_bytes_max: usize::MAX,
    };
    let again = validate_batch(&rebuilt, &generous).expect("a rebuilt batch validates");
    assert_eq!(again.record_count, record_count);
    let back = BatchView::parse(&rebuilt)
        .and_then(|v| v.to_records())
        .expect("a rebuilt batch decodes");
    for (i, (a, b)) in records.iter().zip(&back).enumerate() {
        assert_eq!(a.key, b.key, "record {i} key");
        assert_eq!(a.value, b.value, "record {i} value");
        assert_eq!(a.headers, b.headers, "record {i} headers");
        assert_eq!(b.offset, i as u64, "record {i} offset");
    }
}
