//! Every benchmark's `-o json` is one JSON document on stdout and nothing else (progress and
//! the tools' own output go to stderr), at the smallest sizes that still run every phase.
//! Needs root (namespaces), Debian's knot, dnsperf, iperf3, wireguard-go and etcd, and the
//! `clusterlink` binary beside this one (`cargo build --workspace` puts it there).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

const BENCH: &str = env!("CARGO_BIN_EXE_clusterlink-bench");

fn json_of(args: &[&str]) -> serde_json::Value {
    let out = Command::new(BENCH)
        .args(args)
        .args(["-o", "json"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "clusterlink-bench {}: {}\n{stdout}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "clusterlink-bench {} -o json is not one JSON document ({e}):\n{stdout}",
            args.join(" ")
        )
    })
}

#[test]
fn every_benchmark_prints_pure_json() {
    let broker = json_of(&[
        "broker",
        "--clusters",
        "4",
        "--updates",
        "40",
        "--publishers",
        "2",
        "--stores",
        "embedded,etcd",
    ]);
    assert_eq!(broker.as_array().unwrap().len(), 2, "{broker}");
    let dns = json_of(&[
        "dns",
        "--names",
        "50",
        "--seconds",
        "1",
        "--clients",
        "1",
        "--rounds",
        "1",
    ]);
    assert!(
        dns["servers"].is_array() && dns["discovery"].is_array(),
        "{dns}"
    );
    let routes = json_of(&["routes", "--cidrs", "20", "--seconds", "1"]);
    assert!(routes.is_object(), "{routes}");
    let tunnel = json_of(&[
        "tunnel",
        "--seconds",
        "1",
        "--rounds",
        "1",
        "--rtt-rounds",
        "1",
    ]);
    assert!(tunnel.as_array().unwrap().len() >= 3, "{tunnel}");
    let failover = json_of(&["failover", "--rounds", "1"]);
    assert_eq!(failover.as_array().unwrap().len(), 1, "{failover}");
}
