//! TLS client settings shared by the server backends: CA, client certificate and key files
//! (EMQX names), turned into a rustls client configuration.

use crate::config::{ConfError, PoolConf};
use std::path::PathBuf;
use std::sync::Arc;

/// How much of the server's certificate is checked (PostgreSQL's `sslmode` levels).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// Encrypt only: any certificate is accepted (`require`, `prefer`). Handshake signatures
    /// are still checked, so the session is bound to the presented key.
    Encrypt,
    /// The chain must lead to a trusted CA; the name in it is not checked (`verify-ca`).
    Chain,
    /// Chain and host name (`verify-full`, and the default).
    Full,
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl TlsFiles {
    /// `ca_key` is the database's name for the CA file (`cacertfile` or `cafile`).
    pub fn parse(pool: &PoolConf, ca_key: &str) -> Result<Self, ConfError> {
        let path = |k: &str| -> Result<Option<PathBuf>, ConfError> {
            match pool.str(k).filter(|v| !v.is_empty()) {
                None => Ok(None),
                Some(v) => {
                    let p = PathBuf::from(v);
                    if p.exists() {
                        Ok(Some(p))
                    } else {
                        Err(pool.error(k, format!("`{k}` file {} does not exist", p.display())))
                    }
                }
            }
        };
        let files = TlsFiles {
            ca: path(ca_key)?,
            cert: path("certfile")?,
            key: path("keyfile")?,
        };
        if files.cert.is_some() != files.key.is_some() {
            return Err(pool.error("certfile", "`certfile` and `keyfile` must be set together"));
        }
        Ok(files)
    }

    /// A client configuration verifying the server as `verify` says.
    pub fn client_config_verifying(&self, verify: Verify) -> Result<rustls::ClientConfig, String> {
        if verify == Verify::Full {
            return self.client_config();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous();
        let chain = match verify {
            Verify::Chain => Some(
                rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(self.roots()?), provider.clone())
                    .build()
                    .map_err(|e| e.to_string())?,
            ),
            _ => None,
        };
        let builder = builder.with_custom_certificate_verifier(Arc::new(Relaxed { chain, provider }));
        self.with_client_auth(builder)
    }

    fn roots(&self) -> Result<rustls::RootCertStore, String> {
        let mut roots = rustls::RootCertStore::empty();
        match &self.ca {
            Some(ca) => {
                for cert in read_certs(ca)? {
                    roots
                        .add(cert)
                        .map_err(|e| format!("bad CA certificate in {}: {e}", ca.display()))?;
                }
            }
            None => {
                for cert in rustls_native_certs::load_native_certs().certs {
                    let _ = roots.add(cert);
                }
            }
        }
        Ok(roots)
    }

    fn with_client_auth(
        &self,
        builder: rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>,
    ) -> Result<rustls::ClientConfig, String> {
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let chain = read_certs(cert)?;
                let key_der = rustls_pemfile::private_key(&mut std::io::BufReader::new(
                    std::fs::File::open(key).map_err(|e| format!("{}: {e}", key.display()))?,
                ))
                .map_err(|e| format!("{}: {e}", key.display()))?
                .ok_or_else(|| format!("no private key in {}", key.display()))?;
                builder.with_client_auth_cert(chain, key_der).map_err(|e| e.to_string())
            }
            _ => Ok(builder.with_no_client_auth()),
        }
    }

    /// Verifies the chain against the CA file (or the system's roots) and the host name.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(self.roots()?);
        self.with_client_auth(builder)
    }

    #[cfg(feature = "pgsql")]
    pub fn postgres_connector(&self, verify: Verify) -> Result<tokio_postgres_rustls::MakeRustlsConnect, String> {
        Ok(tokio_postgres_rustls::MakeRustlsConnect::new(self.client_config_verifying(verify)?))
    }
}

fn read_certs(path: &PathBuf) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    rustls_pemfile::certs(&mut std::io::BufReader::new(f))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// `verify-ca` (with `chain`: the full WebPKI check, except that a certificate issued for
/// another name passes) and `require`/`prefer` (without: any certificate). Handshake signatures
/// are verified either way.
#[derive(Debug)]
struct Relaxed {
    chain: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for Relaxed {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use rustls::CertificateError::{NotValidForName, NotValidForNameContext};
        let Some(chain) = &self.chain else {
            return Ok(rustls::client::danger::ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(NotValidForName | NotValidForNameContext { .. })) => {
                Ok(rustls::client::danger::ServerCertVerified::assertion())
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
