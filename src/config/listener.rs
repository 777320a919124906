//! `[listener]`: where apps connect, how many proxy threads, and how their connections are
//! accepted and read.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::convert::{secs, Convert};

/// How app connections are accepted and their requests read (`[listener]`).
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// A request's header block must arrive whole within this time (408 and close).
    pub header_timeout: Duration,
    /// Open app connections beyond this are answered 503 and closed at accept.
    pub max_connections: usize,
    /// A request body must arrive whole within this from the request's start, and no read of it
    /// may wait longer (408 and close).
    pub body_timeout: Duration,
}

/// `[listener]` as written.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct FileListener {
    /// Listen address for app traffic; default `127.0.0.1:8080`.
    address: Option<String>,
    /// Proxy worker threads; default 2.
    threads: Option<usize>,
    /// A request's header block must arrive whole within this time, e.g. `"10s"`; default 10 s.
    header_timeout: Option<String>,
    /// Open app connections beyond this are refused (503, closed); default 1024.
    max_connections: Option<usize>,
    /// A request body must arrive whole within this, e.g. `"30s"`; default 30 s.
    body_timeout: Option<String>,
}

impl Convert<'_> {
    /// `listener.address` and `listener.threads` (top-level fields of [`super::Config`]).
    pub(super) fn listen(&mut self, l: &FileListener) -> (Option<SocketAddr>, usize) {
        let listen = self.addr("listener.address", l.address.as_deref(), "127.0.0.1:8080");
        let threads = l.threads.unwrap_or(2);
        if threads == 0 || threads > 256 {
            self.err("listener.threads", "must be between 1 and 256");
        }
        (listen, threads)
    }

    /// The rest of `[listener]`.
    pub(super) fn listener(&mut self, l: &FileListener) -> ListenerConfig {
        let header_timeout = self.duration(
            "listener.header_timeout",
            l.header_timeout.as_deref(),
            secs(10),
        );
        if header_timeout > secs(300) {
            self.err("listener.header_timeout", "must be at most 5m");
        }
        let max_connections = l.max_connections.unwrap_or(1024);
        if max_connections == 0 || max_connections > 1_000_000 {
            self.err("listener.max_connections", "must be between 1 and 1000000");
        }
        let body_timeout =
            self.duration("listener.body_timeout", l.body_timeout.as_deref(), secs(30));
        if body_timeout > secs(3600) {
            self.err("listener.body_timeout", "must be at most 1h");
        }
        ListenerConfig {
            header_timeout,
            max_connections,
            body_timeout,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;

    #[test]
    fn listener_admin_and_reserved_path_settings() {
        let c = load(MINIMAL).expect("valid");
        assert_eq!(c.listener.header_timeout, secs(10));
        assert_eq!(c.listener.max_connections, 1024);
        assert_eq!(c.listener.body_timeout, secs(30));
        assert!(!c.admin.shutdown_endpoint);
        assert!(c.policy.reserved_paths.is_empty());
        let text = MINIMAL.replace(
            "[auth]",
            "[listener]\nheader_timeout = \"3s\"\nmax_connections = 10\n[admin]\nshutdown_endpoint = true\n[policy]\nreserved_paths = [\"/API/v3/Login/\"]\n[auth]",
        );
        let c = load(&text).expect("valid");
        assert_eq!(c.listener.header_timeout, secs(3));
        assert_eq!(c.listener.max_connections, 10);
        assert!(c.admin.shutdown_endpoint);
        assert_eq!(c.policy.reserved_paths, ["/api/v3/login"]);
        for (bad, key) in [
            (
                "[listener]\nheader_timeout = \"0s\"",
                "listener.header_timeout",
            ),
            (
                "[listener]\nheader_timeout = \"1h\"",
                "listener.header_timeout",
            ),
            (
                "[listener]\nmax_connections = 0",
                "listener.max_connections",
            ),
            ("[listener]\nbody_timeout = \"2h\"", "listener.body_timeout"),
            (
                "[policy]\nreserved_paths = [\"api/x\"]",
                "policy.reserved_paths[0]",
            ),
            (
                "[policy]\nreserved_paths = [\"/a/../b\"]",
                "policy.reserved_paths[0]",
            ),
            (
                "[policy]\nreserved_paths = [\"/\"]",
                "policy.reserved_paths[0]",
            ),
        ] {
            let e = load(&MINIMAL.replace("[auth]", &format!("{bad}\n[auth]"))).unwrap_err();
            assert_eq!(e.0[0].key, key, "{bad}: {e}");
        }
    }
}
