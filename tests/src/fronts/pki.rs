//! A private CA and a certificate for `localhost` signed by it, for the fronts and the relay's
//! own TLS.

use std::path::{Path, PathBuf};

/// A private CA and a server certificate for `localhost` and `127.0.0.1`, as PEM files.
#[derive(Debug, Clone)]
pub struct Pki {
    /// The CA certificate (what `ca_file` points at).
    pub ca: PathBuf,
    /// The server certificate chain.
    pub cert: PathBuf,
    /// The server private key.
    pub key: PathBuf,
    /// Certificate followed by key (HAProxy's `crt`).
    pub combined: PathBuf,
}

impl Pki {
    /// Generates the CA and the certificate into `dir`.
    pub fn generate(dir: &Path) -> anyhow::Result<Self> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "ptth test CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate()?;
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &ca_cert, &ca_key)?;
        let pki = Self {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("cert.key"),
            combined: dir.join("combined.pem"),
        };
        std::fs::write(&pki.ca, ca_cert.pem())?;
        std::fs::write(&pki.cert, cert.pem())?;
        std::fs::write(&pki.key, key.serialize_pem())?;
        std::fs::write(
            &pki.combined,
            format!("{}{}", cert.pem(), key.serialize_pem()),
        )?;
        Ok(pki)
    }
}
