//! Background tasks that must outlive a bug: [`supervise`] runs a task and starts it again if it
//! panics, after a pause, until it returns normally.

use std::future::Future;
use std::time::Duration;

/// Runs the task `make()` builds until it returns; if it panics, logs `what` and starts a new one
/// after `pause` (a panicking task never spins).
pub async fn supervise<F, Fut>(what: &str, pause: Duration, mut make: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        match tokio::spawn(make()).await {
            Err(e) if e.is_panic() => {
                tracing::error!(task = what, "background task panicked; restarting it");
                tokio::time::sleep(pause).await;
            }
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn a_panicking_task_is_restarted_until_it_returns() {
        let runs = Arc::new(AtomicU32::new(0));
        let r = runs.clone();
        tokio::time::timeout(
            Duration::from_secs(5),
            supervise("test", Duration::from_millis(1), move || {
                let r = r.clone();
                async move {
                    if r.fetch_add(1, Ordering::SeqCst) < 2 {
                        panic!("a bug");
                    }
                }
            }),
        )
        .await
        .expect("supervise returns once the task does");
        assert_eq!(runs.load(Ordering::SeqCst), 3);
    }
}
