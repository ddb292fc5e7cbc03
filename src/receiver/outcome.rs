//! Pure pieces of the receiver's decisions: the `vendor_data` template, the workflow for a kind, the mapping of a
//! dead-letter reason to the `import.result` outcome the receiver's backend sees, and which listed session (if
//! any) an import whose answer was lost created.

use crate::didit::wire::{SessionKind, SessionSummary};
use crate::envelope::ImportOutcome;

/// Whether the template makes `vendor_data` unique per source session (it names `{source_session_id}`): then a
/// session listed under it can only be this source's import, even when the list does not say where it came from.
pub fn vendor_data_names_the_source(template: &str) -> bool {
    template.contains("{source_session_id}")
}

/// What the list lookup says about an import whose answer was lost.
#[derive(Debug, Clone, PartialEq)]
pub enum Located {
    /// This session is the import.
    Found(SessionSummary),
    /// The list shows no import of the source: it did not happen.
    Absent,
    /// The list cannot tell (why, for the log and the `reason`): nothing is guessed.
    Unknown(String),
}

/// Picks the session an import of `source_session_id` created among `rows` (the lookup's listing; `complete`
/// when every page was read). When the list reports `shared_from_session`, exactly one row naming the source is
/// the import and none means it did not happen; two mean it was imported twice already, and nothing is guessed.
/// When the list does not report it, a single row is the import only if `vendor_unique` (the rows were filtered by
/// a `vendor_data` that names the source session); otherwise the list cannot tell an import from the entity's own
/// sessions.
pub fn locate_import(
    rows: &[SessionSummary],
    complete: bool,
    source_session_id: &str,
    vendor_unique: bool,
) -> Located {
    let reports_provenance = rows.iter().any(|r| r.shared_from_session.is_some());
    if reports_provenance {
        let matches: Vec<&SessionSummary> = rows
            .iter()
            .filter(|r| {
                r.shared_from_session
                    .as_ref()
                    .is_some_and(|from| from.as_deref() == Some(source_session_id))
            })
            .collect();
        return match (matches.as_slice(), complete) {
            ([one], _) => Located::Found((*one).clone()),
            ([], true) => Located::Absent,
            ([], false) => Located::Unknown(format!(
                "the lookup read {} sessions without reaching the end of the list",
                rows.len()
            )),
            (many, _) => Located::Unknown(format!(
                "{} sessions in this application were imported from source session {source_session_id}",
                many.len()
            )),
        };
    }
    match (rows, complete) {
        ([], true) => Located::Absent,
        ([one], true) if vendor_unique => Located::Found(one.clone()),
        _ => Located::Unknown(format!(
            "the list does not say which of its {} sessions was shared from source session {source_session_id}, \
             and receiver.vendor_data does not name the source session",
            rows.len()
        )),
    }
}

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

    fn row(id: &str, from: Option<Option<&str>>) -> SessionSummary {
        SessionSummary {
            session_id: id.into(),
            status: "In Review".into(),
            shared_from_session: from.map(|f| f.map(str::to_string)),
            ..Default::default()
        }
    }

    #[test]
    fn the_import_is_the_row_shared_from_the_source() {
        let rows = [row("own", Some(None)), row("imp", Some(Some("src")))];
        assert!(
            matches!(locate_import(&rows, true, "src", false), Located::Found(r) if r.session_id == "imp")
        );
        // Provenance reported, no match: it did not happen — unless the list was cut short.
        let own = [row("own", Some(None))];
        assert_eq!(locate_import(&own, true, "src", false), Located::Absent);
        assert!(matches!(
            locate_import(&own, false, "src", false),
            Located::Unknown(_)
        ));
        // Imported twice already: not guessed.
        let twice = [row("a", Some(Some("src"))), row("b", Some(Some("src")))];
        assert!(matches!(
            locate_import(&twice, true, "src", true),
            Located::Unknown(_)
        ));
    }

    #[test]
    fn without_provenance_only_a_vendor_data_naming_the_source_decides() {
        let one = [row("x", None)];
        assert!(matches!(
            locate_import(&one, true, "src", true),
            Located::Found(_)
        ));
        assert!(matches!(
            locate_import(&one, true, "src", false),
            Located::Unknown(_)
        ));
        let two = [row("x", None), row("y", None)];
        assert!(matches!(
            locate_import(&two, true, "src", true),
            Located::Unknown(_)
        ));
        assert_eq!(locate_import(&[], true, "src", false), Located::Absent);
        assert!(vendor_data_names_the_source("{issuer}:{source_session_id}"));
        assert!(!vendor_data_names_the_source("{source_vendor_data}"));
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
