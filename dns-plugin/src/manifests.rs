//! The manifest-directory source (standalone mode, and the lab): `*.yaml` files holding
//! `Service`, `EndpointSlice` and `ServiceExport` objects, as `kubectl` would take them.
//! A file that does not parse, or holds another kind, is reported and left out as a whole,
//! so nothing of it is half-applied. Statuses are written to `status/`, next to them.

use std::path::{Path, PathBuf};

use crate::mcs::ServiceExport;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ManifestError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: document {doc}: {reason}")]
    Invalid {
        path: PathBuf,
        doc: usize,
        reason: String,
    },
}

/// The objects of a directory.
#[derive(Clone, Debug, Default)]
pub struct Manifests {
    pub exports: Vec<ServiceExport>,
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
}

impl Manifests {
    pub fn service(&self, ns: &str, name: &str) -> Option<&Service> {
        self.services.iter().find(|s| {
            s.metadata.namespace.as_deref().unwrap_or("default") == ns
                && s.metadata.name.as_deref() == Some(name)
        })
    }

    /// The EndpointSlices of a Service (label `kubernetes.io/service-name`).
    pub fn slices_of(&self, ns: &str, name: &str) -> Vec<EndpointSlice> {
        self.slices
            .iter()
            .filter(|s| {
                s.metadata.namespace.as_deref().unwrap_or("default") == ns
                    && s.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get("kubernetes.io/service-name"))
                        .map(String::as_str)
                        == Some(name)
            })
            .cloned()
            .collect()
    }
}

/// Parses one file's text (multi-document YAML).
pub fn parse(path: &Path, text: &str) -> Result<Manifests, ManifestError> {
    let invalid = |doc: usize, reason: String| ManifestError::Invalid {
        path: path.to_owned(),
        doc,
        reason,
    };
    let docs: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(text).map_err(|e| invalid(1, format!("not YAML: {e}")))?;
    let mut out = Manifests::default();
    for (i, doc) in docs.into_iter().enumerate() {
        let n = i + 1;
        if doc.is_null() {
            continue;
        }
        let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
        let api = doc["apiVersion"].as_str().unwrap_or_default().to_owned();
        let bad = |e: serde_json::Error| invalid(n, format!("not a valid {kind}: {e}"));
        match (api.as_str(), kind.as_str()) {
            ("v1", "Service") => out.services.push(serde_json::from_value(doc).map_err(bad)?),
            ("discovery.k8s.io/v1", "EndpointSlice") => {
                out.slices.push(serde_json::from_value(doc).map_err(bad)?)
            }
            ("multicluster.x-k8s.io/v1alpha1", "ServiceExport") => {
                let e: ServiceExport = serde_json::from_value(doc).map_err(bad)?;
                if e.metadata.name.is_none() {
                    return Err(invalid(n, "a ServiceExport needs metadata.name".into()));
                }
                out.exports.push(e)
            }
            _ => {
                return Err(invalid(
                    n,
                    format!(
                        "{api:?} {kind:?} is not supported here; this directory holds v1 Service, \
                         discovery.k8s.io/v1 EndpointSlice and multicluster.x-k8s.io/v1alpha1 ServiceExport"
                    ),
                ));
            }
        }
    }
    Ok(out)
}

/// Reads every `*.yaml`/`*.yml` file of `dir` (not its subdirectories); the files that fail
/// are returned as errors and left out.
pub fn read_dir(dir: &Path) -> (Manifests, Vec<ManifestError>) {
    let mut all = Manifests::default();
    let mut errors = Vec::new();
    let mut paths: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
            .collect(),
        Err(source) => {
            errors.push(ManifestError::Read {
                path: dir.to_owned(),
                source,
            });
            return (all, errors);
        }
    };
    paths.sort();
    for path in paths {
        let parsed = std::fs::read_to_string(&path)
            .map_err(|source| ManifestError::Read {
                path: path.clone(),
                source,
            })
            .and_then(|text| parse(&path, &text));
        match parsed {
            Ok(m) => {
                all.exports.extend(m.exports);
                all.services.extend(m.services);
                all.slices.extend(m.slices);
            }
            Err(e) => errors.push(e),
        }
    }
    (all, errors)
}

/// File name of a ServiceExport in a manifest directory.
pub fn export_file(ns: &str, name: &str) -> String {
    format!("serviceexport.{ns}.{name}.yaml")
}

/// A ServiceExport manifest.
pub fn export_manifest(ns: &str, name: &str) -> String {
    format!(
        "apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata:\n  name: {name}\n  namespace: {ns}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: demo}
spec:
  clusterIP: None
  ports: [{name: tcp-echo, port: 7, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: echo-1
  namespace: demo
  labels: {kubernetes.io/service-name: echo}
addressType: IPv4
endpoints:
- addresses: [10.1.101.10]
  hostname: echo-0
  conditions: {ready: true}
---
apiVersion: multicluster.x-k8s.io/v1alpha1
kind: ServiceExport
metadata: {name: echo, namespace: demo}
";

    #[test]
    fn a_directory_of_service_slice_and_export() {
        let m = parse(Path::new("echo.yaml"), GOOD).unwrap();
        assert_eq!(
            (m.services.len(), m.slices.len(), m.exports.len()),
            (1, 1, 1)
        );
        assert!(m.service("demo", "echo").is_some());
        assert_eq!(m.slices_of("demo", "echo").len(), 1);
        assert!(m.slices_of("demo", "other").is_empty());
        let e: Manifests = parse(Path::new("x.yaml"), &export_manifest("demo", "echo")).unwrap();
        assert_eq!(e.exports[0].metadata.name.as_deref(), Some("echo"));
    }

    #[test]
    fn bad_files_say_what_is_wrong_and_where() {
        let kind = parse(
            Path::new("d.yaml"),
            "apiVersion: apps/v1\nkind: Deployment\n",
        )
        .unwrap_err();
        assert!(
            kind.to_string()
                .contains("d.yaml: document 1: \"apps/v1\" \"Deployment\" is not supported"),
            "{kind}"
        );
        let field = parse(
            Path::new("s.yaml"),
            &format!("{GOOD}---\napiVersion: v1\nkind: Service\nmetadata: {{name: x}}\nspec: {{ports: 7}}\n"),
        )
        .unwrap_err();
        assert!(
            field
                .to_string()
                .contains("document 4: not a valid Service"),
            "{field}"
        );
        let yaml = parse(Path::new("y.yaml"), "kind: [").unwrap_err();
        assert!(yaml.to_string().contains("not YAML"), "{yaml}");
    }

    #[test]
    fn a_bad_file_is_left_out_whole_and_the_others_are_read() {
        let dir = std::env::temp_dir().join(format!("cl-manifests-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.yaml"), GOOD).unwrap();
        // A valid Service followed by a broken document: none of the file is taken.
        std::fs::write(
            dir.join("b.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: b, namespace: demo}\n---\nkind: Nope\n",
        )
        .unwrap();
        std::fs::write(dir.join("notes.txt"), "ignored").unwrap();
        let (m, errors) = read_dir(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(errors.len(), 1);
        assert!(errors[0].to_string().contains("b.yaml"));
        assert_eq!(m.services.len(), 1, "only a.yaml's Service");
    }
}
