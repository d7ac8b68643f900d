//! One writer among the DNS plugin's replicas: a `coordination.k8s.io/v1` Lease, held by one
//! replica at a time (client-go's algorithm: take it when it is free or its holder stopped
//! renewing it; optimistic concurrency on the object's resourceVersion settles two
//! replicas taking it at once). Every replica answers DNS; only the holder runs the export
//! and import controllers. [`decide`] is pure; [`elect`] is the loop around it.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// What to do with the Lease as it stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// No Lease yet: make it, held by us.
    Create,
    /// Ours: renew it.
    Renew,
    /// Free, or its holder stopped renewing it: take it.
    Take,
    /// Another replica holds it.
    Follow { holder: String },
}

/// Decides at `now`, for replica `me`, given the Lease's spec (`None`: no Lease object).
pub fn decide(now: Timestamp, me: &str, lease: Option<&LeaseSpec>) -> Decision {
    let Some(spec) = lease else {
        return Decision::Create;
    };
    match spec.holder_identity.as_deref() {
        Some(h) if h == me => Decision::Renew,
        None | Some("") => Decision::Take,
        Some(h) => {
            let duration = i64::from(spec.lease_duration_seconds.unwrap_or(0).max(0));
            let expired = spec
                .renew_time
                .as_ref()
                .is_none_or(|t| t.0 + SignedDuration::from_secs(duration) <= now);
            if expired {
                Decision::Take
            } else {
                Decision::Follow {
                    holder: h.to_owned(),
                }
            }
        }
    }
}

/// The spec we write when we hold the Lease.
fn held(now: Timestamp, me: &str, duration: Duration, previous: Option<&LeaseSpec>) -> LeaseSpec {
    let ours = previous.is_some_and(|p| p.holder_identity.as_deref() == Some(me));
    let transitions = previous.and_then(|p| p.lease_transitions).unwrap_or(0);
    LeaseSpec {
        holder_identity: Some(me.to_owned()),
        lease_duration_seconds: Some(duration.as_secs().try_into().unwrap_or(i32::MAX)),
        renew_time: Some(MicroTime(now)),
        acquire_time: if ours {
            previous.and_then(|p| p.acquire_time.clone())
        } else {
            Some(MicroTime(now))
        },
        lease_transitions: Some(if ours || previous.is_none() {
            transitions
        } else {
            transitions + 1
        }),
        ..LeaseSpec::default()
    }
}

/// One round: read the Lease, decide, write. `Ok(true)` when we hold it after the round.
pub async fn round(
    api: &Api<Lease>,
    name: &str,
    me: &str,
    duration: Duration,
    now: Timestamp,
) -> Result<bool, kube::Error> {
    let current = match api.get(name).await {
        Ok(l) => Some(l),
        Err(kube::Error::Api(s)) if s.code == 404 => None,
        Err(e) => return Err(e),
    };
    let spec = current.as_ref().and_then(|l| l.spec.as_ref());
    let decision = decide(now, me, spec);
    let lease = |meta: ObjectMeta| Lease {
        metadata: meta,
        spec: Some(held(now, me, duration, spec)),
    };
    let written = match (&decision, &current) {
        (Decision::Follow { holder }, _) => {
            debug!(%holder, "another replica holds the controllers' Lease");
            return Ok(false);
        }
        (Decision::Create, _) => {
            api.create(
                &PostParams::default(),
                &lease(ObjectMeta {
                    name: Some(name.to_owned()),
                    ..ObjectMeta::default()
                }),
            )
            .await
        }
        // A replace carries the resourceVersion read: if another replica wrote since, it
        // fails (409) and we follow.
        (Decision::Renew | Decision::Take, Some(current)) => {
            api.replace(
                name,
                &PostParams::default(),
                &lease(current.metadata.clone()),
            )
            .await
        }
        (Decision::Renew | Decision::Take, None) => return Ok(false),
    };
    match written {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => {
            debug!("another replica wrote the Lease first");
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Holds or follows Lease `name` for replica `me`, for as long as the receiver lives: the
/// value says whether we hold it. Renewed every third of `duration`; we stop saying we hold
/// it two thirds of `duration` after the last renewal that succeeded, before any other
/// replica may take it.
pub fn elect(
    api: Api<Lease>,
    name: String,
    me: String,
    duration: Duration,
) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let period = duration / 3;
        let mut last_held: Option<tokio::time::Instant> = None;
        loop {
            let holds = match round(&api, &name, &me, duration, Timestamp::now()).await {
                Ok(true) => {
                    last_held = Some(tokio::time::Instant::now());
                    true
                }
                Ok(false) => {
                    last_held = None;
                    false
                }
                Err(e) => {
                    warn!(error = %e, "cannot read or write the controllers' Lease; retrying");
                    last_held.is_some_and(|t| t.elapsed() < period * 2)
                }
            };
            if *tx.borrow() != holds {
                info!(lease = %name, holds, "controllers' Lease {}", if holds { "held: this replica writes" } else { "not held: this replica only answers" });
            }
            tx.send_replace(holds);
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = tx.closed() => return,
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: &str, renewed: Timestamp, secs: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            renew_time: Some(MicroTime(renewed)),
            lease_duration_seconds: Some(secs),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn a_lease_is_taken_only_when_free_or_lapsed() {
        let t0 = Timestamp::from_second(1_800_000_000).unwrap();
        let at = |s: i64| t0 + SignedDuration::from_secs(s);
        assert_eq!(decide(t0, "a", None), Decision::Create);
        assert_eq!(decide(t0, "a", Some(&spec("a", t0, 15))), Decision::Renew);
        assert_eq!(
            decide(at(14), "b", Some(&spec("a", t0, 15))),
            Decision::Follow { holder: "a".into() }
        );
        assert_eq!(
            decide(at(15), "b", Some(&spec("a", t0, 15))),
            Decision::Take
        );
        assert_eq!(decide(t0, "b", Some(&spec("", t0, 15))), Decision::Take);
        assert_eq!(decide(t0, "b", Some(&LeaseSpec::default())), Decision::Take);
    }

    #[test]
    fn taking_over_counts_a_transition_and_renewing_keeps_the_acquire_time() {
        let t0 = Timestamp::from_second(1_800_000_000).unwrap();
        let t1 = t0 + SignedDuration::from_secs(5);
        let first = held(t0, "a", Duration::from_secs(15), None);
        assert_eq!(first.lease_transitions, Some(0));
        let renewed = held(t1, "a", Duration::from_secs(15), Some(&first));
        assert_eq!(renewed.acquire_time, first.acquire_time);
        assert_eq!(renewed.renew_time, Some(MicroTime(t1)));
        let taken = held(t1, "b", Duration::from_secs(15), Some(&first));
        assert_eq!(taken.lease_transitions, Some(1));
        assert_eq!(taken.acquire_time, Some(MicroTime(t1)));
        assert_eq!(taken.holder_identity.as_deref(), Some("b"));
    }

    /// Against the API (kube's mock), request by request: made when missing; renewed with
    /// the resourceVersion read; a replace that lost the race (409) means follow.
    #[tokio::test]
    async fn rounds_create_renew_and_lose_races_through_the_api() {
        use http::{Method, Request, Response, StatusCode};
        use kube::client::Body;
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let lease_json = |holder: &str| {
            serde_json::json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": "clusterlink-dns", "namespace": "clusterlink-system", "resourceVersion": "7"},
                "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15,
                         "renewTime": "2027-01-15T08:00:00.000000Z"}})
        };
        let not_found = serde_json::json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
            "reason": "NotFound", "code": 404, "message": "not found"});
        let conflict = serde_json::json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
            "reason": "Conflict", "code": 409, "message": "the object has been modified"});
        let script = vec![
            (Method::GET, StatusCode::NOT_FOUND, not_found),
            (Method::POST, StatusCode::CREATED, lease_json("pod-a")),
            (Method::GET, StatusCode::OK, lease_json("pod-a")),
            (Method::PUT, StatusCode::OK, lease_json("pod-a")),
            (Method::GET, StatusCode::OK, lease_json("pod-a")),
            (Method::PUT, StatusCode::CONFLICT, conflict),
        ];
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            for (method, status, body) in script {
                let (request, send) = handle.next_request().await.expect("a request");
                assert_eq!(request.method(), method);
                let path = request.uri().path().to_owned();
                let bytes = request.into_body().collect_bytes().await.unwrap();
                let sent: serde_json::Value =
                    serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
                let mut r = Response::new(Body::from(serde_json::to_vec(&body).unwrap()));
                *r.status_mut() = status;
                send.send_response(r);
                seen.push((method, path, sent));
            }
            seen
        });
        let api: Api<Lease> =
            Api::namespaced(kube::Client::new(service, "default"), "clusterlink-system");
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let d = Duration::from_secs(15);
        assert!(
            round(&api, "clusterlink-dns", "pod-a", d, now)
                .await
                .unwrap(),
            "made it"
        );
        assert!(
            round(&api, "clusterlink-dns", "pod-a", d, now)
                .await
                .unwrap(),
            "renewed it"
        );
        assert!(
            !round(&api, "clusterlink-dns", "pod-a", d, now)
                .await
                .unwrap(),
            "lost a race"
        );
        let seen = server.await.unwrap();
        assert_eq!(
            seen[1].1,
            "/apis/coordination.k8s.io/v1/namespaces/clusterlink-system/leases"
        );
        assert_eq!(seen[1].2["spec"]["holderIdentity"], "pod-a");
        assert_eq!(
            seen[3].1,
            "/apis/coordination.k8s.io/v1/namespaces/clusterlink-system/leases/clusterlink-dns"
        );
        assert_eq!(
            seen[3].2["metadata"]["resourceVersion"], "7",
            "optimistic concurrency"
        );
    }
}
