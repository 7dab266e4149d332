//! TLS material: server identities (from PEM files or a persisted development CA) and client
//! trust roots, turned into rustls configs with the `ring` provider and TLS 1.3 only.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::TlsError;

/// Subject of the development CA. Its certificate is rebuilt from these params when a server
/// certificate has to be re-issued, so they must stay stable across versions.
const DEV_CA_COMMON_NAME: &str = "Quiver development CA";
/// Names every development server certificate carries, before the caller's extra names.
const DEV_DEFAULT_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// TLS material of a server: its certificate chain and private key.
pub struct ServerIdentity {
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl fmt::Debug for ServerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        f.debug_struct("ServerIdentity")
            .field("certificates", &self.cert_chain.len())
            .finish_non_exhaustive()
    }
}

impl ServerIdentity {
    /// Load a certificate chain (leaf first) and a private key from PEM files.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let cert_chain = read_certs(cert)?;
        let key_pem = read(key)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Pem {
            path: key.to_owned(),
            reason: e.to_string(),
        })?;
        Ok(Self { cert_chain, key })
    }

    /// A node with no configured certificate: in `dir` (its data dir), create if missing a
    /// development CA (`ca.pem`, `ca.key`) and a server certificate signed by it (`server.pem`,
    /// `server.key`) with SANs localhost, 127.0.0.1, ::1 and `extra_names` (IP literals become IP
    /// SANs). Key files are created with mode 0600. Later starts reuse the files
    /// (trust-on-first-use); the server certificate is re-issued by the same CA when the names
    /// change (they are recorded in `server.names`).
    ///
    /// Returns the identity and the path of the CA file clients must trust.
    pub fn load_or_generate_dev(
        dir: &Path,
        extra_names: &[String],
    ) -> Result<(Self, PathBuf), TlsError> {
        Self::load_or_generate_dev_with_ca(dir, dir, extra_names)
    }

    /// As [`load_or_generate_dev`](Self::load_or_generate_dev), with the development CA kept
    /// in `ca_dir` rather than beside the server certificate: nodes of one development cluster
    /// on one machine share a CA directory, so they trust each other (and a client trusts all
    /// of them with one `ca.pem`). The certificate also serves as the node's client
    /// certificate towards its peers.
    pub fn load_or_generate_dev_with_ca(
        dir: &Path,
        ca_dir: &Path,
        extra_names: &[String],
    ) -> Result<(Self, PathBuf), TlsError> {
        for d in [dir, ca_dir] {
            fs::create_dir_all(d).map_err(|source| TlsError::Io {
                path: d.to_owned(),
                source,
            })?;
        }
        let ca_cert_path = ca_dir.join("ca.pem");
        let ca_key_path = ca_dir.join("ca.key");
        let cert_path = dir.join("server.pem");
        let key_path = dir.join("server.key");
        let names_path = dir.join("server.names");

        let mut names: Vec<String> = DEV_DEFAULT_NAMES.iter().map(|n| n.to_string()).collect();
        for name in extra_names {
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
        // The record also names the CA and the key usages, so a certificate issued by another
        // CA, or before peers authenticated with it, is issued anew.
        let names_text = format!(
            "{}\n# ca {}\n# usage server,client\n",
            names.join("\n"),
            ca_cert_path.display()
        );

        // Nodes sharing a CA directory may start at once: one creates the CA while the others
        // wait on this lock, then read it.
        let lock_path = ca_dir.join("ca.lock");
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| TlsError::Io {
                path: lock_path.clone(),
                source,
            })?;
        lock.lock().map_err(|source| TlsError::Io {
            path: lock_path.clone(),
            source,
        })?;
        // The CA is reused only when both halves exist: a crash between writing the key and the
        // certificate leaves a key alone, and then both are made anew.
        let (ca_key, ca_reused) = if ca_cert_path.exists() && ca_key_path.exists() {
            let pem = String::from_utf8_lossy(&read(&ca_key_path)?).into_owned();
            let key = KeyPair::from_pem(&pem).map_err(|e| TlsError::Pem {
                path: ca_key_path.clone(),
                reason: e.to_string(),
            })?;
            (key, true)
        } else {
            let key = KeyPair::generate().map_err(generate_error)?;
            let cert = dev_ca_params().self_signed(&key).map_err(generate_error)?;
            write_file(&ca_key_path, key.serialize_pem().as_bytes(), true)?;
            write_file(&ca_cert_path, cert.pem().as_bytes(), false)?;
            tracing::info!(path = %ca_cert_path.display(), "generated development CA");
            (key, false)
        };

        let server_reusable = ca_reused
            && cert_path.exists()
            && key_path.exists()
            && fs::read_to_string(&names_path).is_ok_and(|recorded| recorded == names_text);
        if !server_reusable {
            let issuer = Issuer::new(dev_ca_params(), ca_key);
            let mut params = CertificateParams::new(names.clone()).map_err(generate_error)?;
            params
                .distinguished_name
                .push(DnType::CommonName, "quiver node");
            params.is_ca = IsCa::NoCa;
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let key = KeyPair::generate().map_err(generate_error)?;
            let cert = params.signed_by(&key, &issuer).map_err(generate_error)?;
            write_file(&key_path, key.serialize_pem().as_bytes(), true)?;
            write_file(&cert_path, cert.pem().as_bytes(), false)?;
            write_file(&names_path, names_text.as_bytes(), false)?;
            tracing::info!(path = %cert_path.display(), ?names, "issued development server certificate");
        }
        Ok((Self::from_pem_files(&cert_path, &key_path)?, ca_cert_path))
    }

    /// rustls server config: TLS 1.3, ring, the given ALPN, no client authentication. Built by
    /// hand, not with quinn's `with_single_cert`, so `max_early_data_size` stays 0 (no 0-RTT).
    pub(crate) fn rustls_config(&self, alpn: &[u8]) -> Result<rustls::ServerConfig, TlsError> {
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_error)?
            .with_no_client_auth()
            .with_single_cert(self.cert_chain.clone(), self.key.clone_key())
            .map_err(config_error)?;
        config.alpn_protocols = vec![alpn.to_vec()];
        debug_assert_eq!(config.max_early_data_size, 0);
        Ok(config)
    }
}

impl ServerIdentity {
    /// rustls server config of a peer endpoint: as [`rustls_config`](Self::rustls_config),
    /// and the connecting node must present a certificate issued by a CA of `peers` (mutual
    /// TLS), so that only cluster members speak the peer protocol.
    pub(crate) fn rustls_peer_config(
        &self,
        alpn: &[u8],
        peers: &ClientTrust,
    ) -> Result<rustls::ServerConfig, TlsError> {
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::clone(&peers.roots),
            provider(),
        )
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_error)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.cert_chain.clone(), self.key.clone_key())
            .map_err(config_error)?;
        config.alpn_protocols = vec![alpn.to_vec()];
        debug_assert_eq!(config.max_early_data_size, 0);
        Ok(config)
    }
}

/// What a client trusts: the CA certificates of a PEM file (the CLI's `--ca FILE`).
#[derive(Clone)]
pub struct ClientTrust {
    roots: Arc<rustls::RootCertStore>,
}

impl fmt::Debug for ClientTrust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTrust")
            .field("roots", &self.roots.len())
            .finish()
    }
}

impl ClientTrust {
    /// Trust the CA certificate(s) in a PEM file.
    pub fn from_ca_file(path: &Path) -> Result<Self, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in read_certs(path)? {
            roots.add(cert).map_err(|e| TlsError::Pem {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
        }
        Ok(Self {
            roots: Arc::new(roots),
        })
    }

    /// rustls client config: TLS 1.3, ring, the given ALPN, webpki verification against the roots.
    pub(crate) fn rustls_config(&self, alpn: &[u8]) -> Result<rustls::ClientConfig, TlsError> {
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_error)?
            .with_root_certificates(Arc::clone(&self.roots))
            .with_no_client_auth();
        config.alpn_protocols = vec![alpn.to_vec()];
        Ok(config)
    }
}

impl ClientTrust {
    /// rustls client config of a node connecting to a peer: as
    /// [`rustls_config`](Self::rustls_config), presenting `identity` as its client certificate.
    pub(crate) fn rustls_peer_config(
        &self,
        alpn: &[u8],
        identity: &ServerIdentity,
    ) -> Result<rustls::ClientConfig, TlsError> {
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_error)?
            .with_root_certificates(Arc::clone(&self.roots))
            .with_client_auth_cert(identity.cert_chain.clone(), identity.key.clone_key())
            .map_err(config_error)?;
        config.alpn_protocols = vec![alpn.to_vec()];
        Ok(config)
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn dev_ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, DEV_CA_COMMON_NAME);
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Io {
        path: path.to_owned(),
        source,
    })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificates(path.to_owned()));
    }
    Ok(certs)
}

/// Write through a temporary file and rename, so a crash never leaves a half-written file under
/// the final name. Private files are created with mode 0600 before any byte is written.
fn write_file(path: &Path, contents: &[u8], private: bool) -> Result<(), TlsError> {
    let io_error = |source| TlsError::Io {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_error(e)),
        _ => {}
    }
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options.open(&tmp).map_err(io_error)?;
    file.write_all(contents).map_err(io_error)?;
    file.sync_all().map_err(io_error)?;
    fs::rename(&tmp, path).map_err(io_error)
}

fn generate_error(e: rcgen::Error) -> TlsError {
    TlsError::Generate(e.to_string())
}

fn config_error(e: rustls::Error) -> TlsError {
    TlsError::Config(e.to_string())
}
