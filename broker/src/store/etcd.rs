//! The etcd backend: for brokers that must outlive one machine. Every broker process is
//! stateless on top of it; several may serve the same etcd cluster at once.

use std::time::Duration;

use etcd_client::{
    Client, Compare as EtcdCompare, CompareOp, ConnectOptions, DeleteOptions, EventType,
    GetOptions, PutOptions, TxnOp, TxnOpResponse, WatchOptions,
};
use tracing::debug;

use super::{
    Compare, Event, KeyValue, LeaseId, Op, Revision, Store, StoreError, Txn, TxnOutcome, Watch,
    WatchMessage,
};

#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    endpoints: String,
    /// Every key this broker writes is under this prefix, so one etcd can hold other data too.
    namespace: String,
}

impl EtcdStore {
    /// Parses `etcd://host:port[,host:port…]` (or `etcd+https://…` for TLS-less http is the
    /// default) and connects.
    pub async fn connect(url: &str, namespace: &str) -> Result<Self, StoreError> {
        let bad = |reason: String| StoreError::Address {
            value: url.to_owned(),
            reason,
        };
        let (scheme, rest) = if let Some(rest) = url.strip_prefix("etcd://") {
            ("http", rest)
        } else if let Some(rest) = url.strip_prefix("etcds://") {
            ("https", rest)
        } else {
            return Err(bad(
                "expected etcd://HOST:PORT[,HOST:PORT...][?user=NAME&password-file=FILE] or etcds://HOST:PORT[,...]?ca=FILE[&cert=FILE&key=FILE][&user=NAME&password-file=FILE]".into(),
            ));
        };
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let query = EtcdOptions::parse(query).map_err(&bad)?;
        let tls = if scheme == "https" {
            Some(query.tls().map_err(&bad)?)
        } else if query.ca.is_some() || query.cert.is_some() || query.key.is_some() {
            return Err(bad("ca, cert and key are for etcds:// only".into()));
        } else {
            None
        };
        let user = query.user().map_err(&bad)?;
        let endpoints: Vec<String> = rest
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|hp| {
                hp.rsplit_once(':')
                    .filter(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
                    .map(|_| format!("{scheme}://{hp}"))
                    .ok_or_else(|| StoreError::Address {
                        value: url.to_owned(),
                        reason: format!("{hp:?} is not HOST:PORT"),
                    })
            })
            .collect::<Result<_, _>>()?;
        if endpoints.is_empty() {
            return Err(StoreError::Address {
                value: url.to_owned(),
                reason: "no endpoints given".into(),
            });
        }
        let joined = endpoints.join(",");
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(10))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        let secure = tls.is_some();
        if let Some(tls) = tls {
            options = options.with_tls(tls);
        }
        if let Some((name, password)) = user {
            // etcd's tokens expire (--auth-token-ttl, 5 minutes by default): a broker that
            // runs for months gets a new one when told its token is stale.
            options = options
                .with_user(name, password)
                .with_auto_token_refresh(true);
        }
        let failed = |e: etcd_client::Error| {
            if secure {
                StoreError::EtcdTls {
                    endpoints: joined.clone(),
                    source: Box::new(e),
                }
            } else {
                StoreError::Etcd {
                    endpoints: joined.clone(),
                    source: Box::new(e),
                }
            }
        };
        let mut client = Client::connect(&endpoints, Some(options))
            .await
            .map_err(failed)?;
        let mut namespace = namespace.trim_end_matches('/').to_owned();
        namespace.push('/');
        // Connecting is lazy; make one read of the namespace so an unreachable etcd (or one
        // whose certificate is not trusted, that does not trust ours, that refuses the user,
        // or that gives it no access to the namespace) fails here, clearly.
        client
            .get(
                namespace.as_str(),
                Some(GetOptions::new().with_prefix().with_count_only()),
            )
            .await
            .map_err(failed)?;
        Ok(Self {
            client,
            endpoints: joined,
            namespace,
        })
    }

    fn err(&self, e: etcd_client::Error) -> StoreError {
        StoreError::Etcd {
            endpoints: self.endpoints.clone(),
            source: Box::new(e),
        }
    }

    /// etcd reports an unknown lease only in the error's text.
    fn lease_err(&self, lease: LeaseId, e: etcd_client::Error) -> StoreError {
        if e.to_string().contains("lease not found") {
            StoreError::LeaseNotFound(lease)
        } else {
            self.err(e)
        }
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.namespace)
    }

    fn convert(&self, kv: &etcd_client::KeyValue) -> Result<KeyValue, StoreError> {
        let key = self.strip(kv.key())?;
        Ok(KeyValue {
            key,
            value: kv.value().to_vec(),
            create_revision: kv.create_revision() as Revision,
            mod_revision: kv.mod_revision() as Revision,
            lease: kv.lease(),
        })
    }

    fn strip(&self, raw: &[u8]) -> Result<String, StoreError> {
        let s = std::str::from_utf8(raw).map_err(|e| StoreError::Corrupt {
            key: String::from_utf8_lossy(raw).into_owned(),
            reason: e.to_string(),
        })?;
        s.strip_prefix(&self.namespace)
            .map(str::to_owned)
            .ok_or_else(|| StoreError::Corrupt {
                key: s.to_owned(),
                reason: format!("outside namespace {}", self.namespace),
            })
    }
}

impl Store for EtcdStore {
    fn backend(&self) -> &'static str {
        "etcd"
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let resp = self
            .client
            .kv_client()
            .get(self.full(key), None)
            .await
            .map_err(|e| self.err(e))?;
        resp.kvs().first().map(|kv| self.convert(kv)).transpose()
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let resp = self
            .client
            .kv_client()
            .get(self.full(prefix), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| self.err(e))?;
        let rev = resp.header().map(|h| h.revision()).unwrap_or(0) as Revision;
        let kvs = resp
            .kvs()
            .iter()
            .map(|kv| self.convert(kv))
            .collect::<Result<_, _>>()?;
        Ok((kvs, rev))
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        let compares: Vec<EtcdCompare> = txn
            .compares
            .iter()
            .map(|c| match c {
                Compare::Absent(k) => EtcdCompare::version(self.full(k), CompareOp::Equal, 0),
                Compare::ModRevision(k, r) => {
                    EtcdCompare::mod_revision(self.full(k), CompareOp::Equal, *r as i64)
                }
            })
            .collect();
        let ops: Vec<TxnOp> = txn
            .ops
            .iter()
            .map(|op| match op {
                Op::Put { key, value, lease } => TxnOp::put(
                    self.full(key),
                    value.clone(),
                    (*lease != 0).then(|| PutOptions::new().with_lease(*lease)),
                ),
                Op::Delete { key } => TxnOp::delete(self.full(key), None),
                Op::DeletePrefix { prefix } => {
                    TxnOp::delete(self.full(prefix), Some(DeleteOptions::new().with_prefix()))
                }
            })
            .collect();
        let resp = self
            .client
            .kv_client()
            .txn(etcd_client::Txn::new().when(compares).and_then(ops))
            .await
            .map_err(|e| {
                // A put on an unknown lease is refused by etcd as a whole request.
                let lease = txn.ops.iter().find_map(|o| match o {
                    Op::Put { lease, .. } if *lease != 0 => Some(*lease),
                    _ => None,
                });
                self.lease_err(lease.unwrap_or(0), e)
            })?;
        if !resp.succeeded() {
            return Ok(TxnOutcome::Failed);
        }
        let deleted = resp
            .op_responses()
            .iter()
            .map(|r| match r {
                TxnOpResponse::Delete(d) => d.deleted() as usize,
                _ => 0,
            })
            .sum();
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0) as Revision;
        Ok(TxnOutcome::Committed { revision, deleted })
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<Watch, StoreError> {
        let mut stream = self
            .client
            .watch_client()
            .watch(
                self.full(prefix),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(after as i64 + 1),
                ),
            )
            .await
            .map_err(|e| self.err(e))?;
        let (tx, watch) = Watch::channel(64);
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    next = stream.message() => next,
                    _ = tx.closed() => return,
                };
                let msg = match next {
                    Ok(Some(m)) => m,
                    Ok(None) => return,
                    Err(e) => {
                        let _ = tx.send(Err(this.err(e))).await;
                        return;
                    }
                };
                if msg.compact_revision() > 0 {
                    let _ = tx
                        .send(Ok(WatchMessage::Relist {
                            compact_revision: msg.compact_revision() as Revision,
                        }))
                        .await;
                    return;
                }
                if msg.canceled() {
                    debug!(reason = msg.cancel_reason(), "etcd watch canceled");
                    let _ = tx.send(Err(StoreError::Closed)).await;
                    return;
                }
                let mut events = Vec::with_capacity(msg.events().len());
                for ev in msg.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let converted = match ev.event_type() {
                        EventType::Put => this.convert(kv).map(Event::Put),
                        EventType::Delete => this.strip(kv.key()).map(|key| Event::Delete {
                            key,
                            revision: kv.mod_revision() as Revision,
                        }),
                    };
                    match converted {
                        Ok(e) => events.push(e),
                        Err(e) => {
                            let _ = tx.send(Err(e)).await;
                            return;
                        }
                    }
                }
                if !events.is_empty() && tx.send(Ok(WatchMessage::Events(events))).await.is_err() {
                    return;
                }
            }
        });
        Ok(watch)
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        self.client
            .kv_client()
            .compact(revision as i64, None)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let resp = self
            .client
            .lease_client()
            .grant(ttl.as_millis().div_ceil(1000).max(1) as i64, None)
            .await
            .map_err(|e| self.err(e))?;
        Ok(resp.id())
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        let (mut keeper, mut stream) = self
            .client
            .lease_client()
            .keep_alive(lease)
            .await
            .map_err(|e| self.lease_err(lease, e))?;
        keeper
            .keep_alive()
            .await
            .map_err(|e| self.lease_err(lease, e))?;
        match stream
            .message()
            .await
            .map_err(|e| self.lease_err(lease, e))?
        {
            Some(r) if r.ttl() > 0 => Ok(Duration::from_secs(r.ttl() as u64)),
            _ => Err(StoreError::LeaseNotFound(lease)),
        }
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.client
            .lease_client()
            .revoke(lease)
            .await
            .map(|_| ())
            .map_err(|e| self.lease_err(lease, e))
    }
}

/// The options of a store URL (`?NAME=VALUE&...`): for `etcds://`, `ca=FILE` (the CA that
/// signed etcd's certificate) and, for an etcd that checks clients (`--client-cert-auth`),
/// `cert=FILE&key=FILE`; for either scheme, etcd's own authentication with
/// `user=NAME&password-file=FILE` (the password is never written in the URL, which lands in
/// broker.yaml and in process listings).
#[derive(Debug, Default)]
struct EtcdOptions {
    ca: Option<std::path::PathBuf>,
    cert: Option<std::path::PathBuf>,
    key: Option<std::path::PathBuf>,
    user: Option<String>,
    password_file: Option<std::path::PathBuf>,
}

fn read_option_file(what: &str, p: &std::path::Path) -> Result<String, String> {
    clusterlink_broker_client::fs::read_limited(p, 1024 * 1024)
        .map_err(|e| format!("cannot read the {what} {}: {e}", p.display()))
}

impl EtcdOptions {
    fn parse(query: &str) -> Result<Self, String> {
        let mut o = EtcdOptions::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| format!("{pair:?} is not NAME=VALUE"))?;
            if v.is_empty() {
                return Err(format!("option {k} has no value"));
            }
            match k {
                "ca" => o.ca = Some(v.into()),
                "cert" => o.cert = Some(v.into()),
                "key" => o.key = Some(v.into()),
                "user" => o.user = Some(v.to_owned()),
                "password-file" => o.password_file = Some(v.into()),
                "password" => {
                    return Err(
                        "give the password in a file (password-file=FILE), not in the URL".into(),
                    );
                }
                other => {
                    return Err(format!(
                        "unknown option {other:?} (ca, cert, key, user, password-file)"
                    ));
                }
            }
        }
        Ok(o)
    }

    fn tls(&self) -> Result<etcd_client::TlsOptions, String> {
        let ca = self
            .ca
            .as_ref()
            .ok_or("etcds:// needs ca=FILE, the CA of etcd's certificate")?;
        let mut tls = etcd_client::TlsOptions::new().ca_certificate(
            etcd_client::Certificate::from_pem(read_option_file("CA", ca)?),
        );
        match (&self.cert, &self.key) {
            (Some(c), Some(k)) => {
                tls = tls.identity(etcd_client::Identity::from_pem(
                    read_option_file("client certificate", c)?,
                    read_option_file("client key", k)?,
                ));
            }
            (None, None) => {}
            _ => return Err("give both cert=FILE and key=FILE, or neither".into()),
        }
        Ok(tls)
    }

    /// The user and the password (the file's first line).
    fn user(&self) -> Result<Option<(String, String)>, String> {
        match (&self.user, &self.password_file) {
            (Some(u), Some(f)) => {
                let text = read_option_file("password file", f)?;
                let password = text.lines().next().unwrap_or_default().to_owned();
                if password.is_empty() {
                    return Err(format!("the password file {} is empty", f.display()));
                }
                Ok(Some((u.clone(), password)))
            }
            (None, None) => Ok(None),
            _ => Err("give both user=NAME and password-file=FILE, or neither".into()),
        }
    }
}
