//! Names to addresses for one request: the policy's `[hosts]` table first, then (when
//! `system_resolver = true`) the system resolver. The caller checks every answer against
//! the policy's address classes before dialling; nothing here decides reachability.

use std::net::IpAddr;

use crate::policy::Policy;
use crate::target::{Host, Target};

/// The addresses `target` names, unchecked. The error is the one line the client and the
/// record get.
pub(super) async fn resolve(policy: &Policy, target: &Target) -> Result<Vec<IpAddr>, String> {
    match &target.host {
        Host::Ip(ip) => Ok(vec![*ip]),
        Host::Name(name) => {
            if let Some(addrs) = policy.hosts.get(name) {
                return Ok(addrs.clone());
            }
            if !policy.system_resolver {
                return Err(format!(
                    "{name} is not in [hosts] and system_resolver = false"
                ));
            }
            let addrs: Vec<IpAddr> = tokio::net::lookup_host((name.as_str(), target.port))
                .await
                .map_err(|e| format!("cannot resolve {name}: {e}"))?
                .map(|sa| sa.ip())
                .collect();
            if addrs.is_empty() {
                return Err(format!("{name} has no address"));
            }
            Ok(addrs)
        }
    }
}
