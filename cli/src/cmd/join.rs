//! `clusterlink join`: redeem a broker-info file's token for this cluster's credentials.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use clusterlink_api::{Cluster, Kind, Record, proto};
use clusterlink_broker::pki::{client_public_key, new_client_key};
use clusterlink_broker_client::{
    BrokerInfo, Credentials, JoinOutput, PendingJoin, connect, connect_with,
};
use tracing::info;

use super::{RPC_TIMEOUT, call, explain};
use clusterlink_cli::output::print;
use tonic::Code;

#[derive(Args)]
pub struct JoinArgs {
    /// The broker-info file from `clusterlink deploy-broker` or `broker token create`.
    pub broker_info: PathBuf,
    /// This cluster's ID: a DNS label, unique among the joined clusters.
    #[arg(long)]
    pub cluster_id: String,
    /// Pod CIDR(s) of this cluster (repeat, or comma-separate; with --kubeconfig, learnt
    /// from the cluster when not given).
    #[arg(long = "pod-cidr", required_unless_present = "kubeconfig")]
    pub pod_cidrs: Vec<String>,
    /// Service CIDR(s) of this cluster (repeat, or comma-separate; with --kubeconfig, learnt
    /// from the cluster when not given).
    #[arg(long = "service-cidr", required_unless_present = "kubeconfig")]
    pub service_cidrs: Vec<String>,
    /// The cluster's kubeconfig: the CIDRs not given are read from its API (its ServiceCIDR
    /// objects, kubeadm's or kube-proxy's configuration), and the credentials are also put in
    /// the Secret clusterlink-system/clusterlink-credentials the member components mount.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context (default: its current one).
    #[arg(long, requires = "kubeconfig")]
    pub context: Option<String>,
    /// With --kubeconfig: a node to run a gateway on (labelled gateway.clusterlink.dev/enabled;
    /// repeat for several).
    #[arg(long = "gateway-node", requires = "kubeconfig")]
    pub gateway_nodes: Vec<String>,
    /// With --kubeconfig: the clusterlink image the member components run (default: the
    /// overlay's, localhost/clusterlink:dev).
    #[arg(long, requires = "kubeconfig")]
    pub image: Option<String>,
    /// With --kubeconfig: how long to wait, showing progress, until this cluster's active
    /// gateway is connected to every other cluster that has one (0s: do not wait).
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration, requires = "kubeconfig")]
    pub wait: std::time::Duration,
    /// Labels, KEY=VALUE (e.g. region=eu-west-1).
    #[arg(long = "label")]
    pub labels: Vec<String>,
    /// Where to write this cluster's credentials (default: ./clusterlink-ID.yaml).
    #[arg(long, short)]
    pub output: Option<PathBuf>,
}

/// A client for `--kubeconfig` and `--context`.
async fn kube_client(path: &Path, context: Option<&str>) -> Result<kube::Client> {
    let kubeconfig = kube::config::Kubeconfig::read_from(path)
        .with_context(|| format!("Cannot read the kubeconfig {}", path.display()))?;
    let options = kube::config::KubeConfigOptions {
        context: context.map(str::to_owned),
        ..Default::default()
    };
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .with_context(|| {
            format!(
                "Invalid kubeconfig {} (or no such --context)",
                path.display()
            )
        })?;
    kube::Client::try_from(config).context("Cannot make a Kubernetes client")
}

/// The CIDRs given, and with a kubeconfig those not given, from the cluster's API.
async fn cidrs(a: &JoinArgs) -> Result<(Vec<String>, Vec<String>)> {
    let (mut pods, mut services) = (a.pod_cidrs.clone(), a.service_cidrs.clone());
    let Some(path) = &a.kubeconfig else {
        return Ok((pods, services));
    };
    if pods.is_empty() || services.is_empty() {
        let client = kube_client(path, a.context.as_deref()).await?;
        let (found_pods, found_services) = clusterlink_cli::kube_cluster::discover(client)
            .await
            .context("Cannot learn the cluster's CIDRs from its API")?;
        let strings = |v: Vec<ipnet::IpNet>| v.iter().map(ToString::to_string).collect::<Vec<_>>();
        if pods.is_empty() {
            pods = strings(found_pods);
            anyhow::ensure!(
                !pods.is_empty(),
                "The cluster's API does not tell its pod CIDR (no kubeadm or kube-proxy configuration with it); give --pod-cidr"
            );
            info!(pods = ?pods, "pod CIDRs from the cluster");
        }
        if services.is_empty() {
            services = strings(found_services);
            anyhow::ensure!(
                !services.is_empty(),
                "The cluster's API does not tell its service CIDR (no ServiceCIDR objects, no kubeadm configuration with it); give --service-cidr"
            );
            info!(services = ?services, "service CIDRs from the cluster");
        }
    }
    Ok((pods, services))
}

/// With --kubeconfig: the credentials file's text in the cluster's Secret as well (a join run
/// again puts it there if the first run could not).
async fn store_in_cluster(a: &JoinArgs, output: &Path, cluster: &Cluster) -> Result<()> {
    let Some(path) = &a.kubeconfig else {
        return Ok(());
    };
    let text = std::fs::read_to_string(output)
        .with_context(|| format!("Cannot read back {}", output.display()))?;
    let client = kube_client(path, a.context.as_deref()).await?;
    clusterlink_cli::kube_cluster::store_credentials(client, &text)
        .await
        .with_context(|| {
            format!(
                "Cluster {} joined and its credentials are in {}, but they could not be put in the cluster; run the same join again",
                cluster.id,
                output.display()
            )
        })?;
    print(&format!(
        "Credentials stored in the Secret {}/{} too.\n",
        clusterlink_cli::kube_cluster::NAMESPACE,
        clusterlink_cli::kube_cluster::CREDENTIALS_SECRET
    ));
    let client = kube_client(path, a.context.as_deref()).await?;
    let applied = clusterlink_cli::kube_cluster::apply_member(client.clone(), a.image.as_deref())
        .await
        .context("Cannot install the member components; fix what is named and run the same join again (it applies the same objects)")?;
    clusterlink_cli::kube_cluster::label_gateways(client.clone(), &a.gateway_nodes).await?;
    print(&format!(
        "Installed the member components ({} objects, field manager clusterlink){}.\n",
        applied.len(),
        match a.gateway_nodes.len() {
            0 => "; label the gateway nodes: kubectl label node NODE gateway.clusterlink.dev/enabled=true".to_owned(),
            n => format!("; {n} gateway node(s) labelled"),
        },
    ));
    use clusterlink_cli::kube_cluster::CoreDns;
    match clusterlink_cli::kube_cluster::forward_clusterset(client).await? {
        CoreDns::Added { forward_to } => print(&format!(
            "CoreDNS (kube-system/coredns) forwards clusterset.local to {forward_to}.\n"
        )),
        CoreDns::AlreadyThere => {
            print("CoreDNS has a clusterset.local block already; left as it is.\n")
        }
        CoreDns::NotCoreDns { forward_to } => print(&format!(
            "No kube-system/coredns ConfigMap: the cluster's DNS is not CoreDNS. Forward clusterset.local to {forward_to} (the clusterlink-dns Service) in it.\n"
        )),
    }
    if !a.wait.is_zero() {
        wait_connected(output, &cluster.id, a.wait).await?;
    }
    Ok(())
}

/// Follows the broker until `me`'s active gateway is connected to every other cluster that
/// has one, saying what it waits for as that changes; past `wait`, an error naming what is
/// missing and where to look.
async fn wait_connected(
    output: &Path,
    me: &clusterlink_api::ClusterId,
    wait: std::time::Duration,
) -> Result<()> {
    let creds = Credentials::read(output)?;
    let mut view = clusterlink_broker_client::follow(
        clusterlink_broker_client::LiveCredentials::fixed(creds),
        &[Kind::Clusters, Kind::Gateways, Kind::Connections],
    );
    let deadline = tokio::time::Instant::now() + wait;
    let mut last = None;
    loop {
        let progress = view
            .borrow_and_update()
            .as_ref()
            .map(|s| s.mesh_progress(me));
        if let Some(p) = &progress {
            if p.is_done() {
                let with: Vec<String> = p.connected.iter().map(ToString::to_string).collect();
                print(&format!(
                    "Cluster {me} is in the mesh: gateway {} active{}.\n",
                    p.active_gateway
                        .as_ref()
                        .map(ToString::to_string)
                        .unwrap_or_default(),
                    if with.is_empty() {
                        " (no other cluster has a gateway yet)".to_owned()
                    } else {
                        format!(", connected to {}", with.join(", "))
                    }
                ));
                return Ok(());
            }
            if last.as_ref() != Some(p) {
                print(&format!("{}\n", describe(me, p)));
                last = progress.clone();
            }
        }
        tokio::select! {
            changed = view.changed() => changed.context("Lost the broker")?,
            _ = tokio::time::sleep_until(deadline) => {
                let why = match &last {
                    Some(p) => describe(me, p),
                    None => "the broker's view never arrived".to_owned(),
                };
                bail!(
                    "Cluster {me} joined, but is not in the mesh after {}: {why}. Look at the gateways: kubectl -n clusterlink-system get pods -l app.kubernetes.io/name=clusterlink-gateway (and their logs); `clusterlink show connections` shows the tunnels",
                    humantime::format_duration(wait)
                );
            }
        }
    }
}

fn describe(me: &clusterlink_api::ClusterId, p: &clusterlink_api::MeshProgress) -> String {
    let names = |v: &[clusterlink_api::ClusterId]| {
        v.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    match &p.active_gateway {
        None => format!(
            "waiting for a gateway of {me} to become active (a labelled node running the clusterlink-gateway DaemonSet)"
        ),
        Some(g) => format!(
            "gateway {g} active; connected to [{}]; waiting for [{}]",
            names(&p.connected),
            names(&p.missing)
        ),
    }
}

pub async fn run(a: JoinArgs) -> Result<()> {
    let info = BrokerInfo::read(&a.broker_info, SystemTime::now())?;
    let labels = parse_labels(&a.labels)?;
    let (pod_cidrs, service_cidrs) = cidrs(&a).await?;
    let request_cluster = proto::Cluster {
        id: a.cluster_id.clone(),
        pod_cidrs,
        service_cidrs,
        labels: labels.into_iter().collect(),
    };
    // Validate here, before the broker does, for a clear message without a round trip.
    let cluster = Cluster::try_from(request_cluster.clone()).context("Invalid cluster")?;
    let output = a
        .output
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("clusterlink-{}.yaml", cluster.id)));
    // The output is settled before the broker is asked anything: a join that cannot save its
    // credentials must not spend the token or take the ID. The key is made here and never
    // leaves this machine; the broker signs its public half.
    let existing = JoinOutput::read(&output).with_context(|| {
        format!(
            "Cannot use {} for the credentials; nothing was sent to the broker",
            output.display()
        )
    })?;
    let (key_pem, created) = match existing {
        None => {
            let (key_pem, _) = new_client_key().context("Failed to make a key pair")?;
            PendingJoin::new(info.address.clone(), cluster.id.clone(), key_pem.clone())
                .create(&output)
                .context("Cannot write the credentials file; nothing was sent to the broker")?;
            (key_pem, true)
        }
        Some(JoinOutput::Pending(p)) if p.cluster_id == cluster.id && p.address == info.address => {
            info!(path = %output.display(), "resuming the join that was interrupted, with its key");
            (p.private_key, false)
        }
        Some(JoinOutput::Joined(c))
            if c.cluster() == Some(&cluster.id) && c.address == info.address =>
        {
            already_joined(&c, &cluster, &output).await?;
            return store_in_cluster(&a, &output, &cluster).await;
        }
        Some(other) => bail!(
            "{} already holds {}; choose another --output, or remove it if it is no longer needed",
            output.display(),
            match other {
                JoinOutput::Pending(p) => format!(
                    "an unfinished join of cluster {} to the broker at {}",
                    p.cluster_id, p.address
                ),
                JoinOutput::Joined(c) => format!(
                    "the credentials of {} at the broker at {}",
                    c.identity, c.address
                ),
            }
        ),
    };
    let public_key_der = client_public_key(&key_pem)
        .with_context(|| format!("The key in {} is not usable", output.display()))?;
    // A broker that refused leaves nothing to resume: the pending file this run made goes.
    // One that could not be reached, or did not answer, may have registered the cluster: the
    // file stays, and the same command finishes the join.
    let forget = |e: anyhow::Error| {
        if created {
            let _ = std::fs::remove_file(&output);
        }
        e
    };
    let mut client = connect(&info.address, &info.ca_certificate, None)
        .await
        .map_err(|e| forget(e.into()))?;
    let resp = match tokio::time::timeout(
        RPC_TIMEOUT,
        client.join(proto::JoinRequest {
            token: info.token.clone(),
            cluster: Some(request_cluster),
            public_key_der,
        }),
    )
    .await
    {
        Ok(Ok(r)) => r.into_inner(),
        Ok(Err(status)) if !matches!(status.code(), Code::Unavailable | Code::Unknown) => {
            return Err(forget(explain("join", &status)));
        }
        Ok(Err(status)) => {
            return Err(explain("join", &status).context(format!(
                "The join may or may not have reached the broker; run the same command again \
                 to finish it (the key is kept in {})",
                output.display()
            )));
        }
        Err(_) => bail!(
            "join: the broker did not answer within {RPC_TIMEOUT:?}; run the same command again \
             to finish the join (the key is kept in {})",
            output.display()
        ),
    };
    let creds = Credentials::new(
        info.address.clone(),
        resp.ca_certificate_pem,
        clusterlink_broker_client::Identity::Cluster(cluster.id.clone()),
        resp.certificate_pem,
        key_pem,
    );
    creds.write(&output).with_context(|| {
        format!(
            "Cluster {} joined, but its credentials could not be saved; run the same join \
             again to finish it",
            cluster.id
        )
    })?;
    print(&format!(
        "Cluster {} joined the broker at {}.\nCredentials: {} (keep it private: it holds this cluster's key)\n",
        cluster.id,
        info.address,
        output.display()
    ));
    store_in_cluster(&a, &output, &cluster).await
}

/// The output holds this cluster's credentials already: the same join again is a no-op if
/// the broker has the cluster as asked (nothing is re-issued: the running components keep
/// their certificate); anything else is an error that says what differs.
async fn already_joined(creds: &Credentials, want: &Cluster, output: &Path) -> Result<()> {
    let stale = || {
        format!(
            "{} holds credentials of cluster {} that the broker does not accept (revoked?); \
             remove the file and join again with a fresh token",
            output.display(),
            want.id
        )
    };
    let mut client = connect_with(creds).await.with_context(stale)?;
    let resp = call(
        "list clusters",
        client.list(proto::ListRequest {
            kind: Kind::Clusters.to_proto() as i32,
        }),
    )
    .await
    .with_context(stale)?;
    let registered = resp
        .records
        .into_iter()
        .filter_map(|r| match Record::try_from(r) {
            Ok(Record::Cluster(reg)) => Some(reg.cluster),
            _ => None,
        })
        .find(|c| c.id == want.id)
        .with_context(stale)?;
    if registered != *want {
        bail!(
            "cluster \"{id}\" has already joined, with pod CIDRs {pods}, service CIDRs {svcs} and \
             labels {labels:?}; to change them, revoke it (clusterlink broker revoke {id}) and join \
             again",
            id = want.id,
            pods = registered.pod_cidrs,
            svcs = registered.service_cidrs,
            labels = registered.labels,
        );
    }
    print(&format!(
        "Cluster {} has already joined the broker at {} as asked; its credentials are in {}.\n",
        want.id,
        creds.address,
        output.display()
    ));
    Ok(())
}

/// `KEY=VALUE` labels; a key given twice is an error, not a silent overwrite.
fn parse_labels(labels: &[String]) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for l in labels {
        let (k, v) = l
            .split_once('=')
            .ok_or_else(|| anyhow!("--label {l:?} is not KEY=VALUE"))?;
        if let Some(first) = out.insert(k.to_owned(), v.to_owned()) {
            bail!("--label {k} is given twice ({first:?} and {v:?}); give each key once");
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::parse_labels;

    #[test]
    fn labels_are_key_value_and_each_key_once() {
        let ok = parse_labels(&["region=eu".into(), "zone=a".into()]).unwrap();
        assert_eq!(ok.len(), 2);
        let e = parse_labels(&["region=eu".into(), "region=us".into()]).unwrap_err();
        assert!(e.to_string().contains("given twice"), "{e}");
        let e = parse_labels(&["region".into()]).unwrap_err();
        assert!(e.to_string().contains("not KEY=VALUE"), "{e}");
    }
}
