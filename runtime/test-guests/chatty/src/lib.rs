//! Misbehaving guest: for every batch, logs 100,000 lines through the host and prints 1 MiB
//! to stdout and stderr, then keeps every record. The host must bound what it keeps.

use quiver_plugin::{Config, Filter, Level, Record, Verdict, log};

struct Chatty;

impl Filter for Chatty {
    fn init(_: &Config) -> Result<Self, String> {
        Ok(Chatty)
    }

    fn filter(&mut self, record: &Record<'_>) -> Verdict {
        if record.offset.is_multiple_of(1_000) {
            let line = "x".repeat(1023);
            for i in 0..1024 {
                println!("{i} {line}");
                eprintln!("{i} {line}");
            }
            for i in 0..100_000u32 {
                log(Level::Info, "chatter", &[("i", &i.to_string())]);
            }
        }
        Verdict::Keep
    }
}

quiver_plugin::export_filter!(Chatty);
