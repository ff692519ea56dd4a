//! Passive failure detection (docs/operations.md, "Passive detection"): the datapath counts, per
//! backend, its new flows and what became of them (`xdp_common::Signals`:
//! answered, refused, SYN retransmitted). Every [`PERIOD`] the detector
//! samples each active backend and looks at its most recent new flows
//! that are old enough to have been answered (the service's
//! `unanswered_after`); a burst of unanswered, refused or retransmitted
//! ones makes it a suspect, and the daemon has the health checker probe it
//! at once (`HealthChecker::suspect`): only a failed probe takes it down.

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    time::{Duration, Instant},
};

use tracing::warn;
use xdp_common::{Signals, BACKEND_ACTIVE};

use crate::{config::UNANSWERED_AFTER, controller::Controller};

/// How often the detector may look (the daemon has it look less often when
/// judging every backend would exceed [`MAX_JUDGED`]).
pub const PERIOD: Duration = Duration::from_millis(25);
/// Backends the detector judges a second at most: it looks every
/// `backends / MAX_JUDGED` seconds past 250 backends (every second at
/// 10,000), so its cost stays bounded at any scale. A look reads all
/// backends' signals in one system call (about 3 ms of CPU at 10,000
/// backends, nearly all of it the kernel copying per-CPU values); looking
/// every 100 ms cost 7 % of a core when it read two maps.
pub const MAX_JUDGED: u32 = 10_000;
/// The judged window reaches at most this far back beyond
/// `unanswered_after` (enough flows to judge at 20 a second).
const WINDOW: Duration = Duration::from_millis(250);
/// Fewer new flows than this in the window say nothing either way.
const MIN_FLOWS: u64 = 4;
/// Refusals or SYN retransmissions within [`BAD_WINDOW`] that make a
/// suspect.
const MIN_BAD: u64 = 2;
const BAD_WINDOW: Duration = Duration::from_millis(200);
/// Least time between two suspicions of one backend (each costs a probe).
const SUSPECT_EVERY: Duration = Duration::from_secs(1);

/// One sample of a backend's counters.
#[derive(Clone, Copy, Debug)]
struct Sample {
    at: Instant,
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

/// What the detector keeps of one backend.
#[derive(Default)]
struct Watch {
    /// Recent samples, newest first.
    history: VecDeque<Sample>,
    suspected: Option<Instant>,
    /// The look that last saw it active.
    looked: u64,
}

/// Per backend id: recent samples and the last suspicion.
#[derive(Default)]
pub struct Detector {
    watched: HashMap<u32, Watch>,
    looks: u64,
}

impl Detector {
    /// Samples every active backend. Returns the new suspects, and how many
    /// backend ids a look reads (what its cost, and so its pace, scale with).
    pub fn tick(&mut self, controller: &Controller, now: Instant) -> (Vec<Suspicion>, usize) {
        let count = controller
            .services()
            .flat_map(|s| s.backends.values().map(|b| b.id + 1))
            .max()
            .unwrap_or(0);
        let Ok(samples) = controller
            .maps()
            .all_backend_signals(count)
            .inspect_err(|e| {
                warn!("passive detection: reading the backends' counters: {e:#}");
            })
        else {
            return (Vec::new(), count as usize);
        };
        self.looks += 1;
        let mut suspects = Vec::new();
        for service in controller.services() {
            let grace = service.config.health_check.unanswered_after;
            for b in service.backends.values() {
                if b.state != BACKEND_ACTIVE || !b.healthy {
                    continue;
                }
                let watch = self.watched.entry(b.id).or_default();
                watch.looked = self.looks;
                let signals = samples.get(b.id as usize).copied().unwrap_or_default();
                let history = &mut watch.history;
                // Counters that did not move in all the history kept (they
                // only grow, so the oldest and newest say it) say nothing:
                // only the newest sample's time moves on, and an idle
                // backend costs a comparison, not a judgement.
                let quiet = history.len() >= 2
                    && history.front().is_some_and(|s| s.signals == signals)
                    && history.back().is_some_and(|s| s.signals == signals);
                if quiet {
                    history[0].at = now;
                } else {
                    history.push_front(Sample { at: now, signals });
                }
                // What the oldest judgement needs, and no more.
                let keep = *UNANSWERED_AFTER.end() + WINDOW;
                while history.len() > 2 && history.back().is_some_and(|s| now - s.at > keep) {
                    history.pop_back();
                }
                if quiet {
                    continue;
                }
                let Some(why) = judge(history, grace) else {
                    continue;
                };
                let recent = watch
                    .suspected
                    .is_some_and(|t| now.duration_since(t) < SUSPECT_EVERY);
                if !recent {
                    watch.suspected = Some(now);
                    suspects.push(Suspicion {
                        service: service.config.name.clone(),
                        backend: (b.config.address, b.config.port),
                        why,
                    });
                }
            }
        }
        // Backends no longer active start afresh when they come back.
        self.watched.retain(|_, w| w.looked == self.looks);
        (suspects, count as usize)
    }
}

/// Whether `history` (newest first) looks like a dead backend, and why.
///
/// Unanswered: the most recent new flows that had at least `grace` to be
/// answered (at least [`MIN_FLOWS`] of them, opened within [`WINDOW`]
/// before that): more than half got no answer by now. A backend whose
/// clients often give up after their SYN (a fifth of them, say) is not a
/// suspect; one whose server is gone (its host resets every SYN, or
/// nothing answers) is, about `grace` plus the time it takes to get 4 new
/// flows after it died.
/// Refused and retransmitted: two or more within [`BAD_WINDOW`].
fn judge(history: &VecDeque<Sample>, grace: Duration) -> Option<String> {
    let now = history.front()?;
    let newest = now.signals;
    // The newest sample old enough: flows opened before it had `grace`.
    let b = history
        .iter()
        .position(|s| now.at.duration_since(s.at) >= grace)?;
    let edge = history[b];
    for start in history.iter().skip(b + 1) {
        if edge.at.duration_since(start.at) > WINDOW {
            break;
        }
        let opened = edge.signals.opened.saturating_sub(start.signals.opened);
        if opened < MIN_FLOWS {
            continue;
        }
        let answered = newest.confirmed.saturating_sub(start.signals.confirmed);
        let unanswered = opened.saturating_sub(answered);
        if unanswered * 2 > opened {
            return Some(format!(
                "{unanswered} of its {opened} newest flows unanswered after {} ms",
                grace.as_millis()
            ));
        }
        break;
    }
    let since = history
        .iter()
        .take_while(|s| now.at.duration_since(s.at) <= BAD_WINDOW)
        .last()?
        .signals;
    let refused = newest.refused.saturating_sub(since.refused);
    if refused >= MIN_BAD {
        return Some(format!("{refused} new flows refused (RST) in 200 ms"));
    }
    let retransmits = newest.syn_retransmits.saturating_sub(since.syn_retransmits);
    if retransmits >= MIN_BAD {
        return Some(format!("{retransmits} SYNs retransmitted in 200 ms"));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_millis(50);

    /// Samples every 25 ms, oldest first: (opened, confirmed).
    fn history(points: &[(u64, u64)]) -> VecDeque<Sample> {
        let t0 = Instant::now();
        points
            .iter()
            .enumerate()
            .map(|(i, &(opened, confirmed))| Sample {
                at: t0 + PERIOD * i as u32,
                signals: Signals {
                    opened,
                    confirmed,
                    ..Default::default()
                },
            })
            .rev()
            .collect()
    }

    #[test]
    fn a_dead_backend_is_suspected_and_a_lossy_one_is_not() {
        // 2 flows a sample; answered until the second sample, then none.
        let dead = history(&[(0, 0), (2, 2), (4, 2), (6, 2), (8, 2), (10, 2)]);
        let why = judge(&dead, GRACE).unwrap();
        assert!(why.contains("4 of its 4 newest flows"), "{why}");
        // A fifth of the clients give up after their SYN.
        let lossy = history(&[(0, 0), (10, 8), (20, 16), (30, 24), (40, 32)]);
        assert_eq!(judge(&lossy, GRACE), None);
        // Half of the 4 newest flows unanswered: not more than half.
        let half = history(&[(0, 0), (4, 0), (8, 0), (8, 2), (8, 2)]);
        assert_eq!(judge(&half, GRACE), None);
        // Too few flows to tell.
        let quiet = history(&[(0, 0), (1, 0), (2, 0), (3, 0)]);
        assert_eq!(judge(&quiet, GRACE), None);
        // Not old enough yet: the newest flows had less than the grace.
        assert_eq!(judge(&history(&[(0, 0), (10, 0)]), GRACE), None);
        // Clients that answer 75 ms late: the answers still arrive, and
        // count, so a live backend is not taken for a dead one.
        let slow = history(&[(0, 0), (4, 0), (8, 0), (12, 4), (16, 8), (20, 12)]);
        assert_eq!(judge(&slow, GRACE), None);
        // Nothing answered for long: suspected, whatever the grace.
        let silent = history(&[(0, 0), (4, 0), (8, 0), (12, 0), (16, 0), (20, 0)]);
        assert!(judge(&silent, Duration::from_millis(75)).is_some());
    }

    #[test]
    fn refusals_and_retransmissions_make_a_suspect() {
        let mut h = history(&[(0, 0), (10, 10), (20, 20), (30, 30)]);
        assert_eq!(judge(&h, GRACE), None);
        h[0].signals.refused = 2;
        assert!(judge(&h, GRACE).unwrap().contains("2 new flows refused"));
        h[0].signals.refused = 0;
        h[0].signals.syn_retransmits = 3;
        assert!(judge(&h, GRACE).unwrap().contains("3 SYNs retransmitted"));
    }
}
