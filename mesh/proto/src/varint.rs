//! Zig-zag LEB128 variable-length integers, as used inside records (the same scheme as Kafka's
//! record format and protobuf's `sint64`). At most 10 bytes for an `i64`.

use crate::codec::DecodeError;

/// Most bytes a zig-zag varint of an `i64` can take.
pub const VARINT_BYTES_MAX: usize = 10;

/// Appends `value` as a zig-zag varint.
pub fn put_varint(buf: &mut Vec<u8>, value: i64) {
    let mut v = ((value << 1) ^ (value >> 63)) as u64;
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

/// Number of bytes `put_varint(value)` writes.
pub fn varint_len(value: i64) -> usize {
    let v = ((value << 1) ^ (value >> 63)) as u64;
    let bits = 64 - (v | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

/// Reads a zig-zag varint from the front of `buf`, returning the value and the bytes consumed.
pub fn get_varint(buf: &[u8]) -> Result<(i64, usize), DecodeError> {
    let mut result: u64 = 0;
    for (i, &b) in buf.iter().enumerate().take(VARINT_BYTES_MAX) {
        let chunk = u64::from(b & 0x7f);
        if i == VARINT_BYTES_MAX - 1 && b > 0x01 {
            return Err(DecodeError::Invalid("varint overflows 64 bits"));
        }
        result |= chunk << (7 * i);
        if b & 0x80 == 0 {
            let value = ((result >> 1) as i64) ^ -((result & 1) as i64);
            return Ok((value, i + 1));
        }
    }
    if buf.len() >= VARINT_BYTES_MAX {
        Err(DecodeError::Invalid("varint longer than 10 bytes"))
    } else {
        Err(DecodeError::Truncated("varint"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn roundtrip(v in any::<i64>()) {
            let mut buf = Vec::new();
            put_varint(&mut buf, v);
            prop_assert_eq!(buf.len(), varint_len(v));
            let (back, used) = get_varint(&buf).unwrap();
            prop_assert_eq!(back, v);
            prop_assert_eq!(used, buf.len());
        }

        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..16)) {
            let _ = get_varint(&bytes);
        }
    }

    #[test]
    fn small_values_are_one_byte() {
        for v in -64..64 {
            assert_eq!(varint_len(v), 1, "{v}");
        }
        assert_eq!(varint_len(i64::MIN), 10);
        assert_eq!(varint_len(i64::MAX), 10);
    }

    #[test]
    fn truncated_and_overlong() {
        assert_eq!(get_varint(&[0x80]), Err(DecodeError::Truncated("varint")));
        assert!(get_varint(&[0xff; 11]).is_err());
    }
}
