//! `clusterlink export service` and `unexport service`: write or remove the ServiceExport.
//!
//! Standalone mode (`--manifests DIR`, what the lab uses): a ServiceExport manifest in the
//! directory the cluster's DNS plugin reads. Against Kubernetes (no `--manifests`) the
//! ServiceExport object is created or deleted through the API server.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use clusterlink_api::DnsLabel;
use clusterlink_dns::manifests::{export_file, export_manifest};

use clusterlink_cli::output::print;

#[derive(Subcommand)]
pub enum ExportCommand {
    /// Export a Service to the cluster set.
    Service(ExportArgs),
}

#[derive(Args)]
pub struct ExportArgs {
    /// The Service's name.
    pub name: DnsLabel,
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: DnsLabel,
    /// Standalone mode: the cluster's manifest directory (the DNS plugin's `--manifests`).
    #[arg(long, value_name = "DIR")]
    pub manifests: Option<PathBuf>,
}

pub async fn export(c: ExportCommand) -> Result<()> {
    let ExportCommand::Service(a) = c;
    match &a.manifests {
        Some(dir) => {
            if !dir.is_dir() {
                bail!(
                    "{} is not a directory; give the manifest directory the DNS plugin reads (--manifests)",
                    dir.display()
                );
            }
            let path = dir.join(export_file(&a.namespace, &a.name));
            let existed = path.exists();
            let manifest = export_manifest(&a.namespace, &a.name);
            clusterlink_broker_client::fs::write_atomic(&path, manifest.as_bytes(), 0o644)
                .with_context(|| format!("Cannot write {}", path.display()))?;
            print(&format!(
                "{} service {}/{} ({}); its status will be in {}\n",
                if existed {
                    "Already exported:"
                } else {
                    "Exported"
                },
                a.namespace,
                a.name,
                path.display(),
                dir.join("status")
                    .join(export_file(&a.namespace, &a.name))
                    .display()
            ));
            Ok(())
        }
        None => super::kube_export::create(&a.namespace, &a.name).await,
    }
}

pub async fn unexport(c: ExportCommand) -> Result<()> {
    let ExportCommand::Service(a) = c;
    match &a.manifests {
        Some(dir) => {
            let path = dir.join(export_file(&a.namespace, &a.name));
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    print(&format!("Unexported service {}/{}\n", a.namespace, a.name));
                    Ok(())
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                    "Service {}/{} is not exported here (no {})",
                    a.namespace,
                    a.name,
                    path.display()
                ),
                Err(e) => Err(e).with_context(|| format!("Cannot remove {}", path.display())),
            }
        }
        None => super::kube_export::delete(&a.namespace, &a.name).await,
    }
}
