//! The `quiver` binary: `quiver serve` runs a node; every other subcommand is a client.
#![forbid(unsafe_code)]

/// mimalloc keeps freed memory for reuse: the produce and fetch paths allocate and free
/// buffers of hundreds of KiB per batch, which glibc's allocator hands back to the kernel and
/// faults in again (page clearing showed up at ~10% of CPU in profiles).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    quiver_broker::cli::main()
}
