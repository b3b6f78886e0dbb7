//! TLS with rustls: termination on the data plane and the admin listener
//! (h2 and http/1.1 offered by ALPN), and the extra trust and client
//! identity a route may need to reach a private upstream.
//!
//! Everything here reads files and builds rustls configs; nothing runs on
//! the request path.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;
use tokio_rustls::TlsAcceptor;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read TLS certificate {path}: {source}")]
    Certificate {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("TLS certificate file {path} holds no certificate")]
    NoCertificate { path: PathBuf },
    #[error("cannot read TLS private key {path}: {source}")]
    Key {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("TLS private key file {path} holds no private key")]
    NoKey { path: PathBuf },
    #[error("TLS certificate and key are not usable together: {0}")]
    Config(#[from] rustls::Error),
    /// A certificate of a `ca_file` that cannot serve as a trust anchor.
    #[error("certificate {number} of the CA file is not a usable trust anchor: {source}")]
    TrustAnchor {
        /// 1-based, in file order.
        number: usize,
        source: rustls::Error,
    },
    /// A client certificate's key that rustls cannot load.
    #[error("the private key is not usable: {0}")]
    ClientKey(rustls::Error),
    /// A client certificate chain and key that rustls refuses together,
    /// typically a key that does not belong to the certificate.
    #[error("the client certificate and key do not belong together: {0}")]
    ClientCert(rustls::Error),
}

/// Reads every certificate of a PEM file, in file order; a file without
/// any is an error.
pub fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Certificate {
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// Reads the first private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| match source {
        // pem's own wording ("no items found") does not say what was missing.
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
            path: path.to_owned(),
        },
        source => TlsError::Key {
            path: path.to_owned(),
            source,
        },
    })
}

/// Loads a PEM certificate chain and private key into an acceptor.
pub fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    let chain = read_certificates(cert)?;
    let key_der = read_private_key(key)?;
    acceptor_from_der(chain, key_der)
}

/// Builds an acceptor from DER parts (also used by tests with generated certs).
pub(crate) fn acceptor_from_der(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<TlsAcceptor, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client certificate for mutual TLS with an upstream: the chain it
/// presents, leaf first, and the leaf's private key.
pub struct ClientIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

/// The TLS settings of one upstream beyond the defaults: trusted roots in
/// addition to the webpki ones, a client certificate, or both.
///
/// Built once, when the config is loaded, so that every check that can fail
/// (each root is a usable trust anchor, the key loads and belongs to the
/// certificate) fails there, with the config file's line, rather than at the
/// first request. Two values are equal when they were built from the same
/// certificates and key, which is how a reload tells whether a route's
/// connector must be rebuilt.
#[derive(Clone)]
pub struct UpstreamTls {
    extra_roots: Vec<CertificateDer<'static>>,
    client_chain: Vec<CertificateDer<'static>>,
    /// Kept only for comparison: rustls holds its own loaded copy.
    client_key: Option<Arc<PrivateKeyDer<'static>>>,
    /// ALPN left empty: the connector sets it from the HTTP versions it
    /// enables (and refuses a config that already has it).
    config: Arc<rustls::ClientConfig>,
}

impl UpstreamTls {
    /// Trusts the webpki roots and `extra_roots`, and presents `client`
    /// when the upstream asks for a certificate.
    pub fn new(
        extra_roots: Vec<CertificateDer<'static>>,
        client: Option<ClientIdentity>,
    ) -> Result<UpstreamTls, TlsError> {
        let mut roots = RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        for (index, root) in extra_roots.iter().enumerate() {
            roots
                .add(root.clone())
                .map_err(|source| TlsError::TrustAnchor {
                    number: index + 1,
                    source,
                })?;
        }
        let provider = provider();
        if let Some(client) = &client {
            // Loaded once alone so that a key that does not parse is told
            // apart from a key of another certificate.
            provider
                .key_provider
                .load_private_key(client.key.clone_key())
                .map_err(TlsError::ClientKey)?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
        let (config, client_chain, client_key) = match client {
            None => (builder.with_no_client_auth(), Vec::new(), None),
            Some(ClientIdentity { chain, key }) => {
                let kept = Arc::new(key.clone_key());
                let config = builder
                    .with_client_auth_cert(chain.clone(), key)
                    .map_err(TlsError::ClientCert)?;
                (config, chain, Some(kept))
            }
        };
        Ok(UpstreamTls {
            extra_roots,
            client_chain,
            client_key,
            config: Arc::new(config),
        })
    }

    /// Whether the upstream is offered a client certificate.
    pub fn has_client_cert(&self) -> bool {
        self.client_key.is_some()
    }

    /// The rustls config for the route's connector.
    pub(crate) fn client_config(&self) -> rustls::ClientConfig {
        (*self.config).clone()
    }
}

impl PartialEq for UpstreamTls {
    fn eq(&self, other: &Self) -> bool {
        // The built config follows from these three, so comparing them is
        // comparing the whole.
        self.extra_roots == other.extra_roots
            && self.client_chain == other.client_chain
            && self.client_key.as_deref().map(PrivateKeyDer::secret_der)
                == other.client_key.as_deref().map(PrivateKeyDer::secret_der)
    }
}

impl Eq for UpstreamTls {}

impl fmt::Debug for UpstreamTls {
    /// Counts only: certificates are long and the key is a secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("extra_roots", &self.extra_roots.len())
            .field("client_chain", &self.client_chain.len())
            .field("client_key", &self.client_key.is_some())
            .finish()
    }
}
