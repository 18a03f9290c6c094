//! TLS set-up every service shares. The workspace links both of rustls' crypto providers (ring
//! through tonic, async-nats and lettre; aws-lc-rs through reqwest), and with two linked rustls
//! cannot pick one itself: `ClientConfig::builder()` and `ServerConfig::builder()` (used by
//! async-nats for `tls://` and by tonic for the Flight server) then panic. So every service
//! installs one process default at start, before anything builds a TLS configuration, and every
//! TLS user in the process (reqwest and lettre included, which take the default when there is
//! one) runs on the same provider.

use std::sync::Once;

/// Installs ring as the process's rustls crypto provider, once; later calls do nothing. Called
/// from the start-up path every service goes through (`ServiceConfig::load`, `nats::connect_options`), so
/// a binary and a service started inside a test get the same provider.
pub fn install_crypto_provider() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // Refused only when some code in the process installed a default first; that one then
        // stands, which is all the builders need.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn after_installing_the_builders_have_a_provider() {
        install_crypto_provider();
        install_crypto_provider();
        assert!(rustls::crypto::CryptoProvider::get_default().is_some());
        let _ = rustls::ClientConfig::builder();
    }
}
