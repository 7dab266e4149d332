//! The host side of the columnar batch: building one from records, reading one back, and
//! checking what a guest returned before anything trusts it.

use crate::bindings::Batch;

/// A record as the host hands it to a plugin or gets it back from a transform.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PluginRecord {
    /// Offset in its partition (ignored in transform outputs).
    pub offset: u64,
    /// Milliseconds since the Unix epoch.
    pub timestamp: i64,
    /// Key, if any.
    pub key: Option<Vec<u8>>,
    /// Value; `None` is a tombstone.
    pub value: Option<Vec<u8>>,
    /// Headers in order; a value may be null.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

/// One record of a [`ColumnarBatch`], borrowed.
#[derive(Clone, Debug)]
pub struct RecordView<'a> {
    /// Offset in its partition.
    pub offset: u64,
    /// Timestamp, ms.
    pub timestamp: i64,
    /// Key.
    pub key: Option<&'a [u8]>,
    /// Value.
    pub value: Option<&'a [u8]>,
    batch: &'a Batch,
    headers: std::ops::Range<usize>,
}

impl<'a> RecordView<'a> {
    /// The headers in order. Names are UTF-8 (checked when a guest's output is accepted).
    pub fn headers(&self) -> impl Iterator<Item = (&'a str, Option<&'a [u8]>)> + 'a {
        let b = self.batch;
        self.headers.clone().map(move |h| {
            let name = &b.header_names
                [b.header_name_offsets[h] as usize..b.header_name_offsets[h + 1] as usize];
            let value = bit(&b.header_value_present, h).then(|| {
                &b.header_values
                    [b.header_value_offsets[h] as usize..b.header_value_offsets[h + 1] as usize]
            });
            (std::str::from_utf8(name).unwrap_or(""), value)
        })
    }
}

/// A batch in the contract's columnar layout, built record by record without a per-record
/// allocation. Crossing into a guest copies each column once.
#[derive(Clone, Debug)]
pub struct ColumnarBatch {
    pub(crate) inner: Batch,
}

fn set_bit(bits: &mut Vec<u8>, i: usize, on: bool) {
    if i / 8 >= bits.len() {
        bits.push(0);
    }
    if on {
        bits[i / 8] |= 1 << (i % 8);
    }
}

fn bit(bits: &[u8], i: usize) -> bool {
    bits.get(i / 8).is_some_and(|b| b >> (i % 8) & 1 == 1)
}

impl Default for ColumnarBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl ColumnarBatch {
    /// An empty batch.
    pub fn new() -> Self {
        Self {
            inner: Batch {
                count: 0,
                offsets: Vec::new(),
                timestamps: Vec::new(),
                key_present: Vec::new(),
                key_offsets: vec![0],
                keys: Vec::new(),
                value_present: Vec::new(),
                value_offsets: vec![0],
                values: Vec::new(),
                header_offsets: vec![0],
                header_name_offsets: vec![0],
                header_names: Vec::new(),
                header_value_present: Vec::new(),
                header_value_offsets: vec![0],
                header_values: Vec::new(),
            },
        }
    }

    /// Empties the batch, keeping its buffers' capacity (to build the next batch without
    /// allocating again).
    pub fn clear(&mut self) {
        let b = &mut self.inner;
        b.count = 0;
        b.offsets.clear();
        b.timestamps.clear();
        b.key_present.clear();
        b.key_offsets.clear();
        b.key_offsets.push(0);
        b.keys.clear();
        b.value_present.clear();
        b.value_offsets.clear();
        b.value_offsets.push(0);
        b.values.clear();
        b.header_offsets.clear();
        b.header_offsets.push(0);
        b.header_name_offsets.clear();
        b.header_name_offsets.push(0);
        b.header_names.clear();
        b.header_value_present.clear();
        b.header_value_offsets.clear();
        b.header_value_offsets.push(0);
        b.header_values.clear();
    }

    /// Makes room for `records` more records holding about `data_bytes` of keys and values.
    pub fn reserve(&mut self, records: usize, data_bytes: usize) {
        let b = &mut self.inner;
        b.offsets.reserve(records);
        b.timestamps.reserve(records);
        b.key_present.reserve(records / 8 + 1);
        b.value_present.reserve(records / 8 + 1);
        b.key_offsets.reserve(records);
        b.value_offsets.reserve(records);
        b.header_offsets.reserve(records);
        b.values.reserve(data_bytes);
    }

    /// Records in the batch.
    pub fn len(&self) -> usize {
        self.inner.count as usize
    }

    /// Whether the batch holds no record.
    pub fn is_empty(&self) -> bool {
        self.inner.count == 0
    }

    /// Bytes of keys, values and headers held.
    pub fn data_bytes(&self) -> usize {
        let b = &self.inner;
        b.keys.len() + b.values.len() + b.header_names.len() + b.header_values.len()
    }

    /// Appends one record.
    pub fn push(
        &mut self,
        offset: u64,
        timestamp: i64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[(&str, Option<&[u8]>)],
    ) {
        let b = &mut self.inner;
        let i = b.count as usize;
        b.offsets.push(offset);
        b.timestamps.push(timestamp);
        set_bit(&mut b.key_present, i, key.is_some());
        b.keys.extend_from_slice(key.unwrap_or_default());
        b.key_offsets.push(b.keys.len() as u32);
        set_bit(&mut b.value_present, i, value.is_some());
        b.values.extend_from_slice(value.unwrap_or_default());
        b.value_offsets.push(b.values.len() as u32);
        for (name, v) in headers {
            let h = b.header_name_offsets.len() - 1;
            b.header_names.extend_from_slice(name.as_bytes());
            b.header_name_offsets.push(b.header_names.len() as u32);
            set_bit(&mut b.header_value_present, h, v.is_some());
            b.header_values.extend_from_slice(v.unwrap_or_default());
            b.header_value_offsets.push(b.header_values.len() as u32);
        }
        b.header_offsets
            .push((b.header_name_offsets.len() - 1) as u32);
        b.count += 1;
    }

    /// Appends an owned record.
    pub fn push_record(&mut self, r: &PluginRecord) {
        let headers: Vec<(&str, Option<&[u8]>)> = r
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_deref()))
            .collect();
        self.push(
            r.offset,
            r.timestamp,
            r.key.as_deref(),
            r.value.as_deref(),
            &headers,
        );
    }

    /// A batch of the records at `indexes` (in that order), for the next step of a chain.
    pub fn select(&self, indexes: impl IntoIterator<Item = usize>) -> Self {
        let mut out = Self::new();
        for i in indexes {
            if i < self.len() {
                out.push_record(&self.record(i));
            }
        }
        out
    }

    /// Record `i` as an owned value. Panics if `i` is out of range.
    pub fn record(&self, i: usize) -> PluginRecord {
        let b = &self.inner;
        let slice = |data: &[u8], offsets: &[u32], i: usize| {
            data[offsets[i] as usize..offsets[i + 1] as usize].to_vec()
        };
        let headers = (b.header_offsets[i] as usize..b.header_offsets[i + 1] as usize)
            .map(|h| {
                let name = slice(&b.header_names, &b.header_name_offsets, h);
                (
                    String::from_utf8_lossy(&name).into_owned(),
                    bit(&b.header_value_present, h)
                        .then(|| slice(&b.header_values, &b.header_value_offsets, h)),
                )
            })
            .collect();
        PluginRecord {
            offset: b.offsets[i],
            timestamp: b.timestamps[i],
            key: bit(&b.key_present, i).then(|| slice(&b.keys, &b.key_offsets, i)),
            value: bit(&b.value_present, i).then(|| slice(&b.values, &b.value_offsets, i)),
            headers,
        }
    }

    /// Record `i`, borrowed from the batch's columns. Panics if `i` is out of range.
    pub fn view(&self, i: usize) -> RecordView<'_> {
        let b = &self.inner;
        let range = |offsets: &[u32], i: usize| offsets[i] as usize..offsets[i + 1] as usize;
        RecordView {
            offset: b.offsets[i],
            timestamp: b.timestamps[i],
            key: bit(&b.key_present, i).then(|| &b.keys[range(&b.key_offsets, i)]),
            value: bit(&b.value_present, i).then(|| &b.values[range(&b.value_offsets, i)]),
            batch: b,
            headers: b.header_offsets[i] as usize..b.header_offsets[i + 1] as usize,
        }
    }

    /// Every record, owned.
    pub fn records(&self) -> Vec<PluginRecord> {
        (0..self.len()).map(|i| self.record(i)).collect()
    }

    /// Checks a batch that came from a guest: every column consistent with `count` and every
    /// range inside its data, so reading it can never go out of bounds; at most
    /// `data_bytes_max` bytes of data. Returns it wrapped.
    pub(crate) fn from_guest(b: Batch, data_bytes_max: usize) -> Result<Self, String> {
        let n = b.count as usize;
        let check = |name: &str, offsets: &[u32], items: usize, data: usize| {
            if offsets.len() != items + 1
                || offsets[0] != 0
                || offsets.windows(2).any(|w| w[0] > w[1])
                || offsets[items] as usize > data
            {
                Err(format!(
                    "{name} does not delimit {items} items within {data} bytes"
                ))
            } else {
                Ok(())
            }
        };
        if b.offsets.len() != n || b.timestamps.len() != n {
            return Err(format!(
                "{} offsets and {} timestamps for {n} records",
                b.offsets.len(),
                b.timestamps.len()
            ));
        }
        if b.key_present.len() < n.div_ceil(8) || b.value_present.len() < n.div_ceil(8) {
            return Err("presence bitmaps shorter than the record count".into());
        }
        check("key-offsets", &b.key_offsets, n, b.keys.len())?;
        check("value-offsets", &b.value_offsets, n, b.values.len())?;
        check("header-offsets", &b.header_offsets, n, usize::MAX)?;
        let headers = b.header_offsets[n] as usize;
        check(
            "header-name-offsets",
            &b.header_name_offsets,
            headers,
            b.header_names.len(),
        )?;
        check(
            "header-value-offsets",
            &b.header_value_offsets,
            headers,
            b.header_values.len(),
        )?;
        if b.header_value_present.len() < headers.div_ceil(8) {
            return Err("header value bitmap shorter than the header count".into());
        }
        for h in 0..headers {
            let name = &b.header_names
                [b.header_name_offsets[h] as usize..b.header_name_offsets[h + 1] as usize];
            if std::str::from_utf8(name).is_err() {
                return Err(format!("header {h} has a name that is not UTF-8"));
            }
        }
        let out = Self { inner: b };
        if out.data_bytes() > data_bytes_max {
            return Err(format!(
                "{} bytes of output, more than the limit of {data_bytes_max}",
                out.data_bytes()
            ));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn records_round_trip_through_columns() {
        let mut b = ColumnarBatch::new();
        b.push(
            5,
            100,
            Some(b"k"),
            Some(b"v1"),
            &[("a", Some(b"x")), ("b", None)],
        );
        b.push(6, 101, None, None, &[]);
        b.push(9, 99, Some(b""), Some(b""), &[("c", Some(b""))]);
        let r = b.records();
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].key.as_deref(), Some(&b"k"[..]));
        assert_eq!(
            r[0].headers,
            vec![("a".into(), Some(b"x".to_vec())), ("b".into(), None)]
        );
        assert_eq!((r[1].key.clone(), r[1].value.clone()), (None, None));
        assert_eq!(r[2].offset, 9);
        assert_eq!(r[2].key.as_deref(), Some(&b""[..]));
        let again = ColumnarBatch::from_guest(b.inner.clone(), usize::MAX).unwrap();
        assert_eq!(again.records(), r);
        assert_eq!(b.select([2, 0]).records(), vec![r[2].clone(), r[0].clone()]);
    }

    proptest::proptest! {
        /// Whatever a guest returns, checking it never panics, and a batch that passes the
        /// check can be read record by record without going out of bounds.
        #[test]
        fn any_guest_batch_is_checked_without_panicking(
            count in 0u32..6,
            offsets in proptest::collection::vec(0u32..40, 0..8),
            more in proptest::collection::vec(0u32..40, 0..8),
            bits in proptest::collection::vec(proptest::num::u8::ANY, 0..3),
            data in proptest::collection::vec(proptest::num::u8::ANY, 0..40),
        ) {
            let mut sorted = offsets.clone();
            sorted.sort_unstable();
            let candidate = |o: &Vec<u32>| if o.len().is_multiple_of(2) { sorted.clone() } else { o.clone() };
            let b = Batch {
                count,
                offsets: vec![0; count as usize],
                timestamps: vec![0; count as usize],
                key_present: bits.clone(),
                key_offsets: candidate(&offsets),
                keys: data.clone(),
                value_present: bits.clone(),
                value_offsets: candidate(&more),
                values: data.clone(),
                header_offsets: candidate(&more),
                header_name_offsets: candidate(&offsets),
                header_names: data.clone(),
                header_value_present: bits.clone(),
                header_value_offsets: candidate(&more),
                header_values: data,
            };
            if let Ok(checked) = ColumnarBatch::from_guest(b, usize::MAX) {
                proptest::prop_assert_eq!(checked.records().len(), count as usize);
            }
        }
    }

    #[test]
    fn inconsistent_guest_batches_are_refused() {
        let mut b = ColumnarBatch::new();
        b.push(0, 0, Some(b"key"), Some(b"value"), &[("h", Some(b"v"))]);
        let good = b.inner.clone();
        let mut bad = good.clone();
        bad.count = 2;
        assert!(ColumnarBatch::from_guest(bad, usize::MAX).is_err());
        let mut bad = good.clone();
        bad.value_offsets[1] = 99;
        assert!(ColumnarBatch::from_guest(bad, usize::MAX).is_err());
        let mut bad = good.clone();
        bad.header_names = vec![0xff];
        assert!(ColumnarBatch::from_guest(bad, usize::MAX).is_err());
        assert!(
            ColumnarBatch::from_guest(good.clone(), 3).is_err(),
            "over the byte limit"
        );
        assert!(ColumnarBatch::from_guest(good, usize::MAX).is_ok());
    }
}
