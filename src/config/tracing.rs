//! `[tracing]`: OpenTelemetry traces exported over OTLP/HTTP (protobuf), and the standard
//! `OTEL_*` environment variables for the same settings. A key in the file wins over its
//! variable. Tracing is off (nothing installed, nothing per request) unless an endpoint is set
//! in either place.

use std::time::Duration;

use http::{HeaderName, HeaderValue};
use serde::Deserialize;

use super::convert::Convert;
use crate::secret::Secret;

/// How a trace without a sampled parent decision is sampled (`OTEL_TRACES_SAMPLER`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampler {
    /// Every trace.
    AlwaysOn,
    /// No trace.
    AlwaysOff,
    /// A fraction of traces, decided from the trace id (so every hop agrees).
    TraceIdRatio(f64),
    /// The parent's decision when there is one (the app's `traceparent` flag), else the root.
    ParentBased(ParentRoot),
}

/// The root sampler of a parent-based sampler.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ParentRoot {
    /// `parentbased_always_on` (the OpenTelemetry default).
    AlwaysOn,
    /// `parentbased_always_off`.
    AlwaysOff,
    /// `parentbased_traceidratio`.
    TraceIdRatio(f64),
}

/// Tracing settings; present only when an OTLP endpoint is configured (tracing is on).
#[derive(Debug, Clone)]
pub struct TracingConfig {
    /// The full OTLP/HTTP traces URL (`…/v1/traces`).
    pub endpoint: String,
    /// Headers sent to the collector with every export (often an API key: values are marked
    /// sensitive and never logged).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Longest time one export may take.
    pub timeout: Duration,
    /// `service.name` of the resource.
    pub service_name: String,
    /// Further resource attributes (`OTEL_RESOURCE_ATTRIBUTES`).
    pub resource_attributes: Vec<(String, String)>,
    /// Sampling.
    pub sampler: Sampler,
    /// Spans waiting for export at most; more are dropped and counted.
    pub max_queue_size: usize,
    /// Longest time a span waits before its batch is exported.
    pub schedule_delay: Duration,
    /// Spans per export request at most.
    pub max_export_batch_size: usize,
}

/// `tracing.timeout` when unset (the OTLP default).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// `tracing.schedule_delay` when unset (the OTLP default).
const DEFAULT_SCHEDULE_DELAY: Duration = Duration::from_secs(5);
/// `tracing.max_queue_size` when unset (the OTLP default).
const DEFAULT_MAX_QUEUE_SIZE: usize = 2048;
/// `tracing.max_export_batch_size` when unset (the OTLP default).
const DEFAULT_MAX_EXPORT_BATCH_SIZE: usize = 512;
/// Largest queue accepted: the queue is memory held while a collector is slow.
const MAX_QUEUE_LIMIT: usize = 65_536;

/// `[tracing]` as written. Every key has an `OTEL_*` variable; the file wins.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct FileTracing {
    /// `false` turns tracing off whatever the environment says (`OTEL_SDK_DISABLED=true` too).
    enabled: Option<bool>,
    /// The collector's OTLP/HTTP base URL; `/v1/traces` is appended
    /// (`OTEL_EXPORTER_OTLP_ENDPOINT`). Setting an endpoint turns tracing on.
    endpoint: Option<String>,
    /// The full traces URL, used as is (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`); wins over
    /// `endpoint`.
    traces_endpoint: Option<String>,
    /// `http/protobuf`, the only protocol supported (`OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`,
    /// `OTEL_EXPORTER_OTLP_PROTOCOL`).
    protocol: Option<String>,
    /// Headers for the collector as `key=value,key2=value2` (values percent-decoded); often an
    /// API key, so a secret: `headers = "${ENV_VAR}"` or `headers_file`
    /// (`OTEL_EXPORTER_OTLP_TRACES_HEADERS`, `OTEL_EXPORTER_OTLP_HEADERS`).
    headers: Option<String>,
    /// A file holding the collector headers (see `headers`).
    headers_file: Option<std::path::PathBuf>,
    /// Longest time one export may take (default `10s`; `OTEL_EXPORTER_OTLP_TRACES_TIMEOUT`,
    /// `OTEL_EXPORTER_OTLP_TIMEOUT`, in milliseconds).
    timeout: Option<String>,
    /// `service.name` (default `finhub-sidecar`; `OTEL_SERVICE_NAME`).
    service_name: Option<String>,
    /// Further resource attributes as `key=value,…` (`OTEL_RESOURCE_ATTRIBUTES`); never put a
    /// secret here.
    resource_attributes: Option<String>,
    /// `parentbased_always_on` (default), `parentbased_always_off`, `parentbased_traceidratio`,
    /// `always_on`, `always_off` or `traceidratio` (`OTEL_TRACES_SAMPLER`).
    sampler: Option<String>,
    /// The ratio of the `traceidratio` samplers, 0 to 1 (default 1; `OTEL_TRACES_SAMPLER_ARG`).
    sampler_arg: Option<f64>,
    /// Spans queued for export at most (default 2048, at most 65536); a slow or dead collector
    /// makes the sidecar drop the others and count them (`OTEL_BSP_MAX_QUEUE_SIZE`).
    max_queue_size: Option<usize>,
    /// Longest time a span waits for its batch (default `5s`; `OTEL_BSP_SCHEDULE_DELAY`, ms).
    schedule_delay: Option<String>,
    /// Spans per export at most (default 512, at most `max_queue_size`;
    /// `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`).
    max_export_batch_size: Option<usize>,
}

impl Convert<'_> {
    /// `[tracing]` over the `OTEL_*` variables; `None` when tracing is off.
    pub(super) fn tracing(&mut self, f: FileTracing) -> Option<TracingConfig> {
        let lookup = self.otel_env;
        let env = move |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let disabled = match f.enabled {
            Some(enabled) => !enabled,
            None => env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim() == "true"),
        };
        let exporter = env("OTEL_TRACES_EXPORTER");
        let endpoint = match (&f.traces_endpoint, &f.endpoint) {
            (Some(t), _) => Some(("tracing.traces_endpoint", t.clone(), false)),
            (None, Some(e)) => Some(("tracing.endpoint", e.clone(), true)),
            (None, None) => match (
                env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
                env("OTEL_EXPORTER_OTLP_ENDPOINT"),
            ) {
                (Some(t), _) => Some(("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", t, false)),
                (None, Some(e)) => Some(("OTEL_EXPORTER_OTLP_ENDPOINT", e, true)),
                (None, None) => None,
            },
        };
        if disabled {
            return None;
        }
        match exporter.as_deref().map(str::trim) {
            None | Some("otlp") => {}
            Some("none") => return None,
            Some(_) => {
                self.err("OTEL_TRACES_EXPORTER", "is not supported; use otlp or none");
                return None;
            }
        }
        let (endpoint_key, endpoint, base) = endpoint?;
        let endpoint = match traces_url(&endpoint, base) {
            Ok(u) => u,
            Err(m) => {
                self.err(endpoint_key, m);
                return None;
            }
        };
        let protocol = pick(
            f.protocol,
            "tracing.protocol",
            &[
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                "OTEL_EXPORTER_OTLP_PROTOCOL",
            ],
            &env,
        );
        if let Some((key, p)) = protocol {
            if p.trim() != "http/protobuf" {
                self.err(key, "is not supported; the sidecar exports http/protobuf");
            }
        }
        let headers = self.collector_headers(f.headers, f.headers_file, &env);
        let timeout = match f.timeout {
            Some(t) => self.duration("tracing.timeout", Some(&t), DEFAULT_TIMEOUT),
            None => pick(
                None,
                "",
                &[
                    "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
                    "OTEL_EXPORTER_OTLP_TIMEOUT",
                ],
                &env,
            )
            .map_or(DEFAULT_TIMEOUT, |(k, v)| {
                self.millis(k, &v, DEFAULT_TIMEOUT)
            }),
        };
        let service_name = f
            .service_name
            .or_else(|| env("OTEL_SERVICE_NAME"))
            .unwrap_or_else(|| "finhub-sidecar".to_string());
        let resource_attributes = match pick(
            f.resource_attributes,
            "tracing.resource_attributes",
            &["OTEL_RESOURCE_ATTRIBUTES"],
            &env,
        ) {
            None => Vec::new(),
            Some((key, v)) => match key_values(&v) {
                Ok(kv) => kv,
                Err(m) => {
                    self.err(key, m);
                    Vec::new()
                }
            },
        };
        let sampler = self.sampler(f.sampler, f.sampler_arg, &env);
        let max_queue_size = self.count(
            f.max_queue_size,
            "tracing.max_queue_size",
            "OTEL_BSP_MAX_QUEUE_SIZE",
            DEFAULT_MAX_QUEUE_SIZE,
            &env,
        );
        if max_queue_size > MAX_QUEUE_LIMIT {
            self.err(
                "tracing.max_queue_size",
                format!("must be at most {MAX_QUEUE_LIMIT}"),
            );
        }
        let max_export_batch_size = self
            .count(
                f.max_export_batch_size,
                "tracing.max_export_batch_size",
                "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
                DEFAULT_MAX_EXPORT_BATCH_SIZE,
                &env,
            )
            .min(max_queue_size);
        let schedule_delay = match f.schedule_delay {
            Some(d) => self.duration("tracing.schedule_delay", Some(&d), DEFAULT_SCHEDULE_DELAY),
            None => env("OTEL_BSP_SCHEDULE_DELAY").map_or(DEFAULT_SCHEDULE_DELAY, |v| {
                self.millis("OTEL_BSP_SCHEDULE_DELAY", &v, DEFAULT_SCHEDULE_DELAY)
            }),
        };
        Some(TracingConfig {
            endpoint,
            headers: headers?,
            timeout,
            service_name,
            resource_attributes,
            sampler: sampler?,
            max_queue_size,
            schedule_delay,
            max_export_batch_size,
        })
    }

    /// The collector headers: the file's secret (`headers` / `headers_file`) or the variables.
    fn collector_headers(
        &mut self,
        inline: Option<String>,
        file: Option<std::path::PathBuf>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Option<Vec<(HeaderName, HeaderValue)>> {
        let (key, value): (&str, Secret) = if inline.is_some() || file.is_some() {
            let source = self.secret("tracing", "headers", inline, file, false)?;
            ("tracing.headers", source.current())
        } else {
            match pick(
                None,
                "",
                &[
                    "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
                    "OTEL_EXPORTER_OTLP_HEADERS",
                ],
                env,
            ) {
                Some((k, v)) => (k, Secret::new(v)),
                None => return Some(Vec::new()),
            }
        };
        match header_list(value.expose()) {
            Ok(h) => Some(h),
            Err(m) => {
                self.err(key, m);
                None
            }
        }
    }

    /// `OTEL_TRACES_SAMPLER(_ARG)` or the file's `sampler` / `sampler_arg`.
    fn sampler(
        &mut self,
        name: Option<String>,
        arg: Option<f64>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Option<Sampler> {
        let (name_key, name) = pick(name, "tracing.sampler", &["OTEL_TRACES_SAMPLER"], env)
            .unwrap_or(("tracing.sampler", "parentbased_always_on".into()));
        let (arg_key, arg) = match arg {
            Some(a) => ("tracing.sampler_arg", Some(a)),
            None => match env("OTEL_TRACES_SAMPLER_ARG") {
                Some(v) => match v.trim().parse::<f64>() {
                    Ok(a) => ("OTEL_TRACES_SAMPLER_ARG", Some(a)),
                    Err(_) => {
                        self.err("OTEL_TRACES_SAMPLER_ARG", "must be a number from 0 to 1");
                        return None;
                    }
                },
                None => ("tracing.sampler_arg", None),
            },
        };
        let ratio = arg.unwrap_or(1.0);
        let ratio_ok = (0.0..=1.0).contains(&ratio);
        let sampler = match name.trim() {
            "always_on" => Sampler::AlwaysOn,
            "always_off" => Sampler::AlwaysOff,
            "traceidratio" => Sampler::TraceIdRatio(ratio),
            "parentbased_always_on" => Sampler::ParentBased(ParentRoot::AlwaysOn),
            "parentbased_always_off" => Sampler::ParentBased(ParentRoot::AlwaysOff),
            "parentbased_traceidratio" => Sampler::ParentBased(ParentRoot::TraceIdRatio(ratio)),
            _ => {
                self.err(
                    name_key,
                    "is not a supported sampler (always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off, parentbased_traceidratio)",
                );
                return None;
            }
        };
        if !ratio_ok {
            self.err(arg_key, "must be a number from 0 to 1");
            return None;
        }
        Some(sampler)
    }

    /// A positive count from the file or its variable.
    fn count(
        &mut self,
        file: Option<usize>,
        key: &str,
        var: &str,
        default: usize,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> usize {
        let (key, v) = match file {
            Some(v) => (key, Some(v)),
            None => match env(var) {
                Some(s) => (var, s.trim().parse::<usize>().ok().or(Some(0))),
                None => (key, None),
            },
        };
        match v {
            None => default,
            Some(0) => {
                self.err(key, "must be a whole number greater than zero");
                default
            }
            Some(n) => n,
        }
    }

    /// A duration in whole milliseconds (the `OTEL_*` variables' unit).
    fn millis(&mut self, key: &str, v: &str, default: Duration) -> Duration {
        match v.trim().parse::<u64>() {
            Ok(ms) if ms > 0 => Duration::from_millis(ms),
            _ => {
                self.err(
                    key,
                    "must be a whole number of milliseconds greater than zero",
                );
                default
            }
        }
    }
}

/// The file's value (under `key`) or the first variable of `vars` that is set, with the key
/// or variable it came from.
fn pick<'k>(
    file: Option<String>,
    key: &'k str,
    vars: &[&'k str],
    env: &dyn Fn(&str) -> Option<String>,
) -> Option<(&'k str, String)> {
    if let Some(v) = file {
        return Some((key, v));
    }
    vars.iter().find_map(|var| env(var).map(|v| (*var, v)))
}

/// The traces URL: `http(s)://host[:port][/path]`, no credentials; a base endpoint gets
/// `/v1/traces` appended (the OTLP rule for `OTEL_EXPORTER_OTLP_ENDPOINT`).
fn traces_url(raw: &str, base: bool) -> Result<String, String> {
    let raw = raw.trim();
    let uri: http::Uri = raw
        .parse()
        .map_err(|_| "is not a URL like http://otel-collector:4318".to_string())?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err("must start with http:// or https://".into()),
    }
    let Some(authority) = uri.authority() else {
        return Err("names no host".into());
    };
    if authority.as_str().contains('@') {
        return Err("must not carry credentials; put an API key in tracing.headers".into());
    }
    if !base {
        return Ok(raw.to_string());
    }
    let path = uri.path().trim_end_matches('/');
    let query = uri.query().map_or(String::new(), |q| format!("?{q}"));
    Ok(format!(
        "{}://{}{path}/v1/traces{query}",
        uri.scheme_str().unwrap_or("http"),
        authority
    ))
}

/// `key=value,key2=value2` (W3C baggage syntax, values percent-decoded) as header pairs; the
/// error never quotes a value.
fn header_list(s: &str) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
    key_values(s)?
        .into_iter()
        .enumerate()
        .map(|(i, (k, v))| {
            let name = HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| format!("entry {} has an invalid header name", i + 1))?;
            let mut value = HeaderValue::from_str(&v)
                .map_err(|_| format!("entry {} has an invalid header value", i + 1))?;
            value.set_sensitive(true);
            Ok((name, value))
        })
        .collect()
}

/// `key=value,…` with percent-decoded values; empty entries are skipped. The error names the
/// entry by position, never its text.
fn key_values(s: &str) -> Result<Vec<(String, String)>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .enumerate()
        .map(|(i, entry)| {
            let (k, v) = entry
                .split_once('=')
                .ok_or_else(|| format!("entry {} is not key=value", i + 1))?;
            let k = k.trim();
            if k.is_empty() {
                return Err(format!("entry {} has an empty key", i + 1));
            }
            let v = percent_decode(v.trim())
                .ok_or_else(|| format!("entry {} has a malformed %-escape", i + 1))?;
            Ok((k.to_string(), v))
        })
        .collect()
}

/// `%XX` escapes decoded; `None` for a malformed escape or a result that is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::testing::MINIMAL;
    use super::super::Config;
    use super::*;

    /// Loads `MINIMAL` plus `section`, with `vars` as the environment (and `PW`).
    fn load(section: &str, vars: &[(&str, &str)]) -> Result<Config, Vec<(String, String)>> {
        let text = format!("{MINIMAL}\n{section}");
        let env = |name: &str| -> Option<String> {
            if name == "PW" {
                return Some("s3cret-value".into());
            }
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        };
        Config::from_toml_with_otel(Path::new("/etc/finhub/proxy.toml"), &text, &env, &env)
            .map_err(|e| e.0.into_iter().map(|e| (e.key, e.message)).collect())
    }

    fn on(section: &str, vars: &[(&str, &str)]) -> TracingConfig {
        load(section, vars).unwrap().tracing.expect("tracing on")
    }

    #[test]
    fn off_without_an_endpoint() {
        assert!(load("", &[]).unwrap().tracing.is_none());
        assert!(load("[tracing]\nsampler = \"always_on\"", &[])
            .unwrap()
            .tracing
            .is_none());
        let vars = [("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318")];
        assert!(load("", &[("OTEL_SDK_DISABLED", "true"), vars[0]])
            .unwrap()
            .tracing
            .is_none());
        assert!(load("[tracing]\nenabled = false", &vars)
            .unwrap()
            .tracing
            .is_none());
        assert!(load("", &[("OTEL_TRACES_EXPORTER", "none"), vars[0]])
            .unwrap()
            .tracing
            .is_none());
    }

    #[test]
    fn environment_turns_it_on_with_otel_defaults() {
        let t = on(
            "",
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")],
        );
        assert_eq!(t.endpoint, "http://collector:4318/v1/traces");
        assert_eq!(t.sampler, Sampler::ParentBased(ParentRoot::AlwaysOn));
        assert_eq!(t.service_name, "finhub-sidecar");
        assert_eq!(t.max_queue_size, 2048);
        assert_eq!(t.max_export_batch_size, 512);
        assert_eq!(t.schedule_delay, Duration::from_secs(5));
        assert_eq!(t.timeout, Duration::from_secs(10));
        let t = on(
            "",
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://wrong:4318"),
                (
                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                    "https://c:4318/custom",
                ),
                ("OTEL_TRACES_SAMPLER", "traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
                ("OTEL_BSP_MAX_QUEUE_SIZE", "100"),
                ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "1000"),
                ("OTEL_BSP_SCHEDULE_DELAY", "250"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "1500"),
                ("OTEL_SERVICE_NAME", "payments-sidecar"),
                (
                    "OTEL_RESOURCE_ATTRIBUTES",
                    "k8s.pod.name=p-1,deployment.environment=prod",
                ),
                (
                    "OTEL_EXPORTER_OTLP_HEADERS",
                    "x-api-key=abc%3D%3D,x-team=pay",
                ),
            ],
        );
        assert_eq!(t.endpoint, "https://c:4318/custom");
        assert_eq!(t.sampler, Sampler::TraceIdRatio(0.25));
        assert_eq!(t.max_queue_size, 100);
        assert_eq!(t.max_export_batch_size, 100, "capped at the queue size");
        assert_eq!(t.schedule_delay, Duration::from_millis(250));
        assert_eq!(t.timeout, Duration::from_millis(1500));
        assert_eq!(t.service_name, "payments-sidecar");
        assert_eq!(
            t.resource_attributes[0],
            ("k8s.pod.name".into(), "p-1".into())
        );
        assert_eq!(t.headers[0].0, "x-api-key");
        assert_eq!(t.headers[0].1, "abc==");
        assert!(t.headers[0].1.is_sensitive());
        assert!(!format!("{t:?}").contains("abc=="), "headers are redacted");
    }

    #[test]
    fn the_file_wins_over_the_environment() {
        let t = on(
            "[tracing]\nendpoint = \"http://file:4318\"\nsampler = \"always_off\"\nmax_queue_size = 10\nservice_name = \"from-file\"\nheaders = \"${HDR}\"\nschedule_delay = \"1s\"\ntimeout = \"2s\"",
            &[
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://env:4318/v1/traces"),
                ("OTEL_TRACES_SAMPLER", "always_on"),
                ("OTEL_BSP_MAX_QUEUE_SIZE", "99"),
                ("OTEL_SERVICE_NAME", "from-env"),
                ("OTEL_EXPORTER_OTLP_HEADERS", "x-api-key=env"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "9000"),
                ("HDR", "x-api-key=file"),
            ],
        );
        assert_eq!(t.endpoint, "http://file:4318/v1/traces");
        assert_eq!(t.sampler, Sampler::AlwaysOff);
        assert_eq!(t.max_queue_size, 10);
        assert_eq!(t.service_name, "from-file");
        assert_eq!(t.headers[0].1, "file");
        assert_eq!(t.schedule_delay, Duration::from_secs(1));
        assert_eq!(t.timeout, Duration::from_secs(2));
    }

    #[test]
    fn mistakes_name_the_key_or_variable_without_echoing_secrets() {
        let keys = |section: &str, vars: &[(&str, &str)]| -> Vec<String> {
            load(section, vars)
                .unwrap_err()
                .into_iter()
                .map(|e| e.0)
                .collect()
        };
        assert_eq!(
            keys("[tracing]\nendpoint = \"ftp://c\"", &[]),
            ["tracing.endpoint"]
        );
        assert_eq!(
            keys(
                "[tracing]\ntraces_endpoint = \"http://user:pw@c:4318\"",
                &[]
            ),
            ["tracing.traces_endpoint"]
        );
        assert_eq!(
            keys("", &[("OTEL_EXPORTER_OTLP_ENDPOINT", "not a url")]),
            ["OTEL_EXPORTER_OTLP_ENDPOINT"]
        );
        let ep = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318");
        assert_eq!(
            keys("", &[ep, ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]),
            ["OTEL_EXPORTER_OTLP_PROTOCOL"]
        );
        assert_eq!(
            keys("", &[ep, ("OTEL_TRACES_SAMPLER", "jaeger_remote")]),
            ["OTEL_TRACES_SAMPLER"]
        );
        assert_eq!(
            keys(
                "",
                &[
                    ep,
                    ("OTEL_TRACES_SAMPLER", "traceidratio"),
                    ("OTEL_TRACES_SAMPLER_ARG", "2")
                ]
            ),
            ["OTEL_TRACES_SAMPLER_ARG"]
        );
        assert_eq!(
            keys("[tracing]\nsampler_arg = -0.5", &[ep]),
            ["tracing.sampler_arg"]
        );
        assert_eq!(
            keys("[tracing]\nmax_queue_size = 0", &[ep]),
            ["tracing.max_queue_size"]
        );
        assert_eq!(
            keys("[tracing]\nmax_queue_size = 1000000", &[ep]),
            ["tracing.max_queue_size"]
        );
        assert_eq!(
            keys("", &[ep, ("OTEL_BSP_SCHEDULE_DELAY", "5s")]),
            ["OTEL_BSP_SCHEDULE_DELAY"]
        );
        assert_eq!(
            keys("", &[ep, ("OTEL_TRACES_EXPORTER", "zipkin")]),
            ["OTEL_TRACES_EXPORTER"]
        );
        assert_eq!(keys("[tracing]\nfoo = 1", &[ep]), ["tracing.foo"]);
        // A header list that does not parse: the key is named, the secret never quoted.
        let e = load(
            "",
            &[
                ep,
                ("OTEL_EXPORTER_OTLP_HEADERS", "x-api-key:topsecret-value"),
            ],
        )
        .unwrap_err();
        assert_eq!(e[0].0, "OTEL_EXPORTER_OTLP_HEADERS");
        assert!(!e[0].1.contains("topsecret"), "{e:?}");
        let e = load("[tracing]\nheaders = \"x-api-key=topsecret\"", &[ep]).unwrap_err();
        assert_eq!(e[0].0, "tracing.headers");
        assert!(!e[0].1.contains("topsecret"), "{e:?}");
        let e = load(
            "",
            &[ep, ("OTEL_EXPORTER_OTLP_HEADERS", "bad name=topsecret\n")],
        )
        .unwrap_err();
        assert!(!e[0].1.contains("topsecret"), "{e:?}");
    }

    #[test]
    fn key_value_lists_decode_percent_escapes() {
        assert_eq!(
            key_values(" a=1 , ,b=%20x%2C").unwrap(),
            [
                ("a".to_string(), "1".to_string()),
                ("b".into(), " x,".into())
            ]
        );
        assert!(key_values("a=%zz").is_err());
        assert!(key_values("=1").is_err());
        assert!(key_values("a").is_err());
    }
}
