//! Pure pieces of the receiver's decisions: the `vendor_data` template, the workflow for a kind, and the mapping of a
//! dead-letter reason to the `import.result` outcome the receiver's backend sees.

use crate::didit::wire::SessionKind;
use crate::envelope::ImportOutcome;

/// Renders `receiver.vendor_data`: `{source_vendor_data}` (empty when the issuer did not share it),
/// `{source_session_id}`, `{issuer}` (the issuer's configured name). An empty result means "no vendor_data".
pub fn render_vendor_data(
    template: &str,
    source_vendor_data: Option<&str>,
    source_session_id: &str,
    issuer: &str,
) -> Option<String> {
    let rendered = template
        .replace("{source_vendor_data}", source_vendor_data.unwrap_or(""))
        .replace("{source_session_id}", source_session_id)
        .replace("{issuer}", issuer);
    let trimmed = rendered.trim();
    (!trimmed.is_empty()).then(|| trimmed.to_string())
}

/// The workflow an import of this kind lands in.
pub fn workflow_for(
    kind: SessionKind,
    user: Option<&str>,
    business: Option<&str>,
) -> Option<String> {
    match kind {
        SessionKind::User => user,
        SessionKind::Business => business,
    }
    .map(str::to_string)
}

/// The outcome reported for a dead-letter reason of an import (DESIGN.md §4).
pub fn outcome_for_reason(reason: &str) -> ImportOutcome {
    match reason {
        "misrouted" => ImportOutcome::Misrouted,
        "source_gone" => ImportOutcome::SourceGone,
        "expired" => ImportOutcome::Expired,
        _ => ImportOutcome::Rejected,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vendor_data_template() {
        assert_eq!(
            render_vendor_data("{source_vendor_data}", Some("user-42"), "s1", "fintech"),
            Some("user-42".into())
        );
        assert_eq!(
            render_vendor_data("{source_vendor_data}", None, "s1", "fintech"),
            None
        );
        assert_eq!(
            render_vendor_data("{issuer}:{source_session_id}", None, "s1", "fintech"),
            Some("fintech:s1".into())
        );
    }

    #[test]
    fn workflow_by_kind() {
        assert_eq!(
            workflow_for(SessionKind::User, Some("u"), Some("b")),
            Some("u".into())
        );
        assert_eq!(workflow_for(SessionKind::Business, Some("u"), None), None);
    }

    #[test]
    fn reasons_map_to_outcomes() {
        assert_eq!(outcome_for_reason("misrouted"), ImportOutcome::Misrouted);
        assert_eq!(outcome_for_reason("source_gone"), ImportOutcome::SourceGone);
        assert_eq!(outcome_for_reason("forbidden"), ImportOutcome::Rejected);
        assert_eq!(outcome_for_reason("rejected"), ImportOutcome::Rejected);
        assert_eq!(outcome_for_reason("expired"), ImportOutcome::Expired);
    }
}
