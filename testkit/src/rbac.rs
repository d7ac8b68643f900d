//! Role-based access checked against the code: the verbs a component's requests need (from
//! what it sent to kube's mock API server), and what its ClusterRole in deploy/ grants; a
//! test fails on any difference, either way.

use std::collections::BTreeSet;
use std::path::Path;

/// (API group, resource with subresource, verb).
pub type Grant = (String, String, String);

/// The RBAC verb, API group and resource (with subresource) a request needs. A
/// server-side apply may create the object: it needs `create` as well as `patch`.
pub fn needs(method: &str, path: &str, content_type: &str) -> Vec<Grant> {
    let (path, query) = path.split_once('?').unwrap_or((path, ""));
    let watch = query
        .split('&')
        .any(|p| p == "watch=true" || p == "watch=1");
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", _version, rest @ ..] => (String::new(), rest),
        ["apis", group, _version, rest @ ..] => ((*group).to_owned(), rest),
        _ => panic!("not an API path: {path}"),
    };
    let rest = match rest {
        ["namespaces", _ns, rest @ ..] => rest,
        rest => rest,
    };
    let (resource, named) = match rest {
        [resource] => ((*resource).to_owned(), false),
        [resource, _name] => ((*resource).to_owned(), true),
        [resource, _name, sub] => (format!("{resource}/{sub}"), true),
        _ => panic!("unexpected path {path}"),
    };
    let verbs: &[&str] = match (method, named) {
        ("GET", false) if watch => &["watch"],
        ("GET", false) => &["list"],
        ("GET", true) => &["get"],
        ("POST", _) => &["create"],
        ("PUT", _) => &["update"],
        ("PATCH", _) if content_type.starts_with("application/apply-patch") => &["patch", "create"],
        ("PATCH", _) => &["patch"],
        ("DELETE", true) => &["delete"],
        ("DELETE", false) => &["deletecollection"],
        (m, _) => panic!("unexpected method {m} {path}"),
    };
    verbs
        .iter()
        .map(|v| (group.clone(), resource.clone(), (*v).to_owned()))
        .collect()
}

/// What the ClusterRole or Role `role` in `file` (a YAML stream) grants (resource names are
/// not compared: a grant limited to some names counts as the grant).
pub fn granted(file: &Path, role: &str) -> Result<BTreeSet<Grant>, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let docs = serde_saphyr::from_multiple::<serde_json::Value>(&text)
        .map_err(|e| format!("{}: {e}", file.display()))?;
    let doc = docs
        .iter()
        .find(|d| {
            (d["kind"] == "ClusterRole" || d["kind"] == "Role") && d["metadata"]["name"] == role
        })
        .ok_or_else(|| format!("{}: no ClusterRole or Role {role}", file.display()))?;
    let mut out = BTreeSet::new();
    let strings = |rule: &serde_json::Value, k: &str| -> Vec<String> {
        rule[k]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    for rule in doc["rules"].as_array().into_iter().flatten() {
        for g in strings(rule, "apiGroups") {
            for r in strings(rule, "resources") {
                for v in strings(rule, "verbs") {
                    out.insert((g.clone(), r.clone(), v));
                }
            }
        }
    }
    Ok(out)
}

/// Checks that the roles `roles` (ClusterRoles or Roles) in `file` grant, together, exactly
/// `needed`.
pub fn check(needed: &BTreeSet<Grant>, file: &Path, roles: &[&str]) -> Result<(), String> {
    let mut granted = BTreeSet::new();
    for role in roles {
        granted.extend(self::granted(file, role)?);
    }
    let role = roles.join(" + ");
    let missing: Vec<_> = needed.difference(&granted).collect();
    let unused: Vec<_> = granted.difference(needed).collect();
    if missing.is_empty() && unused.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} ({role}): the code needs {missing:?}, not granted; it grants {unused:?}, not used",
            file.display()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_map_to_the_verbs_they_need() {
        let g = |v: &str| (String::new(), "nodes".to_owned(), v.to_owned());
        assert_eq!(needs("GET", "/api/v1/nodes/gw-1", ""), [g("get")]);
        assert_eq!(needs("GET", "/api/v1/nodes?limit=1", ""), [g("list")]);
        assert_eq!(
            needs("GET", "/api/v1/nodes?resourceVersion=5&watch=true", ""),
            [g("watch")]
        );
        let apply = needs(
            "PATCH",
            "/apis/discovery.k8s.io/v1/namespaces/demo/endpointslices/x?fieldManager=a",
            "application/apply-patch+yaml",
        );
        assert_eq!(apply.len(), 2, "an apply may create: {apply:?}");
        assert_eq!(
            needs(
                "PATCH",
                "/apis/multicluster.x-k8s.io/v1alpha1/namespaces/demo/serviceexports/e/status",
                "application/merge-patch+json"
            ),
            [(
                "multicluster.x-k8s.io".to_owned(),
                "serviceexports/status".to_owned(),
                "patch".to_owned()
            )]
        );
    }
}
