use super::*;
use k8s_openapi::api::core::v1::{ServicePort as KPort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint as KEndpoint, EndpointConditions};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

fn meta(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some("demo".into()),
        ..ObjectMeta::default()
    }
}

fn export() -> ServiceExport {
    ServiceExport {
        metadata: meta("echo"),
        spec: Default::default(),
        status: None,
    }
}

fn service(cluster_ip: &str, port: i32, type_: Option<&str>) -> Service {
    Service {
        metadata: meta("echo"),
        spec: Some(ServiceSpec {
            cluster_ip: Some(cluster_ip.into()),
            type_: type_.map(str::to_owned),
            ports: Some(vec![KPort {
                name: Some("tcp-echo".into()),
                port,
                protocol: Some("TCP".into()),
                ..KPort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

fn slice(addrs: &[(&str, Option<&str>, bool)]) -> EndpointSlice {
    EndpointSlice {
        metadata: meta("echo-abc"),
        address_type: "IPv4".into(),
        endpoints: addrs
            .iter()
            .map(|(ip, host, ready)| KEndpoint {
                addresses: vec![(*ip).into()],
                hostname: host.map(str::to_owned),
                conditions: Some(EndpointConditions {
                    ready: Some(*ready),
                    ..EndpointConditions::default()
                }),
                ..KEndpoint::default()
            })
            .collect(),
        ports: None,
    }
}

fn status<'a>(o: &'a Outcome, kind: &str) -> (&'a str, &'a str) {
    let c = o.conditions.iter().find(|c| c.type_ == kind).unwrap();
    (c.status.as_str(), c.reason.as_str())
}

fn now() -> Timestamp {
    Timestamp::from_second(1_800_000_000).unwrap()
}

#[test]
fn a_cluster_ip_service_is_exported_with_its_ips_ports_and_endpoints() {
    let a = "a".parse().unwrap();
    let o = reconcile_export(
        &a,
        &export(),
        Some(&service("10.101.0.7", 7, None)),
        &[slice(&[
            ("10.1.2.10", None, true),
            ("10.1.2.11", None, false),
        ])],
        &[],
        now(),
    );
    let r = o.record.as_ref().unwrap();
    assert_eq!(r.service_type, ServiceType::ClusterSetIP);
    assert_eq!(r.ips, vec!["10.101.0.7".parse::<IpAddr>().unwrap()]);
    assert_eq!((r.ports[0].port, r.ports[0].protocol.as_str()), (7, "TCP"));
    assert_eq!(r.endpoints.len(), 2);
    assert!(r.ready, "one ready endpoint makes it ready");
    assert_eq!(status(&o, "Valid"), ("True", "Valid"));
    assert_eq!(status(&o, "Ready"), ("True", "Exported"));
    assert_eq!(status(&o, "Conflict"), ("False", "NoConflicts"));
    // No ready endpoint: still exported, not ready (DNS leaves it out).
    let o = reconcile_export(
        &a,
        &export(),
        Some(&service("10.101.0.7", 7, None)),
        &[slice(&[("10.1.2.10", None, false)])],
        &[],
        now(),
    );
    assert!(!o.record.unwrap().ready);
}

#[test]
fn headless_services_carry_their_endpoints_and_hostnames() {
    let o = reconcile_export(
        &"a".parse().unwrap(),
        &export(),
        Some(&service("None", 7, None)),
        &[slice(&[("10.1.2.10", Some("echo-0"), true)])],
        &[],
        now(),
    );
    let r = o.record.unwrap();
    assert_eq!(r.service_type, ServiceType::Headless);
    assert!(r.ips.is_empty());
    assert_eq!(r.endpoints[0].hostname.as_ref().unwrap().as_str(), "echo-0");
}

#[test]
fn invalid_exports_are_not_published() {
    let a = "a".parse().unwrap();
    let o = reconcile_export(&a, &export(), None, &[], &[], now());
    assert_eq!(o.record, None);
    assert_eq!(status(&o, "Valid"), ("False", "ServiceNotFound"));
    assert_eq!(status(&o, "Ready").0, "False");
    let o = reconcile_export(
        &a,
        &export(),
        Some(&service("", 7, Some("ExternalName"))),
        &[],
        &[],
        now(),
    );
    assert_eq!(status(&o, "Valid"), ("False", "ServiceTypeNotSupported"));
}

#[test]
fn conflicting_ports_or_type_across_clusters_set_the_conflict_condition() {
    let a = "a".parse().unwrap();
    let theirs = |port: i32, ip: &str| {
        let mut r = reconcile_export(
            &"b".parse().unwrap(),
            &export(),
            Some(&service(ip, port, None)),
            &[],
            &[],
            now(),
        )
        .record
        .unwrap();
        r.cluster = "b".parse().unwrap();
        r
    };
    let mine = service("10.101.0.7", 7, None);
    let same = reconcile_export(
        &a,
        &export(),
        Some(&mine),
        &[],
        &[theirs(7, "10.102.0.7")],
        now(),
    );
    assert_eq!(status(&same, "Conflict").0, "False");
    let ports = reconcile_export(
        &a,
        &export(),
        Some(&mine),
        &[],
        &[theirs(8, "10.102.0.7")],
        now(),
    );
    assert_eq!(status(&ports, "Conflict"), ("True", "PortConflict"));
    assert!(ports.record.is_some(), "still exported");
    let kind = reconcile_export(&a, &export(), Some(&mine), &[], &[theirs(7, "None")], now());
    assert_eq!(status(&kind, "Conflict"), ("True", "TypeConflict"));
}
