pub mod broker;
pub mod dns;
pub mod export;
pub mod gateway;
pub mod join;
pub mod kube_export;
pub mod lab;
pub mod route_agent;
pub mod show;

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use clusterlink_broker_client::{Credentials, KeepOptions, LiveCredentials};

/// How long one request to the broker may take.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(15);

/// Which credentials to talk to the broker with.
#[derive(clap::Args, Clone, Debug)]
pub struct CredentialsArg {
    /// Credentials file: a cluster's (from `clusterlink join`) or the admin's
    /// (DATA_DIR/admin.yaml from `clusterlink deploy-broker`).
    #[arg(long, env = "CLUSTERLINK_CREDENTIALS")]
    pub credentials: PathBuf,
}

impl CredentialsArg {
    pub fn load(&self) -> Result<Credentials> {
        Credentials::read(&self.credentials).context("Failed to load credentials")
    }
}

/// A daemon's credentials: the file, read again when it changes, the certificate renewed
/// before it expires or when the broker asks (a CA rotation).
#[derive(clap::Args, Clone, Debug)]
pub struct DaemonCredentialsArg {
    #[command(flatten)]
    pub file: CredentialsArg,
    /// How often the credentials file is read again and the broker asked whether the
    /// certificate should be renewed (1s to 1h).
    #[arg(
        long,
        env = "CLUSTERLINK_CREDENTIALS_CHECK_INTERVAL",
        default_value = "1m",
        value_parser = parse_check_interval
    )]
    pub credentials_check_interval: humantime::Duration,
    /// Save renewed credentials to this Kubernetes Secret (NAMESPACE/NAME, key
    /// credentials.yaml) rather than the file, which is then that Secret mounted: the other
    /// pods sharing it pick the renewal up when the kubelet syncs their mount. One component
    /// per cluster (the DNS plugin, in deploy/) is enough.
    #[arg(long, env = "CLUSTERLINK_CREDENTIALS_SECRET")]
    pub credentials_secret: Option<String>,
}

fn parse_check_interval(s: &str) -> Result<humantime::Duration, String> {
    clusterlink_cli::duration_within(s, Duration::from_secs(1), Duration::from_secs(3600))
}

impl DaemonCredentialsArg {
    /// Loads the file and keeps it current.
    pub async fn keep(&self) -> Result<LiveCredentials> {
        let creds = self.file.load()?;
        let save_to = match &self.credentials_secret {
            None => clusterlink_broker_client::renew::SaveTo::File,
            Some(s) => {
                let client = kube::Client::try_default()
                    .await
                    .context("--credentials-secret needs the Kubernetes API (no kubeconfig and not in a pod)")?;
                clusterlink_broker_client::renew::SaveTo::Secret(
                    clusterlink_broker_client::node::SecretRef::parse(client, s)
                        .map_err(anyhow::Error::msg)
                        .context("Invalid --credentials-secret")?,
                )
            }
        };
        Ok(clusterlink_broker_client::keep(
            self.file.credentials.clone(),
            creds,
            KeepOptions {
                check_every: self.credentials_check_interval.into(),
                save_to,
                ..KeepOptions::default()
            },
        ))
    }
}

/// Runs one broker call with a deadline, turning gRPC statuses into plain sentences.
pub async fn call<T>(
    what: &str,
    fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T> {
    match tokio::time::timeout(RPC_TIMEOUT, fut).await {
        Err(_) => Err(anyhow!(
            "{what}: the broker did not answer within {RPC_TIMEOUT:?}; check that it runs and is reachable"
        )),
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(status)) => Err(explain(what, &status)),
    }
}

pub fn explain(what: &str, status: &tonic::Status) -> anyhow::Error {
    use tonic::Code;
    let msg = status.message();
    match status.code() {
        Code::OutOfRange | Code::ResourceExhausted
            if msg.contains("message length too large") || msg.contains("too large") =>
        {
            anyhow!(
                "{what}: the message is larger than the broker accepts ({} MiB); send fewer or smaller records per request ({msg})",
                clusterlink_api::MAX_MESSAGE_BYTES / (1024 * 1024)
            )
        }
        Code::Unavailable => {
            anyhow!("{what}: the broker is unavailable: {msg}; check that it runs and is reachable")
        }
        Code::Unauthenticated => anyhow!("{what}: not authenticated: {msg}"),
        _ => anyhow!("{what}: {msg}"),
    }
}
