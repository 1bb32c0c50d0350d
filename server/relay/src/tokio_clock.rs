//! What every tokio driver of a sans-IO core (this relay, the server's DTLS endpoint) needs from
//! tokio: the clock it feeds the core, and a sleep until the core's next timer.

use std::time::Instant;

/// Now, on tokio's clock, so that paused or simulated time reaches the core.
pub fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Sleeps until `deadline` (the core's `poll_timeout()`), or forever when there is none.
pub async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
        None => std::future::pending().await,
    }
}
