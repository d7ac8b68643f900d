//! `deploy-broker`, `broker run`, `broker revoke`, `broker token create`, `broker rotate-ca`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use clusterlink_api::proto;
use clusterlink_broker::deploy::{AnyStore, BrokerConfig, DataDir, StoreSpec};
use clusterlink_broker::pki::CertAndKey;
use clusterlink_broker::server::{BrokerTls, ServeOptions, serve};
use clusterlink_broker::service::{MAX_TOKEN_TTL, MIN_TOKEN_TTL, SystemClock, create_token};
use clusterlink_broker_client::{
    BrokerInfo, Credentials, check_address, connect_with, rfc3339_from_unix_ms,
};
use tracing::{info, warn};

use super::{CredentialsArg, call};
use clusterlink_cli::daemon::{self, ShutdownArgs};
use clusterlink_cli::health::HealthArgs;
use clusterlink_cli::output::print;

#[derive(Args)]
pub struct DeployArgs {
    /// Directory for the broker's CA, config and (embedded) store. Must not hold a broker yet.
    #[arg(long, env = "CLUSTERLINK_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Address the broker listens on.
    #[arg(long, default_value = "0.0.0.0:7443")]
    pub listen: SocketAddr,
    /// HOST:PORT clusters use to reach the broker (default: the listen address; 127.0.0.1
    /// if that is a wildcard).
    #[arg(long)]
    pub advertise: Option<String>,
    /// `embedded` (a redb file in the data directory) or `etcd://HOST:PORT[,HOST:PORT...]`.
    #[arg(long, default_value = "embedded")]
    pub store: StoreSpec,
    /// Extra DNS names or IPs for the broker's server certificate.
    #[arg(long = "server-name", value_parser = parse_server_name)]
    pub server_names: Vec<String>,
    /// How long the join token in the broker-info file stays valid (1m to 365d).
    #[arg(long, default_value = "24h", value_parser = parse_token_ttl)]
    pub token_ttl: humantime::Duration,
    /// Make the join token usable by one cluster only.
    #[arg(long)]
    pub single_use: bool,
    /// Where to write the broker-info file (default: DATA_DIR/broker-info.yaml).
    #[arg(long)]
    pub broker_info: Option<PathBuf>,
    /// A directory that holds a broker already is left as it is, and this succeeds (an init
    /// container that runs at every start).
    #[arg(long)]
    pub exist_ok: bool,
}

#[derive(Subcommand)]
pub enum BrokerCommand {
    /// Run a broker from its data directory until SIGINT or SIGTERM.
    Run(RunArgs),
    /// Cut a cluster off: its certificate stops working and its records are removed.
    Revoke(RevokeArgs),
    /// Join tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Replace the broker's CA without cutting anyone off: `start` makes a new CA that signs
    /// from then on while the old one stays trusted; every cluster's components renew onto
    /// the new one by themselves; `status` shows who has; `finish` retires the old CA.
    #[command(subcommand, name = "rotate-ca")]
    RotateCa(RotateCaCommand),
}

#[derive(Subcommand)]
pub enum RotateCaCommand {
    /// Make a new CA; both are trusted until `finish`. A running broker picks it up.
    Start(RotateArgs),
    /// Which clusters hold a certificate of the new CA, and which still one of the old.
    Status(RotateArgs),
    /// Retire the old CA: the server gets a certificate of the new one and the old one is no
    /// longer trusted. Refused while a cluster still holds a certificate of the old CA.
    Finish(FinishArgs),
}

#[derive(Args)]
pub struct RotateArgs {
    #[arg(long, env = "CLUSTERLINK_DATA_DIR")]
    pub data_dir: PathBuf,
}

#[derive(Args)]
pub struct FinishArgs {
    #[arg(long, env = "CLUSTERLINK_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Retire the old CA even though some clusters (listed) still hold certificates of it, or
    /// the broker cannot be asked: those clusters must join again.
    #[arg(long)]
    pub force: bool,
}

#[derive(Args)]
pub struct RunArgs {
    #[arg(long, env = "CLUSTERLINK_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Override the listen address from broker.yaml.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Override the store from broker.yaml.
    #[arg(long)]
    pub store: Option<StoreSpec>,
    #[command(flatten)]
    pub health: HealthArgs,
    #[command(flatten)]
    pub shutdown: ShutdownArgs,
}

#[derive(Args)]
pub struct RevokeArgs {
    /// The cluster to revoke.
    pub cluster_id: clusterlink_api::ClusterId,
    #[command(flatten)]
    pub credentials: CredentialsArg,
}

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Make a new join token and write a broker-info file with it.
    Create(TokenCreateArgs),
}

#[derive(Args)]
pub struct TokenCreateArgs {
    /// How long the token stays valid (1m to 365d).
    #[arg(long, default_value = "24h", value_parser = parse_token_ttl)]
    pub ttl: humantime::Duration,
    #[arg(long)]
    pub single_use: bool,
    /// Where to write the broker-info file.
    #[arg(long, short)]
    pub output: PathBuf,
    #[command(flatten)]
    pub credentials: CredentialsArg,
}

fn default_advertise(listen: SocketAddr) -> String {
    if listen.ip().is_unspecified() {
        format!("127.0.0.1:{}", listen.port())
    } else {
        listen.to_string()
    }
}

pub async fn deploy(a: DeployArgs) -> Result<()> {
    let dir = DataDir::new(&a.data_dir);
    let advertise = a
        .advertise
        .clone()
        .unwrap_or_else(|| default_advertise(a.listen));
    check_address(&advertise).context("Invalid --advertise")?;
    if dir.root.join("pki").join("ca.crt").exists() {
        if a.exist_ok {
            dir.load_config()
                .context("The directory holds a broker whose config does not load")?;
            print(&format!(
                "{} holds a broker already; left as it is.\n",
                dir.root.display()
            ));
            return Ok(());
        }
        bail!(clusterlink_broker::deploy::DeployError::AlreadyDeployed(
            dir.root.clone()
        ));
    }
    // Reach the store before writing anything, so a bad --store leaves nothing behind.
    let store = a
        .store
        .open(&dir.root)
        .await
        .with_context(|| format!("Failed to open the store {}", a.store))?;
    let now = SystemTime::now();
    let mut names = a.server_names.clone();
    if let Some((host, _)) = advertise.rsplit_once(':') {
        names.push(host.trim_matches(['[', ']']).to_owned());
    }
    if !a.listen.ip().is_unspecified() {
        names.push(a.listen.ip().to_string());
    }
    names.sort();
    names.dedup();
    let config = BrokerConfig::new(a.listen, advertise.clone(), &a.store);
    let result = async {
        let (tls, admin) = dir.init(now, &config, &names)?;
        let (token, expires) = match &store {
            AnyStore::Embedded(s) => create_token(s, now, a.token_ttl.into(), a.single_use).await?,
            AnyStore::Etcd(s) => create_token(&**s, now, a.token_ttl.into(), a.single_use).await?,
        };
        let info_path = a
            .broker_info
            .clone()
            .unwrap_or_else(|| dir.broker_info_path());
        BrokerInfo::new(advertise.clone(), tls.ca.cert_pem.clone(), token, expires)
            .write(&info_path)?;
        Credentials::new(
            advertise.clone(),
            tls.ca.cert_pem.clone(),
            clusterlink_broker_client::Identity::Admin,
            admin.cert_pem,
            admin.key_pem,
        )
        .write(&dir.admin_path())?;
        anyhow::Ok((info_path, expires))
    }
    .await;
    let (info_path, expires) = match result {
        Ok(p) => p,
        Err(e) => {
            // Leave no half-made broker behind.
            let _ = std::fs::remove_dir_all(dir.root.join("pki"));
            let _ = std::fs::remove_file(dir.config_path());
            return Err(e.context("Failed to deploy the broker"));
        }
    };
    print(&format!(
        "Broker created in {dir}.\n  store:       {store}\n  listen:      {listen}\n  advertised:  {advertise}\n  broker-info: {info} (token valid until {until}{single})\n  admin:       {admin}\n\nStart it:    clusterlink broker run --data-dir {dir}\nJoin a cluster: clusterlink join {info} --cluster-id ID --pod-cidr CIDR --service-cidr CIDR\n",
        dir = dir.root.display(),
        store = a.store,
        listen = a.listen,
        info = info_path.display(),
        until = rfc3339_from_unix_ms(expires),
        single = if a.single_use { ", single use" } else { "" },
        admin = dir.admin_path().display(),
    ));
    Ok(())
}

pub async fn run(c: BrokerCommand) -> Result<()> {
    match c {
        BrokerCommand::Run(a) => run_broker(a).await,
        BrokerCommand::Revoke(a) => revoke(a).await,
        BrokerCommand::Token(TokenCommand::Create(a)) => token_create(a).await,
        BrokerCommand::RotateCa(RotateCaCommand::Start(a)) => rotate_start(a).await,
        BrokerCommand::RotateCa(RotateCaCommand::Status(a)) => rotate_status(a).await,
        BrokerCommand::RotateCa(RotateCaCommand::Finish(a)) => rotate_finish(a).await,
    }
}

/// How often a running broker looks for new TLS material in its data directory.
const TLS_POLL: Duration = Duration::from_secs(2);

/// Reads the data directory's TLS material every [`TLS_POLL`] and sends it when it changed
/// (a `rotate-ca` step); material that does not load is reported once and not sent.
/// How often the broker looks whether its own certificates (server, admin) are due.
const OWN_CERTIFICATES_CHECK: Duration = Duration::from_secs(3600);

/// Also renews the broker's own certificates when due (checked at start, then hourly).
async fn watch_tls(dir: DataDir, tx: tokio::sync::watch::Sender<BrokerTls>) {
    let mut last_error = String::new();
    let mut own = tokio::time::interval(OWN_CERTIFICATES_CHECK);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TLS_POLL) => {}
            _ = own.tick() => match dir.renew_own_certificates(SystemTime::now()) {
                Ok(renewed) => {
                    for what in renewed {
                        info!(what, "renewed before it expires");
                    }
                }
                Err(e) => warn!(error = %e, "cannot renew the broker's own certificates"),
            },
            _ = tx.closed() => return,
        }
        match dir.load_tls() {
            Ok(tls) => {
                last_error.clear();
                tx.send_if_modified(|cur| {
                    let changed = *cur != tls;
                    if changed {
                        *cur = tls;
                    }
                    changed
                });
            }
            Err(e) => {
                let e = e.to_string();
                if e != last_error {
                    warn!(error = %e, "cannot read the broker's certificates; keeping those in use");
                    last_error = e;
                }
            }
        }
    }
}

/// Rewrites the data directory's admin.yaml with `admin`, trusting what `tls` trusts.
fn write_admin(dir: &DataDir, tls: &BrokerTls, admin: CertAndKey) -> Result<()> {
    let config = dir.load_config()?;
    // What the broker trusts is what its admin trusts.
    let bundle =
        clusterlink_broker::pki::Trust::new(&tls.ca, tls.retiring_ca.as_deref())?.bundle_pem;
    Credentials::new(
        config.advertise,
        bundle,
        clusterlink_broker_client::Identity::Admin,
        admin.cert_pem,
        admin.key_pem,
    )
    .write(&dir.admin_path())?;
    Ok(())
}

/// Waits (up to 10 s) until the CA bundle the broker reports (asked with `creds`, which it
/// trusted before the step) passes `done`: whether a running broker picked a rotation step up.
async fn broker_reloaded(creds: &Credentials, done: impl Fn(&str) -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline {
        if let Ok(mut c) = connect_with(creds).await
            && let Ok(Ok(r)) =
                tokio::time::timeout(Duration::from_secs(2), c.who_am_i(proto::WhoAmIRequest {}))
                    .await
            && done(&r.get_ref().ca_certificate_pem)
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

async fn rotate_start(a: RotateArgs) -> Result<()> {
    let dir = DataDir::new(&a.data_dir);
    dir.load_config()?;
    // The admin credentials of the old CA: to ask the running broker when it has the new one.
    let old_admin = Credentials::read(&dir.admin_path()).ok();
    let (tls, admin) = dir
        .start_rotation(SystemTime::now())
        .context("Failed to start the CA rotation")?;
    write_admin(&dir, &tls, admin)?;
    let picked_up = match &old_admin {
        Some(c) => broker_reloaded(c, |b| b.contains(tls.ca.cert_pem.trim())).await,
        None => false,
    };
    print(&format!(
        "CA rotation started in {dir}: a new CA signs from now on; the old one stays trusted.\n\
         {running}\n\
         Each cluster's components renew onto the new CA by themselves (within a minute or so).\n\
         Follow it:  clusterlink broker rotate-ca status --data-dir {dir}\n\
         Then:       clusterlink broker rotate-ca finish --data-dir {dir}\n\
         {admin} was rewritten with a certificate of the new CA.\n",
        dir = dir.root.display(),
        running = if picked_up {
            "The running broker has picked it up. Brokers sharing the store need a copy of pki/."
                .to_owned()
        } else {
            format!(
                "No broker answered with the new CA yet: one that runs picks it up within {}s of seeing it. Brokers sharing the store need a copy of pki/.",
                TLS_POLL.as_secs()
            )
        },
        admin = dir.admin_path().display(),
    ));
    Ok(())
}

/// Each cluster and whether its certificate comes from the CA that signs now.
#[derive(serde::Serialize)]
struct RotationView {
    cluster: String,
    on_new_ca: bool,
}

/// The clusters whose certificate is not from the CA that signs now (asked of the broker).
async fn clusters_on_old_ca(dir: &DataDir) -> Result<(Vec<RotationView>, usize)> {
    let tls = dir.load_tls()?;
    let new_ca = clusterlink_broker::pki::fingerprint(&tls.ca.cert_pem, "the CA certificate")?;
    let creds = Credentials::read(&dir.admin_path()).context("Failed to load admin.yaml")?;
    let mut client = connect_with(&creds).await?;
    let resp = call(
        "list clusters",
        client.list(proto::ListRequest {
            kind: clusterlink_api::Kind::Clusters.to_proto() as i32,
        }),
    )
    .await?;
    let mut views = Vec::new();
    for r in resp.records {
        if let Ok(clusterlink_api::Record::Cluster(reg)) = clusterlink_api::Record::try_from(r) {
            views.push(RotationView {
                cluster: reg.cluster.id.to_string(),
                on_new_ca: reg.certificate_ca_sha256 == new_ca,
            });
        }
    }
    let old = views.iter().filter(|v| !v.on_new_ca).count();
    Ok((views, old))
}

async fn rotate_status(a: RotateArgs) -> Result<()> {
    let dir = DataDir::new(&a.data_dir);
    if !dir.rotating() {
        print("No CA rotation is under way.\n");
        return Ok(());
    }
    let (views, old) = clusters_on_old_ca(&dir).await?;
    let mut out = String::new();
    for v in &views {
        out.push_str(&format!(
            "{}\t{}\n",
            v.cluster,
            if v.on_new_ca {
                "new CA"
            } else {
                "old CA (not renewed yet)"
            }
        ));
    }
    out.push_str(&match old {
        0 => "Every cluster holds a certificate of the new CA: finish the rotation (clusterlink broker rotate-ca finish).\n".to_owned(),
        n => format!("{n} cluster(s) still on the old CA.\n"),
    });
    print(&out);
    Ok(())
}

async fn rotate_finish(a: FinishArgs) -> Result<()> {
    let dir = DataDir::new(&a.data_dir);
    if !dir.rotating() {
        bail!(clusterlink_broker::deploy::DeployError::NoRotation(
            dir.root.clone()
        ));
    }
    match clusters_on_old_ca(&dir).await {
        Ok((views, 0)) => info!(clusters = views.len(), "every cluster is on the new CA"),
        Ok((views, n)) if !a.force => {
            let names: Vec<&str> = views
                .iter()
                .filter(|v| !v.on_new_ca)
                .map(|v| v.cluster.as_str())
                .collect();
            bail!(
                "{n} cluster(s) still hold a certificate of the old CA: {}. Their components renew within a minute or so when they can reach the broker; wait and retry, or pass --force (those clusters must then join again)",
                names.join(", ")
            );
        }
        Ok(_) => warn!("retiring the old CA while some clusters still hold its certificates"),
        Err(e) if !a.force => {
            return Err(e.context(
                "Cannot ask the broker which clusters renewed; start it, or pass --force",
            ));
        }
        Err(e) => warn!(error = %e, "cannot ask the broker; retiring the old CA anyway"),
    }
    let during = Credentials::read(&dir.admin_path()).ok();
    let retiring = dir.load_tls()?.retiring_ca.unwrap_or_default();
    let (tls, admin) = dir
        .finish_rotation(SystemTime::now())
        .context("Failed to finish the CA rotation")?;
    write_admin(&dir, &tls, admin)?;
    let picked_up = match &during {
        Some(c) => broker_reloaded(c, |b| !b.contains(retiring.trim())).await,
        None => false,
    };
    print(&format!(
        "CA rotation finished in {dir}: the old CA is no longer trusted; the server presents a certificate of the new one.\n{running}\n",
        dir = dir.root.display(),
        running = if picked_up {
            "The running broker has picked it up.".to_owned()
        } else {
            format!(
                "No broker answered without the old CA yet: one that runs picks it up within {}s of seeing it.",
                TLS_POLL.as_secs()
            )
        }
    ));
    Ok(())
}

async fn run_broker(a: RunArgs) -> Result<()> {
    let dir = DataDir::new(&a.data_dir);
    let config = dir.load_config()?;
    let tls = dir
        .load_tls()
        .context("Failed to load the broker's certificates")?;
    let listen = a.listen.unwrap_or(config.listen);
    let store_spec = match a.store {
        Some(s) => s,
        None => config.store.parse().map_err(anyhow::Error::msg)?,
    };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| {
            format!("Failed to listen on {listen}: is another broker running there?")
        })?;
    let store = store_spec
        .open(&dir.root)
        .await
        .with_context(|| format!("Failed to open the store {store_spec}"))?;
    info!(%listen, store = %store_spec, "starting broker");
    let clock = Arc::new(SystemClock);
    // The advertised address, when it is an IP, is the broker's too: no cluster may cover it.
    let advertised: Vec<std::net::IpAddr> =
        clusterlink_broker_client::address_ip(&config.advertise)
            .into_iter()
            .collect();
    let options = ServeOptions {
        protected: advertised,
        limits: config.limits,
        certificates: config
            .certificates
            .policy()
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("Invalid config in {}", dir.config_path().display()))?,
        ready: Default::default(),
    };
    if dir.rotating() {
        info!("a CA rotation is under way: both CAs are trusted");
    }
    let (tls_tx, tls) = tokio::sync::watch::channel(tls);
    tokio::spawn(watch_tls(dir, tls_tx));
    let mut options = options;
    daemon::run_with_health(
        "broker",
        a.shutdown.grace(),
        &a.health,
        |stop, ready| async move {
            options.ready = ready;
            match store {
                AnyStore::Embedded(s) => serve(s, tls, listener, clock, options, stop).await?,
                AnyStore::Etcd(s) => serve(*s, tls, listener, clock, options, stop).await?,
            }
            Ok(())
        },
    )
    .await?;
    info!("broker stopped");
    Ok(())
}

async fn revoke(a: RevokeArgs) -> Result<()> {
    let creds = a.credentials.load()?;
    let mut client = connect_with(&creds).await?;
    let r = call(
        "revoke",
        client.revoke_cluster(proto::RevokeClusterRequest {
            cluster_id: a.cluster_id.to_string(),
        }),
    )
    .await?;
    print(&format!(
        "Cluster {} revoked: its certificate no longer works; {} record(s) removed.\n",
        a.cluster_id, r.records_removed
    ));
    Ok(())
}

async fn token_create(a: TokenCreateArgs) -> Result<()> {
    let creds = a.credentials.load()?;
    let mut client = connect_with(&creds).await?;
    let r = call(
        "create token",
        client.create_token(proto::CreateTokenRequest {
            ttl_seconds: a.ttl.as_secs(),
            single_use: a.single_use,
        }),
    )
    .await?;
    BrokerInfo::new(
        creds.address.clone(),
        creds.ca_certificate.clone(),
        r.token,
        r.expires_at_unix_ms,
    )
    .write(&a.output)?;
    // What the broker granted, not what was asked.
    print(&format!(
        "Wrote {} (token valid until {}{}).\n",
        a.output.display(),
        rfc3339_from_unix_ms(r.expires_at_unix_ms),
        if a.single_use { ", single use" } else { "" }
    ));
    Ok(())
}

/// A join token lifetime, within what the broker grants.
fn parse_token_ttl(s: &str) -> Result<humantime::Duration, String> {
    clusterlink_cli::duration_within(s, MIN_TOKEN_TTL, MAX_TOKEN_TTL)
}

/// A DNS name or IP address for the broker's certificate.
fn parse_server_name(s: &str) -> Result<String, String> {
    clusterlink_broker_client::check_host(s)?;
    Ok(s.to_owned())
}
