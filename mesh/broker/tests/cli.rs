//! The `quiver` binary as a user runs it: a server child process, client commands as further
//! child processes, and the exit codes and messages of bad input.
//!
//! How and why: the server is started with `--listen 127.0.0.1:0` and prints its address on
//! stdout, which the test reads, so tests never fight over ports. The server is stopped with
//! SIGTERM to exercise graceful shutdown, then restarted on the same data directory.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const QUIVER: &str = env!("CARGO_BIN_EXE_quiver");

struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start(data: &Path) -> Server {
        let data = data.to_str().unwrap();
        Self::spawn(&["serve", "--listen", "127.0.0.1:0", "--data-dir", data])
    }

    /// Starts `quiver ARGS` and waits for it to print the address it listens on.
    fn spawn(args: &[&str]) -> Server {
        let mut child = Command::new(QUIVER)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn server");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("quiver listening on ") {
                    let _ = tx.send(addr.to_string());
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("server printed its address");
        Server { child, addr }
    }

    /// SIGTERM, then wait (bounded) for a clean exit.
    fn stop(self) {
        self.stop_with("-TERM");
    }

    /// `kill SIGNAL`, then wait (bounded) for a clean exit.
    fn stop_with(mut self, signal: &str) {
        let pid = self.child.id().to_string();
        Command::new("kill").args([signal, &pid]).status().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "server exited with {status}");
                return;
            }
            assert!(
                Instant::now() < deadline,
                "server did not stop after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn quiver(server: &str, ca: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    quiver_bytes(server, ca, args, stdin.map(str::as_bytes))
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "command failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn fails_with(out: &Output, needle: &str) {
    assert!(!out.status.success(), "command unexpectedly succeeded");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(needle), "stderr {err:?} lacks {needle:?}");
}

#[test]
fn produce_consume_restart_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let ca = data.join("tls/ca.pem");
    let server = Server::start(&data);
    let q = |args: &[&str], stdin: Option<&str>| quiver(&server.addr, &ca, args, stdin);

    ok(&q(
        &[
            "topic",
            "create",
            "orders",
            "--partitions",
            "3",
            "--retention-ms",
            "86400000",
        ],
        None,
    ));
    assert!(ok(&q(&["topic", "list"], None)).contains("orders\t3 partition(s)"));
    let described = ok(&q(&["topic", "describe", "orders"], None));
    assert!(described.contains("retention.ms = 86400000"), "{described}");

    let lines: String = (0..500)
        .map(|i| format!("user{}:order {i}\n", i % 7))
        .collect();
    let out = q(
        &[
            "produce",
            "orders",
            "--key-separator",
            ":",
            "--header",
            "src=test",
        ],
        Some(&lines),
    );
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("produced 500 record(s)"));

    let json = ok(&q(
        &["consume", "orders", "--from-beginning", "--format", "json"],
        None,
    ));
    let records: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 500);
    // Per key, values keep their order, and every key lives in one partition.
    let mut by_key: std::collections::BTreeMap<String, (u64, Vec<u64>)> = Default::default();
    for r in &records {
        assert_eq!(r["headers"]["src"], "test");
        let key = r["key"].as_str().unwrap().to_string();
        let n: u64 = r["value"]
            .as_str()
            .unwrap()
            .trim_start_matches("order ")
            .parse()
            .unwrap();
        let e = by_key
            .entry(key)
            .or_insert((r["partition"].as_u64().unwrap(), Vec::new()));
        assert_eq!(e.0, r["partition"].as_u64().unwrap());
        e.1.push(n);
    }
    for (_, (_, ns)) in by_key {
        assert!(ns.windows(2).all(|w| w[0] < w[1]), "per-key order");
    }

    // Raw format, one partition, a bounded count, and an explicit offset.
    let raw = ok(&q(
        &[
            "consume",
            "orders",
            "--partition",
            "0",
            "--offset",
            "1",
            "--max-records",
            "2",
        ],
        None,
    ));
    assert_eq!(raw.lines().count(), 2);
    // From a time in the future: nothing (and the command ends without --follow).
    let none = ok(&q(
        &["consume", "orders", "--from-time", "2999-01-01T00:00:00Z"],
        None,
    ));
    assert!(none.is_empty());
    // Default start is the end of the log: nothing old.
    assert!(ok(&q(&["consume", "orders"], None)).is_empty());

    server.stop();
    let server = Server::start(&data);
    let again = ok(&quiver(
        &server.addr,
        &ca,
        &["consume", "orders", "--from-beginning"],
        None,
    ));
    assert_eq!(
        again.lines().count(),
        500,
        "everything is back after a restart"
    );
    ok(&quiver(
        &server.addr,
        &ca,
        &["topic", "delete", "orders"],
        None,
    ));
    fails_with(
        &quiver(&server.addr, &ca, &["topic", "describe", "orders"], None),
        "unknown_topic_or_partition",
    );
    server.stop();
}

#[test]
fn bad_arguments_and_unreachable_servers_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let ca = data.join("tls/ca.pem");
    let server = Server::start(&data);
    let q = |args: &[&str]| quiver(&server.addr, &ca, args, None);

    fails_with(
        &q(&["topic", "create", "x", "--partitions", "many"]),
        "invalid value",
    );
    fails_with(&q(&["topic", "create", "bad name!"]), "invalid_topic");
    fails_with(
        &q(&["topic", "create", "x", "--config", "colour=blue"]),
        "unknown setting",
    );
    fails_with(&q(&["consume", "missing"]), "unknown_topic_or_partition");
    fails_with(&q(&["produce", "missing"]), "unknown_topic_or_partition");
    fails_with(
        &q(&["consume", "x", "--from-time", "yesterday"]),
        "RFC 3339",
    );
    fails_with(
        &q(&["consume", "x", "--from-beginning", "--offset", "3"]),
        "cannot be used with",
    );
    fails_with(&q(&["frobnicate"]), "unrecognized subcommand");
    // A CA file that does not exist.
    fails_with(
        &quiver(
            &server.addr,
            &dir.path().join("nope.pem"),
            &["topic", "list"],
            None,
        ),
        "not found",
    );
    // Nobody listening: a clear error within the connect timeout, not a hang.
    let started = Instant::now();
    fails_with(
        &quiver(
            "127.0.0.1:9",
            &ca,
            &["topic", "list", "--connect-timeout-ms", "1500"],
            None,
        ),
        "cannot connect to 127.0.0.1:9",
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    server.stop();
}

/// How and why: the node is a child process killed with SIGKILL (no shutdown, no final flush)
/// while a producer keeps writing to a `flush.policy=batch` topic, four times over. Every
/// record the node acknowledged must be there after each restart, at the partition and offset
/// it was acknowledged with, with its content; records that were in flight when the node died
/// may or may not be stored (the producer saw an error for those).
#[test]
fn acknowledged_records_survive_sigkill_of_the_node() {
    use quiver_client::{
        Client, ClientConfig, Consumer, ConsumerConfig, Producer, ProducerConfig, ProducerRecord,
        SeekTo,
    };
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let ca = data.join("tls/ca.pem");
    // Short timeouts: a SIGKILLed node sends no close, so the client only learns of its death
    // by timing out.
    let connect = |addr: String| {
        let ca = ca.clone();
        async move {
            let mut config = ClientConfig::new(addr, ca);
            config.request_timeout_ms = 2_000;
            config.transport.idle_timeout_ms = 3_000;
            config.transport.keep_alive_ms = 500;
            Client::connect(config).await.unwrap()
        }
    };
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut server = Server::start(&data);
    rt.block_on(async {
        connect(server.addr.clone())
            .await
            .create_topic("crash", 2, &[("flush.policy".into(), "batch".into())])
            .await
            .unwrap();
    });
    let acked: Arc<Mutex<BTreeMap<u64, (u32, u64)>>> = Arc::default();
    let mut next_seq = 0u64;
    for cycle in 1..=4u64 {
        let client = rt.block_on(connect(server.addr.clone()));
        let _runtime = rt.enter();
        let producer = Producer::new(
            client,
            ProducerConfig {
                linger_ms: 1,
                retries_max: 0,
                request_timeout_ms: 2_000,
                ..ProducerConfig::default()
            },
        );
        stop.store(false, std::sync::atomic::Ordering::SeqCst);
        let (acked2, start, stop2) = (acked.clone(), next_seq, stop.clone());
        let writer = rt.spawn(async move {
            let mut seq = start;
            let mut waiting = Vec::new();
            while let Ok(d) = producer
                .send(
                    ProducerRecord::new("crash", format!("record-{seq}"))
                        .key(format!("k{}", seq % 10)),
                )
                .await
            {
                let acked = acked2.clone();
                waiting.push(tokio::spawn(async move {
                    if let Ok(meta) = d.await {
                        acked
                            .lock()
                            .unwrap()
                            .insert(seq, (meta.partition, meta.offset.unwrap()));
                    }
                }));
                seq += 1;
                if seq - start > 200_000 || stop2.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                tokio::task::yield_now().await;
            }
            for w in waiting {
                let _ = tokio::time::timeout(Duration::from_secs(30), w).await;
            }
            seq
        });
        // Kill once this cycle has some acknowledgements, mid-stream.
        let deadline = Instant::now() + Duration::from_secs(60);
        while acked.lock().unwrap().len() < (cycle * 3_000) as usize {
            assert!(Instant::now() < deadline, "no progress in cycle {cycle}");
            std::thread::sleep(Duration::from_millis(5));
        }
        server.child.kill().unwrap();
        server.child.wait().unwrap();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        next_seq = rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(60), writer).await })
            .unwrap()
            .unwrap();
        server = Server::start(&data);
    }

    let acked = acked.lock().unwrap().clone();
    let stored = rt.block_on(async {
        let client = connect(server.addr.clone()).await;
        let mut consumer = Consumer::new(client.clone(), "crash", None, ConsumerConfig::default())
            .await
            .unwrap();
        consumer.seek_all(SeekTo::Earliest).await.unwrap();
        let mut ends = BTreeMap::new();
        for p in [0, 1] {
            ends.insert(
                p,
                client.list_offset("crash", p, -1).await.unwrap().unwrap(),
            );
        }
        let mut stored = BTreeMap::new();
        while ends
            .iter()
            .any(|(p, e)| consumer.position(*p).unwrap() < *e)
        {
            for r in consumer.poll().await.unwrap() {
                stored.insert((r.partition, r.offset), r.value.unwrap());
            }
        }
        stored
    });
    for (seq, place) in &acked {
        let value = stored
            .get(place)
            .unwrap_or_else(|| panic!("acknowledged seq {seq} at {place:?} lost"));
        assert_eq!(
            &value[..],
            format!("record-{seq}").as_bytes(),
            "content at {place:?}"
        );
    }
    // Offsets are dense: every stored position from 0 up is there.
    for p in [0u32, 1] {
        let offsets: Vec<u64> = stored
            .keys()
            .filter(|(q, _)| *q == p)
            .map(|(_, o)| *o)
            .collect();
        assert!(
            offsets.iter().enumerate().all(|(i, o)| *o == i as u64),
            "gap in partition {p}"
        );
    }
    eprintln!(
        "{} acknowledged, {} stored ({} unacknowledged records survived)",
        acked.len(),
        stored.len(),
        stored.len() - acked.len()
    );
    server.stop();
}

/// How and why: the parts of the CLI a user meets beyond the basic round trip, each checked
/// through the real binary: `serve --config FILE` (its topic defaults reach new topics),
/// values of every size from 0 bytes to 1 MiB and non-UTF-8 bytes through `produce` and back
/// through `consume --format raw`, `produce --partition`, `consume --follow` seeing records
/// produced after it started, 100k records read back after a SIGINT restart, and each
/// `perf` benchmark printing a JSON summary whose counts match what it was asked for.
#[test]
fn config_file_sizes_partition_follow_sigint_and_perf() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let ca = data.join("tls/ca.pem");
    let config = dir.path().join("quiver.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\nlisten = \"127.0.0.1:0\"\n[topic_defaults]\n\"flush.policy\" = \"interval\"\n\"flush.interval.ms\" = \"25\"\n",
            data.to_str().unwrap()
        ),
    )
    .unwrap();
    let config_arg = config.to_str().unwrap().to_string();
    let server = Server::spawn(&["serve", "--config", &config_arg]);
    let q = |server: &Server, args: &[&str], stdin: Option<&[u8]>| {
        quiver_bytes(&server.addr, &ca, args, stdin)
    };

    ok(&q(
        &server,
        &["topic", "create", "sizes", "--partitions", "2"],
        None,
    ));
    let described = ok(&q(&server, &["topic", "describe", "sizes"], None));
    assert!(described.contains("flush.policy = interval"), "{described}");
    assert!(described.contains("flush.interval.ms = 25"), "{described}");

    // Sizes 0 .. 1 MiB, and bytes that are not UTF-8, one record per line to partition 1.
    let sizes = [0usize, 1, 7, 100, 1000, 65_536, 1 << 20];
    let mut input = Vec::new();
    let mut expected = Vec::new();
    for (i, n) in sizes.iter().enumerate() {
        let value: Vec<u8> = (0..*n).map(|j| b'a' + ((i + j) % 26) as u8).collect();
        input.extend_from_slice(&value);
        input.push(b'\n');
        expected.push(value);
    }
    let binary = vec![0xff, 0xfe, 0x00, 0x80, b'x'];
    input.extend_from_slice(&binary);
    input.push(b'\n');
    expected.push(binary);
    ok(&q(
        &server,
        &["produce", "sizes", "--partition", "1"],
        Some(&input),
    ));
    let raw = q(
        &server,
        &["consume", "sizes", "--partition", "1", "--from-beginning"],
        None,
    );
    assert!(
        raw.status.success(),
        "{}",
        String::from_utf8_lossy(&raw.stderr)
    );
    let got: Vec<&[u8]> = raw.stdout.split(|b| *b == b'\n').collect();
    assert_eq!(got.len(), expected.len() + 1, "one line per record");
    for (g, e) in got.iter().zip(&expected) {
        assert_eq!(g.len(), e.len());
        assert!(g == e, "value of {} bytes differs", e.len());
    }
    assert!(
        ok(&q(
            &server,
            &["consume", "sizes", "--partition", "0", "--from-beginning"],
            None
        ))
        .is_empty(),
        "--partition 1 wrote only to partition 1"
    );
    fails_with(
        &q(
            &server,
            &["produce", "sizes", "--key-separator", ""],
            Some(b"x\n"),
        ),
        "must not be empty",
    );

    // --follow: started first, it sees records produced afterwards, and stops at --max-records.
    let follower = Command::new(QUIVER)
        .args([
            "consume",
            "sizes",
            "--partition",
            "0",
            "--follow",
            "--max-records",
            "3",
        ])
        .args(["--format", "json"])
        .env("QUIVER_SERVER", &server.addr)
        .env("QUIVER_CA", &ca)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    ok(&q(
        &server,
        &["produce", "sizes", "--partition", "0"],
        Some(b"late-1\nlate-2\nlate-3\n"),
    ));
    let out = wait_bounded(follower, Duration::from_secs(60));
    let lines: Vec<serde_json::Value> = ok(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let values: Vec<&str> = lines.iter().map(|r| r["value"].as_str().unwrap()).collect();
    assert_eq!(values, ["late-1", "late-2", "late-3"]);

    // 100k records through the CLI, read back after a restart by SIGINT.
    let many: String = (0..100_000)
        .map(|i| format!("k{}|v{i}\n", i % 101))
        .collect();
    ok(&q(
        &server,
        &["topic", "create", "many", "--partitions", "4"],
        None,
    ));
    ok(&q(
        &server,
        &["produce", "many", "--key-separator", "|"],
        Some(many.as_bytes()),
    ));
    server.stop_with("-INT");
    let server = Server::spawn(&["serve", "--config", &config_arg]);
    let back = ok(&q(
        &server,
        &["consume", "many", "--from-beginning", "--format", "json"],
        None,
    ));
    let mut seen = vec![false; 100_000];
    let mut last_per_key = std::collections::HashMap::new();
    for l in back.lines() {
        let r: serde_json::Value = serde_json::from_str(l).unwrap();
        let key = r["key"].as_str().unwrap().to_string();
        let i: usize = r["value"].as_str().unwrap()[1..].parse().unwrap();
        assert_eq!(key, format!("k{}", i % 101));
        assert!(!std::mem::replace(&mut seen[i], true), "v{i} twice");
        if let Some(prev) = last_per_key.insert(key, i) {
            assert!(prev < i, "per-key order");
        }
    }
    assert!(seen.iter().all(|s| *s), "every record is back");

    // perf: each benchmark runs briefly and its JSON summary adds up.
    let perf = |args: &[&str]| -> serde_json::Value {
        let mut all = vec!["perf"];
        all.extend_from_slice(args);
        all.push("--json");
        let out = ok(&q(&server, &all, None));
        serde_json::from_str(out.lines().last().unwrap()).unwrap()
    };
    let p = perf(&[
        "produce",
        "--topic",
        "bench",
        "--count",
        "5000",
        "--record-bytes",
        "64",
    ]);
    assert_eq!(p["records"], 5000, "{p}");
    assert_eq!(p["failed"], 0, "{p}");
    assert!(p["ack_latency"]["samples"].as_u64().unwrap() > 0, "{p}");
    let c = perf(&["consume", "--topic", "bench", "--count", "5000"]);
    assert_eq!(c["records"], 5000, "{c}");
    assert!(c["poll_latency"]["samples"].as_u64().unwrap() > 0, "{c}");
    let e = perf(&[
        "e2e", "--topic", "e2e", "--count", "2000", "--rate", "20000",
    ]);
    assert_eq!(e["records"], 2000, "{e}");
    assert_eq!(e["consumed"], 2000, "{e}");
    assert_eq!(e["e2e_latency"]["samples"], 2000, "{e}");
    let t = perf(&["transport", "--bytes", "4000000"]);
    for direction in ["upload", "download"] {
        assert_eq!(t[direction]["bytes"], 4_000_000, "{t}");
        assert!(t[direction]["mb_per_s"].as_f64().unwrap() > 0.0, "{t}");
    }
    server.stop();
}

/// Runs `quiver ARGS` against `server` with `stdin`, bounded to two minutes.
fn quiver_bytes(server: &str, ca: &Path, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(QUIVER)
        .args(args)
        .env("QUIVER_SERVER", server)
        .env("QUIVER_CA", ca)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let stdin = stdin.map(<[u8]>::to_vec);
    let writer = std::thread::spawn(move || {
        if let Some(s) = stdin {
            let _ = input.write_all(&s);
        }
    });
    let out = wait_bounded(child, Duration::from_secs(120));
    writer.join().unwrap();
    out
}

/// Waits for `child` at most `limit`, killing it (and failing the test) past that.
fn wait_bounded(child: Child, limit: Duration) -> Output {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("command did not finish within {limit:?}");
        }
    }
}

/// How and why: the plugin registry as a user drives it, through the binary: deploy a real
/// component (a built-in plugin built from source), see it in `list` and `describe`, deploy
/// it again (no-op), be refused for a missing file, garbage bytes and a bad NAME@VERSION, and
/// remove it.
#[test]
fn plugin_commands_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let ca = data.join("tls/ca.pem");
    let server = Server::start(&data);
    let q = |args: &[&str]| quiver(&server.addr, &ca, args, None);
    let component = quiver_test_artifacts::SAMPLE;
    let deploy = |version: &str| {
        q(&[
            "plugin",
            "deploy",
            component,
            "--name",
            "sample",
            "--version",
            version,
        ])
    };
    assert!(ok(&deploy("1.0.0")).contains("deployed sample@1.0.0 (filter)"));
    assert!(ok(&deploy("1.0.0")).contains("already deployed with these bytes"));
    let listed = ok(&q(&["plugin", "list"]));
    assert!(listed.starts_with("sample@1.0.0\tfilter\t"), "{listed}");
    let described = ok(&q(&["plugin", "describe", "sample"]));
    assert!(described.contains("plugin sample (filter)"), "{described}");
    assert!(described.contains("  1.0.0\tfilter\t"), "{described}");

    // Consumer-side: the node runs the plugin and sends 1 record in 2.
    ok(&q(&["topic", "create", "lines"]));
    ok(&quiver(
        &server.addr,
        &ca,
        &["produce", "lines"],
        Some("a\nb\nc\nd\ne\n"),
    ));
    let every_other = ok(&q(&[
        "consume",
        "lines",
        "--from-beginning",
        "--plugin",
        "sample@1.0.0",
        "--param",
        "rate=2",
    ]));
    assert_eq!(every_other, "a\nc\ne\n");
    let described = ok(&q(&["plugin", "describe", "sample"]));
    assert!(
        described.contains("\t1\t5\t3\t2\t0\t0\t"),
        "one batch of 5 records in, 3 out, 2 dropped: {described}"
    );
    fails_with(
        &q(&["consume", "lines", "--from-beginning", "--plugin", "nope"]),
        "plugin_not_found",
    );
    fails_with(
        &q(&["consume", "lines", "--from-beginning", "--plugin", "sample"]),
        "plugin_failed",
    );
    fails_with(
        &q(&["consume", "lines", "--param", "rate=2"]),
        "--param needs a --plugin",
    );

    // Produce-side: a topic policy keeps 1 record in 2 before they are stored.
    ok(&q(&["topic", "create", "rejects"]));
    ok(&q(&[
        "topic",
        "create",
        "clean",
        "--on-produce",
        "sample@1.0.0 rate=2",
        "--on-error",
        "dlq:rejects",
    ]));
    let described = ok(&q(&["topic", "describe", "clean"]));
    assert!(
        described.contains("plugin.on.produce = sample@1.0.0 rate=2"),
        "{described}"
    );
    assert!(
        described.contains("plugin.on.error = dlq:rejects"),
        "{described}"
    );
    ok(&quiver(
        &server.addr,
        &ca,
        &["produce", "clean"],
        Some("1\n2\n3\n4\n"),
    ));
    let consume_clean = || ok(&q(&["consume", "clean", "--from-beginning"]));
    assert_eq!(consume_clean(), "1\n3\n");
    fails_with(&q(&["plugin", "remove", "sample@1.0.0"]), "plugin_in_use");
    fails_with(
        &q(&["topic", "alter", "clean", "--on-produce", "sample@1 rate=2"]),
        "--on-produce",
    );
    fails_with(
        &q(&["topic", "alter", "clean", "--on-error", "ignore"]),
        "--on-error",
    );
    fails_with(&q(&["topic", "alter", "clean"]), "nothing to change");
    fails_with(
        &q(&["topic", "alter", "clean", "--on-produce", "missing"]),
        "plugin_not_found",
    );
    assert!(ok(&q(&["topic", "alter", "clean", "--clear-policy"])).contains("altered topic clean"));
    ok(&quiver(
        &server.addr,
        &ca,
        &["produce", "clean"],
        Some("5\n6\n"),
    ));
    assert_eq!(consume_clean(), "1\n3\n5\n6\n");

    // Guest logs land in the log topic and `plugin logs` shows them.
    let reference = quiver_test_artifacts::REFERENCE;
    ok(&q(&[
        "plugin",
        "deploy",
        reference,
        "--name",
        "ref",
        "--version",
        "1.0.0",
    ]));
    let only_c = ok(&q(&[
        "consume",
        "lines",
        "--from-beginning",
        "--plugin",
        "ref",
        "--param",
        "needle=c",
    ]));
    assert_eq!(only_c, "c\n");
    let wanted = "info  ref@1.0.0 [fetch lines/0] reference filter ready needle=c";
    let mut logs = String::new();
    for _ in 0..100 {
        logs = ok(&q(&["plugin", "logs", "ref"]));
        if logs.contains(wanted) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(logs.contains(wanted), "{logs}");
    assert!(
        ok(&q(&["plugin", "logs", "sample"])).is_empty(),
        "other plugins' lines are not shown"
    );
    let json = ok(&q(&["plugin", "logs", "ref@1.0.0", "--json"]));
    let first: serde_json::Value = serde_json::from_str(json.lines().next().unwrap()).unwrap();
    assert_eq!(first["plugin"], "ref@1.0.0");
    assert_eq!(first["fields"]["needle"], "c");

    // A pipeline from the CLI.
    ok(&q(&["topic", "create", "copies"]));
    let create = [
        "pipeline", "create", "cp", "--from", "lines", "--to", "copies", "--plugin", "ref",
        "--param", "needle=a",
    ];
    assert!(ok(&q(&create)).contains("created pipeline cp"));
    fails_with(&q(&create), "pipeline_exists");
    let mut status = String::new();
    for _ in 0..100 {
        status = ok(&q(&["pipeline", "status", "cp"]));
        if status.contains("  0\t5\t5\t0\t5\t1\t0\trunning") {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        status.contains("  0\t5\t5\t0\t5\t1\t0\trunning"),
        "committed 5 of 5, 5 in, 1 out: {status}"
    );
    assert_eq!(ok(&q(&["consume", "copies", "--from-beginning"])), "a\n");
    let listed = ok(&q(&["pipeline", "list"]));
    assert!(
        listed.starts_with("cp\tlines -> copies\trunning\tlag 0\tref needle=a"),
        "{listed}"
    );
    assert!(ok(&q(&["pipeline", "pause", "cp"])).contains("paused pipeline cp"));
    assert!(ok(&q(&["pipeline", "status", "cp"])).contains("\tpaused"));
    assert!(ok(&q(&["pipeline", "resume", "cp"])).contains("resumed pipeline cp"));
    fails_with(&q(&["plugin", "remove", "ref@1.0.0"]), "plugin_in_use");
    assert!(ok(&q(&["pipeline", "delete", "cp"])).contains("deleted pipeline cp"));
    fails_with(&q(&["pipeline", "status", "cp"]), "pipeline_not_found");
    fails_with(
        &q(&[
            "pipeline", "create", "x", "--from", "lines", "--to", "copies",
        ]),
        "--plugin",
    );
    ok(&q(&["plugin", "remove", "ref@1.0.0"]));

    fails_with(
        &q(&[
            "plugin",
            "deploy",
            "/nonexistent.wasm",
            "--name",
            "x",
            "--version",
            "1.0.0",
        ]),
        "cannot read /nonexistent.wasm",
    );
    let garbage = dir.path().join("garbage.wasm");
    std::fs::write(&garbage, b"not a component").unwrap();
    fails_with(
        &q(&[
            "plugin",
            "deploy",
            garbage.to_str().unwrap(),
            "--name",
            "x",
            "--version",
            "1.0.0",
        ]),
        "invalid_plugin",
    );
    fails_with(&q(&["plugin", "remove", "sample"]), "NAME@VERSION");
    fails_with(&q(&["plugin", "describe", "nothing"]), "plugin_not_found");
    assert!(ok(&q(&["plugin", "remove", "sample@1.0.0"])).contains("removed sample@1.0.0"));
    fails_with(
        &q(&["plugin", "remove", "sample@1.0.0"]),
        "plugin_not_found",
    );
    assert!(ok(&q(&["plugin", "list"])).is_empty());
    server.stop();
}

/// A pipeline whose node is SIGKILLed mid-way and restarted loses no input record: every
/// input record reaches the output topic, in order per key; records the node wrote but had
/// not committed before the kill appear twice (at-least-once), and their number is reported.
#[test]
fn a_pipeline_survives_sigkill_of_the_node() {
    use quiver_client::{
        Client, ClientConfig, Consumer, ConsumerConfig, Producer, ProducerConfig, ProducerRecord,
        SeekTo,
    };
    use std::collections::BTreeMap;

    const RECORDS: u64 = 60_000;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let ca = data.join("tls/ca.pem");
    let connect = |addr: String| {
        let ca = ca.clone();
        async move {
            let mut config = ClientConfig::new(addr, ca);
            config.request_timeout_ms = 5_000;
            Client::connect(config).await.unwrap()
        }
    };
    let mut server = Server::start(&data);
    let batch = [("flush.policy".to_string(), "batch".to_string())];
    rt.block_on(async {
        let c = connect(server.addr.clone()).await;
        c.deploy_plugin(
            "ref",
            "1.0.0",
            std::fs::read(quiver_test_artifacts::REFERENCE)
                .unwrap()
                .into(),
        )
        .await
        .unwrap();
        c.create_topic("src", 2, &batch).await.unwrap();
        c.create_topic("dst", 2, &batch).await.unwrap();
        let producer = Producer::new(c.clone(), ProducerConfig::default());
        let mut deliveries = Vec::new();
        for i in 0..RECORDS {
            deliveries.push(
                producer
                    .send(ProducerRecord::new("src", format!("rec-{i}")).key(format!("k{}", i % 7)))
                    .await
                    .unwrap(),
            );
        }
        producer.flush().await.unwrap();
        for d in deliveries {
            d.await.unwrap();
        }
        c.create_pipeline(&quiver_proto::messages::PipelineSpec {
            name: "copy".into(),
            from: "src".into(),
            to: vec!["dst".into()],
            chain: "ref needle=rec".into(),
            on_error: "fail".into(),
        })
        .await
        .unwrap();
    });
    // Kill twice while the pipeline is part way, restart each time.
    let mut killed_part_way = 0;
    for _ in 0..2 {
        let progress = rt.block_on(async {
            let c = connect(server.addr.clone()).await;
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let p = c.list_pipelines("copy").await.unwrap().pop().unwrap();
                let done: u64 = p.partitions.iter().map(|q| q.committed).sum();
                let total: u64 = p.partitions.iter().map(|q| q.high_watermark).sum();
                if done > 0 || Instant::now() > deadline {
                    return (done, total);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        });
        if progress.0 < progress.1 {
            killed_part_way += 1;
        }
        server.child.kill().unwrap();
        server.child.wait().unwrap();
        server = Server::start(&data);
    }
    let (out, lag) = rt.block_on(async {
        let c = connect(server.addr.clone()).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let p = c.list_pipelines("copy").await.unwrap().pop().unwrap();
            let lag: u64 = p
                .partitions
                .iter()
                .map(|q| q.high_watermark - q.committed)
                .sum();
            if lag == 0 || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let p = c.list_pipelines("copy").await.unwrap().pop().unwrap();
        let lag: u64 = p
            .partitions
            .iter()
            .map(|q| q.high_watermark - q.committed)
            .sum();
        let mut consumer = Consumer::new(c.clone(), "dst", None, ConsumerConfig::default())
            .await
            .unwrap();
        consumer.seek_all(SeekTo::Earliest).await.unwrap();
        let mut out = Vec::new();
        while !consumer.caught_up() {
            out.extend(consumer.poll().await.unwrap());
        }
        (out, lag)
    });
    assert_eq!(lag, 0, "the pipeline caught up after the restarts");
    let mut seen: BTreeMap<u64, u32> = BTreeMap::new();
    let mut last_new_per_key: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
    for r in &out {
        let v = String::from_utf8(r.value.as_ref().unwrap().to_vec()).unwrap();
        let i: u64 = v.strip_prefix("rec-").unwrap().parse().unwrap();
        let n = seen.entry(i).or_default();
        *n += 1;
        // Per key, records appear for the first time in input order (a replay only repeats
        // records already out).
        if *n == 1 {
            let key = r.key.as_ref().unwrap().to_vec();
            if let Some(prev) = last_new_per_key.insert(key, i) {
                assert!(
                    i > prev,
                    "rec-{i} first appeared after rec-{prev} of the same key"
                );
            }
        }
    }
    let missing: Vec<u64> = (0..RECORDS).filter(|i| !seen.contains_key(i)).collect();
    assert!(
        missing.is_empty(),
        "{} input records lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    let duplicates: u32 = seen.values().map(|n| n - 1).sum();
    eprintln!(
        "pipeline under SIGKILL: {RECORDS} records, {} outputs, {duplicates} duplicates, killed part way {killed_part_way} of 2 times",
        out.len()
    );
    server.stop();
}
