//! Passive failure detection (docs/operations.md, "Passive detection"): the datapath counts, per
//! backend, its new flows and what became of them (`xdp_common::Signals`:
//! answered, refused, SYN retransmitted). Every 100 ms the detector looks
//! at the last few hundred milliseconds of each active backend; a burst of
//! unanswered, refused or retransmitted new flows makes it a suspect, and
//! the daemon has the health checker probe it at once
//! (`HealthChecker::suspect`): only a failed probe takes it down.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    net::IpAddr,
    time::{Duration, Instant},
};

use xdp_common::{Signals, BACKEND_ACTIVE};

use crate::controller::Controller;

/// How often the detector looks.
pub const PERIOD: Duration = Duration::from_millis(100);
/// Samples kept per backend: now and two periods back.
const SAMPLES: usize = 3;
/// Fewer new flows than this in the window say nothing either way.
const MIN_FLOWS: u64 = 4;
/// Refusals or SYN retransmissions in the last 200 ms that make a suspect.
const MIN_BAD: u64 = 2;
/// Least time between two suspicions of one backend (each costs a probe).
const SUSPECT_EVERY: Duration = Duration::from_secs(1);

/// One sample of a backend's counters.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    opened: u64,
    signals: Signals,
}

/// A backend the traffic says may be dead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Suspicion {
    pub service: String,
    pub backend: (IpAddr, u16),
    /// The numbers behind it, for the log and the views.
    pub why: String,
}

/// Per backend id: recent samples and the last suspicion.
#[derive(Default)]
pub struct Detector {
    samples: HashMap<u32, VecDeque<Sample>>,
    last_suspected: HashMap<u32, Instant>,
}

impl Detector {
    /// Samples every active backend and returns the new suspects.
    pub fn tick(&mut self, controller: &Controller, now: Instant) -> Vec<Suspicion> {
        let maps = controller.maps();
        let mut seen = HashSet::new();
        let mut suspects = Vec::new();
        for service in controller.services() {
            for b in service.backends.values() {
                if b.state != BACKEND_ACTIVE || !b.healthy {
                    continue;
                }
                seen.insert(b.id);
                let sample = Sample {
                    opened: maps.backend_counters(b.id).map_or(0, |c| c.new_flows),
                    signals: maps.backend_signals(b.id).unwrap_or_default(),
                };
                let history = self.samples.entry(b.id).or_default();
                history.push_front(sample);
                history.truncate(SAMPLES);
                let Some(why) = judge(history) else {
                    continue;
                };
                let recent = self
                    .last_suspected
                    .get(&b.id)
                    .is_some_and(|t| now.duration_since(*t) < SUSPECT_EVERY);
                if !recent {
                    self.last_suspected.insert(b.id, now);
                    suspects.push(Suspicion {
                        service: service.config.name.clone(),
                        backend: (b.config.address, b.config.port),
                        why,
                    });
                }
            }
        }
        // Backends no longer active start afresh when they come back.
        self.samples.retain(|id, _| seen.contains(id));
        self.last_suspected.retain(|id, _| seen.contains(id));
        suspects
    }
}

/// Whether `history` (newest first) looks like a dead backend, and why.
///
/// Unanswered: of the flows opened between 200 and 100 ms ago (each had at
/// least 100 ms, hundreds of round trips on a LAN, to be answered), more
/// than half got no answer by now. A backend whose clients often give up
/// after their SYN (a fifth of them, say) is not a suspect; one whose
/// server is gone (its host resets every SYN, or nothing answers) is,
/// about 200 ms after it died, once it gets 40 new flows a second or more.
/// Refused and retransmitted: two or more in the last 200 ms.
fn judge(history: &VecDeque<Sample>) -> Option<String> {
    if history.len() < SAMPLES {
        return None;
    }
    let (now, before, oldest) = (history[0], history[1], history[SAMPLES - 1]);
    let opened = before.opened.saturating_sub(oldest.opened);
    let answered = now
        .signals
        .confirmed
        .saturating_sub(oldest.signals.confirmed);
    let unanswered = opened.saturating_sub(answered);
    if opened >= MIN_FLOWS && unanswered * 2 > opened {
        return Some(format!(
            "{unanswered} of {opened} new flows unanswered after 100-200 ms"
        ));
    }
    let recent = oldest;
    let refused = now.signals.refused.saturating_sub(recent.signals.refused);
    if refused >= MIN_BAD {
        return Some(format!("{refused} new flows refused (RST) in 200 ms"));
    }
    let retransmits = now
        .signals
        .syn_retransmits
        .saturating_sub(recent.signals.syn_retransmits);
    if retransmits >= MIN_BAD {
        return Some(format!("{retransmits} SYNs retransmitted in 200 ms"));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn history(points: &[(u64, u64)]) -> VecDeque<Sample> {
        // (opened, confirmed), oldest first.
        points
            .iter()
            .rev()
            .map(|&(opened, confirmed)| Sample {
                opened,
                signals: Signals {
                    confirmed,
                    ..Default::default()
                },
            })
            .collect()
    }

    #[test]
    fn a_dead_backend_is_suspected_and_a_lossy_one_is_not() {
        // 10 flows a period, none answered.
        let dead = history(&[(0, 0), (10, 0), (20, 0)]);
        assert!(
            judge(&dead).unwrap().contains("10 of 10"),
            "{:?}",
            judge(&dead)
        );
        // A fifth of the clients give up after their SYN.
        let lossy = history(&[(0, 0), (10, 8), (20, 16)]);
        assert_eq!(judge(&lossy), None);
        // Too few flows to tell.
        let quiet = history(&[(0, 0), (2, 0), (3, 0)]);
        assert_eq!(judge(&quiet), None);
        // Not enough history yet.
        assert_eq!(judge(&history(&[(0, 0), (10, 0)])), None);
    }

    #[test]
    fn refusals_and_retransmissions_make_a_suspect() {
        let mut h = history(&[(0, 0), (10, 10), (20, 20)]);
        assert_eq!(judge(&h), None);
        h[0].signals.refused = 2;
        assert!(judge(&h).unwrap().contains("2 new flows refused"));
        h[0].signals.refused = 0;
        h[0].signals.syn_retransmits = 3;
        assert!(judge(&h).unwrap().contains("3 SYNs retransmitted"));
    }
}
