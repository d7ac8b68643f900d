//! The Kubernetes Multi-Cluster Services API, `multicluster.x-k8s.io/v1alpha1`:
//! `ServiceExport` and `ServiceImport`, schema compatible with kubernetes-sigs/mcs-api.
//!
//! The CRDs in `deploy/crds/` are generated from these types ([`crds_yaml`]); a test fails
//! when they are out of date (`UPDATE_CRDS=1 cargo test -p clusterlink-dns` rewrites them).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use kube::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "multicluster.x-k8s.io";

/// Marks a Service for export to the cluster set. The mcs-api v1alpha1 object has no spec
/// (`no_spec`: the struct's, empty, fields sit at the root), so objects written for other
/// implementations are valid here.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "multicluster.x-k8s.io",
    version = "v1alpha1",
    kind = "ServiceExport",
    namespaced,
    status = "ServiceExportStatus",
    shortname = "svcex",
    no_spec,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
pub struct ServiceExportSpec {}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ServiceExportStatus {
    /// `Valid`, `Ready` and `Conflict`, as the MCS API defines them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// Condition types of a ServiceExport.
pub mod condition {
    /// The export is valid: the Service exists and can be exported.
    pub const VALID: &str = "Valid";
    /// The export has been published to the cluster set.
    pub const READY: &str = "Ready";
    /// Another cluster exports the same name with properties that conflict with this one's.
    pub const CONFLICT: &str = "Conflict";
}

/// A service of the cluster set, as imported into one cluster.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "multicluster.x-k8s.io",
    version = "v1alpha1",
    kind = "ServiceImport",
    namespaced,
    status = "ServiceImportStatus",
    shortname = "svcim",
    printcolumn = r#"{"name":"Type","type":"string","jsonPath":".spec.type"}"#,
    printcolumn = r#"{"name":"IP","type":"string","jsonPath":".spec.ips"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ServiceImportSpec {
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    /// The cluster-set IPs (ClusterSetIP services).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<String>,
    #[serde(rename = "type")]
    pub type_: ServiceImportType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity_config: Option<k8s_openapi::api::core::v1::SessionAffinityConfig>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ServiceImportType {
    #[default]
    ClusterSetIP,
    Headless,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// TCP, UDP or SCTP (TCP when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
    pub port: i32,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ServiceImportStatus {
    /// The clusters the service is imported from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clusters: Vec<ClusterStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ClusterStatus {
    pub cluster: String,
}

/// The two CRDs as YAML documents (what `deploy/crds/` holds), keyed by file name.
pub fn crds_yaml() -> Vec<(&'static str, String)> {
    let export = serde_json::to_value(ServiceExport::crd()).unwrap_or_default();
    let import = serde_json::to_value(ServiceImport::crd()).unwrap_or_default();
    [
        ("serviceexports.multicluster.x-k8s.io.yaml", export),
        ("serviceimports.multicluster.x-k8s.io.yaml", import),
    ]
    .into_iter()
    .map(|(name, crd)| {
        let body = serde_saphyr::to_string(&crd).unwrap_or_default();
        (
            name,
            format!("# Generated from dns-plugin/src/mcs.rs by `UPDATE_CRDS=1 cargo test -p clusterlink-dns`; do not edit.\n{body}"),
        )
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crds_in_deploy_are_up_to_date() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds");
        for (name, text) in crds_yaml() {
            let path = dir.join(name);
            if std::env::var_os("UPDATE_CRDS").is_some() {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, &text).unwrap();
            }
            let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                on_disk == text,
                "{} is out of date; regenerate with `UPDATE_CRDS=1 cargo test -p clusterlink-dns`",
                path.display()
            );
        }
    }

    #[test]
    fn the_crds_name_the_mcs_group_and_kinds() {
        let export = ServiceExport::crd();
        assert_eq!(export.spec.group, GROUP);
        assert_eq!(
            export.metadata.name.as_deref(),
            Some("serviceexports.multicluster.x-k8s.io")
        );
        assert_eq!(export.spec.scope, "Namespaced");
        let import = ServiceImport::crd();
        assert_eq!(import.spec.names.kind, "ServiceImport");
        assert_eq!(import.spec.versions[0].name, "v1alpha1");
    }

    #[test]
    fn mcs_api_objects_parse_as_written_for_other_implementations() {
        // A ServiceExport with no spec, and a ServiceImport as the mcs-api examples write it.
        let export: ServiceExport = serde_json::from_str(
            r#"{"apiVersion":"multicluster.x-k8s.io/v1alpha1","kind":"ServiceExport",
                "metadata":{"name":"echo","namespace":"demo"}}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(export.metadata.name.as_deref(), Some("echo"));
        let import: ServiceImport = serde_json::from_str(
            r#"{"apiVersion":"multicluster.x-k8s.io/v1alpha1","kind":"ServiceImport",
                "metadata":{"name":"echo","namespace":"demo"},
                "spec":{"type":"ClusterSetIP","ips":["10.42.0.10"],
                        "ports":[{"name":"tcp","protocol":"TCP","port":7}]},
                "status":{"clusters":[{"cluster":"east"}]}}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(import.spec.type_, ServiceImportType::ClusterSetIP);
        assert_eq!(import.spec.ports[0].port, 7);
        assert_eq!(import.status.unwrap().clusters[0].cluster, "east");
    }
}
