//! The inspection CA: made by `egress-proxy ca init`, loaded with the policy, and minting
//! the leaf certificates the proxy presents inside inspected tunnels.
//!
//! The CA is **name-constrained** (RFC 5280 permitted DNS subtrees, every IP address
//! excluded): a client that honours name constraints refuses a leaf it signed for any other
//! name, so a stolen key cannot impersonate hosts the policy never inspected. Clients that
//! honour them: rustls/webpki, OpenSSL (curl, git, Python, Node, pip, npm, cargo built
//! against OpenSSL), Go's crypto/x509, GnuTLS, NSS, and the macOS/Windows verifiers.
//!
//! Leaves are ECDSA P-256, valid for [`LEAF_LIFETIME`], cached per host (a tunnel's TLS
//! handshake with the agent then costs one signature, not a key generation).

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, CidrSubnet, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, GeneralSubtree, IsCa, KeyPair, KeyUsagePurpose, NameConstraints,
    PKCS_ECDSA_P256_SHA256,
};
use tokio_rustls::rustls::{self, pki_types};

/// The CA certificate's file name in a CA directory (give it to agent hosts).
pub const CERT_FILE: &str = "ca.pem";
/// The CA key's file name in a CA directory (stays on the proxy host, mode 0600).
pub const KEY_FILE: &str = "ca.key";
/// How long a minted leaf is valid.
pub const LEAF_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
/// A cached leaf is replaced once it is this old, long before it expires.
const LEAF_REFRESH: Duration = Duration::from_secs(24 * 3600);
/// Hosts whose leaves are cached at most (the inspected hosts of a policy are few).
const CACHE_MAX: usize = 4096;
/// How long the CA certificate made by `ca init` is valid.
const CA_LIFETIME_DAYS: i64 = 3650;

/// Why a CA could not be made or loaded.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A file could not be read or written.
    #[error("{what} `{path}`: {source}")]
    Io {
        /// What the file is.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The key file can be read by users other than its owner.
    #[error("CA key `{0}` is readable by group or others (mode {1:o}); chmod 600 it")]
    KeyExposed(PathBuf, u32),
    /// The certificate does not parse or is not a CA.
    #[error("CA certificate `{0}`: {1}")]
    BadCert(PathBuf, String),
    /// The key does not parse.
    #[error("CA key `{0}`: {1}")]
    BadKey(PathBuf, String),
    /// The key is not the certificate's.
    #[error("CA key `{key}` does not match the certificate `{cert}`")]
    Mismatch {
        /// The key file.
        key: PathBuf,
        /// The certificate file.
        cert: PathBuf,
    },
    /// `ca init` was given no domain.
    #[error("a CA needs at least one permitted domain (the hosts it may mint certificates for)")]
    NoDomains,
    /// A domain for `ca init` is not a valid DNS name.
    #[error("`{0}` is not a DNS name")]
    BadDomain(String),
    /// Signing failed.
    #[error("cannot sign: {0}")]
    Sign(String),
}

/// Makes a new CA in `dir` for the `domains` (and their subdomains): `ca.pem`, world-readable,
/// and `ca.key`, created mode 0600 for the user running this. Existing files are never
/// overwritten.
pub fn init(dir: &Path, domains: &[String]) -> Result<(PathBuf, PathBuf), CaError> {
    if domains.is_empty() {
        return Err(CaError::NoDomains);
    }
    let mut permitted = Vec::new();
    for d in domains {
        let canonical = match crate::target::canonical_host(d) {
            Ok(crate::target::Host::Name(n)) => n,
            _ => return Err(CaError::BadDomain(d.clone())),
        };
        permitted.push(GeneralSubtree::DnsName(canonical));
    }
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(sign_err)?;
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "tank egress-proxy inspection CA");
    params
        .distinguished_name
        .push(DnType::OrganizationName, "tank");
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.name_constraints = Some(NameConstraints {
        permitted_subtrees: permitted,
        // DNS subtrees say nothing about IP SANs: exclude every address explicitly.
        excluded_subtrees: vec![
            GeneralSubtree::IpAddress(CidrSubnet::V4([0; 4], [0; 4])),
            GeneralSubtree::IpAddress(CidrSubnet::V6([0; 16], [0; 16])),
        ],
    });
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(CA_LIFETIME_DAYS);
    let cert = params.self_signed(&key).map_err(sign_err)?;

    std::fs::create_dir_all(dir).map_err(|source| CaError::Io {
        what: "cannot create CA directory",
        path: dir.to_owned(),
        source,
    })?;
    let (cert_path, key_path) = (dir.join(CERT_FILE), dir.join(KEY_FILE));
    write_new(
        &key_path,
        0o600,
        key.serialize_pem().as_bytes(),
        "cannot create CA key",
    )?;
    if let Err(e) = write_new(
        &cert_path,
        0o644,
        cert.pem().as_bytes(),
        "cannot create CA certificate",
    ) {
        let _ = std::fs::remove_file(&key_path);
        return Err(e);
    }
    Ok((cert_path, key_path))
}

fn write_new(path: &Path, mode: u32, data: &[u8], what: &'static str) -> Result<(), CaError> {
    let io = |source| CaError::Io {
        what,
        path: path.to_owned(),
        source,
    };
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    f.write_all(data).and_then(|()| f.sync_all()).map_err(io)
}

fn sign_err(e: rcgen::Error) -> CaError {
    CaError::Sign(e.to_string())
}

/// A loaded CA and its leaf cache.
pub struct Ca {
    /// The CA certificate as agents hold it.
    cert_der: pki_types::CertificateDer<'static>,
    /// The issuer (subject and key identifier taken from the certificate).
    issuer: rcgen::Certificate,
    key: KeyPair,
    /// Permitted DNS subtrees; empty = unconstrained (an operator's own CA).
    permitted: Vec<String>,
    leaves: Mutex<HashMap<String, (Instant, Arc<rustls::sign::CertifiedKey>)>>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("permitted", &self.permitted)
            .finish_non_exhaustive()
    }
}

impl PartialEq for Ca {
    fn eq(&self, other: &Self) -> bool {
        self.cert_der == other.cert_der
    }
}
impl Eq for Ca {}

impl Ca {
    /// Loads the CA from its certificate and key files and proves that they belong together
    /// by minting a leaf and verifying it against the certificate.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Ca, CaError> {
        let read = |path: &Path, what| {
            std::fs::read_to_string(path).map_err(|source| CaError::Io {
                what,
                path: path.to_owned(),
                source,
            })
        };
        let cert_pem = read(cert_path, "cannot read CA certificate")?;
        let meta = std::fs::metadata(key_path).map_err(|source| CaError::Io {
            what: "cannot read CA key",
            path: key_path.to_owned(),
            source,
        })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(CaError::KeyExposed(key_path.to_owned(), mode));
        }
        let key_pem = read(key_path, "cannot read CA key")?;
        let bad_cert = |m: String| CaError::BadCert(cert_path.to_owned(), m);
        let cert_der: pki_types::CertificateDer<'static> = {
            use pki_types::pem::PemObject;
            pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes())
                .map_err(|e| bad_cert(format!("no PEM certificate ({e})")))?
        };
        let params =
            CertificateParams::from_ca_cert_der(&cert_der).map_err(|e| bad_cert(e.to_string()))?;
        if !matches!(params.is_ca, IsCa::Ca(_)) {
            return Err(bad_cert(
                "not a CA certificate (basicConstraints cA is not set)".into(),
            ));
        }
        let permitted = params
            .name_constraints
            .as_ref()
            .map(|nc| {
                nc.permitted_subtrees
                    .iter()
                    .filter_map(|s| match s {
                        GeneralSubtree::DnsName(n) => {
                            Some(n.trim_start_matches('.').to_ascii_lowercase())
                        }
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| CaError::BadKey(key_path.to_owned(), e.to_string()))?;
        let issuer = params.self_signed(&key).map_err(sign_err)?;
        let ca = Ca {
            cert_der,
            issuer,
            key,
            permitted,
            leaves: Mutex::new(HashMap::new()),
        };
        ca.prove_key(cert_path, key_path)?;
        Ok(ca)
    }

    /// Mints a leaf for a name the CA permits (or an arbitrary one) and checks it verifies
    /// against the certificate: it fails exactly when the key is not the certificate's.
    fn prove_key(&self, cert_path: &Path, key_path: &Path) -> Result<(), CaError> {
        let name = self
            .permitted
            .first()
            .cloned()
            .unwrap_or_else(|| "key-check.invalid".to_owned());
        let (chain, _) = self.mint(&name)?;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(self.cert_der.clone())
            .map_err(|e| CaError::BadCert(cert_path.to_owned(), e.to_string()))?;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .map_err(|e| CaError::BadCert(cert_path.to_owned(), e.to_string()))?;
        let server_name =
            pki_types::ServerName::try_from(name).map_err(|e| CaError::Sign(e.to_string()))?;
        use rustls::client::danger::ServerCertVerifier;
        verifier
            .verify_server_cert(&chain, &[], &server_name, &[], pki_types::UnixTime::now())
            .map(|_| ())
            .map_err(|_| CaError::Mismatch {
                key: key_path.to_owned(),
                cert: cert_path.to_owned(),
            })
    }

    /// The CA certificate (DER).
    pub fn cert_der(&self) -> &pki_types::CertificateDer<'static> {
        &self.cert_der
    }

    /// Whether the CA's name constraints let it mint for `host` (a canonical name).
    pub fn permits(&self, host: &str) -> bool {
        self.permitted.is_empty()
            || self.permitted.iter().any(|p| {
                host == p
                    || (host.len() > p.len() + 1
                        && host.ends_with(p.as_str())
                        && host.as_bytes()[host.len() - p.len() - 1] == b'.')
            })
    }

    /// The permitted DNS subtrees (empty: unconstrained).
    pub fn permitted(&self) -> &[String] {
        &self.permitted
    }

    fn mint(
        &self,
        host: &str,
    ) -> Result<
        (
            pki_types::CertificateDer<'static>,
            pki_types::PrivateKeyDer<'static>,
        ),
        CaError,
    > {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(sign_err)?;
        let mut params = CertificateParams::new(vec![host.to_owned()]).map_err(sign_err)?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, host);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after =
            now + time::Duration::try_from(LEAF_LIFETIME).unwrap_or(time::Duration::DAY);
        let leaf = params
            .signed_by(&key, &self.issuer, &self.key)
            .map_err(sign_err)?;
        Ok((
            leaf.der().clone(),
            pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        ))
    }

    /// The leaf for `host` (a canonical name), minted on first use and cached.
    pub fn leaf(&self, host: &str) -> Result<Arc<rustls::sign::CertifiedKey>, CaError> {
        {
            let cache = self.leaves.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((made, leaf)) = cache.get(host) {
                if made.elapsed() < LEAF_REFRESH {
                    return Ok(leaf.clone());
                }
            }
        }
        let (cert, key) = self.mint(host)?;
        let signer = rustls::crypto::ring::sign::any_ecdsa_type(&key)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        let leaf = Arc::new(rustls::sign::CertifiedKey::new(vec![cert], signer));
        let mut cache = self.leaves.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHE_MAX {
            cache.clear();
        }
        cache.insert(host.to_owned(), (Instant::now(), leaf.clone()));
        Ok(leaf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verify(
        ca_der: &pki_types::CertificateDer<'static>,
        leaf: &pki_types::CertificateDer<'_>,
        name: &str,
    ) -> Result<(), rustls::Error> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca_der.clone()).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        use rustls::client::danger::ServerCertVerifier;
        verifier
            .verify_server_cert(
                leaf,
                &[],
                &pki_types::ServerName::try_from(name.to_owned()).unwrap(),
                &[],
                pki_types::UnixTime::now(),
            )
            .map(|_| ())
    }

    #[test]
    fn init_makes_a_private_key_and_a_constrained_ca_that_mints_verifiable_leaves() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = init(
            dir.path(),
            &["Example.test".into(), "api.other.test".into()],
        )
        .unwrap();
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let ca = Ca::load(&cert, &key).unwrap();
        assert_eq!(ca.permitted(), ["example.test", "api.other.test"]);
        assert!(ca.permits("example.test") && ca.permits("git.example.test"));
        assert!(!ca.permits("badexample.test") && !ca.permits("other.test"));
        let leaf = ca.leaf("git.example.test").unwrap();
        verify(ca.cert_der(), &leaf.cert[0], "git.example.test").unwrap();
        assert!(
            Arc::ptr_eq(&leaf, &ca.leaf("git.example.test").unwrap()),
            "leaf not cached"
        );
        // Never overwrites.
        assert!(matches!(
            init(dir.path(), &["x.test".into()]),
            Err(CaError::Io { .. })
        ));
    }

    /// What a stolen key could do: sign a leaf for a name outside the constraints. webpki
    /// (rustls) refuses it; the curl (OpenSSL) counterpart is in tests/inspect.rs.
    #[test]
    fn a_leaf_for_a_name_outside_the_constraints_is_rejected_by_webpki() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = init(dir.path(), &["example.test".into()]).unwrap();
        let ca = Ca::load(&cert, &key).unwrap();
        for name in ["bank.test", "example.test.evil.test"] {
            let (leaf, _) = ca.mint(name).unwrap();
            let err = verify(ca.cert_der(), &leaf, name).unwrap_err();
            assert!(
                format!("{err:?}").contains("NameConstraint"),
                "{name}: {err:?}"
            );
        }
        // An IP address SAN is excluded too.
        let (leaf, _) = ca.mint("192.0.2.1").unwrap();
        assert!(verify(ca.cert_der(), &leaf, "192.0.2.1").is_err());
        let (leaf, _) = ca.mint("deep.example.test").unwrap();
        verify(ca.cert_der(), &leaf, "deep.example.test").unwrap();
    }

    #[test]
    fn a_key_that_is_not_the_certificates_or_is_exposed_is_refused() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let (cert_a, _) = init(a.path(), &["a.test".into()]).unwrap();
        let (_, key_b) = init(b.path(), &["a.test".into()]).unwrap();
        let e = Ca::load(&cert_a, &key_b).unwrap_err();
        assert!(matches!(e, CaError::Mismatch { .. }), "{e}");
        assert!(e.to_string().contains("does not match"), "{e}");
        std::fs::set_permissions(&key_b, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Ca::load(&b.path().join(CERT_FILE), &key_b).unwrap_err();
        assert!(e.to_string().contains("readable by group or others"), "{e}");
    }
}
