//! Tasks that must run once per cluster (a pipeline, a connector): on a
//! single node they run on it; on a cluster they run on the leader, for one
//! term at a time, and move with it.
//!
//! A node that becomes leader claims the task for its term in the log
//! ([`Log::claim`]) before it runs it: once the claim is applied, it reads
//! every write made before, and the writes the task makes under the claim
//! ([`Lease::guard`]) are refused if a newer leader has claimed it since.
//! The task is stopped ([`Lease::cancel`]) as soon as the node sees that it
//! no longer leads the term it claimed.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tributary_storage::{Guard, Log};

/// The right to run a task now.
#[derive(Debug)]
pub struct Lease {
    /// The claim its writes carry (`None` on a single node).
    pub guard: Option<Guard>,
    /// Cancelled when the task must stop: the node stopped leading the
    /// term, or the task was stopped.
    pub cancel: CancellationToken,
}

/// Waits until this node may run the task `name` (of the kind `space`, a
/// metadata space): at once on a single node; on a cluster once it leads
/// and has claimed the task for its term. `None`: `cancel` came first.
pub async fn lead(log: &Log, space: &str, name: &str, cancel: &CancellationToken) -> Option<Lease> {
    let Some(mut leadership) = log.leadership() else {
        return (!cancel.is_cancelled()).then(|| Lease {
            guard: None,
            cancel: cancel.child_token(),
        });
    };
    loop {
        let now = leadership.borrow_and_update().clone();
        if now.leads() {
            let guard = Guard {
                space: space.to_owned(),
                key: name.as_bytes().to_vec(),
                value: format!("{}:{}", now.node, now.term).into_bytes(),
            };
            match log.claim(&guard).await {
                Ok(()) => {
                    let token = cancel.child_token();
                    tokio::spawn(stop_when_deposed(leadership, now.term, token.clone()));
                    tracing::info!(task = %name, kind = %space, term = now.term, "running on this node, the leader");
                    return Some(Lease {
                        guard: Some(guard),
                        cancel: token,
                    });
                }
                Err(e) => {
                    tracing::warn!(task = %name, error = %e, "cannot claim a task for this leader's term; trying again");
                    tokio::select! {
                        () = cancel.cancelled() => return None,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                    continue;
                }
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return None,
            changed = leadership.changed() => if changed.is_err() { return None },
        }
    }
}

/// Cancels `token` once this node no longer leads `term`.
async fn stop_when_deposed(
    mut leadership: tokio::sync::watch::Receiver<tributary_storage::Leadership>,
    term: u64,
    token: CancellationToken,
) {
    loop {
        {
            let l = leadership.borrow_and_update();
            if !(l.leads() && l.term == term) {
                break;
            }
        }
        tokio::select! {
            () = token.cancelled() => return,
            changed = leadership.changed() => if changed.is_err() { break },
        }
    }
    token.cancel();
}

/// Runs what `task` makes, each time this node may ([`lead`]), until
/// `cancel`: once on a single node (unless it ends by itself), again at
/// each term this node leads on a cluster.
pub async fn run_leading<F, Fut>(
    log: Log,
    space: &str,
    name: &str,
    cancel: CancellationToken,
    task: F,
) where
    F: Fn(Lease) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    while let Some(lease) = lead(&log, space, name, &cancel).await {
        let stop = lease.cancel.clone();
        task(lease).await;
        if cancel.is_cancelled() || !log.is_replicated() {
            return;
        }
        // Ended by itself while still leading: not again in this term.
        if !stop.is_cancelled() {
            stop.cancelled().await;
        }
    }
}

/// The values of a metadata space by name, decoded by `decode` (those that
/// do not decode are left out): what every node of a cluster follows of
/// the tasks the others' APIs created. `None`: the space cannot be read.
pub fn by_name<T>(
    log: &Log,
    space: &str,
    decode: impl Fn(&[u8]) -> Option<T>,
) -> Option<std::collections::BTreeMap<String, T>> {
    let stored = log.meta(space).ok()?;
    Some(
        stored
            .into_iter()
            .filter_map(|(k, v)| Some((String::from_utf8(k).ok()?, decode(&v)?)))
            .collect(),
    )
}
