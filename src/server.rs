//! Assembles the sidecar from a [`Config`]: validates what must be valid before the first
//! request (certificates, listen sockets), then runs Pingora's server with the proxy service and
//! one background service for the control plane (DNS refresh, sessions, admin listener).

use std::sync::Arc;

use async_trait::async_trait;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};

use crate::admin;
use crate::audit::Audit;
use crate::auth::client::AuthClient;
use crate::auth::fleet::FleetStore;
use crate::auth::{self, SessionTable};
use crate::config::{Backend, Config, SessionStore};
use crate::lifecycle::{DrainingSignal, Lifecycle};
use crate::listener::{self, AppListener, Limits};
use crate::metrics::Metrics;
use crate::policy::ratelimit::{DecidedBy, Limiter, LocalLimiter};
use crate::policy::redis_limit::RedisLimiter;
use crate::proxy::metrics::ProxyMetrics;
use crate::proxy::tenant::Tenants;
use crate::proxy::FinHubProxy;
use crate::state::AppState;
use crate::supervise::supervise;
use crate::telemetry::Telemetry;
use crate::time::unix_now;
use crate::tls::reload::Reloader;
use crate::tls::{TlsError, TlsFiles, TlsStore};
use crate::upstream::UpstreamAddrs;

/// Why the sidecar could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Certificates or keys are unusable.
    #[error("client TLS: {0}")]
    Tls(#[from] TlsError),
    /// The audit file could not be opened.
    #[error("audit.output: {0}")]
    Audit(std::io::Error),
    /// The OTLP exporter could not be built.
    #[error(transparent)]
    Tracing(#[from] crate::telemetry::TelemetryError),
    /// A listen address could not be bound.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: std::net::SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A sidecar ready to run: configuration checked, certificates loaded, admin socket bound.
pub struct Sidecar {
    config: Arc<Config>,
    tls: Arc<TlsStore>,
    upstream: Arc<UpstreamAddrs>,
    sessions: Arc<SessionTable>,
    admin_listener: std::net::TcpListener,
    app_listener: std::net::TcpListener,
    /// Where the listeners are bound (the OS's choice for a port 0).
    app_listener_addr: Option<std::net::SocketAddr>,
    admin_listener_addr: Option<std::net::SocketAddr>,
    tls_files: TlsFiles,
    metrics: Metrics,
    /// The data path's metrics (`proxy::metrics`), registered in `metrics`' registry.
    proxy_metrics: ProxyMetrics,
    audit: Audit,
    audit_guard: Option<crate::audit::AuditGuard>,
    /// The shared limiter, when `backend = "redis"` (its connections live in the control plane).
    redis: Option<RedisLimiter>,
    /// The tracing pipeline, when `[tracing]` or `OTEL_*` configure a collector.
    telemetry: Option<Telemetry>,
}

impl Sidecar {
    /// Loads the TLS material and binds the admin port; fails before anything is served.
    pub fn build(config: Config) -> Result<Sidecar, StartError> {
        let metrics = Metrics::new();
        let proxy_metrics = ProxyMetrics::register(metrics.registry());
        let tls_files = TlsFiles::from_config(&config, &metrics.tls);
        let tls = match tls_files.load(unix_now()) {
            Ok(tls) => tls,
            // Exiting would restart the pod into another PIN attempt, and tokens lock the user
            // after a few: stay up, unready, until pin_file holds a PIN the token takes.
            Err(e) if e.is_pin_refusal() => {
                tracing::error!(error = %e, "the client key token refused the PIN (client_cert.pin_file); not ready until the file changes");
                crate::tls::ClientTls::waiting_for_pin(&tls_files, &e)?
            }
            Err(e) => return Err(e.into()),
        };
        for w in &tls.warnings {
            tracing::warn!(finding = %w, "client certificate breaks a FinHub rule (enforced in production)");
        }
        if config.rules.requires_client_cert
            && tls.cert_key.is_none()
            && tls.availability.is_ready()
        {
            // Config conversion already refuses this; keep the invariant local too.
            return Err(StartError::Tls(TlsError::MissingClientCert));
        }
        let admin_listener =
            std::net::TcpListener::bind(config.admin_listen).map_err(|source| {
                StartError::Bind {
                    what: "admin",
                    addr: config.admin_listen,
                    source,
                }
            })?;
        let app_listener = listener::bind(config.listen).map_err(|source| StartError::Bind {
            what: "listener",
            addr: config.listen,
            source,
        })?;
        let sessions = Arc::new(SessionTable::new(&config));
        let upstream = Arc::new(UpstreamAddrs::for_config(
            &config.upstream,
            metrics.egress.clone(),
        ));
        sessions.clock().set_gauge(metrics.auth.clock_offset());
        for t in &config.tenants {
            metrics.auth.init_tenant(&t.id);
            proxy_metrics.init_tenant(&t.id);
        }
        let (audit, audit_guard) = Audit::open(
            &config.audit.output,
            config.audit.include_query,
            config.audit.flush_interval,
        )
        .map_err(StartError::Audit)?;
        let redis = match &config.policy.rate_limit.backend {
            Backend::Local => None,
            Backend::Redis(settings) => Some(RedisLimiter::new(
                &config.policy.rate_limit,
                settings,
                &metrics.rate_limit,
                &metrics.redis,
            )),
        };
        let telemetry = config
            .tracing
            .as_ref()
            .map(|t| Telemetry::install(t, &metrics.trace))
            .transpose()?;
        Ok(Sidecar {
            telemetry,
            redis,
            audit,
            audit_guard,
            config: Arc::new(config),
            tls: Arc::new(TlsStore::new(tls)),
            upstream,
            sessions,
            app_listener_addr: app_listener.local_addr().ok(),
            admin_listener_addr: admin_listener.local_addr().ok(),
            admin_listener,
            app_listener,
            tls_files,
            metrics,
            proxy_metrics,
        })
    }

    /// The rate-limit backend the proxy asks.
    fn limiter(&self) -> Box<dyn Limiter> {
        match &self.redis {
            Some(redis) => Box::new(redis.clone()),
            None => Box::new(
                LocalLimiter::new(self.config.policy.rate_limit.clone())
                    .counting(self.metrics.rate_limit.decisions(DecidedBy::Local)),
            ),
        }
    }

    /// Runs until SIGTERM/SIGINT (Pingora's signal handling), then returns.
    pub fn run(self) {
        let c = &self.config;
        let conf = ServerConf {
            threads: c.threads,
            // The drain (readiness off, drain delay, in-flight wait) happens before Pingora is
            // told to stop (lifecycle.rs); its own grace period only covers stragglers.
            grace_period_seconds: Some(1),
            graceful_shutdown_timeout_seconds: Some(2),
            upstream_keepalive_pool_size: c.upstream.pool_size,
            // One worker thread: a plain single-threaded runtime, without the multi-thread
            // scheduler's cross-thread wake-ups (more threads keep work stealing).
            work_stealing: c.threads > 1,
            // No `ca_file` here: Pingora would parse it again with stricter rules and unwrap.
            // The validated CA list goes on every peer (`peer.options.ca`) instead.
            ..ServerConf::default()
        };
        let lifecycle = Lifecycle::new(
            c.shutdown.drain_delay,
            c.shutdown.deadline,
            self.metrics.clone(),
        );
        let mut server = Server::new_with_opt_and_conf(None, conf);
        server.bootstrap();

        let limiter = self.limiter();
        let Some(tenants) = Tenants::new(
            &self.sessions,
            c.default_tenant,
            &self.proxy_metrics,
            &*limiter,
            &c.retry,
        ) else {
            tracing::error!("finhub-sidecar cannot start: no tenant configured");
            return;
        };
        let state = Arc::new(AppState {
            config: c.clone(),
            tls: self.tls.clone(),
            upstream: self.upstream.clone(),
            sessions: self.sessions.clone(),
            metrics: self.metrics.clone(),
            lifecycle: lifecycle.clone(),
            audit: self.audit.clone(),
            started: std::time::Instant::now(),
            tracer: self.telemetry.as_ref().map(Telemetry::tracer),
        });
        let proxy = FinHubProxy::new(state.clone(), tenants, &self.proxy_metrics);
        // CONNECT reaches request_filter (instead of Pingora's bare 405) so that it gets the
        // same JSON refusal as every other request; it is never tunnelled.
        let mut server_options = pingora::apps::HttpServerOptions::default();
        server_options.allow_connect_method_proxying = true;
        let mut app = pingora::proxy::http_proxy(&server.configuration, proxy);
        app.server_options = Some(server_options);
        // The sidecar's own accept loop: allowlist at accept, connection cap, header deadline
        // and cap while reading (`listener/`); Pingora parses and proxies from there.
        let proxy_service = AppListener::new(
            self.app_listener,
            app,
            Limits {
                allowed_clients: c.policy.allowed_clients.clone(),
                max_connections: c.listener.max_connections,
                header_timeout: c.listener.header_timeout,
                max_header_bytes: c.policy.max_header_bytes,
            },
            c.threads,
            &self.metrics.listener,
        );

        let control = ControlPlane {
            state,
            admin_listener: std::sync::Mutex::new(Some(self.admin_listener)),
            tls_files: self.tls_files.clone(),
            redis: self.redis.clone(),
        };
        server.add_service(background_service("control-plane", control));
        server.add_service(proxy_service);
        // The bound addresses (a port 0 in the config becomes the one the OS chose): tools and
        // tests read them from this line.
        tracing::info!(
            listen = %bound(&self.app_listener_addr, c.listen),
            admin = %bound(&self.admin_listener_addr, c.admin_listen),
            upstream = %format!("{}:{}", c.upstream.host, c.upstream.port),
            environment = %c.auth.environment,
            tenants = c.tenants.len(),
            "finhub-sidecar starting"
        );
        server.run(RunArgs {
            shutdown_signal: Box::new(DrainingSignal(lifecycle)),
        });
        // Write the queued audit lines before the process exits.
        drop(self.audit_guard);
        // Send the queued spans, bounded: a dead collector cannot hold the exit up.
        if let Some(t) = self.telemetry {
            t.shutdown(std::time::Duration::from_secs(2));
        }
        tracing::info!("finhub-sidecar stopped");
    }
}

/// A listener's bound address, or the configured one if the OS would not say.
fn bound(
    actual: &Option<std::net::SocketAddr>,
    configured: std::net::SocketAddr,
) -> std::net::SocketAddr {
    actual.unwrap_or(configured)
}

/// DNS refresh, certificate reloads, one session task per tenant, the Redis keepers and the
/// admin listener, over the application state.
struct ControlPlane {
    state: Arc<AppState>,
    admin_listener: std::sync::Mutex<Option<std::net::TcpListener>>,
    tls_files: TlsFiles,
    redis: Option<RedisLimiter>,
}

#[async_trait]
impl BackgroundService for ControlPlane {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let sh = &self.state;
        let mut tasks = tokio::task::JoinSet::new();
        if let Err(e) = sh.upstream.resolve().await {
            tracing::warn!(error = %e, host = %sh.upstream.dialled_host(), "initial DNS resolution failed; retrying in the background");
        }
        tasks.spawn(
            sh.upstream
                .clone()
                .refresh_forever(sh.config.upstream.dns_refresh),
        );
        let reloader = Reloader::new(
            self.tls_files.clone(),
            sh.tls.clone(),
            sh.metrics.tls.clone(),
            sh.config.expiry_warning(),
        );
        tasks.spawn(reloader.run(sh.config.tls_reload_interval()));
        if let Some(redis) = &self.redis {
            tasks.spawn(redis.clone().keep_connected());
        }
        // The fleet-shared session store (`auth.session_store = "redis"`).
        let store = match &sh.config.auth.session_store {
            SessionStore::Local => None,
            SessionStore::Redis(settings) => {
                let store = FleetStore::new(settings, &sh.metrics.fleet, &sh.metrics.redis);
                tasks.spawn(store.clone().keep_connected());
                Some(store)
            }
        };
        let client = Arc::new(AuthClient::new(
            &sh.config,
            sh.tls.clone(),
            sh.sessions.clock().clone(),
            sh.upstream.clone(),
        ));
        if store.is_some() && sh.config.auth.logout_on_shutdown {
            // The session is the fleet's: one replica stopping (a rollout always has another)
            // must not end it for the others, and no replica can know it is the last one. After
            // the drain it only gives its leases up, so another replica takes over at once.
            tracing::info!("auth.session_store = \"redis\": sessions are shared with other replicas and are not logged out at shutdown");
        }
        let ending = auth::Ending::of(&sh.config.auth, store.clone());
        if let Some(budget) = ending.budget() {
            // Runs from the drain (Pingora's signal task); the calls go out on this runtime,
            // which lives until the drain is over.
            let (sessions, client, metrics) =
                (sh.sessions.clone(), client.clone(), sh.metrics.auth.clone());
            let runtime = tokio::runtime::Handle::current();
            sh.lifecycle.on_drained(
                budget,
                Box::new(move || {
                    Box::pin(async move {
                        let _ = runtime
                            .spawn(auth::end_all(sessions, client, metrics, ending))
                            .await;
                    })
                }),
            );
        }
        for slot in sh.sessions.tenants() {
            let (slot, client, auth, metrics, store) = (
                slot.clone(),
                client.clone(),
                sh.config.auth.clone(),
                sh.metrics.auth.clone(),
                store.clone(),
            );
            // Supervised: a bug that panics the session task must not end renewals for good.
            tasks.spawn(supervise(
                "session",
                std::time::Duration::from_secs(1),
                move || {
                    auth::run_tenant(
                        slot.clone(),
                        client.clone(),
                        auth.clone(),
                        metrics.clone(),
                        store.clone(),
                    )
                },
            ));
        }
        tasks.spawn(trim_when_serving(sh.sessions.clone()));
        let listener = self.admin_listener.lock().ok().and_then(|mut l| l.take());
        if let Some(listener) = listener {
            tasks.spawn(admin::serve(listener, self.state.clone()));
        }
        let _ = shutdown.changed().await;
        tasks.abort_all();
    }
}

/// Once every tenant has its first session (start-up is over), returns the start-up code's pages
/// to the kernel (`trim.rs`). Gives up waiting after a minute: then it trims anyway.
async fn trim_when_serving(sessions: Arc<SessionTable>) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    while tokio::time::Instant::now() < deadline
        && sessions.tenants().iter().any(|t| t.current().is_none())
    {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    if let Ok(Some(t)) = tokio::task::spawn_blocking(crate::trim::page_out_executable).await {
        tracing::info!(
            rss_before_kib = t.before_kib,
            rss_after_kib = t.after_kib,
            "start-up code paged out"
        );
    }
}
