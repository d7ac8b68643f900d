//! As root: the underlay between two gateways may have a smaller MTU than the WireGuard
//! datagrams (a cloud VPN, an overlay under the nodes, a PPPoE link). The kernel cannot split
//! a GSO send into fragments, and a datagram sent with Don't Fragment set cannot leave at
//! all. Either way full-size packets would be lost while small ones pass: TCP through the
//! tunnel stalls after its handshake. The gateway's socket sends such datagrams one by one
//! and without DF, so the kernel fragments them, as kernel WireGuard does.
//!
//! Two namespaces on a veth pair with MTU 1000; the datagrams are 1200 bytes.

#![allow(clippy::unwrap_used)]

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use clusterlink_gateway::udp::BatchedUdp;
use clusterlink_gateway_core::core::Transmit;
use clusterlink_lab::Testbed;

const SENDER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const RECEIVER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);

fn queue(dst: SocketAddr, sizes: &[usize], seed: usize) -> VecDeque<Transmit> {
    sizes
        .iter()
        .enumerate()
        .map(|(i, &len)| Transmit {
            dst,
            payload: (0..len).map(|j| (seed + i * 7 + j) as u8).collect(),
        })
        .collect()
}

/// Reads `count` datagrams (or fewer, if they stop coming for 2 s).
fn receive(socket: &UdpSocket, count: usize) -> Vec<Vec<u8>> {
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut buf = [0u8; 65_536];
    let mut got = Vec::new();
    while got.len() < count {
        match socket.recv(&mut buf) {
            Ok(n) => got.push(buf[..n].to_vec()),
            Err(_) => break,
        }
    }
    got
}

#[test]
fn datagrams_larger_than_the_underlay_mtu_arrive_fragmented() {
    let bed = Testbed::new().expect("this test needs root");
    let a = bed.namespace("mtua").unwrap();
    let b = bed.namespace("mtub").unwrap();
    bed.veth(&a, "v0", &b, "v0").unwrap();
    for (ns, ip) in [(&a, SENDER), (&b, RECEIVER)] {
        ns.ip(&["link", "set", "v0", "mtu", "1000"]).unwrap();
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "v0"])
            .unwrap();
    }
    // Sockets keep the namespace they were made in, whichever thread uses them later.
    let receiver = b
        .run_in(|| UdpSocket::bind((RECEIVER, 0)).unwrap())
        .unwrap();
    let dst = receiver.local_addr().unwrap();
    let mut udp = a
        .run_in(|| BatchedUdp::new(UdpSocket::bind((SENDER, 0)).unwrap()).unwrap())
        .unwrap();

    // Ten full-size datagrams (one GSO send), two small ones, and a single full-size one.
    let sizes: Vec<usize> = [1200; 10].into_iter().chain([300, 300, 1200]).collect();
    let mut q = queue(dst, &sizes, 0);
    let want: Vec<Vec<u8>> = q.iter().map(|t| t.payload.clone()).collect();
    let mut spent = Vec::new();
    udp.send_all(&mut q, &mut spent);
    assert!(q.is_empty());
    assert_eq!(spent.len(), want.len(), "every buffer is returned");
    let got = receive(&receiver, want.len());
    let lens: Vec<usize> = got.iter().map(Vec::len).collect();
    assert_eq!(lens, sizes, "datagrams lost or reordered");
    assert_eq!(got, want, "datagrams changed");

    // GSO still serves datagrams that fit: small ones in a batch arrive as before.
    let mut q = queue(dst, &[900; 20], 99);
    let want: Vec<Vec<u8>> = q.iter().map(|t| t.payload.clone()).collect();
    udp.send_all(&mut q, &mut spent);
    assert_eq!(receive(&receiver, want.len()), want);
}
