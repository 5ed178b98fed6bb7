//! Budgets in the connection pipeline ([`crate::budget`]): what an allowed request is
//! charged to, and the state file kept current while the proxy runs.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::error;

use super::Shared;
use crate::budget::{Budgets, Charge};
use crate::http::{BodyKind, Request};
use crate::policy::{Policy, Refusal, Rule};
use crate::target::Target;

/// How often the state file is brought up to date (what a crash can lose).
const SAVE_INTERVAL: Duration = Duration::from_secs(1);

/// Charges a request allowed by `rule` to its budget, or refuses it when a ceiling is
/// reached. Inspected tunnels are charged request by request, inside ([`crate::inspect`]);
/// a plain-HTTP request is refused before a byte is forwarded if its head and declared
/// body would pass the `bytes_out` ceiling.
pub(super) fn admit(
    shared: &Shared,
    policy: &Arc<Policy>,
    rule: &Rule,
    req: &Request,
    target: &Target,
    client: IpAddr,
) -> Result<Option<Arc<Charge>>, Refusal> {
    if matches!(req, Request::Connect { .. }) && policy.inspecting(target).is_some() {
        return Ok(None);
    }
    let Some(charge) = shared.budgets.charge(policy, rule, client) else {
        return Ok(None);
    };
    let out = match req {
        Request::Http { head, body, .. } => {
            head.len() as u64
                + match body {
                    BodyKind::Length(n) => *n,
                    BodyKind::None | BodyKind::Chunked => 0,
                }
        }
        Request::Connect { .. } => 0,
    };
    charge.admit(out)?;
    Ok(Some(charge))
}

/// Saves the budget state every [`SAVE_INTERVAL`] until `stop`.
pub(super) async fn keep_saved(budgets: Arc<Budgets>, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(SAVE_INTERVAL) => save(&budgets).await,
            () = stop.cancelled() => return,
        }
    }
}

/// Saves the budget state now (off the runtime's threads); a failure is logged, and the
/// next save tries again.
pub(super) async fn save(budgets: &Arc<Budgets>) {
    let b = budgets.clone();
    match tokio::task::spawn_blocking(move || b.save()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            error!(error = %e, "cannot save the budget state; use since the last save would be lost in a restart")
        }
        Err(e) => error!(error = %e, "budget state save task failed"),
    }
}
