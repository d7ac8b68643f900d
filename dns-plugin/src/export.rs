//! The export reconciler: a `ServiceExport`, its `Service` and `EndpointSlice`s, and what
//! the other clusters export under the same name, to the `ServiceRecord` this cluster
//! publishes and the export's conditions. A plain function: no I/O, the time comes in.
//!
//! Conditions, as the MCS API defines them:
//! - `Valid`: the Service exists and is of a type that can be exported (ClusterIP,
//!   headless); False with `ServiceNotFound` or `ServiceTypeNotSupported` otherwise;
//! - `Ready`: the export is published to the cluster set (True when there is a record);
//! - `Conflict`: another cluster exports the same name with a different type or different
//!   ports (`TypeConflict`, `PortConflict`). The export is still published: conflicts are
//!   the cluster set's to resolve (the oldest export's properties win in the ServiceImport).

use std::collections::BTreeSet;
use std::net::IpAddr;

use crate::mcs::{ServiceExport, condition};
use clusterlink_api::{ClusterId, DnsLabel, Endpoint, ServicePort, ServiceRecord, ServiceType};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// What the reconciler decided for one export.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    /// The record to publish; `None`: withdraw.
    pub record: Option<ServiceRecord>,
    pub conditions: Vec<Condition>,
}

fn cond(kind: &str, ok: bool, reason: &str, message: String, now: Timestamp) -> Condition {
    Condition {
        type_: kind.to_owned(),
        status: if ok { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message,
        last_transition_time: Time(now),
        observed_generation: None,
    }
}

/// `others`: the other clusters' records of the same namespace and name.
pub fn reconcile_export(
    cluster: &ClusterId,
    export: &ServiceExport,
    service: Option<&Service>,
    slices: &[EndpointSlice],
    others: &[ServiceRecord],
    now: Timestamp,
) -> Outcome {
    let ns = export.metadata.namespace.clone().unwrap_or_default();
    let name = export.metadata.name.clone().unwrap_or_default();
    let invalid = |reason: &str, message: String| Outcome {
        record: None,
        conditions: vec![
            cond(condition::VALID, false, reason, message, now),
            cond(
                condition::READY,
                false,
                "NotValid",
                "the export is not valid".into(),
                now,
            ),
        ],
    };
    let (Ok(ns_label), Ok(name_label)) = (ns.parse::<DnsLabel>(), name.parse::<DnsLabel>()) else {
        return invalid(
            "InvalidName",
            format!("{ns}/{name} is not a valid namespace and name (DNS labels)"),
        );
    };
    let Some(svc) = service else {
        return invalid(
            "ServiceNotFound",
            format!("no Service {ns}/{name} in this cluster"),
        );
    };
    let spec = svc.spec.clone().unwrap_or_default();
    let kind = spec.type_.as_deref().unwrap_or("ClusterIP");
    if kind != "ClusterIP" {
        return invalid(
            "ServiceTypeNotSupported",
            format!("a Service of type {kind} cannot be exported (ClusterIP and headless can)"),
        );
    }
    let headless = spec.cluster_ip.as_deref() == Some("None");
    let ports: Vec<ServicePort> = spec
        .ports
        .unwrap_or_default()
        .into_iter()
        .filter_map(|p| {
            Some(ServicePort {
                name: p.name.unwrap_or_default(),
                protocol: p.protocol.unwrap_or_else(|| "TCP".into()),
                port: u16::try_from(p.port).ok()?,
                app_protocol: p.app_protocol.unwrap_or_default(),
            })
        })
        .collect();
    let ips: Vec<IpAddr> = if headless {
        Vec::new()
    } else {
        spec.cluster_ips
            .unwrap_or_default()
            .iter()
            .chain(spec.cluster_ip.iter())
            .filter_map(|ip| ip.parse().ok())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    };
    let mut endpoints = Vec::new();
    for slice in slices {
        for e in &slice.endpoints {
            let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            let hostname = e.hostname.as_deref().and_then(|h| h.parse().ok());
            for a in &e.addresses {
                if let Ok(ip) = a.parse() {
                    endpoints.push(Endpoint {
                        ip,
                        hostname: hostname.clone(),
                        ready,
                    });
                }
            }
        }
    }
    let ready = endpoints.iter().any(|e| e.ready);
    let record = ServiceRecord {
        cluster: cluster.clone(),
        namespace: ns_label,
        name: name_label,
        service_type: if headless {
            ServiceType::Headless
        } else {
            ServiceType::ClusterSetIP
        },
        ports,
        ips,
        endpoints,
        ready,
        exported_at_unix_ms: export
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.as_millisecond())
            .unwrap_or_else(|| now.as_millisecond()),
    };
    let port_set = |r: &ServiceRecord| -> BTreeSet<(String, String, u16)> {
        r.ports
            .iter()
            .map(|p| (p.name.clone(), p.protocol.to_ascii_uppercase(), p.port))
            .collect()
    };
    let conflict = others
        .iter()
        .filter(|o| &o.cluster != cluster)
        .find_map(|o| {
            if o.service_type != record.service_type {
                Some((
                    "TypeConflict",
                    format!("cluster {} exports it as {:?}", o.cluster, o.service_type),
                ))
            } else if port_set(o) != port_set(&record) {
                Some((
                    "PortConflict",
                    format!("cluster {} exports it with other ports", o.cluster),
                ))
            } else {
                None
            }
        });
    let conflict_cond = match conflict {
        Some((reason, message)) => cond(condition::CONFLICT, true, reason, message, now),
        None => cond(
            condition::CONFLICT,
            false,
            "NoConflicts",
            "no other cluster exports it differently".into(),
            now,
        ),
    };
    Outcome {
        record: Some(record),
        conditions: vec![
            cond(
                condition::VALID,
                true,
                "Valid",
                "the Service can be exported".into(),
                now,
            ),
            cond(
                condition::READY,
                true,
                "Exported",
                "published to the cluster set".into(),
                now,
            ),
            conflict_cond,
        ],
    }
}

#[cfg(test)]
mod tests;
