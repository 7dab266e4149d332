//! Zig-zag varints, read from every record field of a batch.
//!
//! Checked on every input: `get_varint` never panics and never claims more bytes than it was
//! given or than a varint may take; a value it decodes encodes back to at most as many bytes
//! (decoding also accepts padded forms), and that encoding decodes to the same value.
//!
//! `#![forbid(unsafe_code)]` is absent on purpose: `fuzz_target!` expands to a `no_mangle`
//! entry point, which that lint counts as unsafe.
#![no_main]

use libfuzzer_sys::fuzz_target;
use quiver_proto::varint::{VARINT_BYTES_MAX, get_varint, put_varint, varint_len};

fuzz_target!(|data: &[u8]| {
    let Ok((value, used)) = get_varint(data) else {
        return;
    };
    assert!((1..=VARINT_BYTES_MAX).contains(&used), "used {used} bytes");
    assert!(used <= data.len());
    let mut buf = Vec::new();
    put_varint(&mut buf, value);
    assert_eq!(buf.len(), varint_len(value));
    assert!(
        buf.len() <= used,
        "{value} re-encodes longer than its input"
    );
    assert_eq!(get_varint(&buf), Ok((value, buf.len())));
});
