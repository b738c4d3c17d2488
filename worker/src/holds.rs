//! What a worker holds besides its slots: the jobs it is claiming or running (by attempt), and
//! the cancel notices of jobs that are not running here (yet).

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;
use uuid::Uuid;

/// The claims this worker holds, from before the claim is sent to the end of the run: a claim
/// found held by this worker's own id is run only if it is not in here (its reply was lost),
/// else it is a duplicate delivery. Each is kept with the attempt running (0 while claiming),
/// so that the end of a stale run never lets go of a newer attempt of the same job that this
/// worker claimed meanwhile (a stall past two leases: the newer one would then be taken for a
/// lost reply and run twice).
#[derive(Default)]
pub(crate) struct Claims(Mutex<HashMap<Uuid, i32>>);

impl Claims {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, i32>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes hold of a job before claiming it: false when this worker already holds it.
    pub fn hold(&self, id: Uuid) -> bool {
        take(&mut self.map(), id)
    }

    /// [`Claims::hold`] for many under one lock; returns those taken.
    pub fn hold_many(&self, ids: impl IntoIterator<Item = Uuid>) -> Vec<Uuid> {
        let mut m = self.map();
        ids.into_iter().filter(|id| take(&mut m, *id)).collect()
    }

    /// `attempt` of the job runs here now (a newer attempt takes over from an older one).
    pub fn running(&self, id: Uuid, attempt: i32) {
        self.map().insert(id, attempt);
    }

    /// A claim of `attempt` found held by this worker's own id: taken as this hold's own
    /// claim whose reply was lost only while the hold is still claiming (not when another
    /// delivery of the job claimed it and runs it meanwhile).
    pub fn adopt(&self, id: Uuid, attempt: i32) -> bool {
        let mut m = self.map();
        match m.get_mut(&id) {
            Some(v) if *v == 0 => {
                *v = attempt;
                true
            }
            _ => false,
        }
    }

    /// Lets go of a hold whose claim ran nothing.
    pub fn release(&self, id: Uuid) {
        let mut m = self.map();
        if m.get(&id) == Some(&0) {
            m.remove(&id);
        }
    }

    /// Lets go of `attempt`'s run, unless a newer attempt took over.
    pub fn finished(&self, id: Uuid, attempt: i32) {
        let mut m = self.map();
        if m.get(&id) == Some(&attempt) {
            m.remove(&id);
        }
    }

    /// The attempt held for `id` (0: claiming), if any.
    #[cfg(test)]
    fn get(&self, id: Uuid) -> Option<i32> {
        self.map().get(&id).copied()
    }
}

/// Holds `id` as claiming (0) unless it is held already.
fn take(m: &mut HashMap<Uuid, i32>, id: Uuid) -> bool {
    match m.entry(id) {
        Entry::Vacant(v) => {
            v.insert(0);
            true
        }
        Entry::Occupied(_) => false,
    }
}

/// How long a cancel notice waits for its run to register.
const NOTICE_TTL: Duration = Duration::from_secs(30);
/// Notices kept at most (the oldest go first).
const MAX_NOTICES: usize = 10_000;

/// Cancel notices for jobs not running here: a run that registers right after its notice
/// arrived still sees it. Every worker hears every cancel, so expiry is amortized (notices in
/// arrival order) rather than a scan of all of them per notice.
#[derive(Default)]
pub(crate) struct RecentCancels {
    at: HashMap<Uuid, Instant>,
    order: VecDeque<(Instant, Uuid)>,
}

impl RecentCancels {
    pub fn insert(&mut self, id: Uuid, now: Instant) {
        while let Some(&(t, old)) = self.order.front() {
            if now.duration_since(t) < NOTICE_TTL && self.order.len() < MAX_NOTICES {
                break;
            }
            self.order.pop_front();
            // a notice for the same job heard again since is newer: it stays
            if self.at.get(&old) == Some(&t) {
                self.at.remove(&old);
            }
        }
        self.at.insert(id, now);
        self.order.push_back((now, id));
    }

    /// Whether a notice for `id` arrived in the last 30 s (and forgets it).
    pub fn take(&mut self, id: Uuid, now: Instant) -> bool {
        self.at
            .remove(&id)
            .is_some_and(|t| now.duration_since(t) < NOTICE_TTL)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.at.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_run_ending_keeps_a_newer_attempt_held() {
        let c = Claims::default();
        let id = Uuid::now_v7();
        assert!(c.hold(id));
        assert!(!c.hold(id), "held while claiming");
        assert!(c.adopt(id, 1), "a lost reply of this hold's own claim");
        assert!(!c.adopt(id, 1), "once");
        c.running(id, 1);
        // attempt 2 claimed here while attempt 1 still runs (after a stall)
        c.running(id, 2);
        c.finished(id, 1);
        assert_eq!(c.get(id), Some(2), "attempt 2 still held");
        assert!(!c.hold(id), "a duplicate delivery is not a lost reply");
        c.release(id);
        assert_eq!(c.get(id), Some(2), "a release lets go of a claim only");
        c.finished(id, 2);
        assert_eq!(c.get(id), None);
        assert_eq!(c.hold_many([id, id]), vec![id]);
        c.release(id);
        assert_eq!(c.get(id), None);
    }

    #[test]
    fn cancel_notices_expire_in_order_and_stay_bounded() {
        let mut r = RecentCancels::default();
        let t0 = Instant::now();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        r.insert(a, t0);
        r.insert(b, t0 + Duration::from_secs(20));
        // a is heard again: its newer notice survives the old one's expiry
        r.insert(a, t0 + Duration::from_secs(25));
        r.insert(Uuid::now_v7(), t0 + Duration::from_secs(31));
        assert!(r.take(a, t0 + Duration::from_secs(31)));
        assert!(!r.take(a, t0 + Duration::from_secs(31)), "taken once");
        assert!(!r.take(b, t0 + Duration::from_secs(51)), "expired");
        for i in 0..(MAX_NOTICES as u64 + 50) {
            r.insert(Uuid::now_v7(), t0 + Duration::from_millis(40_000 + i));
        }
        assert!(r.len() <= MAX_NOTICES);
        assert!(r.order.len() <= MAX_NOTICES);
    }
}
