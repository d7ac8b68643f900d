//! The agent's part of the node, read and changed over rtnetlink. Reads only what carries
//! the agent's marks (its table and protocol, its rule priority, its overlay link's name);
//! changes only what [`crate::core`] decided.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use futures::{StreamExt, TryStreamExt, stream};
use ipnet::Ipv4Net;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteMetric, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::{Handle, IpVersion, LinkUnspec, LinkVxlan, RouteMessageBuilder};
use thiserror::Error;

use crate::core::{
    Changes, LINK_ALIAS, NextHop, NodeFacts, Overlay, Ownership, Route, Rule, State,
};

#[derive(Debug, Error)]
pub enum KernelError {
    #[error("cannot open a netlink socket: {0} (the route agent needs CAP_NET_ADMIN)")]
    Socket(#[source] std::io::Error),
    #[error("netlink: {what}: {source}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error(
        "a link named {0:?} exists and is not the route agent's (its alias is not {LINK_ALIAS:?}); \
         remove or rename it, or give the agent another --overlay-device"
    )]
    ForeignLink(String),
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> KernelError {
    move |source| KernelError::Netlink {
        what: what.into(),
        source,
    }
}

/// errno of a netlink error, if it is one.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(-m.raw_code()),
        _ => None,
    }
}

const ENOENT: i32 = 2;
const ESRCH: i32 = 3;
const ENODEV: i32 = 19;

/// How many netlink requests are in flight at once when applying many routes.
const IN_FLIGHT: usize = 64;

pub struct Kernel {
    handle: Handle,
    own: Ownership,
    overlay_device: String,
    tunnel_device: String,
    /// VNI and port of the overlay the agent makes, once known.
    overlay_vni: Option<(u32, u16)>,
}

/// What one apply did.
#[derive(Debug, Default)]
pub struct Applied {
    pub routes_replaced: usize,
    pub routes_removed: usize,
    /// Requests that failed (each with its reason); the next reconcile tries again.
    pub failures: Vec<String>,
}

struct Links {
    by_name: BTreeMap<String, u32>,
    by_index: BTreeMap<u32, String>,
    overlay: Option<LinkMessage>,
}

impl Kernel {
    /// A netlink connection (strict checking on, so dumps are filtered by the kernel).
    pub fn connect(
        own: Ownership,
        overlay_device: &str,
        tunnel_device: &str,
    ) -> Result<Self, KernelError> {
        let (conn, handle, _) =
            rtnetlink::new_connection_with_strict_check().map_err(KernelError::Socket)?;
        tokio::spawn(conn);
        Ok(Self {
            handle,
            own,
            overlay_device: overlay_device.to_owned(),
            tunnel_device: tunnel_device.to_owned(),
            overlay_vni: None,
        })
    }

    /// The overlay's VNI and port: a link of the overlay's name with these but no alias yet
    /// is taken for one the agent made (and was stopped before it could name it).
    pub fn with_overlay_vni(mut self, vni: u32, port: u16) -> Self {
        self.overlay_vni = Some((vni, port));
        self
    }

    async fn links(&self) -> Result<Links, KernelError> {
        let msgs: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl("list links"))?;
        let mut links = Links {
            by_name: BTreeMap::new(),
            by_index: BTreeMap::new(),
            overlay: None,
        };
        for m in msgs {
            let Some(name) = m.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            }) else {
                continue;
            };
            links.by_name.insert(name.clone(), m.header.index);
            links.by_index.insert(m.header.index, name.clone());
            if name == self.overlay_device {
                let alias = m.attributes.iter().find_map(|a| match a {
                    LinkAttribute::IfAlias(s) => Some(s.as_str()),
                    _ => None,
                });
                // Without the alias it is someone else's, unless it is the VXLAN link of our
                // VNI and port that the agent made and stopped before naming.
                let unnamed_ours = alias.is_none()
                    && self.overlay_vni.is_some_and(|(vni, port)| {
                        let o = overlay_of(&name, &m, &[]);
                        o.vni == vni && o.port == port
                    });
                if alias != Some(LINK_ALIAS) && !unnamed_ours {
                    return Err(KernelError::ForeignLink(name));
                }
                links.overlay = Some(m);
            }
        }
        Ok(links)
    }

    /// The agent's routes, rules and overlay link as the kernel has them, and the node's
    /// links and addresses.
    pub async fn read(&self) -> Result<(State, NodeFacts), KernelError> {
        let links = self.links().await?;
        let addrs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl("list addresses"))?;
        let mut facts = NodeFacts {
            links: links.by_name.keys().cloned().collect(),
            addresses: Vec::new(),
            subnets: Vec::new(),
        };
        let overlay_index = links.by_name.get(&self.overlay_device).copied();
        let mut overlay_addrs = Vec::new();
        for a in &addrs {
            let Some(ip) = a.attributes.iter().find_map(|x| match x {
                AddressAttribute::Local(IpAddr::V4(ip))
                | AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            }) else {
                continue;
            };
            if Some(a.header.index) == overlay_index {
                overlay_addrs.push((ip, a.header.prefix_len));
                continue;
            }
            if links.by_index.get(&a.header.index) == Some(&self.tunnel_device) {
                continue;
            }
            if !facts.addresses.contains(&ip) {
                facts.addresses.push(ip);
            }
            if let Ok(net) = Ipv4Net::new(ip, a.header.prefix_len) {
                let net = net.trunc();
                if !facts.subnets.contains(&net) {
                    facts.subnets.push(net);
                }
            }
        }
        let overlay = links
            .overlay
            .as_ref()
            .map(|m| overlay_of(&self.overlay_device, m, &overlay_addrs));

        let mut query = RouteMessageBuilder::<Ipv4Addr>::new()
            .table_id(self.own.table)
            .build();
        query.header.protocol = RouteProtocol::Other(self.own.protocol);
        // Every type (the builder asks for unicast): the throw routes are the agent's too.
        query.header.kind = RouteType::Unspec;
        let routes: Vec<RouteMessage> = self
            .handle
            .route()
            .get(query)
            .execute()
            .try_collect()
            .await
            .map_err(nl("list routes"))?;
        let routes = routes
            .iter()
            .filter_map(|m| route_of(m, &links.by_index))
            .filter(|r| r.table == self.own.table && r.protocol == self.own.protocol)
            .map(|r| (r.destination, r))
            .collect();

        let rules: Vec<RuleMessage> = self
            .handle
            .rule()
            .get(IpVersion::V4)
            .execute()
            .try_collect()
            .await
            .map_err(nl("list rules"))?;
        let rules = rules
            .iter()
            .filter_map(rule_of)
            .filter(|r| r.priority == self.own.rule_priority)
            .collect();
        Ok((
            State {
                overlay,
                routes,
                rules,
            },
            facts,
        ))
    }

    /// Applies `changes`: the overlay first, then routes, then rules. A failing route or
    /// rule is reported and the rest still applied; a failing overlay stops here.
    pub async fn apply(&self, ch: &Changes) -> Result<Applied, KernelError> {
        let mut out = Applied::default();
        if ch.delete_overlay {
            let links = self.links().await?;
            if let Some(m) = &links.overlay {
                match self.handle.link().del(m.header.index).execute().await {
                    Err(e) if errno(&e) == Some(ENODEV) => {}
                    r => r.map_err(nl(format!("delete link {}", self.overlay_device)))?,
                }
            }
        }
        if let Some(o) = &ch.create_overlay {
            self.create_overlay(o).await?;
        }
        let links = self.links().await?;
        let removes = ch.remove_routes.iter().map(|r| {
            let msg = route_message(r, &links.by_name);
            async move {
                // Its link is gone, and the kernel took the route along.
                let Some(msg) = msg else { return Ok(()) };
                match self.handle.route().del(msg).execute().await {
                    Err(e) if matches!(errno(&e), Some(ESRCH | ENOENT)) => Ok(()),
                    res => res.map_err(|e| format!("remove route {}: {e}", r.destination)),
                }
            }
        });
        let results: Vec<Result<(), String>> = stream::iter(removes)
            .buffer_unordered(IN_FLIGHT)
            .collect()
            .await;
        for r in results {
            match r {
                Ok(()) => out.routes_removed += 1,
                Err(e) => out.failures.push(e),
            }
        }
        let replaces = ch.replace_routes.iter().map(|r| {
            let msg = route_message(r, &links.by_name);
            async move {
                let Some(msg) = msg else {
                    return Err(format!("route {}: no link {}", r.destination, device(r)));
                };
                self.handle
                    .route()
                    .add(msg)
                    .replace()
                    .execute()
                    .await
                    .map_err(|e| format!("replace route {}: {e}", r.destination))
            }
        });
        let results: Vec<Result<(), String>> = stream::iter(replaces)
            .buffer_unordered(IN_FLIGHT)
            .collect()
            .await;
        for r in results {
            match r {
                Ok(()) => out.routes_replaced += 1,
                Err(e) => out.failures.push(e),
            }
        }
        for rule in &ch.add_rules {
            let mut req = self
                .handle
                .rule()
                .add()
                .v4()
                .table_id(rule.table)
                .priority(rule.priority)
                .action(RuleAction::ToTable);
            req.message_mut()
                .attributes
                .push(RuleAttribute::Protocol(RouteProtocol::Other(rule.protocol)));
            if let Err(e) = req.execute().await {
                out.failures.push(format!("add rule {rule:?}: {e}"));
            }
        }
        for rule in &ch.remove_rules {
            if let Err(e) = self.handle.rule().del(rule_message(rule)).execute().await
                && !matches!(errno(&e), Some(ENOENT | ESRCH))
            {
                out.failures.push(format!("remove rule {rule:?}: {e}"));
            }
        }
        Ok(out)
    }

    async fn create_overlay(&self, o: &Overlay) -> Result<(), KernelError> {
        let mut b = LinkVxlan::new(&o.name, o.vni)
            .port(o.port)
            .local(o.local)
            .learning(true);
        if let Some(remote) = o.remote {
            b = b.remote(remote);
        }
        let msg = b.mtu(o.mtu).build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(nl(format!("create VXLAN link {}", o.name)))?;
        let mut req = self
            .handle
            .link()
            .get()
            .match_name(o.name.clone())
            .execute();
        let index = req
            .try_next()
            .await
            .map_err(nl(format!("find link {}", o.name)))?
            .map(|m| m.header.index)
            .ok_or_else(|| KernelError::ForeignLink(o.name.clone()))?;
        // The kernel ignores the alias on creation: name the link as the agent's now.
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .append_extra_attribute(LinkAttribute::IfAlias(LINK_ALIAS.to_owned()))
                    .build(),
            )
            .execute()
            .await
            .map_err(nl(format!("set the alias of {}", o.name)))?;
        self.handle
            .address()
            .add(
                index,
                IpAddr::V4(o.address),
                crate::core::OVERLAY_NET.prefix_len(),
            )
            .execute()
            .await
            .map_err(nl(format!("add {} to {}", o.address, o.name)))?;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(nl(format!("set {} up", o.name)))?;
        // Pod traffic arrives on the overlay and its replies leave through the CNI: loose
        // reverse-path filtering on this link, as Submariner does.
        let sysctl = format!("/proc/sys/net/ipv4/conf/{}/rp_filter", o.name);
        if let Err(e) = std::fs::write(&sysctl, "2") {
            tracing::warn!(path = %sysctl, error = %e, "cannot set loose reverse-path filtering on the overlay");
        }
        Ok(())
    }
}

fn device(r: &Route) -> &str {
    match &r.next_hop {
        NextHop::Device(d) | NextHop::Via(_, d) => d,
        NextHop::Throw => "",
    }
}

/// The overlay link as found; anything unexpected (down, missing address) makes it differ
/// from every desired overlay, so it is recreated.
fn overlay_of(name: &str, m: &LinkMessage, addrs: &[(Ipv4Addr, u8)]) -> Overlay {
    let mut o = Overlay {
        name: name.to_owned(),
        vni: 0,
        port: 0,
        local: Ipv4Addr::UNSPECIFIED,
        remote: None,
        address: Ipv4Addr::UNSPECIFIED,
        mtu: 0,
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::Mtu(mtu) => o.mtu = *mtu,
            LinkAttribute::LinkInfo(infos) => {
                let mut vxlan = false;
                for i in infos {
                    match i {
                        LinkInfo::Kind(InfoKind::Vxlan) => vxlan = true,
                        LinkInfo::Data(InfoData::Vxlan(data)) => {
                            for d in data {
                                match d {
                                    InfoVxlan::Id(id) => o.vni = *id,
                                    InfoVxlan::Port(p) => o.port = *p,
                                    InfoVxlan::Local(l) => o.local = *l,
                                    InfoVxlan::Group(g) => o.remote = Some(*g),
                                    _ => {}
                                }
                            }
                        }
                        _ => {}
                    }
                }
                if !vxlan {
                    o.vni = 0;
                }
            }
            _ => {}
        }
    }
    let up = m.header.flags.contains(LinkFlags::Up);
    if up
        && let Some((ip, _)) = addrs
            .iter()
            .find(|(_, len)| *len == crate::core::OVERLAY_NET.prefix_len())
    {
        o.address = *ip;
    }
    o
}

fn route_of(m: &RouteMessage, by_index: &BTreeMap<u32, String>) -> Option<Route> {
    let mut dst = None;
    let mut gw = None;
    let mut oif = None;
    let mut mtu = 0;
    let mut source = None;
    let mut table = u32::from(m.header.table);
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = Some(*d),
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => gw = Some(*g),
            RouteAttribute::Oif(i) => oif = by_index.get(i).cloned(),
            RouteAttribute::PrefSource(RouteAddress::Inet(s)) => source = Some(*s),
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Metrics(ms) => {
                for x in ms {
                    if let RouteMetric::Mtu(v) = x {
                        mtu = *v;
                    }
                }
            }
            _ => {}
        }
    }
    let destination = Ipv4Net::new(
        dst.unwrap_or(Ipv4Addr::UNSPECIFIED),
        m.header.destination_prefix_length,
    )
    .ok()?;
    let dev = oif.unwrap_or_default();
    Some(Route {
        destination,
        next_hop: match gw {
            _ if m.header.kind == RouteType::Throw => NextHop::Throw,
            Some(g) => NextHop::Via(g, dev.into()),
            None => NextHop::Device(dev.into()),
        },
        mtu,
        source,
        table,
        protocol: u8::from(m.header.protocol),
    })
}

fn route_message(r: &Route, by_name: &BTreeMap<String, u32>) -> Option<RouteMessage> {
    if r.next_hop == NextHop::Throw {
        return Some(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(r.destination.addr(), r.destination.prefix_len())
                .table_id(r.table)
                .protocol(RouteProtocol::Other(r.protocol))
                .kind(RouteType::Throw)
                .build(),
        );
    }
    let index = *by_name.get(device(r))?;
    let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(r.destination.addr(), r.destination.prefix_len())
        .table_id(r.table)
        .protocol(RouteProtocol::Other(r.protocol))
        .output_interface(index);
    b = match &r.next_hop {
        NextHop::Device(_) => b.scope(RouteScope::Link),
        NextHop::Via(g, _) => b.gateway(*g),
        NextHop::Throw => b,
    };
    if let Some(s) = r.source {
        b = b.pref_source(s);
    }
    let mut msg = b.build();
    if r.mtu > 0 {
        msg.attributes
            .push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(r.mtu)]));
    }
    Some(msg)
}

fn rule_of(m: &RuleMessage) -> Option<Rule> {
    let mut priority = None;
    let mut table = u32::from(m.header.table);
    let mut protocol = 0;
    for a in &m.attributes {
        match a {
            RuleAttribute::Priority(p) => priority = Some(*p),
            RuleAttribute::Table(t) => table = *t,
            RuleAttribute::Protocol(p) => protocol = u8::from(*p),
            _ => {}
        }
    }
    Some(Rule {
        priority: priority?,
        table,
        protocol,
    })
}

fn rule_message(r: &Rule) -> RuleMessage {
    let mut m = RuleMessage::default();
    m.header.family = netlink_packet_route::AddressFamily::Inet;
    m.header.action = RuleAction::ToTable;
    if r.table > 255 {
        m.header.table = 0;
    } else {
        m.header.table = r.table as u8;
    }
    m.attributes.push(RuleAttribute::Table(r.table));
    m.attributes.push(RuleAttribute::Priority(r.priority));
    m.attributes
        .push(RuleAttribute::Protocol(RouteProtocol::Other(r.protocol)));
    m
}
