//! Paths of the test guests and the built-in plugins (`plugins/`), compiled into components by this crate's build script.
//! See `runtime/test-guests/*` for what each guest does.
#![forbid(unsafe_code)]

include!(concat!(env!("OUT_DIR"), "/guests.rs"));

/// Every guest: (constant name, path).
pub fn all() -> Vec<(&'static str, &'static str)> {
    vec![
        ("REFERENCE", REFERENCE),
        ("IDENTITY", IDENTITY),
        ("SPLIT", SPLIT),
        ("SPIN", SPIN),
        ("HOG", HOG),
        ("PANIC", PANIC),
        ("BAD_OUTPUT", BAD_OUTPUT),
        ("CHATTY", CHATTY),
        ("FILTER_JSON", FILTER_JSON),
        ("REDACT", REDACT),
        ("SAMPLE", SAMPLE),
        ("ROUTE", ROUTE),
        ("DEDUPE", DEDUPE),
        ("TEMPLATE", TEMPLATE),
    ]
}
