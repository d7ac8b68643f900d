//! `export`/`unexport` against the Kubernetes API (kubeconfig or in-cluster config).

use anyhow::{Context, Result, bail};
use clusterlink_api::DnsLabel;
use clusterlink_dns::kube_source::{self, Outcome};

use clusterlink_cli::output::print;

async fn client() -> Result<kube::Client> {
    kube::Client::try_default().await.context(
        "Cannot reach the Kubernetes API (no kubeconfig and not in a cluster); \
         in standalone mode give --manifests DIR",
    )
}

pub async fn create(ns: &DnsLabel, name: &DnsLabel) -> Result<()> {
    match kube_source::export(client().await?, ns.as_str(), name.as_str()).await? {
        Outcome::AlreadyExported => print(&format!("Already exported: service {ns}/{name}\n")),
        _ => print(&format!(
            "Exported service {ns}/{name} (ServiceExport created)\n"
        )),
    }
    Ok(())
}

pub async fn delete(ns: &DnsLabel, name: &DnsLabel) -> Result<()> {
    match kube_source::unexport(client().await?, ns.as_str(), name.as_str()).await? {
        Outcome::NotExported => bail!("Service {ns}/{name} is not exported (no ServiceExport)"),
        _ => print(&format!(
            "Unexported service {ns}/{name} (ServiceExport deleted)\n"
        )),
    }
    Ok(())
}
