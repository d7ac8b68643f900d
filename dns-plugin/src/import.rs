//! The import reconciler: the cluster set's service records to the `ServiceImport` and
//! `EndpointSlice`s an importing cluster holds. A plain function.
//!
//! One ServiceImport per exported namespace/name: its type and ports are those of the
//! oldest export (the MCS API's conflict resolution), its status lists every exporting
//! cluster. One EndpointSlice per exporting cluster, labelled with the service and the
//! source cluster as the MCS API names them, holding that cluster's ready endpoints (a
//! headless service) or its service IPs (a ClusterSetIP service).

use std::collections::BTreeMap;

use crate::mcs::{
    ClusterStatus, ServiceImport, ServiceImportSpec, ServiceImportStatus, ServiceImportType,
    ServicePort,
};
use clusterlink_api::{ServiceRecord, ServiceType};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

pub const SERVICE_NAME_LABEL: &str = "multicluster.kubernetes.io/service-name";
pub const SOURCE_CLUSTER_LABEL: &str = "multicluster.kubernetes.io/source-cluster";

#[derive(Clone, Debug)]
pub struct Imported {
    pub import: ServiceImport,
    pub slices: Vec<EndpointSlice>,
}

impl Imported {
    /// The service's namespace and name.
    pub fn key(&self) -> (String, String) {
        let m = &self.import.metadata;
        (
            m.namespace.clone().unwrap_or_default(),
            m.name.clone().unwrap_or_default(),
        )
    }
}

pub fn imports<'a>(records: impl IntoIterator<Item = &'a ServiceRecord>) -> Vec<Imported> {
    let mut by_name: BTreeMap<(String, String), Vec<&ServiceRecord>> = BTreeMap::new();
    for r in records {
        by_name
            .entry((r.namespace.to_string(), r.name.to_string()))
            .or_default()
            .push(r);
    }
    by_name
        .into_iter()
        .filter_map(|((ns, name), mut rs)| {
            rs.sort_by_key(|r| (r.exported_at_unix_ms, r.cluster.clone()));
            let oldest = *rs.first()?;
            let meta = |n: String, labels: Option<BTreeMap<String, String>>| ObjectMeta {
                name: Some(n),
                namespace: Some(ns.clone()),
                labels,
                ..ObjectMeta::default()
            };
            let import = ServiceImport {
                metadata: meta(name.clone(), None),
                spec: ServiceImportSpec {
                    ports: oldest
                        .ports
                        .iter()
                        .map(|p| ServicePort {
                            name: (!p.name.is_empty()).then(|| p.name.clone()),
                            protocol: Some(p.protocol.clone()),
                            app_protocol: (!p.app_protocol.is_empty())
                                .then(|| p.app_protocol.clone()),
                            port: i32::from(p.port),
                        })
                        .collect(),
                    ips: Vec::new(),
                    type_: match oldest.service_type {
                        ServiceType::ClusterSetIP => ServiceImportType::ClusterSetIP,
                        ServiceType::Headless => ServiceImportType::Headless,
                    },
                    session_affinity: None,
                    session_affinity_config: None,
                },
                status: Some(ServiceImportStatus {
                    clusters: rs
                        .iter()
                        .map(|r| ClusterStatus {
                            cluster: r.cluster.to_string(),
                        })
                        .collect(),
                }),
            };
            let slices = rs
                .iter()
                .map(|r| {
                    let labels = BTreeMap::from([
                        (SERVICE_NAME_LABEL.to_owned(), name.clone()),
                        (SOURCE_CLUSTER_LABEL.to_owned(), r.cluster.to_string()),
                    ]);
                    let endpoints: Vec<Endpoint> = match r.service_type {
                        ServiceType::Headless => r
                            .endpoints
                            .iter()
                            .map(|e| Endpoint {
                                addresses: vec![e.ip.to_string()],
                                hostname: e.hostname.as_ref().map(ToString::to_string),
                                conditions: Some(EndpointConditions {
                                    ready: Some(e.ready),
                                    ..EndpointConditions::default()
                                }),
                                ..Endpoint::default()
                            })
                            .collect(),
                        ServiceType::ClusterSetIP => r
                            .ips
                            .iter()
                            .map(|ip| Endpoint {
                                addresses: vec![ip.to_string()],
                                conditions: Some(EndpointConditions {
                                    ready: Some(r.ready),
                                    ..EndpointConditions::default()
                                }),
                                ..Endpoint::default()
                            })
                            .collect(),
                    };
                    let v6 = endpoints
                        .first()
                        .is_some_and(|e| e.addresses.iter().any(|a| a.contains(':')));
                    EndpointSlice {
                        metadata: meta(format!("{name}-{}", r.cluster), Some(labels)),
                        address_type: if v6 { "IPv6" } else { "IPv4" }.into(),
                        endpoints,
                        ports: None,
                    }
                })
                .collect();
            Some(Imported { import, slices })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clusterlink_api::Endpoint as E;

    fn rec(cluster: &str, port: u16, at: i64, kind: ServiceType) -> ServiceRecord {
        ServiceRecord {
            cluster: cluster.parse().unwrap(),
            namespace: "demo".parse().unwrap(),
            name: "echo".parse().unwrap(),
            service_type: kind,
            ports: vec![clusterlink_api::ServicePort {
                name: "tcp".into(),
                protocol: "TCP".into(),
                port,
                app_protocol: String::new(),
            }],
            ips: vec!["10.101.0.7".parse().unwrap()],
            endpoints: vec![E {
                ip: "10.1.2.3".parse().unwrap(),
                hostname: Some("echo-0".parse().unwrap()),
                ready: true,
            }],
            ready: true,
            exported_at_unix_ms: at,
        }
    }

    #[test]
    fn one_import_per_name_the_oldest_export_wins_a_slice_per_cluster() {
        let rs = [
            rec("west", 8, 20, ServiceType::Headless),
            rec("east", 7, 10, ServiceType::Headless),
        ];
        let out = imports(&rs);
        assert_eq!(out.len(), 1);
        let i = &out[0];
        assert_eq!(i.import.metadata.name.as_deref(), Some("echo"));
        assert_eq!(i.import.spec.ports[0].port, 7, "east exported first");
        assert_eq!(i.import.spec.type_, ServiceImportType::Headless);
        let clusters: Vec<&str> = i
            .import
            .status
            .as_ref()
            .unwrap()
            .clusters
            .iter()
            .map(|c| c.cluster.as_str())
            .collect();
        assert_eq!(clusters, ["east", "west"]);
        assert_eq!(i.slices.len(), 2);
        let s = &i.slices[0];
        assert_eq!(
            s.metadata.labels.as_ref().unwrap()[SOURCE_CLUSTER_LABEL],
            "east"
        );
        assert_eq!(s.endpoints[0].hostname.as_deref(), Some("echo-0"));
        // A ClusterSetIP export's slice holds its service IPs.
        let out = imports(&[rec("east", 7, 10, ServiceType::ClusterSetIP)]);
        assert_eq!(out[0].slices[0].endpoints[0].addresses, ["10.101.0.7"]);
        assert!(imports(&[]).is_empty());
    }
}
