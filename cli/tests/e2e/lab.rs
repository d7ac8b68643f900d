//! `clusterlink lab` as an operator runs it (needs root): up with its own verification,
//! status, exec, down, and nothing left behind.

use std::process::Command;

use crate::support::BIN;

fn lab(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .arg("lab")
        .args(args)
        .env("CLUSTERLINK_LAB_DIR", dir)
        .output()
        .unwrap()
}

fn lab_namespaces() -> usize {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("cllab-"))
        .count()
}

/// Removes the lab even if an assertion fails.
struct Down<'a>(&'a std::path::Path);
impl Drop for Down<'_> {
    fn drop(&mut self) {
        let _ = lab(self.0, &["down"]);
    }
}

#[test]
fn lab_up_status_exec_down() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let _down = Down(dir);
    let up = lab(dir, &["up", "--clusters", "3", "--nat", "west"]);
    let stdout = String::from_utf8_lossy(&up.stdout);
    assert!(
        up.status.success(),
        "{}\n{stdout}",
        String::from_utf8_lossy(&up.stderr)
    );
    let (reach, discovery) = stdout
        .split_once("Service discovery")
        .expect("a service discovery table");
    assert_eq!(
        reach.matches(" ok ").count(),
        6,
        "a reachability row per ordered pair: {stdout}"
    );
    assert_eq!(
        discovery.matches(" 3/3 ").count(),
        3,
        "from every cluster, three answers that each echo: {stdout}"
    );
    assert_eq!(stdout.matches(" connected ").count(), 6, "{stdout}");
    let again = lab(dir, &["up", "--clusters", "2"]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("already running"));
    let status = lab(dir, &["status", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(v["clusters"].as_array().unwrap().len(), 3);
    assert_eq!(v["clusters"][1]["nat"], true);
    let processes = v["processes"].as_array().unwrap();
    assert!(
        processes.iter().all(|p| p["running"] == true),
        "{processes:?}"
    );
    // A process that died is shown as exited, not running.
    let echo = v["clusters"][0]["echoPid"].as_u64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(echo),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    clusterlink_testkit::wait_until(
        "the echo server to be reported exited",
        std::time::Duration::from_secs(10),
        || {
            let v: serde_json::Value =
                serde_json::from_slice(&lab(dir, &["status", "-o", "json"]).stdout).unwrap();
            v["processes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["pid"] == echo && p["running"] == false)
        },
    )
    .unwrap();
    let table = String::from_utf8_lossy(&lab(dir, &["status"]).stdout).into_owned();
    assert!(
        table
            .lines()
            .any(|l| l.contains("exited") && l.contains(&echo.to_string())),
        "{table}"
    );
    // `lab status | head -1`: the reader goes; the command ends quietly.
    let mut child = Command::new(BIN)
        .args(["lab", "status"])
        .env("CLUSTERLINK_LAB_DIR", dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let piped = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&piped.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(piped.status.success(), "{}: {err}", piped.status);
    let exec = lab(
        dir,
        &[
            "exec",
            "east",
            "w1-pod",
            "--",
            "ping",
            "-c1",
            "-W2",
            "10.3.101.10",
        ],
    );
    assert!(
        exec.status.success(),
        "{}",
        String::from_utf8_lossy(&exec.stderr)
    );
    let bad = lab(dir, &["exec", "nowhere", "--", "true"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("No cluster \"nowhere\""));
    let down = lab(dir, &["down"]);
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    let said = String::from_utf8_lossy(&down.stdout);
    assert!(said.contains("process(es) stopped"), "{said}");
    assert_eq!(lab_namespaces(), 0, "lab down left namespaces behind");
    assert!(!dir.join("state.json").exists());
    // A lab whose `up` died leaves namespaces and no state: `up` refuses, `down` removes them.
    assert!(
        Command::new("ip")
            .args(["netns", "add", "cllab-orphan"])
            .status()
            .unwrap()
            .success()
    );
    let refused = lab(dir, &["up", "--clusters", "2"]);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("earlier lab"));
    assert!(lab(dir, &["down"]).status.success());
    assert_eq!(lab_namespaces(), 0, "lab down left orphaned namespaces");
}

/// `/readyz` of every component says what it can do: all ready once the lab is up; still
/// ready (serving their last view) when the broker goes; a route agent started while the
/// broker is gone is not, and says why; `/healthz` answers regardless.
#[test]
fn every_component_says_whether_it_is_ready() {
    use std::time::Duration;

    use clusterlink_lab::invoke::AGENT_HEALTH_PORT;
    use clusterlink_lab::lab::http_get;
    use clusterlink_lab::{Lab, wait_until};

    use crate::support::{all_ready, readiness};

    let specs = crate::support::small(&["a", "b"]);
    let mut lab = Lab::up(std::path::Path::new(BIN), &specs, &|_| {}).expect("lab up (needs root)");
    lab.wait_connected(Duration::from_secs(30)).unwrap();
    lab.wait_routes(Duration::from_secs(30)).unwrap();
    if wait_until(
        "every component to be ready",
        Duration::from_secs(20),
        || all_ready(&lab),
    )
    .is_err()
    {
        panic!("{:#?}", readiness(&lab));
    }
    assert_eq!(readiness(&lab).len(), 1 + 2 * (1 + 2 + 1));

    lab.stop_broker();
    let b_worker = lab.state.clusters[1].nodes[1].node.ns();
    lab.stop_agent(1, 1).expect("b's worker agent stops");
    lab.start_agent(1, 1, false).unwrap();
    // Not ready from its start ("starting"), then, once it is up, because the cluster set
    // never comes.
    let mut answer = None;
    let waited = wait_until(
        "the restarted agent to say what it waits for",
        Duration::from_secs(10),
        || {
            answer = http_get(&b_worker, AGENT_HEALTH_PORT, "/readyz");
            answer.as_ref().is_some_and(|(_, body)| {
                body.contains("waiting for the cluster set from the broker")
            })
        },
    );
    assert!(waited.is_ok(), "{answer:?}");
    let (code, body) = answer.unwrap();
    assert_eq!(code, 503, "{body}");
    assert_eq!(
        http_get(&b_worker, AGENT_HEALTH_PORT, "/healthz").map(|(c, _)| c),
        Some(200)
    );
    // The others keep serving from their last view.
    for (who, r) in readiness(&lab) {
        if who == "broker" || who == "route agent b-w1" {
            continue;
        }
        assert!(matches!(r, Some((200, _))), "{who}: {r:?}");
    }
}
