//! The floor of the e2e benchmark (`benches/e2e/run.py --systems pingora-minimal`): the smallest
//! `ProxyHttp` over the same vendored Pingora, with the same mTLS upstream and connection pool
//! as the sidecar, adding two static headers. What the sidecar costs above it is the product.
//!
//! ```sh
//! cargo build --release --example pingora_minimal
//! target/release/examples/pingora_minimal LISTEN UPSTREAM_PORT CA CLIENT_CERT CLIENT_KEY
//! ```

use std::sync::Arc;

use async_trait::async_trait;
use pingora::prelude::HttpPeer;
use pingora::proxy::{ProxyHttp, Session};
use pingora::server::configuration::ServerConf;
use pingora::server::Server;
use pingora::utils::tls::{CertKey, WrappedX509};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The floor proxy: one upstream, one client certificate, two static headers.
struct Minimal {
    upstream: std::net::SocketAddr,
    cert_key: Arc<CertKey>,
    ca: Arc<[WrappedX509]>,
}

#[async_trait]
impl ProxyHttp for Minimal {
    type CTX = ();

    fn new_ctx(&self) {}

    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut (),
    ) -> pingora::Result<Box<HttpPeer>> {
        let mut peer = HttpPeer::new_mtls(self.upstream, "localhost".into(), self.cert_key.clone());
        peer.options.ca = Some(self.ca.clone());
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        req: &mut pingora::http::RequestHeader,
        _ctx: &mut (),
    ) -> pingora::Result<()> {
        req.insert_header("X-Tenant-ID", "tenant-demo")?;
        req.insert_header("Authorization", "Bearer pingora-minimal")
    }
}

fn pem(path: &str) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, listen, upstream_port, ca, cert, key] = args.as_slice() else {
        eprintln!("usage: pingora_minimal LISTEN UPSTREAM_PORT CA CLIENT_CERT CLIENT_KEY");
        std::process::exit(2);
    };
    let certs: Vec<Vec<u8>> = CertificateDer::pem_slice_iter(&pem(cert))
        .map(|c| c.expect("client certificate PEM").to_vec())
        .collect();
    let key = PrivateKeyDer::from_pem_slice(&pem(key)).expect("client key PEM");
    let ca: Vec<WrappedX509> = CertificateDer::pem_slice_iter(&pem(ca))
        .map(|c| WrappedX509::new(c.expect("CA PEM").to_vec(), pingora::utils::tls::parse_x509))
        .collect();
    let proxy = Minimal {
        upstream: format!("127.0.0.1:{upstream_port}").parse().expect("port"),
        cert_key: Arc::new(CertKey::new(certs, key.secret_der().to_vec())),
        ca: ca.into(),
    };
    let conf = ServerConf {
        threads: 1,
        work_stealing: false,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut service = pingora::proxy::http_proxy_service(&server.configuration, proxy);
    service.add_tcp(listen);
    server.add_service(service);
    server.run_forever();
}
