//! Names to addresses for one request: the policy's `[hosts]` table first, then (when
//! `system_resolver = true`) the proxy's own asynchronous DNS stub resolver (hickory), using
//! the nameservers of `/etc/resolv.conf` or `[resolver] nameservers`. Each lookup has its
//! own timeout and waits for one of a bounded number of slots, so slow names cannot starve
//! fast ones of threads (there are none to starve) or the proxy of sockets. The caller
//! checks every answer against the policy's address classes before dialling; nothing here
//! decides reachability.

use std::net::IpAddr;
use std::sync::Arc;

use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig,
    ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::policy::{Policy, ResolverSettings};
use crate::target::{Host, Target};

/// The DNS side of resolution, rebuilt when its settings change on reload.
pub struct Resolver {
    settings: ResolverSettings,
    /// `None` when `system_resolver = false`.
    dns: Option<TokioResolver>,
    slots: Arc<Semaphore>,
}

impl Resolver {
    /// Builds the resolver `policy` describes. Fails (one line) when it needs the
    /// nameservers of `/etc/resolv.conf` and cannot read them.
    pub fn new(policy: &Policy) -> anyhow::Result<Resolver> {
        let settings = &policy.resolver;
        let slots = Arc::new(Semaphore::new(settings.max_lookups));
        if !policy.system_resolver {
            return Ok(Resolver {
                settings: settings.clone(),
                dns: None,
                slots,
            });
        }
        let builder = match &settings.nameservers {
            Some(servers) => {
                let servers = servers
                    .iter()
                    .map(|sa| {
                        let mut udp = ConnectionConfig::udp();
                        udp.port = sa.port();
                        let mut tcp = ConnectionConfig::tcp();
                        tcp.port = sa.port();
                        let mut ns = NameServerConfig::udp_and_tcp(sa.ip());
                        ns.connections = vec![udp, tcp];
                        ns
                    })
                    .collect();
                TokioResolver::builder_with_config(
                    ResolverConfig::from_name_servers(servers),
                    TokioRuntimeProvider::default(),
                )
            }
            None => TokioResolver::builder_tokio().map_err(|e| {
                anyhow::anyhow!("cannot read the nameservers from /etc/resolv.conf: {e}")
            })?,
        };
        let mut opts = ResolverOpts::default();
        opts.timeout = settings.lookup_timeout;
        opts.attempts = 1;
        // The proxy's slots bound concurrency; hickory's own per-connection bound must not
        // refuse below them.
        opts.max_active_requests = settings.max_lookups;
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        // [hosts] is the proxy's hosts file; the host's /etc/hosts is not policy.
        opts.use_hosts_file = ResolveHosts::Never;
        let dns = builder
            .with_options(opts)
            .build()
            .map_err(|e| anyhow::anyhow!("cannot build the resolver: {e}"))?;
        Ok(Resolver {
            settings: settings.clone(),
            dns: Some(dns),
            slots,
        })
    }

    /// Whether it was built for what `policy` asks (else a reload rebuilds it). One that
    /// reads `/etc/resolv.conf` never fits, so each reload re-reads the file.
    pub fn fits(&self, policy: &Policy) -> bool {
        self.settings == policy.resolver
            && self.dns.is_some() == policy.system_resolver
            && !(policy.system_resolver && policy.resolver.nameservers.is_none())
    }

    /// The addresses `target` names, unchecked, by `deadline`. The error is the one line
    /// the client and the record get.
    pub async fn resolve(
        &self,
        policy: &Policy,
        target: &Target,
        deadline: Instant,
    ) -> Result<Vec<IpAddr>, String> {
        let name = match &target.host {
            Host::Ip(ip) => return Ok(vec![*ip]),
            Host::Name(name) => name,
        };
        if let Some(addrs) = policy.hosts.get(name) {
            return Ok(addrs.clone());
        }
        let Some(dns) = self.dns.as_ref().filter(|_| policy.system_resolver) else {
            return Err(format!(
                "{name} is not in [hosts] and system_resolver = false"
            ));
        };
        let busy = || {
            format!(
                "{name}: every lookup slot was busy until connect_timeout_secs (max_concurrent_lookups = {})",
                self.settings.max_lookups
            )
        };
        let _slot = tokio::time::timeout_at(deadline, self.slots.acquire())
            .await
            .map_err(|_| busy())?
            .map_err(|_| "the resolver is shut down".to_owned())?;
        let now = Instant::now();
        if now >= deadline {
            // A slot freed as the deadline passed: too late to ask.
            return Err(busy());
        }
        let (until, limit) = if now + self.settings.lookup_timeout <= deadline {
            (
                now + self.settings.lookup_timeout,
                format!(
                    "within {} s (lookup_timeout_secs)",
                    self.settings.lookup_timeout.as_secs_f64()
                ),
            )
        } else {
            (deadline, "before connect_timeout_secs ran out".to_owned())
        };
        // A fully qualified name: no search domains appended.
        let addrs: Vec<IpAddr> = tokio::time::timeout_at(until, dns.lookup_ip(format!("{name}.")))
            .await
            .map_err(|_| format!("cannot resolve {name}: no answer {limit}"))?
            .map_err(|e| format!("cannot resolve {name}: {e}"))?
            .iter()
            .collect();
        if addrs.is_empty() {
            return Err(format!("{name} has no address"));
        }
        Ok(addrs)
    }
}
