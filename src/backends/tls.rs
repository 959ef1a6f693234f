//! TLS client settings shared by the server backends: CA, client certificate and key files
//! (EMQX names), turned into a rustls client configuration.

use crate::config::{ConfError, PoolConf};
use std::path::PathBuf;
use std::sync::Arc;

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

    pub fn client_config(&self) -> Result<rustls::ClientConfig, String> {
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
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
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

    #[cfg(feature = "pgsql")]
    pub fn postgres_connector(&self, _host: &str) -> Result<tokio_postgres_rustls::MakeRustlsConnect, String> {
        Ok(tokio_postgres_rustls::MakeRustlsConnect::new(self.client_config()?))
    }
}

fn read_certs(path: &PathBuf) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    rustls_pemfile::certs(&mut std::io::BufReader::new(f))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))
}
