//! The broker's decisions, free of I/O and clocks: whether a join is allowed, and whether an
//! identity may write a record. The service feeds it what it read from the store and `now`.

use std::net::IpAddr;

use clusterlink_api::ownership::{self, Covered, Infrastructure};
use clusterlink_api::{
    Cluster, ClusterId, ClusterRegistration, Kind, Record, RecordKey, RetiringSerial,
};
use thiserror::Error;

use crate::pki::Identity;

/// A join token as the store keeps it (under the SHA-256 of the token, never the token).
#[derive(Clone, PartialEq, prost::Message)]
pub struct StoredToken {
    #[prost(int64, tag = "1")]
    pub expires_at_unix_ms: i64,
    #[prost(bool, tag = "2")]
    pub single_use: bool,
    /// The cluster that redeemed a single-use token.
    #[prost(string, tag = "3")]
    pub used_by: String,
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum JoinRefusal {
    #[error(
        "the join token is not known to this broker; ask the operator for a fresh broker-info file (clusterlink broker token create)"
    )]
    UnknownToken,
    #[error(
        "the join token expired at {expired_at_unix_ms} (unix ms); ask the operator for a fresh one (clusterlink broker token create)"
    )]
    TokenExpired { expired_at_unix_ms: i64 },
    #[error(
        "the join token was single-use and cluster {by:?} has already used it; ask the operator for a fresh one"
    )]
    TokenUsed { by: String },
    #[error(
        "a cluster with ID \"{id}\" has already joined; choose another --cluster-id, or revoke the old one first (clusterlink broker revoke {id})"
    )]
    DuplicateCluster { id: ClusterId },
    #[error(
        "CIDR {ours} overlaps {theirs} of cluster \"{cluster}\"; clusters joined at layer 3 need disjoint pod and service CIDRs"
    )]
    Overlap {
        cluster: ClusterId,
        ours: String,
        theirs: String,
    },
    #[error("CIDR {0}; choose CIDRs that hold only this cluster's pods and services")]
    Covers(String),
}

/// Refuses cluster CIDRs that cover a reserved range or an address the mesh runs on
/// (`infrastructure`: the broker's addresses, every gateway's underlay and public address).
pub fn check_cidrs(
    cluster: &Cluster,
    infrastructure: &[Infrastructure],
) -> Result<(), JoinRefusal> {
    let all = cluster
        .all_cidrs()
        .map_err(|e| JoinRefusal::Covers(e.to_string()))?;
    ownership::covers(&all, infrastructure)
        .map_or(Ok(()), |c: Covered| Err(JoinRefusal::Covers(c.to_string())))
}

/// What a cluster may not publish.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ContentRefusal {
    #[error(
        "{what} {addr} of service {service} is not in cluster {cluster}'s CIDRs ({cidrs}); a cluster publishes only addresses it owns"
    )]
    NotOwned {
        what: &'static str,
        addr: IpAddr,
        /// NAMESPACE/NAME.
        service: String,
        cluster: ClusterId,
        cidrs: String,
    },
    #[error("gateway {gateway}: its {what} {addr} is {why}; give the node's routable address")]
    BadUnderlay {
        /// NODE of cluster ID.
        gateway: String,
        what: &'static str,
        addr: IpAddr,
        why: &'static str,
    },
    #[error(
        "gateway {gateway}: its {what} {addr} lies in {cidr} of cluster \"{owner}\"; every route agent would send the tunnels' own traffic into them"
    )]
    UnderlayInCluster {
        /// NODE of cluster ID.
        gateway: String,
        what: &'static str,
        addr: IpAddr,
        owner: ClusterId,
        cidr: String,
    },
}

/// Checks what a record says against what its cluster owns: a service's addresses lie in its
/// cluster's CIDRs; a gateway's underlay addresses are routable and outside every cluster's
/// CIDRs (`clusters`: every registered cluster, the owner's included).
pub fn check_content(
    record: &Record,
    owner: &Cluster,
    clusters: &[std::sync::Arc<Cluster>],
) -> Result<(), ContentRefusal> {
    match record {
        Record::Service(s) => match ownership::foreign_in_service(s, owner) {
            None => Ok(()),
            Some(f) => Err(ContentRefusal::NotOwned {
                what: f.what,
                addr: f.addr,
                service: format!("{}/{}", s.namespace, s.name),
                cluster: owner.id.clone(),
                cidrs: format!("pods {}, services {}", owner.pod_cidrs, owner.service_cidrs),
            }),
        },
        Record::Gateway(g) => {
            if let Some(why) = ownership::bad_underlay(g.private_addr) {
                return Err(ContentRefusal::BadUnderlay {
                    gateway: format!("{} of cluster {}", g.node, owner.id),
                    what: "private address",
                    addr: g.private_addr,
                    why,
                });
            }
            match ownership::gateway_inside_a_cluster(g, clusters.iter().map(|c| &**c)) {
                None => Ok(()),
                Some((what, addr, other, cidr)) => Err(ContentRefusal::UnderlayInCluster {
                    gateway: format!("{} of cluster {}", g.node, owner.id),
                    what,
                    addr,
                    owner: other,
                    cidr: cidr.to_string(),
                }),
            }
        }
        Record::Cluster(_) | Record::Connection(_) => Ok(()),
    }
}

/// What a join that may go ahead does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinDecision {
    /// Register the cluster.
    New,
    /// The same cluster joining again with the same key, token and CIDRs: its first join
    /// registered it, but the joiner never saved the certificate (it crashed, or its output
    /// could not be written). Issue a certificate again for the same registration.
    Retry,
}

/// Decides whether `cluster` may join with `token` and the public key whose SHA-256 (hex) is
/// `key_sha256`, given the clusters already joined.
pub fn decide_join(
    now_unix_ms: i64,
    token: Option<&StoredToken>,
    cluster: &Cluster,
    key_sha256: &str,
    existing: &[ClusterRegistration],
) -> Result<JoinDecision, JoinRefusal> {
    let token = token.ok_or(JoinRefusal::UnknownToken)?;
    if now_unix_ms >= token.expires_at_unix_ms {
        return Err(JoinRefusal::TokenExpired {
            expired_at_unix_ms: token.expires_at_unix_ms,
        });
    }
    if let Some(same) = existing.iter().find(|r| r.cluster.id == cluster.id) {
        let retry = !same.public_key_sha256.is_empty()
            && same.public_key_sha256 == key_sha256
            && same.cluster == *cluster
            && (!token.single_use || token.used_by == cluster.id.as_str());
        return if retry {
            Ok(JoinDecision::Retry)
        } else {
            Err(JoinRefusal::DuplicateCluster {
                id: cluster.id.clone(),
            })
        };
    }
    if token.single_use && !token.used_by.is_empty() {
        return Err(JoinRefusal::TokenUsed {
            by: token.used_by.clone(),
        });
    }
    let ours = cluster
        .all_cidrs()
        .map_err(|_| JoinRefusal::DuplicateCluster {
            id: cluster.id.clone(),
        })?;
    for other in existing {
        let Ok(theirs) = other.cluster.all_cidrs() else {
            continue;
        };
        if let Some((a, b)) = ours.overlaps_with(&theirs).into_iter().next() {
            return Err(JoinRefusal::Overlap {
                cluster: other.cluster.id.clone(),
                ours: a.to_string(),
                theirs: b.to_string(),
            });
        }
    }
    Ok(JoinDecision::New)
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum Denied {
    #[error("cluster {caller} may not write records of cluster {owner}")]
    WrongOwner { caller: ClusterId, owner: ClusterId },
    #[error(
        "the certificate of cluster {cluster} is not (or no longer) valid: the cluster was revoked or re-joined, or the certificate was renewed and its grace has ended; use the credentials file's current certificate, or join again with a fresh token"
    )]
    Revoked { cluster: ClusterId },
    #[error("cluster registrations are written by join only")]
    ClusterRecord,
    #[error("the admin identity does not publish cluster records; use a cluster's credentials")]
    AdminWrite,
    #[error("only the broker's admin identity may do this")]
    AdminOnly,
}

/// Which certificates speak for a cluster: the current one, and earlier ones renewed away
/// from, each until the end of its grace.
#[derive(Clone, Copy, Debug)]
pub struct Certificates<'a> {
    pub current: &'a str,
    pub retiring: &'a [RetiringSerial],
}

impl<'a> Certificates<'a> {
    pub fn of(reg: &'a ClusterRegistration) -> Self {
        Certificates {
            current: &reg.certificate_serial,
            retiring: &reg.retiring,
        }
    }

    /// Does the certificate with `serial` speak for the cluster at `now_ms`?
    pub fn accepts(&self, serial: &str, now_ms: i64) -> bool {
        self.current == serial || self.grace_of(serial).is_some_and(|until| now_ms < until)
    }

    /// When a renewed-away certificate stops working; `None` for the current one or an
    /// unknown one.
    pub fn grace_of(&self, serial: &str) -> Option<i64> {
        self.retiring
            .iter()
            .find(|r| r.serial == serial)
            .map(|r| r.valid_until_unix_ms)
    }
}

/// May `identity` (whose cluster's registered certificates are `registered`, `None` if it has
/// no registration) read the broker's records at `now_ms`?
pub fn authorize_read(
    identity: &Identity,
    registered: Option<Certificates<'_>>,
    now_ms: i64,
) -> Result<(), Denied> {
    match identity {
        Identity::Admin => Ok(()),
        Identity::Cluster { id, serial } => {
            if registered.is_some_and(|c| c.accepts(serial, now_ms)) {
                Ok(())
            } else {
                Err(Denied::Revoked {
                    cluster: id.clone(),
                })
            }
        }
    }
}

/// May `identity` write (publish or withdraw) the record at `key`? Returns the writing cluster.
pub fn authorize_write(
    identity: &Identity,
    registered: Option<Certificates<'_>>,
    now_ms: i64,
    key: &RecordKey,
) -> Result<ClusterId, Denied> {
    let Identity::Cluster { id, .. } = identity else {
        return Err(Denied::AdminWrite);
    };
    authorize_read(identity, registered, now_ms)?;
    if key.kind() == Kind::Clusters {
        return Err(Denied::ClusterRecord);
    }
    if key.owner() != id {
        return Err(Denied::WrongOwner {
            caller: id.clone(),
            owner: key.owner().clone(),
        });
    }
    Ok(id.clone())
}

/// The most renewed-away certificates a cluster keeps working at once (components that share
/// one credentials file may renew at the same moment; each keeps its grace).
pub const MAX_RETIRING: usize = 4;

/// A certificate the CA just issued on a renewal.
#[derive(Clone, Debug)]
pub struct Issued {
    pub serial: String,
    pub expires_at_unix_ms: i64,
    pub ca_sha256: String,
    pub public_key_sha256: String,
}

/// The registration after a renewal by the certificate `caller` at `now_ms`: the issued
/// certificate becomes current; the one that was current keeps working until the end of the
/// grace (whoever else holds it picks the new one up meanwhile); renewed-away ones whose
/// grace ended are dropped, and at most [`MAX_RETIRING`] kept (those that last longest).
/// Refused when `caller` does not speak for the cluster.
pub fn renew(
    reg: &ClusterRegistration,
    caller: &str,
    now_ms: i64,
    grace_ms: i64,
    issued: Issued,
) -> Result<ClusterRegistration, Denied> {
    if !Certificates::of(reg).accepts(caller, now_ms) {
        return Err(Denied::Revoked {
            cluster: reg.cluster.id.clone(),
        });
    }
    let mut retiring: Vec<RetiringSerial> = reg
        .retiring
        .iter()
        .filter(|r| now_ms < r.valid_until_unix_ms && r.serial != reg.certificate_serial)
        .cloned()
        .chain(std::iter::once(RetiringSerial {
            serial: reg.certificate_serial.clone(),
            valid_until_unix_ms: now_ms.saturating_add(grace_ms),
        }))
        .collect();
    retiring.sort_by_key(|r| std::cmp::Reverse(r.valid_until_unix_ms));
    retiring.truncate(MAX_RETIRING);
    Ok(ClusterRegistration {
        cluster: reg.cluster.clone(),
        certificate_serial: issued.serial,
        joined_at_unix_ms: reg.joined_at_unix_ms,
        public_key_sha256: issued.public_key_sha256,
        certificate_expires_at_unix_ms: issued.expires_at_unix_ms,
        retiring,
        certificate_ca_sha256: issued.ca_sha256,
    })
}

pub fn authorize_admin(identity: &Identity) -> Result<(), Denied> {
    match identity {
        Identity::Admin => Ok(()),
        Identity::Cluster { .. } => Err(Denied::AdminOnly),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(id: &str, pods: &str, svcs: &str) -> Cluster {
        Cluster {
            id: id.parse().unwrap(),
            pod_cidrs: pods.parse().unwrap(),
            service_cidrs: svcs.parse().unwrap(),
            labels: Default::default(),
        }
    }

    fn reg(c: Cluster) -> ClusterRegistration {
        ClusterRegistration {
            cluster: c,
            certificate_serial: "01".into(),
            joined_at_unix_ms: 0,
            public_key_sha256: "k1".into(),
            certificate_expires_at_unix_ms: 0,
            retiring: Vec::new(),
            certificate_ca_sha256: String::new(),
        }
    }

    fn token(expires: i64, single: bool, used: &str) -> StoredToken {
        StoredToken {
            expires_at_unix_ms: expires,
            single_use: single,
            used_by: used.into(),
        }
    }

    #[test]
    fn join_token_rules() {
        let c = cluster("east", "10.1.0.0/16", "10.101.0.0/16");
        assert_eq!(
            decide_join(5, None, &c, "k2", &[]),
            Err(JoinRefusal::UnknownToken)
        );
        assert_eq!(
            decide_join(10, Some(&token(10, false, "")), &c, "k2", &[]),
            Err(JoinRefusal::TokenExpired {
                expired_at_unix_ms: 10
            })
        );
        assert_eq!(
            decide_join(5, Some(&token(10, true, "west")), &c, "k2", &[]),
            Err(JoinRefusal::TokenUsed { by: "west".into() })
        );
        assert_eq!(
            decide_join(5, Some(&token(10, true, "")), &c, "k2", &[]),
            Ok(JoinDecision::New)
        );
        // A multi-use token stays usable.
        assert_eq!(
            decide_join(5, Some(&token(10, false, "west")), &c, "k2", &[]),
            Ok(JoinDecision::New)
        );
    }

    #[test]
    fn join_refuses_duplicates_and_overlaps_naming_the_other_cluster() {
        let t = token(i64::MAX, false, "");
        let west = reg(cluster("west", "10.2.0.0/16", "10.102.0.0/16"));
        let dup = cluster("west", "10.3.0.0/16", "10.103.0.0/16");
        assert_eq!(
            decide_join(0, Some(&t), &dup, "k2", std::slice::from_ref(&west)),
            Err(JoinRefusal::DuplicateCluster {
                id: "west".parse().unwrap()
            })
        );
        // East's service CIDR overlaps west's pod CIDR.
        let east = cluster("east", "10.1.0.0/16", "10.2.128.0/17");
        let err = decide_join(0, Some(&t), &east, "k2", std::slice::from_ref(&west)).unwrap_err();
        assert_eq!(
            err,
            JoinRefusal::Overlap {
                cluster: "west".parse().unwrap(),
                ours: "10.2.128.0/17".into(),
                theirs: "10.2.0.0/16".into(),
            }
        );
        assert!(err.to_string().contains("\"west\""), "{err}");
        let apart = cluster("east", "10.1.0.0/16", "10.101.0.0/16");
        assert_eq!(
            decide_join(0, Some(&t), &apart, "k2", std::slice::from_ref(&west)),
            Ok(JoinDecision::New)
        );
    }

    #[test]
    fn a_join_retried_with_the_same_key_token_and_cidrs_is_recognised() {
        let west = cluster("west", "10.2.0.0/16", "10.102.0.0/16");
        let registered = [reg(west.clone())]; // joined with key "k1"
        let used = token(i64::MAX, true, "west");
        assert_eq!(
            decide_join(0, Some(&used), &west, "k1", &registered),
            Ok(JoinDecision::Retry)
        );
        let multi = token(i64::MAX, false, "");
        assert_eq!(
            decide_join(0, Some(&multi), &west, "k1", &registered),
            Ok(JoinDecision::Retry)
        );
        let dup = Err(JoinRefusal::DuplicateCluster {
            id: "west".parse().unwrap(),
        });
        // Another key: someone else claiming the ID.
        assert_eq!(decide_join(0, Some(&used), &west, "k2", &registered), dup);
        // Other CIDRs: not the same join.
        let moved = cluster("west", "10.3.0.0/16", "10.102.0.0/16");
        assert_eq!(decide_join(0, Some(&used), &moved, "k1", &registered), dup);
        // A single-use token another cluster redeemed.
        let others = token(i64::MAX, true, "east");
        assert_eq!(decide_join(0, Some(&others), &west, "k1", &registered), dup);
        // An expired token is refused whatever else matches.
        assert!(matches!(
            decide_join(i64::MAX, Some(&used), &west, "k1", &registered),
            Err(JoinRefusal::TokenExpired { .. })
        ));
        // Registrations from before keys were recorded are never retried.
        let mut old = reg(west.clone());
        old.public_key_sha256.clear();
        assert_eq!(decide_join(0, Some(&used), &west, "", &[old]), dup);
    }

    #[test]
    fn writes_only_to_own_records_with_current_certificate() {
        let east: ClusterId = "east".parse().unwrap();
        let me = Identity::Cluster {
            id: east.clone(),
            serial: "aa".into(),
        };
        let own: RecordKey = "services/east/demo/echo".parse().unwrap();
        let other: RecordKey = "services/west/demo/echo".parse().unwrap();
        let current = |serial| {
            Some(Certificates {
                current: serial,
                retiring: &[],
            })
        };
        assert_eq!(
            authorize_write(&me, current("aa"), 0, &own),
            Ok(east.clone())
        );
        assert_eq!(
            authorize_write(&me, current("aa"), 0, &other),
            Err(Denied::WrongOwner {
                caller: east.clone(),
                owner: "west".parse().unwrap()
            })
        );
        // Revoked (no registration) or re-joined (another serial): the old certificate is void.
        assert_eq!(
            authorize_write(&me, None, 0, &own),
            Err(Denied::Revoked {
                cluster: east.clone()
            })
        );
        assert_eq!(
            authorize_write(&me, current("bb"), 0, &own),
            Err(Denied::Revoked {
                cluster: east.clone()
            })
        );
        assert_eq!(
            authorize_write(&me, current("aa"), 0, &"clusters/east".parse().unwrap()),
            Err(Denied::ClusterRecord)
        );
        assert_eq!(
            authorize_write(&Identity::Admin, None, 0, &own),
            Err(Denied::AdminWrite)
        );
        assert_eq!(authorize_admin(&me), Err(Denied::AdminOnly));
        assert_eq!(authorize_admin(&Identity::Admin), Ok(()));
    }

    fn issued(serial: &str) -> Issued {
        Issued {
            serial: serial.into(),
            expires_at_unix_ms: 9_000,
            ca_sha256: "ca2".into(),
            public_key_sha256: format!("key-{serial}"),
        }
    }

    #[test]
    fn a_renewed_certificate_works_until_its_grace_ends_then_never_again() {
        let east = reg(cluster("east", "10.1.0.0/16", "10.2.0.0/16"));
        let grace = 1_000;
        let renewed = renew(&east, "01", 100, grace, issued("02")).unwrap();
        assert_eq!(renewed.certificate_serial, "02");
        assert_eq!(renewed.certificate_expires_at_unix_ms, 9_000);
        assert_eq!(renewed.certificate_ca_sha256, "ca2");
        assert_eq!(renewed.public_key_sha256, "key-02");
        assert_eq!(renewed.cluster, east.cluster);
        let certs = Certificates::of(&renewed);
        assert!(certs.accepts("02", 100));
        assert!(certs.accepts("02", 1_000_000));
        assert!(
            certs.accepts("01", 1_099),
            "the old certificate works during the grace"
        );
        assert!(!certs.accepts("01", 1_100), "and not a millisecond after");
        assert!(!certs.accepts("03", 100));
        assert_eq!(certs.grace_of("01"), Some(1_100));
        assert_eq!(certs.grace_of("02"), None);
        let me = Identity::Cluster {
            id: "east".parse().unwrap(),
            serial: "01".into(),
        };
        assert_eq!(authorize_read(&me, Some(certs), 1_099), Ok(()));
        assert!(authorize_read(&me, Some(certs), 1_100).is_err());
        // After its grace the old certificate cannot renew either.
        assert_eq!(
            renew(&renewed, "01", 1_100, grace, issued("03")),
            Err(Denied::Revoked {
                cluster: "east".parse().unwrap()
            })
        );
    }

    #[test]
    fn renewals_racing_from_one_credentials_file_all_keep_working() {
        let east = reg(cluster("east", "10.1.0.0/16", "10.2.0.0/16"));
        let grace = 1_000;
        // Two components holding 01 renew at once: the second renews with 01, in its grace.
        let a = renew(&east, "01", 100, grace, issued("02")).unwrap();
        let b = renew(&a, "01", 110, grace, issued("03")).unwrap();
        let certs = Certificates::of(&b);
        assert_eq!(b.certificate_serial, "03");
        // 02 (current until a moment ago) gets a grace of its own; 01 keeps its first one.
        assert_eq!(certs.grace_of("02"), Some(1_110));
        assert_eq!(certs.grace_of("01"), Some(1_100));
        // Renewed-away certificates whose grace ended are dropped, and at most MAX_RETIRING
        // kept, those that last longest.
        let mut r = b;
        for (i, now) in (2_000..).step_by(10).take(MAX_RETIRING + 2).enumerate() {
            let current = r.certificate_serial.clone();
            r = renew(&r, &current, now, grace, issued(&format!("1{i}"))).unwrap();
        }
        assert_eq!(r.retiring.len(), MAX_RETIRING);
        assert!(r.retiring.iter().all(|x| x.valid_until_unix_ms > 3_000));
        assert!(Certificates::of(&r).grace_of("01").is_none());
    }
}
