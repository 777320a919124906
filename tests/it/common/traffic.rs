//! Continuous traffic through the sidecar: `workers` loops of `GET /api/v2/accounts` until
//! stopped, recording each answer (send time, the client-certificate serial FinHub saw) and
//! counting failures (any non-200 or transport error, printed as it happens).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use finhub_testkit::emulator::Emulator;

use super::{eventually, http_client, SidecarProcess};

/// One answered request: when it was sent and the certificate serial FinHub saw.
pub type Answer = (Instant, String);

/// Traffic in the background; stop it with [`Traffic::stop`].
pub struct Traffic {
    stop: Arc<AtomicBool>,
    failures: Arc<AtomicU64>,
    answers: Arc<Mutex<Vec<Answer>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// What a stopped [`Traffic`] saw.
pub struct TrafficReport {
    /// Requests that did not get a 200.
    pub failures: u64,
    /// Every 200, in the order they were recorded.
    pub answers: Vec<Answer>,
}

impl Traffic {
    /// `workers` loops, each waiting `pause` between its requests (`Duration::ZERO`: none).
    pub fn start(sc: &SidecarProcess, workers: usize, pause: Duration) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(AtomicU64::new(0));
        let answers = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..workers)
            .map(|_| {
                let (stop, failures, answers) = (stop.clone(), failures.clone(), answers.clone());
                let url = sc.url("/api/v2/accounts");
                tokio::spawn(async move {
                    let client = http_client();
                    while !stop.load(Ordering::SeqCst) {
                        let sent = Instant::now();
                        match client.get(&url).send().await {
                            Ok(r) if r.status() == 200 => {
                                let v: Value = r.json().await.unwrap_or_default();
                                let serial = v["client_cert"]["serial_hex"]
                                    .as_str()
                                    .unwrap_or("")
                                    .to_string();
                                answers.lock().unwrap().push((sent, serial));
                            }
                            Ok(r) => {
                                eprintln!(
                                    "traffic: status {}: {}",
                                    r.status(),
                                    r.text().await.unwrap_or_default()
                                );
                                failures.fetch_add(1, Ordering::SeqCst);
                            }
                            Err(e) => {
                                eprintln!("traffic: {e}");
                                failures.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                        if !pause.is_zero() {
                            tokio::time::sleep(pause).await;
                        }
                    }
                })
            })
            .collect();
        Traffic {
            stop,
            failures,
            answers,
            tasks,
        }
    }

    /// Whether FinHub has seen the certificate with this serial on an answered request.
    pub fn seen(&self, serial: &str) -> bool {
        self.answers
            .lock()
            .unwrap()
            .iter()
            .any(|(_, s)| s == serial)
    }

    /// Waits (polling, up to `within`) until [`Traffic::seen`] the serial.
    pub async fn wait_seen(&self, serial: &str, within: Duration) -> bool {
        eventually(within, || async { self.seen(serial).then_some(()) })
            .await
            .is_some()
    }

    /// How many requests were answered with 200 so far.
    pub fn answered(&self) -> usize {
        self.answers.lock().unwrap().len()
    }

    /// Stops every worker (each finishes its request in flight) and reports.
    pub async fn stop(self) -> TrafficReport {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            t.await.unwrap();
        }
        let answers = self.answers.lock().unwrap().clone();
        TrafficReport {
            failures: self.failures.load(Ordering::SeqCst),
            answers,
        }
    }
}

/// Makes the emulator answer after `delay`, sends one `GET /api/v2/slow` and waits until the
/// sidecar counts it in flight; the handle yields its status. Reset the delay when done.
pub async fn slow_request_in_flight(
    sc: &SidecarProcess,
    emu: &Emulator,
    delay: Duration,
) -> tokio::task::JoinHandle<reqwest::Result<u16>> {
    emu.controls().set_delay(delay);
    let (client, url) = (http_client(), sc.url("/api/v2/slow"));
    let slow =
        tokio::spawn(async move { client.get(url).send().await.map(|r| r.status().as_u16()) });
    let in_flight = eventually(Duration::from_secs(5), || async {
        let v = sc.metric("finhub_sidecar_requests_in_flight").await?;
        (v >= 1.0).then_some(())
    })
    .await;
    assert!(in_flight.is_some(), "the slow request is in flight");
    slow
}
