//! Redacting holder for credentials and tokens.
//!
//! A [`Secret`] prints as `[redacted]` through `Debug` and `Display`, so it can sit inside any
//! struct that is logged or formatted into an error without leaking. The only way to the bytes is
//! [`Secret::expose`], which call sites use right where the value goes on the wire.

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// A credential or token that must never reach a log, a metric label, an error or a panic.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value read from a secret file, an environment variable or a FinHub answer.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The raw value, for the one place that puts it on the wire.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the value is empty (an empty secret file is a configuration error).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Where a credential comes from. A file-backed secret (a Kubernetes Secret mount) is re-read
/// each time it is used, so a rotated credential is picked up without a restart; if the file
/// cannot be read at that moment (gone, empty, not a regular file, too large), the value read
/// at start is used and the problem is logged once until it changes.
#[derive(Clone, Debug)]
pub struct SecretSource {
    loaded: Secret,
    file: Option<PathBuf>,
    /// The last problem logged for `file` (logged again only when it changes).
    last_problem: Arc<Mutex<Option<String>>>,
}

impl SecretSource {
    /// A value from the environment (fixed for the life of the process).
    pub fn fixed(value: Secret) -> Self {
        SecretSource {
            loaded: value,
            file: None,
            last_problem: Arc::default(),
        }
    }

    /// A value read from `file` at start.
    pub fn file(value: Secret, file: PathBuf) -> Self {
        SecretSource {
            loaded: value,
            file: Some(file),
            last_problem: Arc::default(),
        }
    }

    /// The value now.
    pub fn current(&self) -> Secret {
        let Some(path) = &self.file else {
            return self.loaded.clone();
        };
        let problem = match crate::files::read_to_string(path) {
            Ok(v) => {
                let v = v.trim_end_matches(['\n', '\r']);
                if !v.is_empty() {
                    self.note_problem(path, None);
                    return Secret::new(v);
                }
                "secret file is empty".to_string()
            }
            Err(e) => format!("secret file unreadable: {e}"),
        };
        self.note_problem(path, Some(problem));
        self.loaded.clone()
    }

    /// Logs `problem` (which never holds the secret) unless it is the one logged last.
    fn note_problem(&self, path: &std::path::Path, problem: Option<String>) {
        let mut last = match self.last_problem.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if *last == problem {
            return;
        }
        if let Some(p) = &problem {
            tracing::warn!(file = %path.display(), problem = %p, "using the value read at start");
        }
        *last = problem;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatting_never_shows_the_value() {
        let s = Secret::new("hunter2-token");
        assert_eq!(format!("{s}"), "[redacted]");
        assert!(!format!("{s:?}").contains("hunter2"));
        assert!(!format!("{:?}", Some(&s)).contains("hunter2"));
        assert_eq!(s.expose(), "hunter2-token");
    }

    #[test]
    fn file_secrets_are_reread() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "one\n").unwrap();
        let src = SecretSource::file(Secret::new("one"), p.clone());
        std::fs::write(&p, "two\n").unwrap();
        assert_eq!(src.current().expose(), "two");
        std::fs::remove_file(&p).unwrap();
        assert_eq!(
            src.current().expose(),
            "one",
            "falls back to the value read at start"
        );
        // A FIFO put in its place neither blocks nor is read.
        let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo has no other memory effects.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert_eq!(src.current().expose(), "one");
        assert_eq!(
            SecretSource::fixed(Secret::new("env")).current().expose(),
            "env"
        );
    }
}
