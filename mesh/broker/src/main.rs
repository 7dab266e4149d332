//! The `quiver` binary: `quiver serve` runs a node; every other subcommand is a client.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    quiver_broker::cli::main()
}
