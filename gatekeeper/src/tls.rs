//! TLS for the REST API (`[api] tls_cert`/`tls_key`): PEM loading and the server
//! configuration; `api::serve` runs the handshakes (each under [`HANDSHAKE_TIMEOUT`]), and the
//! CLI trusts a CA file with [`load_certs`].
//!
//! rustls runs on the ring provider, passed explicitly, so no process-wide default provider is
//! needed and aws-lc-rs is never built.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
};

/// A client that has not finished its handshake by then is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: cannot read: {error}")]
    Read { path: PathBuf, error: std::io::Error },
    #[error("{path}: not valid PEM: {reason}")]
    Pem { path: PathBuf, reason: &'static str },
    #[error("{path}: no PEM certificate (-----BEGIN CERTIFICATE-----) found")]
    NoCertificate { path: PathBuf },
    #[error("{path}: no PEM private key (PKCS#8, PKCS#1 or SEC1) found")]
    NoKey { path: PathBuf },
    #[error("{path}: private key is accessible by group or others (mode {mode:04o}); make it 0600")]
    KeyPermissions { path: PathBuf, mode: u32 },
    #[error("{cert} with {key}: {error}")]
    Config { cert: PathBuf, key: PathBuf, error: rustls::Error },
}

/// Describes a PEM syntax error without quoting the file: the file may be a private key.
fn pem_reason(e: &rustls::pki_types::pem::Error) -> &'static str {
    use rustls::pki_types::pem::Error as E;
    match e {
        E::MissingSectionEnd { .. } => "a section has no END line",
        E::IllegalSectionStart { .. } => "malformed BEGIN line",
        E::Base64Decode(_) => "a section is not valid base64",
        E::SectionTooLarge => "a section is too large",
        _ => "malformed PEM",
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Read { path: path.into(), error })
}

/// The certificates of a PEM file, leaf first.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem { path: path.into(), reason: pem_reason(&e) })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: path.into() });
    }
    Ok(certs)
}

/// The first private key of a PEM file, which only its owner may access (like the token files).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    use std::os::unix::fs::PermissionsExt as _;
    let meta = std::fs::metadata(path).map_err(|error| TlsError::Read { path: path.into(), error })?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(TlsError::KeyPermissions { path: path.into(), mode });
    }
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey { path: path.into() },
        e => TlsError::Pem { path: path.into(), reason: pem_reason(&e) },
    })
}

/// A server configuration from a PEM certificate chain and its key: TLS 1.2 and 1.3 on ring,
/// no client certificates, ALPN `http/1.1` (the API speaks HTTP/1.1 only).
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = load_certs(cert)?;
    let private_key = load_key(key)?;
    let config_error = |error| TlsError::Config { cert: cert.into(), key: key.into(), error };
    let mut config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(config_error)?
        .with_no_client_auth()
        // Also checks that the key belongs to the leaf certificate.
        .with_single_cert(certs, private_key)
        .map_err(config_error)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Self {
            let d = std::env::temp_dir().join(format!("gk-tls-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).unwrap();
            Self(d)
        }

        fn write(&self, name: &str, text: &str, mode: u32) -> PathBuf {
            let p = self.0.join(name);
            std::fs::write(&p, text).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            p
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn self_signed() -> (String, String) {
        let c = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        (c.cert.pem(), c.signing_key.serialize_pem())
    }

    #[test]
    fn loads_a_matching_certificate_and_key() {
        let d = Dir::new("ok");
        let (cert, key) = self_signed();
        let c = d.write("cert.pem", &cert, 0o644);
        let k = d.write("key.pem", &key, 0o600);
        let config = server_config(&c, &k).unwrap();
        assert_eq!(config.alpn_protocols, [b"http/1.1".to_vec()]);
        let k = d.write("key-ro.pem", &key, 0o400);
        assert!(server_config(&c, &k).is_ok(), "0400 is stricter than 0600");
    }

    #[test]
    fn refuses_bad_files_precisely() {
        let d = Dir::new("bad");
        let (cert, key) = self_signed();
        let (_, other_key) = self_signed();
        let c = d.write("cert.pem", &cert, 0o644);
        let k = d.write("key.pem", &key, 0o600);
        let e = |r: Result<Arc<ServerConfig>, TlsError>| r.unwrap_err().to_string();

        let missing = d.0.join("missing.pem");
        let msg = e(server_config(&missing, &k));
        assert!(msg.contains("missing.pem: cannot read"), "{msg}");
        let msg = e(server_config(&c, &missing));
        assert!(msg.contains("missing.pem: cannot read"), "{msg}");

        let not_pem = d.write("not-pem.pem", "hello\n", 0o600);
        let msg = e(server_config(&not_pem, &k));
        assert!(msg.contains("not-pem.pem: no PEM certificate"), "{msg}");
        let msg = e(server_config(&c, &not_pem));
        assert!(msg.contains("not-pem.pem: no PEM private key"), "{msg}");

        // A key where the certificate belongs, and the other way round.
        let msg = e(server_config(&k, &k));
        assert!(msg.contains("key.pem: no PEM certificate"), "{msg}");
        let cert_as_key = d.write("cert-as-key.pem", &cert, 0o600);
        let msg = e(server_config(&c, &cert_as_key));
        assert!(msg.contains("cert-as-key.pem: no PEM private key"), "{msg}");

        let broken = d.write("broken.pem", "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n", 0o644);
        let msg = e(server_config(&broken, &k));
        assert!(msg.contains("broken.pem: not valid PEM"), "{msg}");
        let secret_line = "-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n";
        let truncated = d.write("truncated.pem", secret_line, 0o600);
        let msg = e(server_config(&c, &truncated));
        assert!(msg.contains("truncated.pem: not valid PEM") && !msg.contains("c2VjcmV0"), "{msg}");

        let mismatched = d.write("other-key.pem", &other_key, 0o600);
        let msg = e(server_config(&c, &mismatched));
        assert!(msg.contains("cert.pem with") && msg.contains("other-key.pem"), "{msg}");
    }

    #[test]
    fn refuses_a_key_others_can_read() {
        let d = Dir::new("mode");
        let (cert, key) = self_signed();
        let c = d.write("cert.pem", &cert, 0o644);
        for mode in [0o644, 0o640, 0o604, 0o660] {
            let k = d.write(&format!("key-{mode:o}.pem"), &key, mode);
            let msg = server_config(&c, &k).unwrap_err().to_string();
            assert!(msg.contains(&format!("mode {mode:04o}")) && msg.contains("make it 0600"), "{msg}");
        }
    }
}
