//! How a component says whether it can do its job right now; the CLI serves it as `/readyz`.
//! What "ready" means is the component's to say (see each `run`).

use tokio::sync::watch;

/// `Ok` when ready, `Err(reason)` when not.
pub type Readiness = Result<(), String>;

/// Where a component reports its readiness; the default reports to nobody (tests, benches).
#[derive(Clone, Debug, Default)]
pub struct Ready(Option<watch::Sender<Readiness>>);

impl Ready {
    pub fn new(tx: watch::Sender<Readiness>) -> Self {
        Ready(Some(tx))
    }

    /// Ready.
    pub fn ok(&self) {
        self.set(Ok(()));
    }

    /// Not ready, for `why`.
    pub fn not(&self, why: impl Into<String>) {
        self.set(Err(why.into()));
    }

    fn set(&self, r: Readiness) {
        if let Some(tx) = &self.0 {
            tx.send_if_modified(|cur| {
                let changed = *cur != r;
                if changed {
                    *cur = r;
                }
                changed
            });
        }
    }
}
