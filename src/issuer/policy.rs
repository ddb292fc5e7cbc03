//! Which partners an onboarding event goes to: pure, so the policy rules are unit-tested row by row.
//!
//! A partner receives an event when its policy accepts the event's status (either casing) and session kind. An event
//! may narrow the set with `partners` (application ids); a partner it names still has to accept the event — a
//! partner's policy is what that partner agreed to receive. Ids the event names that are not configured are
//! reported so they can be dead-lettered as `unknown_partner` instead of vanishing. A retried event carries the
//! partners still to be served in a header; everything else was already served or dead-lettered.

use crate::config::PartnerConfig;
use crate::didit::wire::{SessionKind, SessionStatus};

/// The partners one event goes to.
#[derive(Debug, PartialEq)]
pub struct Selection<'a> {
    /// Partners to mint a token for.
    pub partners: Vec<&'a PartnerConfig>,
    /// Application ids the event named that no `[[issuer.partners]]` entry has.
    pub unknown: Vec<String>,
    /// Partners the event named whose policy refuses this status or kind.
    pub refused: Vec<&'a PartnerConfig>,
}

/// Picks the partners for an event. `requested` is the event's `partners` field; `pending` the retry header's list.
pub fn select<'a>(
    partners: &'a [PartnerConfig],
    status: SessionStatus,
    kind: SessionKind,
    requested: Option<&[String]>,
    pending: Option<&[String]>,
) -> Selection<'a> {
    let mut selection = Selection {
        partners: Vec::new(),
        unknown: Vec::new(),
        refused: Vec::new(),
    };
    if let Some(pending) = pending {
        // A retry: serve exactly the partners that were still pending (they were selected by policy before).
        selection.partners = partners
            .iter()
            .filter(|p| pending.contains(&p.application_id))
            .collect();
        return selection;
    }
    match requested {
        None => {
            selection.partners = partners
                .iter()
                .filter(|p| p.accepts(status, kind))
                .collect();
        }
        Some(ids) => {
            let mut seen = Vec::new();
            for id in ids {
                if seen.contains(&id) {
                    continue;
                }
                seen.push(id);
                match partners.iter().find(|p| &p.application_id == id) {
                    Some(p) if p.accepts(status, kind) => selection.partners.push(p),
                    Some(p) => selection.refused.push(p),
                    None => selection.unknown.push(id.clone()),
                }
            }
        }
    }
    selection
}

#[cfg(test)]
mod tests {
    use super::*;

    fn partner(name: &str, id: &str, statuses: &[&str], kinds: &[SessionKind]) -> PartnerConfig {
        PartnerConfig {
            name: name.into(),
            application_id: id.into(),
            ttl_seconds: 3600,
            statuses: statuses.iter().map(|s| s.to_string()).collect(),
            session_kinds: kinds.to_vec(),
            share_vendor_data: false,
            public_keys: Vec::new(),
            public_key_files: Vec::new(),
            tokens_url: None,
            tokens_url_file: None,
            agreement_id: None,
        }
    }

    fn fixture() -> Vec<PartnerConfig> {
        vec![
            partner(
                "bank",
                "a",
                &["Approved"],
                &[SessionKind::User, SessionKind::Business],
            ),
            partner(
                "broker",
                "b",
                &["APPROVED", "In Review"],
                &[SessionKind::User],
            ),
            partner(
                "kyb-only",
                "c",
                &["Approved", "Declined"],
                &[SessionKind::Business],
            ),
        ]
    }

    fn names(s: &Selection) -> Vec<String> {
        s.partners.iter().map(|p| p.name.clone()).collect()
    }

    #[test]
    fn policy_matches_status_in_either_casing_and_kind() {
        let ps = fixture();
        let s = select(&ps, SessionStatus::Approved, SessionKind::User, None, None);
        assert_eq!(names(&s), ["bank", "broker"]);
        let s = select(
            &ps,
            SessionStatus::Approved,
            SessionKind::Business,
            None,
            None,
        );
        assert_eq!(names(&s), ["bank", "kyb-only"]);
        let s = select(&ps, SessionStatus::InReview, SessionKind::User, None, None);
        assert_eq!(names(&s), ["broker"]);
        let s = select(&ps, SessionStatus::Declined, SessionKind::User, None, None);
        assert!(s.partners.is_empty());
    }

    #[test]
    fn requested_partners_narrow_and_unknown_ones_are_reported() {
        let ps = fixture();
        let req = vec![
            "b".to_string(),
            "zzz".to_string(),
            "c".to_string(),
            "b".to_string(),
        ];
        let s = select(
            &ps,
            SessionStatus::Approved,
            SessionKind::User,
            Some(&req),
            None,
        );
        assert_eq!(names(&s), ["broker"]);
        assert_eq!(s.unknown, vec!["zzz".to_string()]);
        assert_eq!(s.refused.len(), 1);
        assert_eq!(s.refused[0].name, "kyb-only");
    }

    #[test]
    fn a_retry_serves_only_the_pending_partners() {
        let ps = fixture();
        let pending = vec!["a".to_string()];
        let s = select(
            &ps,
            SessionStatus::Approved,
            SessionKind::User,
            None,
            Some(&pending),
        );
        assert_eq!(names(&s), ["bank"]);
    }
}
