//! Compiles every test guest and built-in plugin into a WebAssembly component (wasmtime's `test-programs/artifacts`
//! pattern), so `cargo test` needs no manual step. Each guest is built by its own `cargo build
//! -p` with the `guest` profile for `wasm32-wasip2`, into a target directory under `OUT_DIR`:
//! one invocation per guest, because the SDK's world features (`filter`, `transform`) must not
//! unify across guests. The generated `guests.rs` names each component's path.

use std::path::{Path, PathBuf};
use std::process::Command;

/// (constant name, package) of every guest.
const GUESTS: &[(&str, &str)] = &[
    ("REFERENCE", "quiver-test-guest-reference"),
    ("IDENTITY", "quiver-test-guest-identity"),
    ("SPLIT", "quiver-test-guest-split"),
    ("SPIN", "quiver-test-guest-spin"),
    ("HOG", "quiver-test-guest-hog"),
    ("PANIC", "quiver-test-guest-panic"),
    ("BAD_OUTPUT", "quiver-test-guest-bad-output"),
    ("CHATTY", "quiver-test-guest-chatty"),
    ("FILTER_JSON", "quiver-plugin-filter-json"),
    ("REDACT", "quiver-plugin-redact"),
    ("SAMPLE", "quiver-plugin-sample"),
    ("ROUTE", "quiver-plugin-route"),
    ("DEDUPE", "quiver-plugin-dedupe"),
    ("TEMPLATE", "quiver-plugin-template"),
];

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let root = manifest_dir.join("../../..");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets it"));
    let target_dir = out_dir.join("target");
    for watched in [
        "sdk/plugin",
        "wit",
        "runtime/test-guests",
        "plugins",
        "Cargo.lock",
        "Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut consts = String::new();
    for (name, package) in GUESTS {
        let mut cmd = Command::new(&cargo);
        cmd.current_dir(&root)
            .args([
                "build",
                "--locked",
                "--profile",
                "guest",
                "--target",
                "wasm32-wasip2",
            ])
            .args(["-p", package])
            .arg("--target-dir")
            .arg(&target_dir);
        // The outer build's settings are for the host: don't let them leak into the guests.
        for var in [
            "CARGO_ENCODED_RUSTFLAGS",
            "RUSTFLAGS",
            "RUSTC_WORKSPACE_WRAPPER",
            "RUSTC_WRAPPER",
            "CARGO_TARGET_DIR",
            "CARGO_BUILD_TARGET",
            "CARGO_PRIMARY_PACKAGE",
        ] {
            cmd.env_remove(var);
        }
        let status = cmd.status().expect("run cargo for a guest");
        assert!(
            status.success(),
            "building guest {package} failed (is the wasm32-wasip2 target installed? \
             scripts/setup.sh adds it)"
        );
        let file = package.replace('-', "_") + ".wasm";
        let path = target_dir.join("wasm32-wasip2/guest").join(file);
        assert!(Path::new(&path).exists(), "{} missing", path.display());
        consts.push_str(&format!(
            "/// Component built from `{package}`.\npub const {name}: &str = {:?};\n",
            path.display().to_string()
        ));
    }
    std::fs::write(out_dir.join("guests.rs"), consts).expect("write guests.rs");
}
