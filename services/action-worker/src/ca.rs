//! Extra certificate authorities (`service.ca_file`): a PEM bundle trusted besides the public
//! roots for every TLS connection the kinds make (webhooks and Slack over HTTPS, SMTP over TLS
//! or STARTTLS), for receivers and relays behind a private CA.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot read the CA file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the CA file {path} is not a PEM bundle of certificates: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// The certificates of one CA file, parsed for each TLS client that uses them.
#[derive(Debug, Clone)]
pub struct ExtraRoots {
    pub http: Vec<reqwest::Certificate>,
    pub smtp: lettre::transport::smtp::client::Certificate,
}

impl ExtraRoots {
    /// Reads and parses the file; one with no certificate in it is refused, since trusting it
    /// would change nothing and is surely a mistake (a key file named instead, say).
    pub fn load(path: &Path) -> Result<Self, CaError> {
        let pem = std::fs::read(path).map_err(|source| CaError::Read {
            path: path.to_owned(),
            source,
        })?;
        let invalid = |message: String| CaError::Invalid {
            path: path.to_owned(),
            message,
        };
        let http =
            reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| invalid(e.to_string()))?;
        if http.is_empty() {
            return Err(invalid("it holds no CERTIFICATE block".into()));
        }
        let smtp = lettre::transport::smtp::client::Certificate::from_pem(&pem)
            .map_err(|e| invalid(e.to_string()))?;
        Ok(Self { http, smtp })
    }

    /// The roots `settings.ca_file` names, if it names a file.
    pub fn from_setting(ca_file: Option<&Path>) -> Result<Option<Self>, CaError> {
        ca_file.map(Self::load).transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_without_a_certificate_is_refused_by_name() {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(file.path(), "not a certificate\n").expect("write");
        let error = ExtraRoots::load(file.path()).expect_err("no certificate");
        assert!(
            error
                .to_string()
                .contains(&file.path().display().to_string()),
            "{error}"
        );
        let missing = ExtraRoots::load(Path::new("/nonexistent/ca.pem")).expect_err("missing");
        assert!(
            missing.to_string().contains("/nonexistent/ca.pem"),
            "{missing}"
        );
    }

    #[test]
    fn a_generated_ca_loads() {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&key).expect("CA");
        let file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(file.path(), ca.pem()).expect("write");
        let roots = ExtraRoots::load(file.path()).expect("loads");
        assert_eq!(roots.http.len(), 1);
    }
}
