//! Pure: whether this host is fit to hold the VIP, with hysteresis so a flapping check does not
//! flap the VIP. The proxy is unfit while a cluster behind a primary listener has no routable
//! primary or its etcd is unreachable; the state only changes after the condition has held
//! for `fall` (to unhealthy) or `rise` (back to healthy).

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
pub struct Health {
    fall: Duration,
    rise: Duration,
    healthy: bool,
    /// Since when the observations have disagreed with `healthy`.
    since: Option<Instant>,
}

impl Health {
    pub fn new(fall: Duration, rise: Duration) -> Health {
        Health { fall, rise, healthy: true, since: None }
    }

    /// Reload: new thresholds, applied to the observations already under way.
    pub fn set_thresholds(&mut self, fall: Duration, rise: Duration) {
        self.fall = fall;
        self.rise = rise;
    }

    pub fn healthy(&self) -> bool {
        self.healthy
    }

    /// Records one observation; returns the (possibly new) verdict.
    pub fn observe(&mut self, now: Instant, ok: bool) -> bool {
        if ok == self.healthy {
            self.since = None;
            return self.healthy;
        }
        let since = *self.since.get_or_insert(now);
        let need = if ok { self.rise } else { self.fall };
        if now - since >= need {
            self.healthy = ok;
            self.since = None;
        }
        self.healthy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hysteresis() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut h = Health::new(3 * s, 5 * s);
        assert!(h.observe(t0, false));
        assert!(h.observe(t0 + 2 * s, false), "not yet");
        assert!(h.observe(t0 + 2 * s + s / 2, true), "a good observation resets the count");
        assert!(h.observe(t0 + 3 * s, false));
        assert!(!h.observe(t0 + 6 * s, false), "3 s of failure");
        assert!(!h.observe(t0 + 7 * s, true));
        assert!(!h.observe(t0 + 11 * s, true));
        assert!(h.observe(t0 + 12 * s, true), "5 s of success");
    }

    #[test]
    fn new_thresholds_apply_to_the_run_under_way() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut h = Health::new(10 * s, 10 * s);
        assert!(h.observe(t0, false));
        assert!(h.observe(t0 + 2 * s, false));
        h.set_thresholds(2 * s, 10 * s);
        assert!(!h.observe(t0 + 2 * s, false), "2 s of failure already seen");
    }
}
