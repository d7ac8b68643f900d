//! What a handshake initiation from an unknown key costs the gateway's core, within the
//! DoS gate's limit (a Diffie-Hellman to learn the sender) and past it (MAC1 and a cookie
//! reply). `cargo bench -p clusterlink-gateway-core --bench handshake_flood`; see BENCHMARKS.md.

#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::time::Instant;

use clusterlink_gateway_core::core::GatewayCore;
use clusterlink_gateway_core::wg::{self, Output, Session, StaticSecret};

fn key(seed: u64) -> StaticSecret {
    let mut b = [0u8; 32];
    b[..8].copy_from_slice(&seed.to_le_bytes());
    b[31] = 0x40;
    StaticSecret::from(b)
}

/// An initiation to `to` from a key it does not know.
fn initiation(seed: u64, to: [u8; 32]) -> Vec<u8> {
    let mut session = Session::new(&key(seed), &to, None, 1);
    let mut buf = vec![0u8; 2048];
    let mut packet = vec![0u8; 21];
    packet[0] = 0x45;
    match session.encapsulate(&packet, &mut buf) {
        Output::Network(b) => b.to_vec(),
        other => panic!("expected a handshake initiation, got {other:?}"),
    }
}

fn main() {
    let limit = wg::HANDSHAKE_RATE_LIMIT as usize;
    let past = 2_000;
    for round in 1..=3 {
        // A fresh core per round: its one-second window starts empty.
        let mut core = GatewayCore::new(key(1));
        let inits: Vec<Vec<u8>> = (0..limit + past)
            .map(|i| initiation(10_000 + i as u64, core.public_key()))
            .collect();
        let now = Instant::now();
        let from = |i: usize| format!("203.0.113.9:{}", 1_024 + i).parse().unwrap();
        let t = Instant::now();
        for (i, init) in inits[..limit].iter().enumerate() {
            core.handle_datagram(from(i), init, now);
        }
        let within = t.elapsed() / limit as u32;
        let t = Instant::now();
        for (i, init) in inits[limit..].iter().enumerate() {
            core.handle_datagram(from(limit + i), init, now);
        }
        let beyond = t.elapsed() / past as u32;
        while core.poll_transmit().is_some() {}
        assert_eq!(core.counters.handshakes_under_load, past as u64);
        println!(
            "round {round}: within the limit {within:?} per initiation (key exchange), past it \
             {beyond:?} (cookie reply): {:.1}x cheaper",
            within.as_secs_f64() / beyond.as_secs_f64()
        );
    }
}
