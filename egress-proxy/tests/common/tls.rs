//! Throwaway TLS identities of the test origins, in one place: a CA of their own (its PEM is
//! what the proxy gets as `upstream_ca`), a leaf for the origin's names made as a test
//! wants it (good, wrong name, expired, self-signed), and a rustls server configuration
//! from a leaf; a client configuration trusting a PEM file. PEM files for origins that are
//! not Rust (Python's `ssl`). The benchmark driver (`examples/inspect_bench.rs`) uses it too.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::rustls;

/// How the origin's certificate is made.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum CertKind {
    /// Valid for the names, from the origin CA.
    Good,
    /// From the origin CA but for another name.
    WrongName,
    /// Expired yesterday.
    Expired,
    /// Self-signed (not from the origin CA).
    SelfSigned,
}

/// An origin's leaf and the CA that signed it (written to `ca_pem`).
pub struct OriginCert {
    /// The origin CA's certificate, PEM.
    pub ca_pem: PathBuf,
    leaf: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl OriginCert {
    /// A fresh CA (written to `ca_pem`) and a leaf of `kind` for `names`.
    pub fn new(ca_pem: PathBuf, names: &[&str], kind: CertKind) -> OriginCert {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "egress-proxy test origin CA");
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf_names: Vec<String> = match kind {
            CertKind::WrongName => vec!["somewhere-else.test".into()],
            _ => names.iter().map(|s| s.to_string()).collect(),
        };
        let mut params = rcgen::CertificateParams::new(leaf_names).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, names[0]);
        if kind == CertKind::Expired {
            let now = time::OffsetDateTime::now_utc();
            params.not_before = now - time::Duration::days(30);
            params.not_after = now - time::Duration::days(1);
        }
        let leaf = match kind {
            CertKind::SelfSigned => params.self_signed(&key).unwrap(),
            _ => params.signed_by(&key, &ca, &ca_key).unwrap(),
        };
        std::fs::write(&ca_pem, ca.pem()).unwrap();
        OriginCert { ca_pem, leaf, key }
    }

    /// A server configuration presenting the leaf, offering `alpn`.
    pub fn server_config(&self, alpn: &[&str]) -> Arc<rustls::ServerConfig> {
        server_config(self.leaf.der().clone(), &self.key, alpn)
    }

    /// Writes the leaf and its key as PEM: (`dir/NAME.pem`, `dir/NAME.key`).
    pub fn write_pem(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let (cert, key) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&cert, self.leaf.pem()).unwrap();
        std::fs::write(&key, self.key.serialize_pem()).unwrap();
        (cert, key)
    }
}

/// A rustls server configuration presenting `cert` (signed for `key`), offering `alpn`.
pub fn server_config(
    cert: rustls::pki_types::CertificateDer<'static>,
    key: &rcgen::KeyPair,
    alpn: &[&str],
) -> Arc<rustls::ServerConfig> {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![cert],
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Arc::new(config)
}

/// A rustls client configuration trusting the certificates of `ca_pem`, offering `alpn`.
pub fn client_config(ca_pem: &Path, alpn: &[&str]) -> rustls::ClientConfig {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca_pem).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    config
}
