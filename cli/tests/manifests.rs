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
        "DaemonSet",
        "Service",
        "PodDisruptionBudget",
    ] {
        assert!(kinds.iter().any(|x| x == k), "no {k} in {kinds:?}");
    }
    assert!(rendered.contains("namespace: clusterlink-system"));
    assert!(rendered.contains("image: localhost/clusterlink:dev"));
    // Every component's arguments are ones the CLI takes.
    cli_takes(&rendered, 3);
}

/// Checks that the `n` containers' args are ones the CLI takes (with `--help` after them:
/// a flag it does not take fails before `--help` is read).
fn cli_takes(rendered: &str, n: usize) {
    let all = container_args(rendered);
    assert_eq!(all.len(), n, "{all:?}");
    for args in all {
        let out = Command::new(env!("CARGO_BIN_EXE_clusterlink"))
            .args(&args)
            .arg("--help")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "clusterlink {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Every container's args.
fn container_args(rendered: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for doc in serde_saphyr::from_multiple::<serde_json::Value>(rendered).unwrap() {
        let spec = &doc["spec"]["template"]["spec"];
        for list in ["initContainers", "containers"] {
            for c in spec[list].as_array().into_iter().flatten() {
                let args: Vec<String> = c["args"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|a| a.as_str().map(str::to_owned))
                    .collect();
                out.push(args);
            }
        }
    }
    out
}

/// `join --kubeconfig` applies deploy/rendered/member.yaml: it must be what kustomize
/// renders (regenerate with `UPDATE_RENDERED=1 cargo test -p clusterlink --test manifests`).
#[test]
fn the_rendered_member_overlay_join_applies_is_up_to_date() {
    let rendered = render("member");
    let path = deploy().join("rendered/member.yaml");
    if std::env::var_os("UPDATE_RENDERED").is_some() {
        std::fs::write(&path, &rendered).unwrap();
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == rendered,
        "{} is out of date: UPDATE_RENDERED=1 cargo test -p clusterlink --test manifests",
        path.display()
    );
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
    cli_takes(&rendered, 2);
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
