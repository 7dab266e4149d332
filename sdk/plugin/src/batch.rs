//! Per-record views over the contract's columnar batch, and the glue that runs a plugin's
//! per-record function over a whole batch.

/// Configuration given to `init`: the attachment's `--param K=V` pairs, in order.
#[derive(Clone, Debug, Default)]
pub struct Config {
    pairs: Vec<(String, String)>,
}

impl Config {
    /// Wraps `pairs` (for tests of a plugin's logic outside a component).
    pub fn new(pairs: Vec<(String, String)>) -> Self {
        Self { pairs }
    }

    /// The last value given for `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Every pair, in order.
    pub fn pairs(&self) -> &[(String, String)] {
        &self.pairs
    }
}

/// One record, borrowed from the batch.
#[derive(Clone, Copy, Debug)]
pub struct Record<'a> {
    /// Offset in its partition.
    pub offset: u64,
    /// Milliseconds since the Unix epoch.
    pub timestamp: i64,
    /// Key, if any.
    pub key: Option<&'a [u8]>,
    /// Value; `None` is a tombstone.
    pub value: Option<&'a [u8]>,
    /// Headers, in order.
    pub headers: Headers<'a>,
}

/// A record's headers: `(name, value)` pairs in order; a value may be null.
#[derive(Clone, Copy, Debug)]
pub struct Headers<'a> {
    cols: &'a Columns<'a>,
    range: (usize, usize),
}

impl<'a> Headers<'a> {
    /// Number of headers.
    pub fn len(&self) -> usize {
        self.range.1 - self.range.0
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The value of the first header named `name`: `None` when absent, `Some(None)` when its
    /// value is null.
    pub fn get(&self, name: &str) -> Option<Option<&'a [u8]>> {
        self.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    /// Every header in order.
    pub fn iter(&self) -> impl Iterator<Item = (&'a str, Option<&'a [u8]>)> + 'a {
        let cols = self.cols;
        (self.range.0..self.range.1).map(move |h| cols.header(h))
    }
}

/// What a filter decides for one record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The record goes on.
    Keep,
    /// The record is filtered out.
    Drop,
    /// The record could not be judged; the attachment's error policy decides (fail the
    /// batch, skip the record, or send it to a dead-letter topic).
    Fail(String),
}

impl Verdict {
    /// `Keep` when `keep`, else `Drop`.
    pub fn keep_if(keep: bool) -> Self {
        if keep { Verdict::Keep } else { Verdict::Drop }
    }
}

/// A record a transform produces.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OutputRecord {
    /// Key, if any.
    pub key: Option<Vec<u8>>,
    /// Value; `None` is a tombstone.
    pub value: Option<Vec<u8>>,
    /// Headers, in order.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    /// Timestamp, ms; `None` keeps the input record's.
    pub timestamp: Option<i64>,
    /// Output topic; `None` is the attachment's own output.
    pub topic: Option<String>,
}

impl OutputRecord {
    /// A record with `value` and nothing else.
    pub fn new(value: impl Into<Vec<u8>>) -> Self {
        Self {
            value: Some(value.into()),
            ..Self::default()
        }
    }

    /// An output with the input record's key, value, headers and timestamp.
    pub fn copy_of(record: &Record<'_>) -> Self {
        Self {
            key: record.key.map(<[u8]>::to_vec),
            value: record.value.map(<[u8]>::to_vec),
            headers: record
                .headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.map(<[u8]>::to_vec)))
                .collect(),
            timestamp: None,
            topic: None,
        }
    }

    /// Sets the key.
    pub fn with_key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Adds a header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name.into(), Some(value.into())));
        self
    }

    /// Routes the record to `topic` instead of the attachment's own output.
    pub fn to_topic(mut self, topic: impl Into<String>) -> Self {
        self.topic = Some(topic.into());
        self
    }
}

/// The columns of one input batch, checked once so that every record view is in bounds.
#[derive(Debug)]
pub(crate) struct Columns<'a> {
    count: usize,
    offsets: &'a [u64],
    timestamps: &'a [i64],
    key_present: &'a [u8],
    key_offsets: &'a [u32],
    keys: &'a [u8],
    value_present: &'a [u8],
    value_offsets: &'a [u32],
    values: &'a [u8],
    header_offsets: &'a [u32],
    header_name_offsets: &'a [u32],
    header_names: &'a [u8],
    header_value_present: &'a [u8],
    header_value_offsets: &'a [u32],
    header_values: &'a [u8],
}

fn bit(bits: &[u8], i: usize) -> bool {
    bits.get(i / 8).is_some_and(|b| b >> (i % 8) & 1 == 1)
}

/// Checks an offsets column delimiting `items` items within `data_len` bytes.
fn check_offsets(name: &str, offsets: &[u32], items: usize, data_len: usize) -> Result<(), String> {
    if offsets.len() != items + 1 {
        return Err(format!(
            "{name}: {} entries for {items} items",
            offsets.len()
        ));
    }
    if offsets[0] != 0 || offsets.windows(2).any(|w| w[0] > w[1]) {
        return Err(format!("{name}: not increasing from 0"));
    }
    if offsets[items] as usize > data_len {
        return Err(format!("{name}: past the end of its data"));
    }
    Ok(())
}

impl<'a> Columns<'a> {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        count: u32,
        offsets: &'a [u64],
        timestamps: &'a [i64],
        key_present: &'a [u8],
        key_offsets: &'a [u32],
        keys: &'a [u8],
        value_present: &'a [u8],
        value_offsets: &'a [u32],
        values: &'a [u8],
        header_offsets: &'a [u32],
        header_name_offsets: &'a [u32],
        header_names: &'a [u8],
        header_value_present: &'a [u8],
        header_value_offsets: &'a [u32],
        header_values: &'a [u8],
    ) -> Result<Self, String> {
        let count = count as usize;
        if offsets.len() != count || timestamps.len() != count {
            return Err("offsets or timestamps do not match the record count".into());
        }
        let bits = count.div_ceil(8);
        if key_present.len() < bits || value_present.len() < bits {
            return Err("presence bitmaps shorter than the record count".into());
        }
        check_offsets("key-offsets", key_offsets, count, keys.len())?;
        check_offsets("value-offsets", value_offsets, count, values.len())?;
        check_offsets("header-offsets", header_offsets, count, usize::MAX)?;
        let headers = header_offsets[count] as usize;
        check_offsets(
            "header-name-offsets",
            header_name_offsets,
            headers,
            header_names.len(),
        )?;
        check_offsets(
            "header-value-offsets",
            header_value_offsets,
            headers,
            header_values.len(),
        )?;
        if header_value_present.len() < headers.div_ceil(8) {
            return Err("header value bitmap shorter than the header count".into());
        }
        for h in 0..headers {
            let (s, e) = (
                header_name_offsets[h] as usize,
                header_name_offsets[h + 1] as usize,
            );
            if std::str::from_utf8(&header_names[s..e]).is_err() {
                return Err(format!("header {h}: name is not UTF-8"));
            }
        }
        Ok(Self {
            count,
            offsets,
            timestamps,
            key_present,
            key_offsets,
            keys,
            value_present,
            value_offsets,
            values,
            header_offsets,
            header_name_offsets,
            header_names,
            header_value_present,
            header_value_offsets,
            header_values,
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.count
    }

    fn slice<'d>(data: &'d [u8], offsets: &[u32], i: usize) -> &'d [u8] {
        &data[offsets[i] as usize..offsets[i + 1] as usize]
    }

    fn header(&self, h: usize) -> (&'a str, Option<&'a [u8]>) {
        let name = Self::slice(self.header_names, self.header_name_offsets, h);
        // Checked in `new`.
        let name = std::str::from_utf8(name).unwrap_or_default();
        let value = bit(self.header_value_present, h)
            .then(|| Self::slice(self.header_values, self.header_value_offsets, h));
        (name, value)
    }

    pub(crate) fn record(&'a self, i: usize) -> Record<'a> {
        Record {
            offset: self.offsets[i],
            timestamp: self.timestamps[i],
            key: bit(self.key_present, i).then(|| Self::slice(self.keys, self.key_offsets, i)),
            value: bit(self.value_present, i)
                .then(|| Self::slice(self.values, self.value_offsets, i)),
            headers: Headers {
                cols: self,
                range: (
                    self.header_offsets[i] as usize,
                    self.header_offsets[i + 1] as usize,
                ),
            },
        }
    }
}

/// Column views of a generated `Batch` (each world generates its own type).
macro_rules! columns_of {
    ($b:expr) => {
        $crate::batch::Columns::new(
            $b.count,
            &$b.offsets,
            &$b.timestamps,
            &$b.key_present,
            &$b.key_offsets,
            &$b.keys,
            &$b.value_present,
            &$b.value_offsets,
            &$b.values,
            &$b.header_offsets,
            &$b.header_name_offsets,
            &$b.header_names,
            &$b.header_value_present,
            &$b.header_value_offsets,
            &$b.header_values,
        )
    };
}

/// The plugin value of this instance, created by `init`. A component instance is
/// single-threaded, so a thread-local cell is the instance's own.
macro_rules! instance_slot {
    () => {
        thread_local! {
            static INSTANCE: std::cell::RefCell<Option<Box<dyn std::any::Any>>> =
                const { std::cell::RefCell::new(None) };
        }
    };
}

#[cfg(feature = "filter")]
pub(crate) mod filter_glue {
    use super::{Config, Verdict};
    use crate::Filter;
    use crate::filter_world::{Batch, PluginError, RecordFailure, Verdicts};

    instance_slot!();

    pub fn filter_init<F: Filter>(config: Vec<(String, String)>) -> Result<(), PluginError> {
        let plugin = F::init(&Config::new(config)).map_err(PluginError::InvalidConfig)?;
        INSTANCE.with(|slot| *slot.borrow_mut() = Some(Box::new(plugin)));
        Ok(())
    }

    pub fn filter_batch<F: Filter>(input: Batch) -> Result<Verdicts, PluginError> {
        let cols =
            columns_of!(input).map_err(|e| PluginError::Internal(format!("bad batch: {e}")))?;
        INSTANCE.with(|slot| {
            let mut slot = slot.borrow_mut();
            let plugin = slot
                .as_mut()
                .and_then(|p| p.downcast_mut::<F>())
                .ok_or_else(|| PluginError::Internal("filter called before init".into()))?;
            let mut keep = Vec::with_capacity(cols.len());
            let mut failures = Vec::new();
            for i in 0..cols.len() {
                match plugin.filter(&cols.record(i)) {
                    Verdict::Keep => keep.push(true),
                    Verdict::Drop => keep.push(false),
                    Verdict::Fail(reason) => {
                        keep.push(false);
                        failures.push(RecordFailure {
                            index: i as u32,
                            reason,
                        });
                    }
                }
            }
            Ok(Verdicts { keep, failures })
        })
    }
}

#[cfg(feature = "transform")]
pub(crate) mod transform_glue {
    use super::{Config, OutputRecord};
    use crate::Transform;
    use crate::transform_world::{Batch, Output, PluginError, RecordFailure};

    instance_slot!();

    pub fn transform_init<T: Transform>(config: Vec<(String, String)>) -> Result<(), PluginError> {
        let plugin = T::init(&Config::new(config)).map_err(PluginError::InvalidConfig)?;
        INSTANCE.with(|slot| *slot.borrow_mut() = Some(Box::new(plugin)));
        Ok(())
    }

    /// Builds the columnar output as records are emitted.
    struct OutputColumns {
        batch: Batch,
        sources: Vec<u32>,
        topics: Vec<i32>,
        topic_names: Vec<String>,
    }

    fn set_bit(bits: &mut Vec<u8>, i: usize, on: bool) {
        if i / 8 >= bits.len() {
            bits.push(0);
        }
        if on {
            bits[i / 8] |= 1 << (i % 8);
        }
    }

    impl OutputColumns {
        fn new() -> Self {
            Self {
                batch: Batch {
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
                sources: Vec::new(),
                topics: Vec::new(),
                topic_names: Vec::new(),
            }
        }

        fn push(&mut self, source: u32, input_timestamp: i64, r: OutputRecord) {
            let b = &mut self.batch;
            let i = b.count as usize;
            b.offsets.push(0);
            b.timestamps.push(r.timestamp.unwrap_or(input_timestamp));
            set_bit(&mut b.key_present, i, r.key.is_some());
            b.keys
                .extend_from_slice(r.key.as_deref().unwrap_or_default());
            b.key_offsets.push(b.keys.len() as u32);
            set_bit(&mut b.value_present, i, r.value.is_some());
            b.values
                .extend_from_slice(r.value.as_deref().unwrap_or_default());
            b.value_offsets.push(b.values.len() as u32);
            for (name, value) in r.headers {
                let h = b.header_name_offsets.len() - 1;
                b.header_names.extend_from_slice(name.as_bytes());
                b.header_name_offsets.push(b.header_names.len() as u32);
                set_bit(&mut b.header_value_present, h, value.is_some());
                b.header_values
                    .extend_from_slice(value.as_deref().unwrap_or_default());
                b.header_value_offsets.push(b.header_values.len() as u32);
            }
            b.header_offsets
                .push((b.header_name_offsets.len() - 1) as u32);
            b.count += 1;
            self.sources.push(source);
            let topic = match r.topic {
                None => -1,
                Some(t) => match self.topic_names.iter().position(|n| *n == t) {
                    Some(p) => p as i32,
                    None => {
                        self.topic_names.push(t);
                        (self.topic_names.len() - 1) as i32
                    }
                },
            };
            self.topics.push(topic);
        }
    }

    pub fn transform_batch<T: Transform>(input: Batch) -> Result<Output, PluginError> {
        let cols =
            columns_of!(input).map_err(|e| PluginError::Internal(format!("bad batch: {e}")))?;
        INSTANCE.with(|slot| {
            let mut slot = slot.borrow_mut();
            let plugin = slot
                .as_mut()
                .and_then(|p| p.downcast_mut::<T>())
                .ok_or_else(|| PluginError::Internal("transform called before init".into()))?;
            let mut out = OutputColumns::new();
            let mut failures = Vec::new();
            let mut emitted = Vec::new();
            for i in 0..cols.len() {
                let record = cols.record(i);
                emitted.clear();
                match plugin.transform(&record, &mut emitted) {
                    Ok(()) => {
                        for r in emitted.drain(..) {
                            out.push(i as u32, record.timestamp, r);
                        }
                    }
                    Err(reason) => failures.push(RecordFailure {
                        index: i as u32,
                        reason,
                    }),
                }
            }
            Ok(Output {
                records: out.batch,
                sources: out.sources,
                topics: out.topics,
                topic_names: out.topic_names,
                failures,
            })
        })
    }
}
