//! Pure pieces of the receiver's decisions: the `vendor_data` template, the workflow for a kind, and the mapping of a
//! dead-letter reason to the `import.result` outcome the receiver's backend sees.

use crate::didit::wire::SessionKind;
use crate::envelope::ImportOutcome;

/// Renders `receiver.vendor_data`: `{source_vendor_data}` (empty when the issuer did not share it),
/// `{source_session_id}`, `{issuer}` (the issuer's configured name). An empty result means "no vendor_data".
///
/// One pass over the template: the values are data from the envelope, so a value that happens to contain
/// `{issuer}` or `{source_session_id}` is copied as it is, never expanded (which would change the entity id the
/// import lands on).
pub fn render_vendor_data(
    template: &str,
    source_vendor_data: Option<&str>,
    source_session_id: &str,
    issuer: &str,
) -> Option<String> {
    let placeholders = [
        ("{source_vendor_data}", source_vendor_data.unwrap_or("")),
        ("{source_session_id}", source_session_id),
        ("{issuer}", issuer),
    ];
    let mut rendered = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        rendered.push_str(&rest[..start]);
        let tail = &rest[start..];
        match placeholders.iter().find(|(name, _)| tail.starts_with(name)) {
            Some((name, value)) => {
                rendered.push_str(value);
                rest = &tail[name.len()..];
            }
            None => {
                rendered.push('{');
                rest = &tail[1..];
            }
        }
    }
    rendered.push_str(rest);
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
    fn vendor_data_values_are_never_expanded() {
        assert_eq!(
            render_vendor_data(
                "{issuer}/{source_vendor_data}",
                Some("crm-{issuer}-{source_session_id}"),
                "s1",
                "fintech"
            ),
            Some("fintech/crm-{issuer}-{source_session_id}".into())
        );
        assert_eq!(
            render_vendor_data("{source_session_id}|{issuer}", None, "{issuer}", "a{b"),
            Some("{issuer}|a{b".into())
        );
        assert_eq!(
            render_vendor_data("{x}{issuer}", None, "s1", "fintech"),
            Some("{x}fintech".into())
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
