//! What is wrong with a configuration: each mistake names the file and the key, never a
//! secret.

use std::fmt;
use std::path::PathBuf;

/// One thing wrong with the configuration: which file, which key, what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {key}: {message}", file.display())]
pub struct ConfigError {
    /// The configuration file (or the file a key names, for file-content errors).
    pub file: PathBuf,
    /// Dotted key, e.g. `upstream.base_url` or `tenants[0].password_file`.
    pub key: String,
    /// What is wrong, never containing a secret.
    pub message: String,
}

/// Everything wrong with a configuration (at least one entry).
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}
