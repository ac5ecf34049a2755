//! TLS on a listener (`--tls-cert`, `--tls-key`; the admin listener's own with
//! `--admin-tls-cert`, `--admin-tls-key`): rustls with the ring provider, TLS 1.2 and
//! 1.3, ALPN `h2` then `http/1.1`.
//!
//! The certificate is looked up per handshake from a slot that a reload replaces
//! ([`crate::reload`]: the files changed, or SIGHUP), so a renewed certificate is served
//! to the next connection while open ones keep theirs. A reload that fails (a
//! half-written file, a key that does not match the certificate) keeps the last good
//! pair. A handshake must finish within the header read timeout; one that does not, or
//! fails, costs its own connection only.

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

/// A listener's certificate chain and private key, as PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// Read and check the pair: the chain, the key, and that they belong together.
    pub fn load(&self, provider: &CryptoProvider) -> Result<CertifiedKey, String> {
        let at = |path: &PathBuf, e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
        let chain = CertificateDer::pem_file_iter(&self.cert)
            .map_err(|e| at(&self.cert, &e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| at(&self.cert, &e))?;
        if chain.is_empty() {
            return Err(at(&self.cert, &"no certificate in the file"));
        }
        let key = PrivateKeyDer::from_pem_file(&self.key).map_err(|e| at(&self.key, &e))?;
        let certified = CertifiedKey::from_der(chain, key, provider).map_err(|e| at(&self.key, &e))?;
        Ok(certified)
    }
}

/// The certificate every handshake is answered with, replaced whole on reload.
#[derive(Debug)]
struct Current(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

/// A TLS acceptor for `files` (read now: a bad pair stops start-up), and the task that
/// reloads them.
pub fn acceptor(
    files: &TlsFiles,
    file_label: &'static str,
    reloads: prometheus::IntCounterVec,
) -> Result<(TlsAcceptor, JoinHandle<()>), String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let current = Arc::new(Current(ArcSwap::from_pointee(files.load(&provider)?)));
    let mut config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(current.clone());
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let reload_files = files.clone();
    let watcher = crate::reload::watch(
        file_label,
        vec![files.cert.clone(), files.key.clone()],
        reloads,
        move || reload_files.load(&provider),
        move |certified| current.0.store(Arc::new(certified)),
    );
    Ok((TlsAcceptor::from(Arc::new(config)), watcher))
}
