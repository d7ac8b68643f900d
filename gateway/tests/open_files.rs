//! The gateway raises its soft limit on open files to the hard one (a socket per peer).
//! A test binary of its own: it changes this process's limit.

use nix::sys::resource::{Resource, getrlimit, setrlimit};

#[test]
fn the_open_files_limit_is_raised_to_the_hard_limit() {
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let low = hard.min(256);
    setrlimit(Resource::RLIMIT_NOFILE, low, hard).unwrap();
    assert_eq!(getrlimit(Resource::RLIMIT_NOFILE).unwrap(), (low, hard));

    let got = clusterlink_gateway::config::raise_open_files_limit();
    assert_eq!(got, Some(hard));
    assert_eq!(getrlimit(Resource::RLIMIT_NOFILE).unwrap(), (hard, hard));
    // Already there: nothing to do, same answer.
    assert_eq!(
        clusterlink_gateway::config::raise_open_files_limit(),
        Some(hard)
    );
}
