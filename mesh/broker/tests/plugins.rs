//! The plugin registry through a real node: deploy, list, remove, restart.
//!
//! How and why: components are the real test guests and built-in plugins, built from source
//! by `quiver-test-artifacts`, deployed over QUIC with the public client exactly as
//! `quiver plugin deploy` does. What must hold: a deploy is validated before it is accepted
//! (garbage and invalid names/versions are refused with their own codes), versions are
//! immutable (same bytes again is a no-op, other bytes are refused), the registry survives a
//! restart, and removing a version leaves the others.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{client, start, wasm};
use quiver_client::ErrorCode;
use quiver_test_artifacts as guests;

fn code<T: std::fmt::Debug>(r: Result<T, quiver_client::ClientError>) -> ErrorCode {
    r.expect_err("refused").code().expect("a server code")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_list_remove_and_restart() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let dir = tempfile::tempdir().unwrap();
        let node = start(dir.path()).await;
        let c = client(&node).await;

        let (created, info) = c
            .deploy_plugin("filter-json", "1.0.0", wasm(guests::FILTER_JSON))
            .await
            .unwrap();
        assert!(created);
        assert_eq!(info.kind, "filter");
        assert_eq!(
            info.sha256,
            quiver_runtime::sha256_hex(&wasm(guests::FILTER_JSON))
        );
        assert_eq!(info.bytes, wasm(guests::FILTER_JSON).len() as u64);

        // Same bytes again: accepted, nothing new stored.
        let (created, again) = c
            .deploy_plugin("filter-json", "1.0.0", wasm(guests::FILTER_JSON))
            .await
            .unwrap();
        assert!(!created);
        assert_eq!(again, info);
        // Other bytes under the same version: refused.
        assert_eq!(
            code(
                c.deploy_plugin("filter-json", "1.0.0", wasm(guests::SAMPLE))
                    .await
            ),
            ErrorCode::PluginExists
        );
        // A new version, a transform, a pre-release.
        c.deploy_plugin("filter-json", "1.1.0", wasm(guests::SAMPLE))
            .await
            .unwrap();
        c.deploy_plugin("filter-json", "1.1.0-rc.1", wasm(guests::FILTER_JSON))
            .await
            .unwrap();
        let (_, t) = c
            .deploy_plugin("redact", "0.1.0", wasm(guests::REDACT))
            .await
            .unwrap();
        assert_eq!(t.kind, "transform");

        // Refusals, each with its code.
        assert_eq!(
            code(
                c.deploy_plugin("junk", "1.0.0", b"not wasm"[..].into())
                    .await
            ),
            ErrorCode::InvalidPlugin
        );
        for (name, version) in [
            ("Bad Name", "1.0.0"),
            ("ok", "1.0"),
            ("ok", "1.0.0+build.5"),
            ("", "1.0.0"),
        ] {
            assert_eq!(
                code(c.deploy_plugin(name, version, wasm(guests::SAMPLE)).await),
                ErrorCode::InvalidRequest,
                "{name:?} {version:?}"
            );
        }

        let versions: Vec<String> = c
            .list_plugins("filter-json")
            .await
            .unwrap()
            .into_iter()
            .map(|p| p.version)
            .collect();
        assert_eq!(versions, ["1.0.0", "1.1.0-rc.1", "1.1.0"], "semantic order");
        assert_eq!(c.list_plugins("").await.unwrap().len(), 4);
        assert!(c.list_plugins("nothing").await.unwrap().is_empty());

        // The registry survives a restart.
        node.shutdown().await;
        let node = start(dir.path()).await;
        let c = client(&node).await;
        assert_eq!(c.list_plugins("").await.unwrap().len(), 4);

        c.remove_plugin("filter-json", "1.0.0").await.unwrap();
        assert_eq!(
            code(c.remove_plugin("filter-json", "1.0.0").await),
            ErrorCode::PluginNotFound
        );
        let left: Vec<String> = c
            .list_plugins("filter-json")
            .await
            .unwrap()
            .into_iter()
            .map(|p| p.version)
            .collect();
        assert_eq!(left, ["1.1.0-rc.1", "1.1.0"]);
        // 1.1.0-rc.1 still uses filter-json's bytes, so the component file stays.
        let file = dir
            .path()
            .join("plugins")
            .join(format!("{}.wasm", info.sha256));
        assert!(file.exists());
        c.remove_plugin("filter-json", "1.1.0-rc.1").await.unwrap();
        assert!(!file.exists(), "unused component deleted");
        node.shutdown().await;
    })
    .await
    .expect("test finished in time");
}
