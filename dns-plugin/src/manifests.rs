//! The manifest-directory source (standalone mode, and the lab): `*.yaml` files holding
//! `Service`, `EndpointSlice` and `ServiceExport` objects, as `kubectl` would take them.
//! A file that does not parse, or holds another kind, is reported and left out as a whole,
//! so nothing of it is half-applied. Statuses are written to `status/`, next to them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::mcs::ServiceExport;
use clusterlink_api::DnsLabel;
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
    #[error(
        "{path} is {size} bytes, over the {} MiB limit for a manifest file; split it into smaller files",
        MAX_MANIFEST_BYTES / (1024 * 1024)
    )]
    TooLarge { path: PathBuf, size: u64 },
    #[error("{reason}")]
    Held { path: PathBuf, reason: String },
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
    // The parser's default budget stops at 1,024 documents; a file up to MAX_MANIFEST_BYTES
    // may hold tens of thousands of objects. The limits on aliases and depth (YAML bombs)
    // stay as they are.
    let options = serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_documents: 100_000,
            max_nodes: 4_000_000,
            max_events: 16_000_000,
        },
    };
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple_with_options(text, options)
        .map_err(|e| invalid(1, format!("not YAML: {e}")))?;
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

/// The largest manifest file read. A file of Services, EndpointSlices and ServiceExports of
/// this size holds thousands of objects; past it, the file is refused with a clear error
/// rather than parsed on every change.
pub const MAX_MANIFEST_BYTES: u64 = 8 * 1024 * 1024;

/// What identifies one version of a file without reading it: a write changes its size,
/// modification time or change time (nanoseconds), a replacement its inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Fingerprint {
    len: u64,
    ino: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Fingerprint {
    fn of(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        Fingerprint {
            len: meta.len(),
            ino: meta.ino(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// One file as last read.
struct Cached {
    fingerprint: Fingerprint,
    /// Its last version that parsed; kept while a newer one does not (an editor or a
    /// `cat >`/`kubectl ... > f` writing in place is caught half-way), so its services are not
    /// withdrawn from the cluster set for that moment.
    good: Option<Manifests>,
    error: Option<String>,
}

/// A manifest directory, read incrementally: a file is read and parsed again only when it
/// changed (by its [`Fingerprint`]); a file that stops parsing keeps its last good version
/// (and is reported) until it parses again or is removed.
#[derive(Default)]
pub struct ManifestDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, Cached>,
    /// Bytes read from files since this was made (what a test, or a curious operator, checks
    /// to see that unchanged files are left alone).
    pub bytes_read: u64,
}

impl ManifestDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        ManifestDir {
            dir: dir.into(),
            ..Default::default()
        }
    }

    /// Brings the view up to date with the directory: every `*.yaml`/`*.yml` file (not in
    /// subdirectories). Returns the objects of every file's last good version, and what is
    /// wrong now (files left out or held at their last good version, each said once per
    /// call).
    pub fn refresh(&mut self) -> (Manifests, Vec<ManifestError>) {
        let mut errors = Vec::new();
        let paths: Vec<PathBuf> = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
                .collect(),
            Err(source) => {
                // The directory is gone or unreadable: keep what was known rather than
                // withdraw every export at once; the error says why nothing changes.
                errors.push(ManifestError::Read {
                    path: self.dir.clone(),
                    source,
                });
                return (self.merged(), errors);
            }
        };
        let mut present = BTreeSet::new();
        for path in paths {
            let meta = match std::fs::metadata(&path) {
                Ok(m) if m.is_file() => m,
                // A directory named *.yaml, or a file removed since the listing.
                _ => continue,
            };
            present.insert(path.clone());
            let fingerprint = Fingerprint::of(&meta);
            if self
                .files
                .get(&path)
                .is_some_and(|c| c.fingerprint == fingerprint)
            {
                continue;
            }
            let parsed = self
                .read(&path, meta.len())
                .and_then(|text| parse(&path, &text));
            let previous = self.files.remove(&path).and_then(|c| c.good);
            let cached = match parsed {
                Ok(m) => Cached {
                    fingerprint,
                    good: Some(m),
                    error: None,
                },
                Err(e) => Cached {
                    fingerprint,
                    error: Some(match &previous {
                        Some(_) => format!(
                            "{e} (its last good version stays in use until it parses again)"
                        ),
                        None => format!("{e} (left out)"),
                    }),
                    good: previous,
                },
            };
            self.files.insert(path, cached);
        }
        self.files.retain(|p, _| present.contains(p));
        for (path, c) in &self.files {
            if let Some(e) = &c.error {
                errors.push(ManifestError::Held {
                    path: path.clone(),
                    reason: e.clone(),
                });
            }
        }
        (self.merged(), errors)
    }

    fn read(&mut self, path: &Path, len: u64) -> Result<String, ManifestError> {
        if len > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge {
                path: path.to_owned(),
                size: len,
            });
        }
        let text = clusterlink_broker_client::fs::read_limited(path, MAX_MANIFEST_BYTES).map_err(
            |source| match source.kind() {
                // It grew past the limit since it was looked at.
                std::io::ErrorKind::FileTooLarge => ManifestError::TooLarge {
                    path: path.to_owned(),
                    size: MAX_MANIFEST_BYTES + 1,
                },
                _ => ManifestError::Read {
                    path: path.to_owned(),
                    source,
                },
            },
        )?;
        self.bytes_read += text.len() as u64;
        Ok(text)
    }

    fn merged(&self) -> Manifests {
        let mut all = Manifests::default();
        for m in self.files.values().filter_map(|c| c.good.as_ref()) {
            all.exports.extend(m.exports.iter().cloned());
            all.services.extend(m.services.iter().cloned());
            all.slices.extend(m.slices.iter().cloned());
        }
        all
    }
}

/// Reads every `*.yaml`/`*.yml` file of `dir` once; see [`ManifestDir`].
pub fn read_dir(dir: &Path) -> (Manifests, Vec<ManifestError>) {
    ManifestDir::new(dir).refresh()
}

/// File name of a ServiceExport in a manifest directory. DNS labels only: a name can never
/// make it a path.
pub fn export_file(ns: &DnsLabel, name: &DnsLabel) -> String {
    format!("serviceexport.{ns}.{name}.yaml")
}

/// A ServiceExport manifest.
pub fn export_manifest(ns: &DnsLabel, name: &DnsLabel) -> String {
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
        let (demo, echo) = ("demo".parse().unwrap(), "echo".parse().unwrap());
        let e: Manifests = parse(Path::new("x.yaml"), &export_manifest(&demo, &echo)).unwrap();
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

    #[test]
    fn an_unchanged_file_is_not_read_again_however_large() {
        let dir = tempfile::tempdir().unwrap();
        // About 2 MiB of Services.
        let big: String = (0..8_000)
            .map(|i| {
                format!(
                    "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: demo}}\n\
                     spec: {{clusterIP: 10.96.{}.{}, ports: [{{port: 80}}]}}\n---\n",
                    i / 250,
                    i % 250
                )
            })
            .collect();
        std::fs::write(dir.path().join("big.yaml"), &big).unwrap();
        let mut m = ManifestDir::new(dir.path());
        let (first, errors) = m.refresh();
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(first.services.len(), 8_000);
        let after_first = m.bytes_read;
        assert_eq!(after_first, big.len() as u64);
        for _ in 0..10 {
            let (again, _) = m.refresh();
            assert_eq!(again.services.len(), 8_000);
        }
        assert_eq!(
            m.bytes_read, after_first,
            "the unchanged file was read again"
        );
        // A change is seen (and only the changed file read).
        std::fs::write(dir.path().join("small.yaml"), GOOD).unwrap();
        let (more, _) = m.refresh();
        assert_eq!(more.services.len(), 8_001);
        assert_eq!(m.bytes_read, after_first + GOOD.len() as u64);
    }

    #[test]
    fn a_half_written_file_keeps_its_last_good_version_until_it_parses_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("echo.yaml");
        std::fs::write(&path, GOOD).unwrap();
        let mut m = ManifestDir::new(dir.path());
        assert_eq!(m.refresh().0.exports.len(), 1);
        // Caught in the middle of a rewrite in place: the first half, cut inside a document.
        let cut = GOOD.find("addressType").unwrap() - 3;
        std::fs::write(&path, &GOOD[..cut]).unwrap();
        let (held, errors) = m.refresh();
        assert_eq!(held.exports.len(), 1, "the export must not flap away");
        assert_eq!(held.slices.len(), 1);
        assert_eq!(errors.len(), 1);
        let e = errors[0].to_string();
        assert!(
            e.contains("echo.yaml") && e.contains("last good version"),
            "{e}"
        );
        // The rest arrives: the new version is taken, the error is gone.
        std::fs::write(&path, GOOD.replace("10.1.101.10", "10.1.101.11")).unwrap();
        let (done, errors) = m.refresh();
        assert!(errors.is_empty(), "{errors:?}");
        let addr = &done.slices[0].endpoints[0].addresses[0];
        assert_eq!(addr, "10.1.101.11");
        // Removed: gone, with its last good version.
        std::fs::remove_file(&path).unwrap();
        let (gone, errors) = m.refresh();
        assert!(gone.exports.is_empty() && errors.is_empty());
    }

    #[test]
    fn a_file_never_parsed_is_left_out_and_an_oversized_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("bad.yaml"), "kind: [").unwrap();
        let f = std::fs::File::create(dir.path().join("huge.yaml")).unwrap();
        f.set_len(MAX_MANIFEST_BYTES + 1).unwrap();
        let mut m = ManifestDir::new(dir.path());
        let (got, errors) = m.refresh();
        assert!(got.exports.is_empty());
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(text.len(), 2, "{text:?}");
        assert!(
            text.iter()
                .any(|e| e.contains("bad.yaml") && e.contains("left out")),
            "{text:?}"
        );
        assert!(
            text.iter()
                .any(|e| e.contains("huge.yaml") && e.contains("over the 8 MiB limit")),
            "{text:?}"
        );
        assert_eq!(m.bytes_read, 7, "the oversized file was not read");
    }
}
