//! Waiting for a condition with a deadline.

use std::time::{Duration, Instant};

/// Polls `f` every 100 ms until it returns `Some`; panics (failing the
/// test) naming `what` once `timeout` has passed.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_value_and_times_out() {
        let mut n = 0;
        assert_eq!(
            wait_for(Duration::from_secs(5), "three calls", || {
                n += 1;
                (n == 3).then_some(n)
            }),
            3
        );
        let r = std::panic::catch_unwind(|| {
            wait_for(Duration::from_millis(50), "never", || None::<()>)
        });
        assert!(r.is_err());
    }
}
