//! `--fixture FILE`: applications (and optionally sessions) to start with instead of the two defaults. The
//! format is documented in the [module docs](super); this module parses it strictly (unknown fields are an
//! error naming the field, because a fixture is written by hand) and loads it into a [`State`].

use std::path::Path;

use serde::Deserialize;

use super::model::{ApplicationInfo, WorkflowIds};
use super::state::{NewApplication, NewSession, Session, State, is_uuid};
use crate::didit::wire::{SessionKind, SessionStatus};

/// A fixture file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fixture {
    /// The applications to create.
    pub applications: Vec<FixtureApplication>,
    /// Sessions to create in them.
    #[serde(default)]
    pub sessions: Vec<FixtureSession>,
}

/// One application of a fixture.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixtureApplication {
    /// Human name.
    pub name: String,
    /// Its uuid.
    pub application_id: String,
    /// Its API key.
    pub api_key: crate::secret::Secret,
    /// Its default workflows.
    pub workflows: WorkflowIds,
    /// The key's privileges (default read and write sessions).
    #[serde(default)]
    pub privileges: Option<Vec<String>>,
}

/// One session of a fixture.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixtureSession {
    /// The owning application (one of the fixture's).
    pub application_id: String,
    /// `user` or `business`.
    pub session_kind: String,
    /// Any Didit status, either casing.
    pub status: String,
    /// The application's id for the entity.
    #[serde(default)]
    pub vendor_data: Option<String>,
    /// A fixed uuid (default: a fresh one).
    #[serde(default)]
    pub session_id: Option<String>,
}

/// Why a fixture could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    /// The file could not be read.
    #[error("cannot read fixture {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a valid fixture (the message names the field).
    #[error("invalid fixture {path}: {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

impl From<FixtureError> for std::io::Error {
    fn from(e: FixtureError) -> Self {
        match e {
            FixtureError::Read { source, .. } => source,
            invalid => std::io::Error::new(std::io::ErrorKind::InvalidData, invalid.to_string()),
        }
    }
}

impl Fixture {
    /// Parses JSON, or TOML when the file name ends in `.toml`.
    pub fn parse(text: &str, toml_format: bool) -> Result<Fixture, String> {
        if toml_format {
            toml::from_str(text).map_err(|e| e.to_string())
        } else {
            serde_json::from_str(text).map_err(|e| e.to_string())
        }
    }

    /// Reads and parses a file.
    pub fn read(path: &Path) -> Result<Fixture, FixtureError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| FixtureError::Read {
            path: shown.clone(),
            source,
        })?;
        let toml_format = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("toml"));
        Fixture::parse(&text, toml_format).map_err(|reason| FixtureError::Invalid {
            path: shown,
            reason,
        })
    }

    /// Creates the applications and sessions in `state`; answers the applications and the sessions created.
    pub fn load(&self, state: &mut State) -> Result<(Vec<ApplicationInfo>, Vec<Session>), String> {
        if self.applications.is_empty() {
            return Err("applications: at least one application is required".to_string());
        }
        let mut apps = Vec::with_capacity(self.applications.len());
        for (i, app) in self.applications.iter().enumerate() {
            if !is_uuid(&app.application_id) {
                return Err(format!(
                    "applications[{i}].application_id: `{}` is not a uuid",
                    app.application_id
                ));
            }
            let info = state
                .create_application(NewApplication {
                    name: app.name.clone(),
                    application_id: Some(app.application_id.clone()),
                    api_key: Some(app.api_key.expose().to_string()),
                    workflows: Some(app.workflows.clone()),
                    privileges: app.privileges.clone(),
                })
                .map_err(|e| format!("applications[{i}]: {e}"))?;
            apps.push(info);
        }
        let mut sessions = Vec::with_capacity(self.sessions.len());
        for (i, s) in self.sessions.iter().enumerate() {
            if !apps.iter().any(|a| a.application_id == s.application_id) {
                return Err(format!(
                    "sessions[{i}].application_id: `{}` is not one of the fixture's applications",
                    s.application_id
                ));
            }
            let kind = SessionKind::parse(&s.session_kind).ok_or_else(|| {
                format!(
                    "sessions[{i}].session_kind: `{}` is not user or business",
                    s.session_kind
                )
            })?;
            let status = SessionStatus::parse(&s.status).ok_or_else(|| {
                format!(
                    "sessions[{i}].status: `{}` is not a Didit session status",
                    s.status
                )
            })?;
            let session = state
                .insert_session(NewSession {
                    application_id: s.application_id.clone(),
                    kind,
                    status,
                    workflow_id: None,
                    vendor_data: s.vendor_data.clone(),
                    metadata: None,
                    callback: None,
                    session_id: s.session_id.clone(),
                    features: None,
                    generate: status != SessionStatus::NotStarted,
                    shared_from: None,
                })
                .map_err(|e| format!("sessions[{i}]: {e}"))?;
            sessions.push(session);
        }
        Ok((apps, sessions))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const APP_A: &str = "0b5b3a4e-1111-4c1a-9a59-8d1f9d0c0001";
    const APP_B: &str = "0b5b3a4e-2222-4c1a-9a59-8d1f9d0c0002";

    fn text(extra_app_field: &str) -> String {
        format!(
            r#"{{"applications": [
                {{"name": "fintech-a", "application_id": "{APP_A}", "api_key": "key-a",
                  "workflows": {{"user": "0b5b3a4e-1111-4c1a-9a59-8d1f9d0c0011", "business": "0b5b3a4e-1111-4c1a-9a59-8d1f9d0c0012"}}{extra_app_field}}},
                {{"name": "bank-b", "application_id": "{APP_B}", "api_key": "key-b",
                  "workflows": {{"user": "0b5b3a4e-2222-4c1a-9a59-8d1f9d0c0021", "business": "0b5b3a4e-2222-4c1a-9a59-8d1f9d0c0022"}},
                  "privileges": ["read:sessions"]}}],
              "sessions": [{{"application_id": "{APP_A}", "session_kind": "business", "status": "approved",
                             "vendor_data": "company-1"}}]}}"#
        )
    }

    #[test]
    fn loads_the_documented_shape() {
        let fixture = Fixture::parse(&text(""), false).unwrap();
        let mut state = State::new("http://x".into());
        let (apps, sessions) = fixture.load(&mut state).unwrap();
        assert_eq!(apps.len(), 2);
        assert_eq!(apps[1].privileges, ["read:sessions"]);
        assert_eq!(sessions[0].status_str(), "APPROVED");
        assert!(state.authenticate(Some("key-a")).is_ok());
    }

    #[test]
    fn unknown_fields_are_named() {
        let err = Fixture::parse(&text(r#", "privilege": []"#), false).unwrap_err();
        assert!(err.contains("privilege"), "{err}");
    }

    #[test]
    fn reads_toml_too() {
        let toml_text = format!(
            r#"[[applications]]
name = "fintech-a"
application_id = "{APP_A}"
api_key = "key-a"
workflows = {{ user = "0b5b3a4e-1111-4c1a-9a59-8d1f9d0c0011", business = "0b5b3a4e-1111-4c1a-9a59-8d1f9d0c0012" }}
"#
        );
        let fixture = Fixture::parse(&toml_text, true).unwrap();
        assert_eq!(fixture.applications[0].name, "fintech-a");
    }
}
