//! `clusterlink dns run`: hickory-server on UDP and TCP, answering from [`crate::answer`].
//!
//! The handler turns a request into labels and a type, asks the core, and turns its answer
//! into records: the zone's TTL on every record, the SOA in the authority section for
//! NXDOMAIN and NODATA, REFUSED outside the zone, FORMERR for a request that is not one
//! plain query. Malformed packets never reach the handler: hickory-server answers FORMERR
//! or drops them.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use clusterlink_api::{ClusterId, Kind};
use clusterlink_broker_client::LiveCredentials;
use clusterlink_broker_client::follow;
use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{
    Edns, Header, HeaderCounts, MessageType, Metadata, OpCode, ResponseCode,
};
use hickory_server::proto::rr::rdata::{A, AAAA, NS, SOA, SRV};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use thiserror::Error;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::answer::{Answer, Data, Policy, QType, View, answer, view_of};

#[derive(Debug, Error)]
pub enum DnsError {
    #[error("{zone:?} is not a DNS name: {reason}")]
    Zone { zone: String, reason: String },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the credentials name no cluster (identity {0}); use the file `clusterlink join` wrote"
    )]
    NotACluster(clusterlink_broker_client::Identity),
}

#[derive(Clone, Debug)]
pub struct DnsConfig {
    pub listen: SocketAddr,
    /// The zone, e.g. `clusterset.local`.
    pub zone: String,
    pub ttl: u32,
    pub policy: Policy,
    /// The addresses `ns.<zone>` (the zone's name server, named by its SOA and NS records)
    /// resolves to: where this plugin is reached.
    pub ns_addresses: Vec<std::net::IpAddr>,
    /// Where the export and import controllers work (none: the plugin only answers).
    pub controllers: Option<crate::controller::Source>,
    /// How long this plugin's service records outlive it (a broker lease, renewed every
    /// third of it): a cluster whose plugin died stops being answered after this.
    pub record_lease: std::time::Duration,
    /// Told when the plugin answers from a view of the cluster set (its first one arrived).
    pub ready: clusterlink_broker_client::Ready,
    /// With several replicas: whether this one holds the controllers' Lease
    /// ([`crate::election::elect`]); `None`: the only one, it writes.
    pub leader: Option<watch::Receiver<bool>>,
}

/// The largest UDP reply sent: whatever the client offers (RFC 6891 6.2.5), up to 64 KiB. A
/// resolver that offers more than its path carries unfragmented (1232 is the usual choice)
/// takes that risk itself.
pub const MAX_UDP_PAYLOAD: u16 = u16::MAX;

/// The zone's fixed parts: its name, labels, SOA and NS.
pub struct Zone {
    origin: Name,
    labels: Vec<String>,
    ttl: u32,
    soa: Record,
    ns: Record,
    ns_name: Name,
    ns_addresses: Vec<std::net::IpAddr>,
}

impl Zone {
    pub fn new(
        zone: &str,
        ttl: u32,
        ns_addresses: Vec<std::net::IpAddr>,
    ) -> Result<Self, DnsError> {
        let err = |reason: String| DnsError::Zone {
            zone: zone.to_owned(),
            reason,
        };
        let origin = Name::from_ascii(zone)
            .map_err(|e| err(e.to_string()))?
            .to_lowercase();
        let origin = if origin.is_fqdn() {
            origin
        } else {
            origin
                .append_domain(&Name::root())
                .map_err(|e| err(e.to_string()))?
        };
        if origin.is_root() {
            return Err(err("the root zone cannot be served".into()));
        }
        let labels = labels_of(&origin);
        let ns_name = Name::from_ascii("ns")
            .and_then(|n| n.append_domain(&origin))
            .map_err(|e| err(e.to_string()))?;
        let admin = Name::from_ascii("hostmaster")
            .and_then(|n| n.append_domain(&origin))
            .map_err(|e| err(e.to_string()))?;
        let soa = Record::from_rdata(
            origin.clone(),
            ttl,
            RData::SOA(SOA::new(ns_name.clone(), admin, 1, 7200, 1800, 86400, ttl)),
        );
        let ns = Record::from_rdata(origin.clone(), ttl, RData::NS(NS(ns_name.clone())));
        Ok(Self {
            origin,
            labels,
            ttl,
            soa,
            ns,
            ns_name,
            ns_addresses,
        })
    }
}

fn labels_of(name: &Name) -> Vec<String> {
    name.iter()
        .map(|l| String::from_utf8_lossy(l).to_ascii_lowercase())
        .collect()
}

pub struct Handler {
    zone: Zone,
    policy: Policy,
    view: watch::Receiver<Arc<View>>,
    turn: AtomicU64,
}

impl Handler {
    pub fn new(zone: Zone, policy: Policy, view: watch::Receiver<Arc<View>>) -> Self {
        Self {
            zone,
            policy,
            view,
            turn: AtomicU64::new(0),
        }
    }
}

/// The records of a reply to one query (no I/O): what the server sends and the fuzz target
/// drives.
#[derive(Debug)]
pub struct Reply {
    pub code: ResponseCode,
    pub answers: Vec<Record>,
    /// The SOA, for NXDOMAIN and NODATA.
    pub authority: Vec<Record>,
}

impl Zone {
    /// The reply to `name`/`rtype` from `view`.
    pub fn reply(
        &self,
        view: &View,
        policy: Policy,
        turn: u64,
        name: &Name,
        rtype: RecordType,
    ) -> Reply {
        if name.eq_ignore_root(&self.ns_name) {
            return self.ns_reply(name, rtype);
        }
        let got = answer(
            &self.labels,
            view,
            policy,
            turn,
            &labels_of(name),
            qtype(rtype),
        );
        match got {
            Answer::Records(data) => Reply {
                code: ResponseCode::NoError,
                answers: data.iter().filter_map(|d| self.record(name, d)).collect(),
                authority: Vec::new(),
            },
            Answer::NoData => Reply {
                code: ResponseCode::NoError,
                answers: Vec::new(),
                authority: vec![self.soa.clone()],
            },
            Answer::NxDomain => Reply {
                code: ResponseCode::NXDomain,
                answers: Vec::new(),
                authority: vec![self.soa.clone()],
            },
            Answer::Refused => Reply {
                code: ResponseCode::Refused,
                answers: Vec::new(),
                authority: Vec::new(),
            },
        }
    }

    /// The name server's own name: its addresses, so that the NS and SOA records lead
    /// somewhere.
    fn ns_reply(&self, name: &Name, rtype: RecordType) -> Reply {
        let answers: Vec<Record> = self
            .ns_addresses
            .iter()
            .filter(|ip| match rtype {
                RecordType::A => ip.is_ipv4(),
                RecordType::AAAA => ip.is_ipv6(),
                RecordType::ANY => true,
                _ => false,
            })
            .filter_map(|ip| self.record(name, &Data::Ip(*ip)))
            .collect();
        Reply {
            code: ResponseCode::NoError,
            authority: if answers.is_empty() {
                vec![self.soa.clone()]
            } else {
                Vec::new()
            },
            answers,
        }
    }

    fn record(&self, name: &Name, data: &Data) -> Option<Record> {
        let rdata = match data {
            Data::Ip(std::net::IpAddr::V4(ip)) => RData::A(A(*ip)),
            Data::Ip(std::net::IpAddr::V6(ip)) => RData::AAAA(AAAA(*ip)),
            Data::Srv { port, target } => {
                let target = Name::from_labels(target.iter().map(String::as_bytes))
                    .ok()?
                    .append_domain(&self.origin)
                    .ok()?;
                RData::SRV(SRV::new(0, 100, *port, target))
            }
            Data::Soa => return Some(self.soa.clone()),
            Data::Ns => return Some(self.ns.clone()),
        };
        Some(Record::from_rdata(name.clone(), self.ttl, rdata))
    }
}

fn qtype(t: RecordType) -> QType {
    match t {
        RecordType::A => QType::A,
        RecordType::AAAA => QType::Aaaa,
        RecordType::SRV => QType::Srv,
        RecordType::SOA => QType::Soa,
        RecordType::NS => QType::Ns,
        RecordType::ANY => QType::Any,
        other => QType::Other(u16::from(other)),
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        // EDNS(0): a client that sends an OPT record gets one back, and UDP replies up to
        // the size it offered (at least 512, at most MAX_UDP_PAYLOAD) instead of 512 bytes.
        let edns = request.edns.as_ref().map(|req| {
            let mut e = Edns::new();
            e.set_version(0);
            e.set_max_payload(req.max_payload().clamp(512, MAX_UDP_PAYLOAD));
            e
        });
        let builder = MessageResponseBuilder::new(&request.queries, edns.as_ref());
        let fail = |code: ResponseCode| {
            let mut m = Metadata::response_from_request(&request.metadata);
            m.response_code = code;
            m
        };
        let plain_query = request.metadata.message_type == MessageType::Query
            && request.metadata.op_code == OpCode::Query
            && request.queries.queries().len() == 1;
        // What the query is, or the error code it gets: an EDNS version other than 0
        // (RFC 6891 6.1.3), not one plain query, or a name outside the zone.
        let asked = if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
            Err(ResponseCode::BADVERS)
        } else {
            match request.request_info() {
                Ok(info) if plain_query => {
                    Ok((Name::from(info.query.name()), info.query.query_type()))
                }
                _ if request.metadata.op_code == OpCode::Query => Err(ResponseCode::FormErr),
                _ => Err(ResponseCode::NotImp),
            }
        };
        let answered = asked.and_then(|(name, qtype)| {
            let turn = self.turn.fetch_add(1, Ordering::Relaxed);
            let view = self.view.borrow().clone();
            let reply = self.zone.reply(&view, self.policy, turn, &name, qtype);
            match reply.code {
                ResponseCode::Refused => Err(ResponseCode::Refused),
                _ => Ok(reply),
            }
        });
        let reply = match answered {
            Ok(reply) => reply,
            Err(code) => {
                return send(
                    &mut response,
                    builder.error_msg(&request.metadata, code),
                    fail(code),
                )
                .await;
            }
        };
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = true;
        metadata.response_code = reply.code;
        let (answers, soa) = (reply.answers, reply.authority);
        let msg = builder.build(metadata, answers.iter(), [], soa.iter(), []);
        send(&mut response, msg, metadata).await
    }
}

async fn send<'a, R: ResponseHandler>(
    response: &mut R,
    msg: hickory_server::zone_handler::MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
    fallback: Metadata,
) -> ResponseInfo {
    match response.send_response(msg).await {
        Ok(info) => info,
        Err(e) => {
            warn!(error = %e, "cannot send a DNS response");
            let mut metadata = fallback;
            metadata.response_code = ResponseCode::ServFail;
            Header {
                metadata,
                counts: HeaderCounts::default(),
            }
            .into()
        }
    }
}

/// Serves a fixed view (no broker) until `shutdown`: for benchmarks.
pub async fn serve_fixed(
    config: DnsConfig,
    view: View,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), DnsError> {
    let zone = Zone::new(&config.zone, config.ttl, config.ns_addresses.clone())?;
    let (_tx, rx) = watch::channel(Arc::new(view));
    serve(config, zone, rx, shutdown).await
}

async fn serve(
    config: DnsConfig,
    zone: Zone,
    view: watch::Receiver<Arc<View>>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), DnsError> {
    let udp = UdpSocket::bind(config.listen)
        .await
        .map_err(|source| DnsError::Listen {
            addr: config.listen,
            source,
        })?;
    let tcp = TcpListener::bind(config.listen)
        .await
        .map_err(|source| DnsError::Listen {
            addr: config.listen,
            source,
        })?;
    let mut server = Server::new(Handler::new(zone, config.policy, view));
    server.register_socket(udp);
    server.register_listener(tcp, Duration::from_secs(5), 65_535);
    info!(listen = %config.listen, zone = %config.zone, "DNS plugin serving");
    tokio::select! {
        _ = shutdown => {}
        r = server.block_until_done() => if let Err(e) = r { warn!(error = %e, "DNS server stopped") },
    }
    let _ = server.shutdown_gracefully().await;
    Ok(())
}

/// Serves the zone until `shutdown`, following the broker for services and tunnel health.
pub async fn run(
    config: DnsConfig,
    credentials: LiveCredentials,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), DnsError> {
    let creds = credentials.peek();
    let local: ClusterId = creds
        .cluster()
        .cloned()
        .ok_or_else(|| DnsError::NotACluster(creds.identity.clone()))?;
    let zone = Zone::new(&config.zone, config.ttl, config.ns_addresses.clone())?;
    let (view_tx, view_rx) = watch::channel(Arc::new(View {
        local: Some(local.clone()),
        ..View::default()
    }));
    // Clusters too: each record is vetted against its cluster's CIDRs.
    let mut set = follow(
        credentials.clone(),
        &[Kind::Clusters, Kind::Services, Kind::Connections],
    );
    let controller = config.controllers.clone().map(|source| {
        let mut c = crate::controller::ExportController::new(source, credentials, local.clone())
            .with_record_lease(config.record_lease);
        if let Some(leader) = config.leader.clone() {
            c = c.with_leader(leader);
        }
        tokio::spawn(c.run(set.clone()))
    });
    // The view follows the broker, and is recomputed every second as well: a tunnel whose
    // last handshake grows too old leaves it without any record changing.
    config
        .ready
        .not("waiting for the cluster set from the broker");
    let ready = config.ready.clone();
    let follower = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                changed = set.changed() => if changed.is_err() { return },
                _ = tick.tick() => {}
            }
            let now = clusterlink_api::unix_ms(std::time::SystemTime::now());
            let view = set
                .borrow_and_update()
                .as_ref()
                .map(|s| view_of(&local, &s.clusters, &s.services, &s.connections, now));
            if let Some(v) = view {
                view_tx.send_replace(Arc::new(v));
                ready.ok();
            }
        }
    });
    let served = serve(config, zone, view_rx, shutdown).await;
    follower.abort();
    if let Some(c) = controller {
        c.abort();
    }
    served
}
