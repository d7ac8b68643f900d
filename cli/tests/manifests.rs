//! The Kubernetes manifests in deploy/: every overlay renders with `kubectl kustomize`, and
//! every object it renders passes `kubernetes-validate --strict` (the official schemas,
//! unknown fields refused) for the oldest and the newest Kubernetes the README claims.
//! scripts/install-deps.sh installs both tools; a missing one fails the test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The Kubernetes versions the README claims: oldest and newest.
const VERSIONS: [&str; 2] = ["1.29.0", "1.37.0"];

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn render(overlay: &str) -> String {
    let out = Command::new("kubectl")
        .args([
            "kustomize",
            &deploy()
                .join("overlays")
                .join(overlay)
                .display()
                .to_string(),
        ])
        .output()
        .expect("kubectl (scripts/install-deps.sh installs it)");
    assert!(
        out.status.success(),
        "kubectl kustomize deploy/overlays/{overlay}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn validate(overlay: &str, rendered: &str) {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), rendered).unwrap();
    for version in VERSIONS {
        let out = Command::new("kubernetes-validate")
            .args(["--strict", "--quiet", "-k", version])
            .arg(file.path())
            .output()
            .expect("kubernetes-validate (scripts/install-deps.sh installs it)");
        assert!(
            out.status.success(),
            "deploy/overlays/{overlay} against Kubernetes {version}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn kinds(rendered: &str) -> Vec<String> {
    rendered
        .lines()
        .filter_map(|l| l.strip_prefix("kind: "))
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_member_overlay_renders_and_validates() {
    let rendered = render("member");
    validate("member", &rendered);
    let kinds = kinds(&rendered);
    for k in [
        "CustomResourceDefinition",
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
    ] {
        assert!(kinds.iter().any(|x| x == k), "no {k} in {kinds:?}");
    }
    assert!(rendered.contains("namespace: clusterlink-system"));
    assert!(rendered.contains("image: localhost/clusterlink:dev"));
}

#[test]
fn the_broker_overlay_renders_and_validates() {
    let rendered = render("broker");
    validate("broker", &rendered);
    let kinds = kinds(&rendered);
    for k in [
        "Namespace",
        "ConfigMap",
        "PersistentVolumeClaim",
        "Deployment",
        "Service",
    ] {
        assert!(kinds.iter().any(|x| x == k), "no {k} in {kinds:?}");
    }
}

/// The validator catches what it must: a misspelt field is an error, not a warning.
#[test]
fn a_misspelt_field_is_refused() {
    let rendered = render("member").replacen("serviceAccountName:", "serviceAcountName:", 1);
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), rendered).unwrap();
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "--quiet", "-k", VERSIONS[1]])
        .arg(file.path())
        .output()
        .unwrap();
    assert!(!out.status.success(), "a misspelt field passed");
}
