//! What the benchmarks read from the tools they drive and from the kernel: iperf3's JSON,
//! ping's summary and per-reply lines, a process's memory and CPU time from /proc.

use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use clusterlink_lab::{Netns, Testbed, wait_until};

/// One TCP stream for `seconds`; Gbit/s received.
pub fn iperf(
    client: &Netns,
    server: &Netns,
    bed: &Testbed,
    addr: &str,
    seconds: u32,
) -> Result<f64> {
    let pid = bed.spawn(
        server,
        &format!("iperf3-{addr}"),
        "iperf3",
        &["-s", "-1", "-B", addr],
    )?;
    wait_until("iperf3 to listen", Duration::from_secs(10), || {
        server
            .exec("ss", &["-Htln", "sport", "= :5201"])
            .is_ok_and(|o| !o.stdout.is_empty())
    })?;
    let out = client.exec("iperf3", &["-c", addr, "-t", &seconds.to_string(), "-J"]);
    bed.kill(pid);
    let out = out?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .ok_or_else(|| anyhow!("iperf3 reported no throughput"))
}

/// Average RTT in ms over 200 pings, 10 ms apart.
pub fn rtt(client: &Netns, addr: &str) -> Result<f64> {
    Ok(pings(client, addr, 200)?.avg_ms)
}

/// What `ping` reports of `count` pings, 10 ms apart.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PingStats {
    pub min_ms: f64,
    pub avg_ms: f64,
}

pub fn pings(client: &Netns, addr: &str, count: u32) -> Result<PingStats> {
    let out = client.exec(
        "ping",
        &[
            "-q",
            "-c",
            &count.to_string(),
            "-i",
            "0.01",
            "-W",
            "1",
            addr,
        ],
    )?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    parse_ping(&text).ok_or_else(|| anyhow!("cannot read ping's RTT from: {text}"))
}

/// Reads `rtt min/avg/max/mdev = a/b/c/d ms` from ping's summary.
pub fn parse_ping(text: &str) -> Option<PingStats> {
    let values = text
        .lines()
        .find(|l| l.contains("min/avg/max"))?
        .split('=')
        .nth(1)?
        .trim()
        .trim_end_matches(" ms");
    let mut v = values.split('/').map(|x| x.parse::<f64>().ok());
    Some(PingStats {
        min_ms: v.next()??,
        avg_ms: v.next()??,
    })
}

/// `[1732650000.123456] 64 bytes from …: icmp_seq=12 ttl=62 time=0.5 ms` → (time, seq).
pub fn parse_reply(line: &str) -> Option<(f64, u64)> {
    let ts = line.strip_prefix('[')?.split(']').next()?.parse().ok()?;
    let seq = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("icmp_seq="))?
        .parse()
        .ok()?;
    Some((ts, seq))
}

/// A field of `/proc/PID/status` in KiB (`VmHWM:` is the peak resident set).
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// User plus system CPU time of a process, in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = s.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_summary_is_read() {
        let text = "--- 10.2.255.1 ping statistics ---\n\
                    100 packets transmitted, 100 received, 0% packet loss, time 1010ms\n\
                    rtt min/avg/max/mdev = 0.058/0.131/0.225/0.027 ms\n";
        assert_eq!(
            parse_ping(text),
            Some(PingStats {
                min_ms: 0.058,
                avg_ms: 0.131
            })
        );
        // Every ping lost: no summary line, no figures.
        assert_eq!(
            parse_ping("100 packets transmitted, 0 received, 100% packet loss\n"),
            None
        );
    }

    #[test]
    fn replies_are_read_from_ping_output() {
        let line = "[1732650000.123456] 64 bytes from 10.1.101.10: icmp_seq=12 ttl=62 time=0.5 ms";
        assert_eq!(parse_reply(line), Some((1732650000.123456, 12)));
        assert_eq!(
            parse_reply("PING 10.1.101.10 (10.1.101.10) 56(84) bytes of data."),
            None
        );
    }
}
