//! Realistic, fake decision payloads: the feature arrays a KYC or KYB session carries once the person or company
//! went through the flow. Deterministic (seeded by the session number) so tests can compare a clone with its
//! source; every item has a `node_id` and a `status`; names carry Unicode and numbers are floats such as `45.0`,
//! because those are what break webhook signatures and careless parsers.
//!
//! All data is invented: names from a fixed list, documentation IP ranges (RFC 5737), `example.com` addresses.
//!
//! Two array names have two spellings in Didit's own material: the decision reference says `poa_verifications`
//! and `questionnaire_responses`, the product page's import example says `proof_of_address` and `questionnaires`.
//! Both spellings are served, with the same content, so a client written against either finds its array.

use serde_json::{Map, Value, json};

use crate::didit::wire::{SessionKind, SessionStatus};

/// The feature reports of one session: the `features` list and every feature array by name.
#[derive(Debug, Clone, PartialEq)]
pub struct Features {
    /// The `features` list (`ID_VERIFICATION`, `REGISTRY`, …).
    pub features: Vec<String>,
    /// Feature arrays by their JSON name, aliases included.
    pub arrays: Map<String, Value>,
}

/// The array names a decision of `kind` always shows (as `null` when the feature has not run).
pub fn array_names(kind: SessionKind) -> &'static [&'static str] {
    match kind {
        SessionKind::User => &[
            "id_verifications",
            "nfc_verifications",
            "liveness_checks",
            "face_matches",
            "poa_verifications",
            "proof_of_address",
            "database_validations",
            "phone_verifications",
            "email_verifications",
            "aml_screenings",
            "ip_analyses",
        ],
        SessionKind::Business => &[
            "registry_checks",
            "key_people_checks",
            "document_verifications",
            "aml_screenings",
            "phone_verifications",
            "email_verifications",
            "questionnaire_responses",
            "questionnaires",
            "ip_analyses",
        ],
    }
}

const PEOPLE: [(&str, &str, &str); 8] = [
    ("José", "Müller 日本", "ESP"),
    ("Zoë", "Ångström", "SWE"),
    ("Łukasz", "Wiśniewski", "POL"),
    ("Søren", "Østergaard", "DNK"),
    ("Chloé", "Dubois-Lefèvre", "FRA"),
    ("Aiko", "山田", "JPN"),
    ("Nuño", "García-Peña", "MEX"),
    ("Ævar", "Þórsson", "ISL"),
];

const COMPANIES: [(&str, &str); 4] = [
    ("Ñandú Pagos S.L.", "ESP"),
    ("Grünwald Zahlungsdienste GmbH", "DEU"),
    ("Øresund Fintech ApS", "DNK"),
    ("Société Générale de Test SAS", "FRA"),
];

/// The status every feature of a session in `status` shows: the session's verdict spread over its checks.
fn feature_status(status: SessionStatus, kind: SessionKind) -> &'static str {
    let st = match status {
        SessionStatus::Approved | SessionStatus::KycExpired => SessionStatus::Approved,
        SessionStatus::Declined => SessionStatus::Declined,
        SessionStatus::InReview => SessionStatus::InReview,
        _ => {
            return if kind == SessionKind::User {
                "Not Finished"
            } else {
                "NOT_FINISHED"
            };
        }
    };
    st.for_kind(kind)
}

fn approved(kind: SessionKind) -> &'static str {
    SessionStatus::Approved.for_kind(kind)
}

fn node(name: &str, n: i64) -> String {
    format!("node-{name}-{:04}", n % 10_000)
}

/// The payload of session number `n` of `kind` in `status`.
pub fn generate(kind: SessionKind, status: SessionStatus, n: i64) -> Features {
    match kind {
        SessionKind::User => kyc(status, n),
        SessionKind::Business => kyb(status, n),
    }
}

fn person(n: i64) -> (&'static str, &'static str, &'static str, f64, String) {
    let (first, last, country) = PEOPLE[(n.unsigned_abs() % PEOPLE.len() as u64) as usize];
    let age = 18 + (n.unsigned_abs() * 7) % 60;
    let birth_year = 2026 - age as i64;
    let dob = format!(
        "{birth_year}-{:02}-{:02}",
        1 + n.unsigned_abs() % 12,
        1 + n.unsigned_abs() % 28
    );
    (first, last, country, age as f64, dob)
}

fn kyc(status: SessionStatus, n: i64) -> Features {
    let kind = SessionKind::User;
    let verdict = feature_status(status, kind);
    // A declined session declines on the face match, a session in review is held by the AML hit; the other
    // checks passed.
    let ok = if status.is_finished() || status == SessionStatus::KycExpired {
        approved(kind)
    } else {
        verdict
    };
    let face_status = if status == SessionStatus::Declined {
        verdict
    } else {
        ok
    };
    let aml_status = if status == SessionStatus::InReview {
        verdict
    } else {
        ok
    };
    let (first, last, country, age, dob) = person(n);
    let doc_number = format!("X{:08}", (n.unsigned_abs() * 7919) % 100_000_000);
    let score = if status == SessionStatus::Declined {
        41.5
    } else {
        91.5
    };
    let ip_last = 1 + n.unsigned_abs() % 254;
    let poa = json!([{
        "node_id": node("poa", n),
        "status": ok,
        "document_type": "Utility Bill",
        "issuer": "Compañía Eléctrica de Prueba",
        "issue_date": "2026-09-01",
        "poa_address": format!("Calle de la Prueba {}, 28013 Madrid", 1 + n.unsigned_abs() % 200),
        "poa_formatted_address": format!("Calle de la Prueba {}, 28013 Madrid, España", 1 + n.unsigned_abs() % 200),
        "name_on_document": format!("{first} {last}"),
        "warnings": []
    }]);
    let mut arrays = Map::new();
    arrays.insert(
        "id_verifications".into(),
        json!([{
            "node_id": node("id-verification", n),
            "status": ok,
            "document_type": "Identity Card",
            "document_subtype": null,
            "document_number": doc_number,
            "personal_number": format!("{:09}", (n.unsigned_abs() * 104_729) % 1_000_000_000),
            "first_name": first,
            "last_name": last,
            "full_name": format!("{first} {last}"),
            "date_of_birth": dob,
            "age": age,
            "gender": if n % 2 == 0 { "F" } else { "M" },
            "nationality": country,
            "issuing_state": country,
            "issuing_state_name": country,
            "date_of_issue": "2022-03-14",
            "expiration_date": "2032-03-13",
            "place_of_birth": "Sevilla",
            "address": "Calle de la Prueba 1, Madrid",
            "portrait_image": null,
            "front_image": null,
            "back_image": null,
            "warnings": []
        }]),
    );
    arrays.insert("nfc_verifications".into(), Value::Null);
    arrays.insert(
        "liveness_checks".into(),
        json!([{
            "node_id": node("liveness", n),
            "status": ok,
            "method": "PASSIVE",
            "score": 97.25,
            "age_estimation": age + 1.5,
            "reference_image": null,
            "video_url": null,
            "warnings": []
        }]),
    );
    arrays.insert(
        "face_matches".into(),
        json!([{
            "node_id": node("face-match", n),
            "status": face_status,
            "score": score,
            "source_image": null,
            "target_image": null,
            "warnings": if status == SessionStatus::Declined { json!(["LOW_FACE_MATCH_SIMILARITY"]) } else { json!([]) }
        }]),
    );
    arrays.insert("poa_verifications".into(), poa.clone());
    arrays.insert("proof_of_address".into(), poa);
    arrays.insert(
        "database_validations".into(),
        json!([{
            "node_id": node("database-validation", n),
            "status": ok,
            "match_type": "full_match",
            "issuing_state": country,
            "validation_type": "two_by_two",
            "screened_data": {"first_name": first, "last_name": last, "date_of_birth": dob}
        }]),
    );
    arrays.insert(
        "phone_verifications".into(),
        json!([{
            "node_id": node("phone", n),
            "status": ok,
            "phone_number_prefix": "+34",
            "phone_number": format!("6{:08}", n.unsigned_abs() % 100_000_000),
            "full_number": format!("+346{:08}", n.unsigned_abs() % 100_000_000),
            "country_code": "ES",
            "carrier": {"name": "Operadora Ficticia", "type": "mobile"},
            "is_disposable": false,
            "is_virtual": false
        }]),
    );
    arrays.insert(
        "email_verifications".into(),
        json!([{
            "node_id": node("email", n),
            "status": ok,
            "email": format!("person{n}@example.com"),
            "is_breached": false,
            "is_disposable": false,
            "is_undeliverable": false
        }]),
    );
    arrays.insert(
        "aml_screenings".into(),
        json!([{
            "node_id": node("aml", n),
            "status": aml_status,
            "total_hits": if status == SessionStatus::InReview { 1 } else { 0 },
            "score": if status == SessionStatus::InReview { 62.5 } else { 0.0 },
            "screened_data": {"full_name": format!("{first} {last}"), "date_of_birth": dob, "nationality": country},
            "hits": if status == SessionStatus::InReview {
                json!([{"id": format!("hit-{n}"), "caption": format!("{first} {last}"), "match_score": 62.5,
                        "datasets": ["PEP"], "review_status": "Pending"}])
            } else { json!([]) }
        }]),
    );
    arrays.insert(
        "ip_analyses".into(),
        json!([{
            "node_id": node("ip-analysis", n),
            "status": ok,
            "ip_address": format!("203.0.113.{ip_last}"),
            "ip_country": "Spain",
            "ip_country_code": "ES",
            "ip_city": "Málaga",
            "is_vpn_or_tor": false,
            "latitude": 36.7213,
            "longitude": -4.4214,
            "device_brand": "Apple",
            "browser_family": "Mobile Safari"
        }]),
    );
    Features {
        features: [
            "ID_VERIFICATION",
            "LIVENESS",
            "FACE_MATCH",
            "POA",
            "DATABASE_VALIDATION",
            "PHONE",
            "EMAIL",
            "AML",
            "IP_ANALYSIS",
        ]
        .map(String::from)
        .to_vec(),
        arrays,
    }
}

fn kyb(status: SessionStatus, n: i64) -> Features {
    let kind = SessionKind::Business;
    let verdict = feature_status(status, kind);
    let ok = if status.is_finished() || status == SessionStatus::KycExpired {
        approved(kind)
    } else {
        verdict
    };
    let registry_status = if status == SessionStatus::Declined {
        verdict
    } else {
        ok
    };
    let aml_status = if status == SessionStatus::InReview {
        verdict
    } else {
        ok
    };
    let (company, country) = COMPANIES[(n.unsigned_abs() % COMPANIES.len() as u64) as usize];
    let registration = format!("B{:08}", (n.unsigned_abs() * 7919) % 100_000_000);
    let people: Vec<Value> = (0..2)
        .map(|i| {
            let (first, last, nationality, age, dob) = person(n + i);
            let (role, ownership) = if i == 0 { ("UBO", 51.0) } else { ("DIRECTOR", 25.5) };
            json!({
                "node_id": node(&format!("key-person-{i}"), n),
                "status": ok,
                "role": role,
                "ownership_percentage": ownership,
                "first_name": first,
                "last_name": last,
                "full_name": format!("{first} {last}"),
                "date_of_birth": dob,
                "nationality": nationality,
                "is_ubo": i == 0,
                "id_verification": {
                    "status": approved(SessionKind::User),
                    "document_type": "Passport",
                    "document_number": format!("P{:08}", ((n + i).unsigned_abs() * 3571) % 100_000_000),
                    "age": age
                },
                "liveness_check": {"status": approved(SessionKind::User), "score": 96.5},
                "face_match": {"status": approved(SessionKind::User), "score": 92.0},
                "aml_screening": {"status": approved(SessionKind::User), "total_hits": 0, "score": 0.0}
            })
        })
        .collect();
    let questionnaire = json!([{
        "node_id": node("questionnaire", n),
        "status": ok,
        "questionnaire_id": "kyb-onboarding-v2",
        "title": "Cuestionario de actividad",
        "answers": [
            {"question": "Expected monthly volume (EUR)", "answer": 250000.0},
            {"question": "Países de operación", "answer": ["ESP", "PRT"]},
            {"question": "Handles crypto-assets?", "answer": false}
        ]
    }]);
    let mut arrays = Map::new();
    arrays.insert(
        "registry_checks".into(),
        json!([{
            "node_id": node("registry", n),
            "status": registry_status,
            "company_name": company,
            "registration_number": registration,
            "country": country,
            "legal_form": "Limited company",
            "incorporation_date": "2019-06-03",
            "registered_address": "Avenida de la Prueba 42, 28046 Madrid",
            "company_status": "active",
            "share_capital": 3000.0,
            "officers_count": 2
        }]),
    );
    arrays.insert("key_people_checks".into(), Value::Array(people));
    arrays.insert(
        "document_verifications".into(),
        json!([
            {"node_id": node("document-0", n), "status": ok, "document_type": "Certificate of Incorporation",
             "issuer": "Registro Mercantil", "extracted_company_name": company, "pages": 3},
            {"node_id": node("document-1", n), "status": ok, "document_type": "Shareholder Register",
             "issuer": company, "extracted_company_name": company, "pages": 1}
        ]),
    );
    arrays.insert(
        "aml_screenings".into(),
        json!([{
            "node_id": node("aml", n),
            "status": aml_status,
            "entity_type": "company",
            "total_hits": if status == SessionStatus::InReview { 1 } else { 0 },
            "score": if status == SessionStatus::InReview { 55.0 } else { 0.0 },
            "screened_data": {"company_name": company, "country": country}
        }]),
    );
    arrays.insert(
        "phone_verifications".into(),
        json!([{
            "node_id": node("phone", n),
            "status": ok,
            "full_number": format!("+349{:08}", n.unsigned_abs() % 100_000_000),
            "country_code": "ES"
        }]),
    );
    arrays.insert(
        "email_verifications".into(),
        json!([{
            "node_id": node("email", n),
            "status": ok,
            "email": format!("compliance{n}@example.com"),
            "is_disposable": false
        }]),
    );
    arrays.insert("questionnaire_responses".into(), questionnaire.clone());
    arrays.insert("questionnaires".into(), questionnaire);
    arrays.insert("ip_analyses".into(), Value::Null);
    Features {
        features: [
            "REGISTRY",
            "KEY_PEOPLE",
            "DOCUMENTS",
            "AML",
            "PHONE",
            "EMAIL",
            "QUESTIONNAIRE",
        ]
        .map(String::from)
        .to_vec(),
        arrays,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_item_has_node_id_and_status_and_every_named_array_is_present() {
        for kind in [SessionKind::User, SessionKind::Business] {
            for status in SessionStatus::all() {
                let f = generate(kind, *status, 7);
                for name in array_names(kind) {
                    let array = f
                        .arrays
                        .get(*name)
                        .unwrap_or_else(|| panic!("{name} missing"));
                    for item in array.as_array().into_iter().flatten() {
                        assert!(item.get("node_id").is_some_and(|v| v.is_string()), "{name}");
                        assert!(item.get("status").is_some_and(|v| v.is_string()), "{name}");
                    }
                }
            }
        }
    }

    #[test]
    fn deterministic_and_in_the_kind_casing() {
        assert_eq!(
            generate(SessionKind::User, SessionStatus::Approved, 3),
            generate(SessionKind::User, SessionStatus::Approved, 3)
        );
        let kyb = generate(SessionKind::Business, SessionStatus::InReview, 3);
        assert_eq!(kyb.arrays["aml_screenings"][0]["status"], "IN_REVIEW");
        let kyc = generate(SessionKind::User, SessionStatus::Declined, 3);
        assert_eq!(kyc.arrays["face_matches"][0]["status"], "Declined");
        assert!(kyc.arrays["id_verifications"][0]["age"].is_f64());
    }
}
