//! Little-endian primitives for message bodies: fixed-width integers, length-prefixed strings and
//! byte strings, and counted arrays. PROTOCOL.md names these types (`u16`, `string`, `bytes`, ...).
//!
//! The [`Reader`] works over [`Bytes`] so byte fields are returned as zero-copy slices of the
//! received frame; record batches travel from the network to the log without a copy.

use bytes::{BufMut, Bytes, BytesMut};

/// Why a message body could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input ended inside the named field.
    #[error("truncated input: {0}")]
    Truncated(&'static str),
    /// A string field is not UTF-8.
    #[error("string field is not valid UTF-8")]
    InvalidUtf8,
    /// A count or length exceeds what the remaining input could hold.
    #[error("{field} of {value} exceeds the remaining {remaining} bytes")]
    LengthOutOfRange {
        /// Field being decoded.
        field: &'static str,
        /// Claimed length or count.
        value: u64,
        /// Bytes left in the input.
        remaining: usize,
    },
    /// A field holds a value the protocol does not define.
    #[error("invalid value: {0}")]
    Invalid(&'static str),
    /// Bytes were left over after the message ended.
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
}

/// Cursor over a received buffer.
#[derive(Debug, Clone)]
pub struct Reader {
    buf: Bytes,
    pos: usize,
}

impl Reader {
    /// Starts reading at the beginning of `buf`.
    pub fn new(buf: Bytes) -> Self {
        Self { buf, pos: 0 }
    }

    /// Bytes not yet consumed.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Fails unless every byte has been consumed.
    pub fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(DecodeError::Trailing(n)),
        }
    }

    fn take(&mut self, n: usize, field: &'static str) -> Result<&[u8], DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Truncated(field));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, field)?);
        Ok(out)
    }

    /// Reads a `u8`.
    pub fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(field)?[0])
    }
    /// Reads a little-endian `u16`.
    pub fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }
    /// Reads a little-endian `u32`.
    pub fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }
    /// Reads a little-endian `u64`.
    pub fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }
    /// Reads a little-endian `i64`.
    pub fn i64(&mut self, field: &'static str) -> Result<i64, DecodeError> {
        Ok(i64::from_le_bytes(self.array(field)?))
    }

    /// Reads a `string`: `u16` byte length, then UTF-8 bytes.
    pub fn string(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let len = usize::from(self.u16(field)?);
        let raw = self.take(len, field)?;
        std::str::from_utf8(raw)
            .map(str::to_owned)
            .map_err(|_| DecodeError::InvalidUtf8)
    }

    /// Reads `bytes`: `u32` byte length, then the bytes, as a zero-copy slice.
    pub fn bytes(&mut self, field: &'static str) -> Result<Bytes, DecodeError> {
        let len = self.u32(field)? as usize;
        if len > self.remaining() {
            return Err(DecodeError::LengthOutOfRange {
                field,
                value: len as u64,
                remaining: self.remaining(),
            });
        }
        let out = self.buf.slice(self.pos..self.pos + len);
        self.pos += len;
        Ok(out)
    }

    /// Reads an array count (`u32`), checking that `count * min_item_bytes` could fit in the
    /// remaining input, so a hostile count cannot make the decoder allocate without bound.
    pub fn count(
        &mut self,
        field: &'static str,
        min_item_bytes: usize,
    ) -> Result<usize, DecodeError> {
        let n = self.u32(field)? as usize;
        if n.saturating_mul(min_item_bytes.max(1)) > self.remaining() {
            return Err(DecodeError::LengthOutOfRange {
                field,
                value: n as u64,
                remaining: self.remaining(),
            });
        }
        Ok(n)
    }
}

/// Appends primitives to a growing buffer.
#[derive(Debug, Default)]
pub struct Writer {
    buf: BytesMut,
}

impl Writer {
    /// An empty writer.
    pub fn new() -> Self {
        Self::default()
    }
    /// A writer whose buffer already holds `prefix`.
    pub fn with_buffer(buf: BytesMut) -> Self {
        Self { buf }
    }
    /// Writes a `u8`.
    pub fn u8(&mut self, v: u8) {
        self.buf.put_u8(v);
    }
    /// Writes a little-endian `u16`.
    pub fn u16(&mut self, v: u16) {
        self.buf.put_u16_le(v);
    }
    /// Writes a little-endian `u32`.
    pub fn u32(&mut self, v: u32) {
        self.buf.put_u32_le(v);
    }
    /// Writes a little-endian `u64`.
    pub fn u64(&mut self, v: u64) {
        self.buf.put_u64_le(v);
    }
    /// Writes a little-endian `i64`.
    pub fn i64(&mut self, v: i64) {
        self.buf.put_i64_le(v);
    }
    /// Writes a `string`, truncated at a character boundary to 65,535 bytes if longer.
    pub fn string(&mut self, s: &str) {
        let mut end = s.len().min(usize::from(u16::MAX));
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.u16(end as u16);
        self.buf.put_slice(&s.as_bytes()[..end]);
    }
    /// Writes `bytes` (`u32` length + bytes).
    ///
    /// # Panics
    /// If `b` is 4 GiB or longer; callers bound frames far below that.
    pub fn bytes(&mut self, b: &[u8]) {
        let len = u32::try_from(b.len()).unwrap_or(u32::MAX);
        assert_eq!(len as usize, b.len(), "byte field longer than u32::MAX");
        self.u32(len);
        self.buf.put_slice(b);
    }
    /// Writes an array count.
    pub fn count(&mut self, n: usize) {
        self.u32(u32::try_from(n).unwrap_or(u32::MAX));
    }
    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }
    /// Whether nothing has been written.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    /// Mutable access to the underlying buffer (to patch a length prefix).
    pub fn buffer_mut(&mut self) -> &mut BytesMut {
        &mut self.buf
    }
    /// The written bytes.
    pub fn into_bytes(self) -> BytesMut {
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_primitives() {
        let mut w = Writer::new();
        w.u8(7);
        w.u16(513);
        w.u32(70_000);
        w.u64(u64::MAX - 1);
        w.i64(-5);
        w.string("héllo");
        w.bytes(b"\x00\x01");
        w.count(3);
        let mut r = Reader::new(w.into_bytes().freeze());
        assert_eq!(r.u8("a").unwrap(), 7);
        assert_eq!(r.u16("b").unwrap(), 513);
        assert_eq!(r.u32("c").unwrap(), 70_000);
        assert_eq!(r.u64("d").unwrap(), u64::MAX - 1);
        assert_eq!(r.i64("e").unwrap(), -5);
        assert_eq!(r.string("f").unwrap(), "héllo");
        assert_eq!(&r.bytes("g").unwrap()[..], b"\x00\x01");
        assert_eq!(r.u32("h").unwrap(), 3);
        r.finish().unwrap();
    }

    #[test]
    fn hostile_lengths_are_refused() {
        let mut w = Writer::new();
        w.u32(u32::MAX);
        let mut r = Reader::new(w.into_bytes().freeze());
        assert!(matches!(
            r.bytes("x"),
            Err(DecodeError::LengthOutOfRange { .. })
        ));
        let mut w = Writer::new();
        w.u32(1_000_000);
        let mut r = Reader::new(w.into_bytes().freeze());
        assert!(r.count("items", 4).is_err());
    }

    #[test]
    fn long_strings_truncate_on_char_boundary() {
        let s = "é".repeat(40_000);
        let mut w = Writer::new();
        w.string(&s);
        let mut r = Reader::new(w.into_bytes().freeze());
        let back = r.string("s").unwrap();
        assert!(back.len() <= 65_535);
        assert!(s.starts_with(&back));
    }
}
